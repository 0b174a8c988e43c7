"""The loss library against direct reference computations, invariants, gradients and chunking."""

import contextlib
import math
import signal

import pytest
import torch
import torch.nn.functional as F
from tiny import random_logits

from hf_kd.losses import build_loss, parse_recipe

V = 13


@pytest.fixture
def batch():
    return random_logits(seed=0, length=6, vocab_size=V)


def _kl(p_logits, q_logits):
    p = F.softmax(p_logits, -1)
    return (p * (F.log_softmax(p_logits, -1) - F.log_softmax(q_logits, -1))).sum(-1)


def _masked_mean(per_token, labels):
    mask = labels != -100
    return per_token[mask].sum() / mask.sum()


def _akl_weight_by_sort(p, q, mu):
    """AKL's head weight as defined: sort p descending (stable: ties by lower index first), the head is the longest
    prefix whose cumulative mass is <= mu and at least the top-1; g_head / sum of |p - q|."""
    p_sorted, idx = p.sort(dim=-1, descending=True, stable=True)
    err = (p_sorted - q.gather(-1, idx)).abs()
    head = p_sorted.cumsum(-1) <= mu
    head[..., 0] = True
    return (err * head).sum(-1) / err.sum(-1).clamp_min(torch.finfo(p.dtype).tiny)


