"""DAC-KL against a direct reference computation, its band guards, its signal on confident teachers, gradients
and chunking."""

import pytest
import torch
from tiny import random_logits

from hf_kd import DistillationConfig
from hf_kd.losses import build_loss
from hf_kd.losses.dac_kl import DACKL

V = 13


@pytest.fixture
def batch():
    return random_logits(seed=1, length=5, vocab_size=V)


def _reference(term: DACKL, s, t, labels):
    """Full sort, plain probabilities, explicit sigmoid mask: the formula of the module docstring."""
    temp, k = term.temperature, min(term.top_m, V - 1)
    p = torch.softmax(t / temp, -1)
    q = torch.softmax(s / temp, -1)
    p_sorted, order = p.sort(-1, descending=True)
    p_top, q_top = p_sorted[..., :k], q.gather(-1, order)[..., :k]
    features = torch.zeros(*p_top.shape[:-1], term.top_m, dtype=p.dtype)
    features[..., :k] = p_top
    raw = term.band.net(features)
    m = term.band.min_mass
    hi = m + (1 - m) * torch.sigmoid(raw[..., 0:1])
    lo = (hi - m) * torch.sigmoid(raw[..., 1:2])
    before = torch.cat([torch.zeros_like(p_top[..., :1]), p_top.cumsum(-1)[..., :-1]], -1)
    upto = before + p_top
    w = torch.sigmoid(term.sharpness * (upto - lo)) * torch.sigmoid(term.sharpness * (hi - before))
    w[..., 0] = 1.0
    pt, qt = w * p_top, w * q_top  # no renormalisation: the mass left out goes to one outside bucket
    pt = torch.cat([pt, 1 - pt.sum(-1, keepdim=True)], -1)
    qt = torch.cat([qt, 1 - qt.sum(-1, keepdim=True)], -1)
    per = (pt * (pt / qt).log()).sum(-1) if term.direction == "forward" else (qt * (qt / pt).log()).sum(-1)
    mask = labels != -100
    return per[mask].sum() / mask.sum()


@pytest.mark.parametrize(
    "kw",
    [
        {"top_m": 6},
        {"top_m": 6, "temperature": 2.0, "sharpness": 10.0},
        {"top_m": 40, "direction": "reverse", "min_mass": 0.3},  # top_m > V: only V - 1 entries
    ],
)
def test_exact_value(batch, kw):
    s, t, labels = batch
    torch.manual_seed(0)
    loss = build_loss("dac_kl", hidden=7, **kw).double()
    got = loss(s, t, labels)
    with torch.no_grad():
        want = _reference(loss.terms[0], s, t, labels)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_identical_distributions_give_zero(batch):
    _, t, labels = batch
    loss = build_loss("dac_kl", top_m=8).double()
    assert loss(t.clone(), t, labels).abs() < 1e-12


def _set_bounds(term: DACKL, a: float, b: float):
    """Make the sub-network output the constant raw bounds (a, b)."""
    with torch.no_grad():
        term.band.net[-1].weight.zero_()
        term.band.net[-1].bias.copy_(torch.tensor([a, b]))


def test_band_never_empty_narrowest_setting_keeps_min_mass_and_top1():
    term = DACKL(top_m=8, min_mass=0.5, sharpness=1e4).double()
    _set_bounds(term, -1e4, -1e4)  # hi -> min_mass, lo -> 0: the smallest band the parameterisation allows
    p = torch.tensor([[0.3, 0.25, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01]], dtype=torch.float64)
    _, top_lp, log_w, _ = term.band_weights(p.log())
    w = log_w.exp()
    assert w[0, 0] == 1.0
    # [lo, hi] = [0, 0.5] overlaps entries 0 (mass 0-0.3) and 1 (0.3-0.55); nothing else
    torch.testing.assert_close(w[0, :3], torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), atol=1e-6, rtol=0)
    assert (w * top_lp.exp()).sum() >= 0.5

    _set_bounds(term, -1e4, 1e4)  # lo pushed up as far as allowed: still lo = 0 since hi - min_mass = 0
    w = term.band_weights(p.log())[2].exp()
    assert (w * p[:, :8]).sum() >= 0.5