def _reference(name, s, t, labels, **kw):
    temp = kw.get("temperature", 1.0)
    s_t, t_t = s / temp, t / temp
    if name == "fkl":
        per = _kl(t_t, s_t)
    elif name == "rkl":
        per = _kl(s_t, t_t)
    elif name in ("sfkl", "srkl"):
        a = kw.get("alpha", 0.1)
        p, q = F.softmax(t_t, -1), F.softmax(s_t, -1)
        if name == "sfkl":
            per = (p * (p.log() - (a * p + (1 - a) * q).log())).sum(-1)
        else:
            per = (q * (q.log() - (a * q + (1 - a) * p).log())).sum(-1)
    elif name == "ce":
        per = -F.log_softmax(s, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    elif name == "akl":
        w = _akl_weight_by_sort(F.softmax(t_t, -1), F.softmax(s_t, -1).detach(), kw.get("mu", 0.5))
        per = w * _kl(t_t, s_t) + (1 - w) * _kl(s_t, t_t)
    elif name == "bild":
        k, temp = kw.get("top_k", 8), kw.get("temperature", 3.0)
        per = 0
        for leader in ("t", "s"):
            idx = (t if leader == "t" else s).topk(k, -1).indices
            zs, zt = s.gather(-1, idx) / temp, t.gather(-1, idx) / temp
            pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
            ds = torch.stack([zs[..., i] - zs[..., j] for i, j in pairs], -1)
            dt = torch.stack([zt[..., i] - zt[..., j] for i, j in pairs], -1)
            per = per + _kl(dt, ds)
    else:
        raise KeyError(name)
    return _masked_mean(per, labels)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("fkl", {}),
        ("fkl", {"temperature": 2.0}),
        ("rkl", {"temperature": 0.7}),
        ("sfkl", {}),
        ("srkl", {"alpha": 0.3, "temperature": 1.5}),
        ("akl", {}),
        ("akl", {"mu": 0.8, "temperature": 2.0}),
        ("bild", {}),
        ("bild", {"top_k": 4, "temperature": 1.0}),
        ("ce", {}),
    ],
)
def test_exact_values(batch, name, kw):
    s, t, labels = batch
    got = build_loss(name, **kw)(s, t, labels)
    torch.testing.assert_close(got, _reference(name, s, t, labels, **kw), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_jsd_matches_trl(batch, beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    s, t, labels = batch
    ours = build_loss("jsd", beta=beta, temperature=temperature)(s, t, labels)
    trl = GKDTrainer.generalized_jsd_loss(s, t, labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours, trl, rtol=1e-10, atol=1e-12)


def test_akl_weights_sum_to_one_and_interpolate(batch):
    from hf_kd.losses.akl import akl_head_weight

    s, t, labels = batch
    p, q = F.softmax(t, -1).reshape(-1, V), F.softmax(s, -1).reshape(-1, V)
    w = akl_head_weight(p, q, 0.5)
    assert ((w >= 0) & (w <= 1)).all()
    akl, fkl, rkl = (build_loss(n)(s, t, labels) for n in ("akl", "fkl", "rkl"))
    assert min(fkl, rkl) - 1e-12 <= akl <= max(fkl, rkl) + 1e-12


def _akl_teachers(dtype):
    """(name, p, mu) rows of every shape the head search meets: peaked, flat, uniform with exact ties, ties at
    random places, random temperatures, mu exactly on a cumulative boundary, tiny vocabularies. Where mu falls on
    a boundary the probabilities are dyadic, so that any order of summation gives the same cumulative sums."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3000, generator=g, dtype=torch.float64)
    ties = torch.tensor([2.0**-8] * 128 + [2.0**-9] * 128 + [2.0**-10] * 256, dtype=torch.float64)  # sum 1
    ties = ties[torch.randperm(512, generator=g)]
    cases = [
        (
            "peaked",
            F.softmax(logits * torch.tensor([[5.0], [12.0], [40.0], [200.0], [1000.0]], dtype=torch.float64), -1),
            0.5,
        ),
        (
            "flat",
            F.softmax(logits * torch.tensor([[1e-6], [1e-4], [0.05], [0.6], [2.0]], dtype=torch.float64), -1),
            0.5,
        ),
        ("uniform, boundary", torch.full((2, 256), 2.0**-8, dtype=torch.float64), 0.5),
        ("uniform, off boundary", torch.full((2, 300), 1 / 300, dtype=torch.float64), (150.5) / 300),
        (
            "temperatures",
            F.softmax(logits / torch.empty(5, 1, dtype=torch.float64).uniform_(0.05, 20, generator=g), -1),
            0.9,
        ),
    ]
    for mu in (0.25, 0.5, 0.625):
        cases.append((f"dyadic ties, boundary {mu}", ties.unsqueeze(0), mu))
    peaked_ties = torch.tensor([2.0**-2] + [2.0**-3] * 3 + [2.0**-11] * 768 + [0.0] * 252, dtype=torch.float64)
    cases.append(("peaked, ties across the head's end", peaked_ties[torch.randperm(1024, generator=g)][None], 0.5))
    for vocab in (1, 2, 3, 5):
        cases.append(
            (f"vocabulary {vocab}", F.softmax(torch.randn(6, vocab, generator=g, dtype=torch.float64) * 3, -1), 0.5)
        )
    cases.append(
        (
            "top-1 above mu",
            F.softmax(torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 5.0, 5.0, 5.0]], dtype=torch.float64), -1),
            0.1,
        )
    )
    return [(name, p.to(dtype), mu) for name, p, mu in cases]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_akl_head_weight_equals_the_sort_based_definition(dtype):
    """The radix select gives the sorted definition's head on every teacher shape, ties in index order."""
    from hf_kd.losses.akl import akl_head_weight

    g = torch.Generator().manual_seed(2)
    for name, p, mu in _akl_teachers(dtype):
        assert p.sum(-1).sub(1).abs().max() < 1e-5, name
        q = F.softmax(torch.randn(p.shape, generator=g, dtype=torch.float64) * 2, -1).to(dtype)
        torch.testing.assert_close(akl_head_weight(p, q, mu), _akl_weight_by_sort(p, q, mu), msg=name)


def test_akl_head_search_never_sorts(monkeypatch):
    """On a flat teacher the head holds most of the vocabulary: finding it must stay O(V), without a sort."""
    from hf_kd.losses.akl import akl_head_weight

    g = torch.Generator().manual_seed(3)
    p, q = (F.softmax(torch.randn(4, 5000, generator=g) * scale, -1) for scale in (0.1, 1.0))
    expected = _akl_weight_by_sort(p, q, 0.5)

    def refuse(*args, **kwargs):
        raise AssertionError("the head search sorted (or took a top-k of) the vocabulary")

    for owner in (torch, torch.Tensor):
        for name in ("sort", "argsort", "topk", "kthvalue", "msort"):
            if hasattr(owner, name):
                monkeypatch.setattr(owner, name, refuse)
    got = akl_head_weight(p, q, 0.5)
    monkeypatch.undo()
    torch.testing.assert_close(got, expected)


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise TimeoutError in the block after ``seconds`` (a hang fails the test instead of stalling the suite)."""

    def stop(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("vocab", [V, 300])  # inside and past the first top-64 prefix of the head search
def test_akl_on_non_finite_rows_terminates_and_gives_nan(vocab):
    from hf_kd.losses.akl import AdaptiveKL, akl_head_weight
    from hf_kd.losses.recipe import DistillationLoss

    s, t, labels = random_logits(seed=2, length=6, vocab_size=vocab)
    bad = t.clone()
    bad[0, 3] = float("nan")
    bad[1, 2, 5] = float("inf")
    p, q = F.softmax(bad, -1).reshape(-1, vocab), F.softmax(s, -1).reshape(-1, vocab)
    with time_limit(20):
        weights = akl_head_weight(p, q, 0.5)
        value = build_loss("akl")(s, bad, labels)
        at_zero_temperature = DistillationLoss([AdaptiveKL(temperature=0.0)], [1.0])(s, t, labels)
    rows = torch.tensor([3, 6 + 2])
    assert weights[rows].isnan().all()
    others = torch.ones(len(weights), dtype=torch.bool).index_fill_(0, rows, False)
    torch.testing.assert_close(weights[others], akl_head_weight(F.softmax(t, -1).reshape(-1, vocab), q, 0.5)[others])
    assert value.isnan() and at_zero_temperature.isnan()


def test_gradcheck_of_a_weighted_sum(batch):
    """Each term's gradient is checked by tests/losses/test_contract.py; a weighted sum of two is exact too."""
    s, t, labels = batch
    s = s[:, :4, :7].clone().requires_grad_(True)
    t, labels = t[:, :4, :7], labels[:, :4] % 7
    labels[0, 0] = -100
    fn = build_loss("0.3*ce+0.7*srkl", chunk_size=3)
    assert torch.autograd.gradcheck(lambda x: fn(x, t, labels), (s,))


def test_akl_gradient_treats_weights_as_constants(batch):
    """AKL's weights are detached (official code): its gradient is w * dFKL + (1 - w) * dRKL."""
    from hf_kd.losses.akl import akl_head_weight

    s, t, labels = batch
    s = s.clone().requires_grad_(True)
    build_loss("akl", chunk_size=4)(s, t, labels).backward()
    w = akl_head_weight(F.softmax(t, -1).reshape(-1, V), F.softmax(s, -1).detach().reshape(-1, V), 0.5).view(2, 6)
    s2 = s.detach().clone().requires_grad_(True)
    ref = _masked_mean(w * _kl(t, s2) + (1 - w) * _kl(s2, t), labels)
    ref.backward()
    torch.testing.assert_close(s.grad, s2.grad)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("fkl", {"temperature": 2.0}),
        ("rkl", {"temperature": 0.7}),
        ("jsd", {"beta": 0.1}),
        ("jsd", {"beta": 0.9, "temperature": 2.0}),
        ("sfkl", {"alpha": 0.3}),
        ("srkl", {"alpha": 0.3, "temperature": 1.5}),
    ],
)
def test_closed_form_gradients_equal_autograd_reference(batch, name, kw):
    """The terms write their gradient by hand; it must equal autograd through the plain formula."""
    s, t, labels = batch
    x, y = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    build_loss(name, chunk_size=4, **kw)(x, t, labels).backward()
    if name == "jsd":
        from trl.experimental.gkd import GKDTrainer

        ref = GKDTrainer.generalized_jsd_loss(y, t, labels, beta=kw["beta"], temperature=kw.get("temperature", 1.0))
    else:
        ref = _reference(name, y, t, labels, **kw)
    ref.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_heads_of_a_weighted_sum_equal_full_logits(bias):
    """As tests/losses/test_contract.py checks each term: hidden states + nn.Linear heads against autograd on full
    logits, for a weighted sum of two terms."""
    recipe = "0.5*ce+0.5*jsd"
    g = torch.Generator().manual_seed(3)
    head_s, head_t = torch.nn.Linear(5, V, bias=bias).double(), torch.nn.Linear(7, V, bias=bias).double()
    hs, ht = torch.randn(2, 6, 5, generator=g, dtype=torch.float64), torch.randn(2, 6, 7, generator=g).double()
    labels = torch.randint(0, V, (2, 6), generator=g)
    labels[0, :2] = -100
    results = []
    for fused, chunk in ((False, None), (True, 1), (True, 4), (True, None)):
        head_s.zero_grad(set_to_none=True)
        x = hs.clone().requires_grad_(True)
        loss = build_loss(recipe, chunk_size=chunk)
        value = loss.forward_fused(x, head_s, ht, head_t, labels) if fused else loss(head_s(x), head_t(ht), labels)
        value.backward()
        results.append([value.detach(), x.grad, *(p.grad for p in head_s.parameters())])
    assert head_t.weight.grad is None or not head_t.weight.grad.any()  # teacher accessors are detached
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_loss_scaled_upstream_and_single_backward():
    """The fused loss hands its gradients over to autograd: a scaled loss (e.g. divided by the accumulation steps)
    scales every gradient, and a second backward through the same graph recomputes the same gradients."""
    g = torch.Generator().manual_seed(5)
    head_s, head_t = torch.nn.Linear(5, V).double(), torch.nn.Linear(7, V).double()
    hs, ht = torch.randn(1, 6, 5, generator=g, dtype=torch.float64), torch.randn(1, 6, 7, generator=g).double()
    labels = torch.randint(0, V, (1, 6), generator=g)
    grads = []
    for scale in (1.0, 0.25):
        head_s.zero_grad(set_to_none=True)
        x = hs.clone().requires_grad_(True)
        (scale * build_loss("jsd", chunk_size=2).forward_fused(x, head_s, ht, head_t, labels)).backward()
        grads.append([x.grad, head_s.weight.grad, head_s.bias.grad])
    for full, scaled in zip(*grads):
        torch.testing.assert_close(scaled, 0.25 * full, rtol=1e-12, atol=1e-14)
    head_s.zero_grad(set_to_none=True)
    x = hs.clone().requires_grad_(True)
    loss = build_loss("jsd", chunk_size=2).forward_fused(x, head_s, ht, head_t, labels)
    loss.backward(retain_graph=True)
    loss.backward()
    for twice, once in zip([x.grad, head_s.weight.grad, head_s.bias.grad], grads[0]):
        torch.testing.assert_close(twice, 2 * once, rtol=1e-12, atol=1e-14)


def test_fused_linear_head_bf16_and_masked_rows():
    """A bf16 head: logits are formed in bf16 and computed in fp32 as with full logits; masked rows get zero
    gradient and change nothing."""
    g = torch.Generator().manual_seed(4)
    head_s, head_t = torch.nn.Linear(8, 32, bias=False).bfloat16(), torch.nn.Linear(8, 32, bias=False).bfloat16()
    hs, ht = torch.randn(1, 9, 8, generator=g).bfloat16(), torch.randn(1, 9, 8, generator=g).bfloat16()
    labels = torch.randint(0, 32, (1, 9), generator=g)
    labels[0, 4:6] = -100
    results = []
    for fused in (False, True):
        head_s.zero_grad(set_to_none=True)
        x = hs.clone().requires_grad_(True)
        loss = build_loss("jsd", chunk_size=3)
        value = loss.forward_fused(x, head_s, ht, head_t, labels) if fused else loss(head_s(x), head_t(ht), labels)
        value.backward()
        assert value.dtype == torch.float32
        results.append((value.detach(), x.grad.float(), head_s.weight.grad.float()))
        assert not x.grad[0, 4:6].any()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)


def test_autocast_runs_heads_in_its_dtype_and_divergences_in_float32():
    """Under autocast (a bf16 trainer's ``accelerator.autocast()``) float32 heads are applied in bf16, as the
    model's own layers are, while the divergences stay float32: the value equals the float32 loss of the bf16
    logits, and given logits directly autocast changes nothing."""
    g = torch.Generator().manual_seed(5)
    head_s, head_t = torch.nn.Linear(16, 64, bias=False), torch.nn.Linear(12, 64, bias=False)
    hs, ht = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 12, generator=g) * 3
    labels = torch.randint(0, 64, (2, 7), generator=g)
    loss = build_loss("jsd+0.5*akl", chunk_size=4)
    x = hs.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss.forward_fused(x, head_s, ht, head_t, labels)
    fused.backward()
    assert fused.dtype == torch.float32 and head_s.weight.grad.dtype == torch.float32
    y = hs.clone().requires_grad_(True)
    w = head_s.weight.detach().clone().requires_grad_(True)
    student_logits = torch.nn.functional.linear(y.bfloat16(), w.bfloat16()).float()
    teacher_logits = torch.nn.functional.linear(ht.bfloat16(), head_t.weight.bfloat16()).float()
    reference = loss(student_logits, teacher_logits, labels)
    reference.backward()
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(head_s.weight.grad, w.grad, rtol=2e-2, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss(student_logits.detach(), teacher_logits, labels)
    assert torch.equal(under_autocast, loss(student_logits.detach(), teacher_logits, labels))


def test_chunked_equals_unchunked_for_a_weighted_sum(batch):
    """Each term is checked by tests/losses/test_contract.py; a weighted sum in float32 too."""
    recipe = "0.5*ce+0.5*fkl"
    s, t, labels = batch[0].float(), batch[1].float(), batch[2]
    values, grads = [], []
    for chunk in (1, 3, 1000):
        x = s.clone().requires_grad_(True)
        values.append(build_loss(recipe, chunk_size=chunk)(x, t, labels))
        values[-1].backward()
        grads.append(x.grad)
    for v, g in zip(values[1:], grads[1:]):
        torch.testing.assert_close(v, values[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g, grads[0], rtol=1e-6, atol=1e-6)


def test_masking_and_num_items_in_batch(batch):
    s, t, labels = batch
    loss = build_loss("fkl")
    changed = s.clone()
    changed[labels == -100] += 100.0  # masked rows must not matter
    torch.testing.assert_close(loss(changed, t, labels), loss(s, t, labels))
    n = int((labels != -100).sum())
    torch.testing.assert_close(loss(s, t, labels, num_items_in_batch=4 * n), loss(s, t, labels) / 4)


def test_bf16_inputs_computed_in_fp32(batch):
    s, t, labels = batch
    ref = build_loss("jsd")(s.bfloat16().double(), t.bfloat16().double(), labels)
    got = build_loss("jsd")(s.bfloat16(), t.bfloat16(), labels)
    assert got.dtype == torch.float32
    assert math.isclose(got.item(), ref.item(), rel_tol=1e-5)


def test_gradients_reach_student_only(batch):
    s, t, labels = batch
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    build_loss("0.5*ce+0.5*akl")(s, t, labels).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None or not t.grad.any()


def test_recipe_parsing_terms_and_errors(batch):
    assert parse_recipe("0.5*ce+0.5*akl") == [(0.5, "ce"), (0.5, "akl")]
    assert parse_recipe("ce + 2e-1*bild") == [(1.0, "ce"), (0.2, "bild")]
    s, t, labels = batch
    loss = build_loss("0.5*ce+0.25*akl")
    total = loss(s, t, labels)
    parts = loss.last_values
    assert set(parts) == {"ce", "akl"}
    torch.testing.assert_close(total, 0.5 * parts["ce"].to(total) + 0.25 * parts["akl"].to(total))
    with pytest.raises(ValueError, match="Known losses: .*akl.*bild"):
        build_loss("kld")
    with pytest.raises(ValueError, match="Cannot parse"):
        build_loss("0.5**ce")
    with pytest.raises(ValueError, match="no term that takes"):
        build_loss("fkl", mu=0.3)
    with pytest.raises(ValueError, match="twice"):
        build_loss("ce+ce")
    assert build_loss("akl+bild", temperature=2.0, bild_temperature=3.0).terms[1].temperature == 3.0