def test_band_skips_head_but_keeps_top1_and_at_least_min_mass():
    term = DACKL(top_m=8, min_mass=0.4, sharpness=1e4).double()
    _set_bounds(term, 1e4, 1e4)  # hi -> 1, lo -> 0.6: band [0.6, 1]
    p = torch.tensor([[0.3, 0.25, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01]], dtype=torch.float64)
    w = term.band_weights(p.log())[2].exp()
    # entry 1 ends at 0.55 < 0.6: clipped; entry 2 (0.55-0.75) overlaps; the top-1 is always kept
    torch.testing.assert_close(w[0, :3], torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), atol=1e-6, rtol=0)
    assert (w[0, 2:] * p[0, 2:8]).sum() >= 0.4 - 0.01  # the band itself (top-M mass beyond 0.55 is 0.45)


def test_band_never_everything_and_mass_beyond_it_is_one_bucket():
    """Widest setting: the teacher's least likely entries (beyond the top-M, at least one) are never compared one by
    one; they form the outside bucket, so only their total student mass matters (not how it is spread)."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(1, 4, V, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 4, V, generator=g, dtype=torch.float64)
    labels = torch.zeros(1, 4, dtype=torch.long)
    for top_m, outside in [(5, V - 5), (40, 1)]:
        loss = build_loss("dac_kl", top_m=top_m, min_mass=0.2).double()
        _set_bounds(loss.terms[0], 1e4, -1e4)  # hi -> 1, lo -> 0: keep every candidate entry
        value = loss(s, t, labels).detach()
        dropped = t.argsort(-1)[..., :outside]
        shuffled = s.detach().clone()
        shuffled.scatter_(-1, dropped, s.detach().gather(-1, dropped.flip(-1)))  # spread differently, same total
        torch.testing.assert_close(loss(shuffled, t, labels), value)
        moved = s.detach().scatter_add(-1, dropped, torch.full(dropped.shape, 3.0, dtype=s.dtype))
        assert loss(moved, t, labels) > value + 0.1  # misplaced mass is penalised, not renormalised away


def confident_case(vocab: int = 50, rows: int = 8):
    """Teacher: top-1 0.95 on token 0; student: 0.99 on token 7. The common case of an instruct teacher."""
    p = torch.full((vocab,), 0.05 / (vocab - 1))
    p[0] = 0.95
    q = torch.full((vocab,), 0.01 / (vocab - 1))
    q[7] = 0.99
    return q.log().expand(1, rows, vocab), p.log().expand(1, rows, vocab), torch.zeros(1, rows, dtype=torch.long)


def test_confident_teacher_keeps_signal_at_init_and_after_the_subnetwork_trains():
    """A renormalised band is the top-1 alone here (KL 0 whatever the student does); the outside bucket keeps DAC-KL
    at least half of FKL, and training the sub-network alone on the loss (default lr) cannot lower it below that."""
    s, t, labels = confident_case()
    fkl = build_loss("fkl")(s, t, labels)
    torch.manual_seed(0)
    loss = build_loss("dac_kl")
    assert loss(s, t, labels) >= 0.5 * fkl
    optimizer = torch.optim.Adam(loss.parameters(), lr=DistillationConfig(output_dir="x").dac_kl_lr)
    for _ in range(300):
        optimizer.zero_grad()
        loss(s, t, labels).backward()
        optimizer.step()
    assert loss(s, t, labels) >= 0.5 * fkl


@pytest.mark.parametrize("a,b", [(-1e4, -1e4), (1e4, 1e4), (1e4, -1e4), (0.0, 0.0), (2.0, -3.0)])
def test_bounded_by_top1_binary_kl_and_full_kl(batch, a, b):
    """Data-processing bounds (module docstring): KL(top-1 vs rest) <= DAC-KL <= FKL per token, for every band."""
    s, t, labels = batch
    loss = build_loss("dac_kl", top_m=6, min_mass=0.3, sharpness=30.0).double()
    _set_bounds(loss.terms[0], a, b)
    fkl = build_loss("fkl").double()
    keep = labels != -100
    for s_r, t_r in zip(s[keep], t[keep]):  # one token at a time
        s_r, t_r, l_r = s_r.view(1, 1, -1), t_r.view(1, 1, -1), torch.zeros(1, 1, dtype=torch.long)
        p, q = t_r.softmax(-1), s_r.softmax(-1)
        top = p.argmax(-1, keepdim=True)
        p1, q1 = p.gather(-1, top), q.gather(-1, top)
        binary = (p1 * (p1 / q1).log() + (1 - p1) * ((1 - p1) / (1 - q1)).log()).sum()
        value = loss(s_r, t_r, l_r)
        assert binary - 1e-12 <= value <= fkl(s_r, t_r, l_r) + 1e-12


def test_gradients_reach_student_and_subnetwork_not_teacher(batch):
    s, t, labels = batch
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    loss = build_loss("dac_kl", top_m=6).double()
    loss(s, t, labels).backward()
    assert s.grad.abs().sum() > 0
    assert t.grad is None or t.grad.abs().sum() == 0
    for name, param in loss.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert s.grad[labels == -100].abs().sum() == 0


def test_gradcheck(batch):
    s, t, labels = batch
    loss = build_loss("dac_kl", top_m=6, sharpness=5.0).double()
    s = s[:, :3].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss(x, t[:, :3], labels[:, :3]), (s,))

    # the band bounds' gradient, through the sub-network's output bias
    bias = loss.terms[0].band.net[-1].bias

    def through_bias(b):
        with torch.no_grad():
            bias.copy_(b)
        return _reference(loss.terms[0], s.detach(), t[:, :3], labels[:, :3])

    bias.grad = None
    loss(s.detach(), t[:, :3], labels[:, :3]).backward()
    b0 = bias.detach().clone()
    eps = 1e-6
    numeric = torch.stack(
        [(through_bias(b0 + eps * e) - through_bias(b0 - eps * e)) / (2 * eps) for e in torch.eye(2).double()]
    )
    torch.testing.assert_close(bias.grad, numeric.detach(), rtol=1e-5, atol=1e-8)


def test_chunked_equals_unchunked(batch):
    s, t, labels = batch
    results = []
    for chunk in (None, 1, 3):
        torch.manual_seed(0)
        loss = build_loss("dac_kl", top_m=6, chunk_size=chunk).double()
        x = s.clone().requires_grad_()
        value = loss(x, t, labels)
        value.backward()
        results.append((value.detach(), x.grad, [p.grad for p in loss.parameters()]))
    for value, grad, pgrads in results[1:]:
        torch.testing.assert_close(value, results[0][0])
        torch.testing.assert_close(grad, results[0][1])
        for a, b in zip(pgrads, results[0][2]):
            torch.testing.assert_close(a, b)


def test_float32_module_with_float64_rows_and_fused_head(batch):
    s, t, labels = batch
    loss = build_loss("dac_kl", top_m=6)  # float32 sub-network
    assert torch.isfinite(loss(s, t, labels))
    head_s, head_t = torch.nn.Linear(4, V, bias=False), torch.nn.Linear(4, V, bias=False)
    hs, ht = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    fused = loss.forward_fused(hs, head_s, ht, head_t, labels)
    torch.testing.assert_close(fused, loss(head_s(hs), head_t(ht), labels))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"min_mass": 1.0}, "min_mass"),
        ({"top_m": 0}, "top_m"),
        ({"sharpness": 0.0}, "sharpness"),
        ({"direction": "sideways"}, "direction"),
    ],
)
def test_invalid_knobs(kw, match):
    with pytest.raises(ValueError, match=match):
        DACKL(**kw)
