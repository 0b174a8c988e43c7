"""The contract every registered loss term meets; a new term is tested by registering it.

For every name in ``LOSS_REGISTRY``: zero for identical distributions and positive otherwise, an exact gradient
(``gradcheck`` in float64), the same value and gradient at any chunk size, masked rows ignored, gradient
accumulation invariance, uniform (tied) and peaked teachers, bf16 inputs computed in float32, the caller's logits
left unchanged, and declarations the rest of hf_kd can read (paper, knobs, per-token inputs, optimizer group).
"""

import dataclasses

import pytest
import torch
from tiny import random_logits

from hf_kd import DistillationConfig
from hf_kd.knobs import knobs_of
from hf_kd.losses import IGNORE_INDEX, LOSS_REGISTRY, Recipe, TeacherSignal, TokenLoss, build_loss
from hf_kd.model_card import papers_used
from hf_kd.papers import Paper

V = 11
NAMES = sorted(LOSS_REGISTRY)

# Terms whose gradient is deliberately not the derivative of their value, and where their gradient is tested.
NOT_EXACT_GRADIENT = {
    "akl": "the head/tail weights are detached, as in the official code "
    "(tests/test_losses.py::test_akl_gradient_treats_weights_as_constants checks the documented gradient)",
}


def _span_ids(labels: torch.Tensor) -> torch.Tensor:
    """Spans of three positions each, unique per (sequence, span) as ``sentence_spans`` makes them; -1 elsewhere."""
    rows, length = labels.shape
    ids = torch.arange(length) // 3 + length * torch.arange(rows).unsqueeze(-1)
    return torch.where(labels != IGNORE_INDEX, ids, -1)


# How the contract test builds each per-token input a term may require (a trainer builds them with build_inputs).
# Prompt positions: the ignored rows (random_logits' prompt and padding) plus the first row's third position.
SYNTHETIC_INPUTS = {
    "span_ids": _span_ids,
    "prompt_positions": lambda labels: (
        (labels == IGNORE_INDEX)
        | (torch.arange(labels.shape[1]) == 2) & (torch.arange(labels.shape[0]) == 0).unsqueeze(-1)
    ),
}


def _rows(name: str, labels: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
    """The rows the term is computed on: the response tokens, or the per-token input named by ``positions``."""
    positions = LOSS_REGISTRY[name].positions
    return labels != IGNORE_INDEX if positions is None else extras[positions]


def _counts(name: str, n_items: int) -> dict:
    """``n_items`` as the normaliser of the term's own rows."""
    positions = LOSS_REGISTRY[name].positions
    return {"num_items_in_batch": n_items} if positions is None else {"position_counts": {positions: n_items}}


def _loss(name: str, chunk_size: int | None = None):
    torch.manual_seed(0)  # terms with parameters (the DAC-KL band) start from the same initialisation
    return build_loss(name, chunk_size=chunk_size).double()  # float64 parameters: exact comparisons


def _inputs(name: str, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    missing = [key for key in LOSS_REGISTRY[name].requires if key not in SYNTHETIC_INPUTS]
    assert not missing, f"add a synthetic builder for {missing} to SYNTHETIC_INPUTS"
    return {key: SYNTHETIC_INPUTS[key](labels) for key in LOSS_REGISTRY[name].requires}


def _value_and_grad(loss, s, t, labels, **kwargs):
    x = s.detach().clone().requires_grad_(True)
    value = loss(x, t, labels, **kwargs)
    value.backward()
    return value.detach(), x.grad


@pytest.fixture
def batch():
    return random_logits(seed=3, length=7, vocab_size=V)


@pytest.mark.parametrize("name", NAMES)
def test_zero_for_identical_positive_otherwise(batch, name):
    s, t, labels = batch
    loss, extras = _loss(name), _inputs(name, labels)
    if LOSS_REGISTRY[name].teacher_needs == TeacherSignal.NOTHING:  # not a divergence (ce): the teacher is ignored
        torch.testing.assert_close(loss(s, t, labels, **extras), loss(s, -t, labels, **extras))
        assert loss(s, t, labels, **extras) > 1e-4
        return
    assert loss(t, t, labels, **extras).abs() < 1e-12
    assert loss(s, t, labels, **extras) > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(batch, name):
    s, t, labels = batch
    s = s[:, :5].clone().requires_grad_(True)
    t, labels = t[:, :5], labels[:, :5]
    loss, extras = _loss(name, chunk_size=3), _inputs(name, labels)
    exact = torch.autograd.gradcheck(lambda x: loss(x, t, labels, **extras), (s,), raise_exception=False)
    assert exact == (name not in NOT_EXACT_GRADIENT), NOT_EXACT_GRADIENT.get(name, "gradcheck failed")


@pytest.mark.parametrize("name", NAMES)
def test_chunk_size_invariance(batch, name):
    s, t, labels = batch
    extras = _inputs(name, labels)
    reference = _value_and_grad(_loss(name, chunk_size=1000), s, t, labels, **extras)
    for chunk in (1, 2, 5):
        value, grad = _value_and_grad(_loss(name, chunk_size=chunk), s, t, labels, **extras)
        torch.testing.assert_close(value, reference[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, reference[1], rtol=1e-10, atol=1e-12)
    s32, t32 = s.float(), t.float()  # float32 logits: chunked sums agree to float32 precision
    reference = _value_and_grad(_loss(name, chunk_size=1000).float(), s32, t32, labels, **extras)
    for chunk in (1, 3):
        value, grad = _value_and_grad(_loss(name, chunk_size=chunk).float(), s32, t32, labels, **extras)
        torch.testing.assert_close(value, reference[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, reference[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_fused_linear_heads_equal_full_logits(name, bias):
    """Hidden states + nn.Linear heads (the head gradient written by hand, chunk by chunk) against autograd on
    full logits: same value, same gradients for the student's hidden states, head weight and bias."""
    g = torch.Generator().manual_seed(3)
    head_s, head_t = torch.nn.Linear(5, V, bias=bias).double(), torch.nn.Linear(7, V, bias=bias).double()
    hs, ht = torch.randn(2, 6, 5, generator=g, dtype=torch.float64), torch.randn(2, 6, 7, generator=g).double()
    labels = torch.randint(0, V, (2, 6), generator=g)
    labels[0, :2] = -100
    extras = _inputs(name, labels)
    results = []
    for fused, chunk in ((False, None), (True, 1), (True, 4), (True, None)):
        head_s.zero_grad(set_to_none=True)
        x = hs.clone().requires_grad_(True)
        loss = _loss(name, chunk_size=chunk)
        if fused:
            value = loss.forward_fused(x, head_s, ht, head_t, labels, **extras)
        else:
            value = loss(head_s(x), head_t(ht), labels, **extras)
        value.backward()
        results.append([value.detach(), x.grad, *(p.grad for p in head_s.parameters())])
    assert head_t.weight.grad is None or not head_t.weight.grad.any()  # teacher accessors are detached
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_fully_masked_and_infinite_logits_are_finite(batch, name):
    """No row to compute gives 0 and a finite gradient; -inf logits (padded vocabulary entries) on either side give
    a finite gradient and no NaN."""
    s, t, labels = batch
    s, t = s.float(), t.float()
    nothing = torch.full_like(labels, IGNORE_INDEX)
    extras = {key: torch.zeros_like(value) for key, value in _inputs(name, nothing).items()}
    if "span_ids" in extras:
        extras["span_ids"] -= 1  # -1: outside every span
    x = s.clone().requires_grad_(True)
    value = _loss(name).float()(x, t, nothing, **extras)
    value.backward()
    assert value == 0 and torch.isfinite(x.grad).all()
    t_inf, s_inf = t.clone(), s.clone()
    t_inf[..., :3] = float("-inf")
    s_inf[..., 3:5] = float("-inf")
    x = s_inf.requires_grad_(True)
    value = _loss(name).float()(x, t_inf, labels, **_inputs(name, labels))
    value.backward()
    assert torch.isfinite(x.grad).all() and not torch.isnan(value)


# Teacher shapes besides random logits: every entry tied (a uniform teacher, the worst case of a search by teacher
# mass such as AKL's head/tail split) and one token holding nearly all the mass.
TEACHER_SHAPES = {"uniform": torch.zeros_like, "peaked": lambda t: t * 30}


@pytest.mark.parametrize("shape", sorted(TEACHER_SHAPES))
@pytest.mark.parametrize("name", NAMES)
def test_uniform_and_peaked_teachers(batch, name, shape):
    """Whatever the teacher's shape: zero against itself, the same value and gradient at any chunk size, and
    float32 inputs give float64's value."""
    s, t, labels = batch
    t = TEACHER_SHAPES[shape](t)
    extras = _inputs(name, labels)
    if LOSS_REGISTRY[name].teacher_needs != TeacherSignal.NOTHING:
        assert _loss(name)(t, t, labels, **extras).abs() < 1e-12
    reference = _value_and_grad(_loss(name, chunk_size=1000), s, t, labels, **extras)
    assert torch.isfinite(reference[0]) and torch.isfinite(reference[1]).all()
    value, grad = _value_and_grad(_loss(name, chunk_size=2), s, t, labels, **extras)
    torch.testing.assert_close(value, reference[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, reference[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        _loss(name)(s.float(), t.float(), labels, **extras).double(), reference[0], rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("name", NAMES)
def test_inputs_are_left_unchanged(batch, name):
    """The engine overwrites its own per-chunk buffers in place, never the caller's logits, at T = 1 or not."""
    s, t, labels = batch
    extras = _inputs(name, labels)
    for grad in (True, False):
        student, teacher = s.clone().requires_grad_(grad), t.clone()
        with torch.set_grad_enabled(grad):
            _loss(name)(student, teacher, labels, **extras)
        assert torch.equal(student.detach(), s) and torch.equal(teacher, t)


@pytest.mark.parametrize("name", NAMES)
def test_masked_rows_are_ignored(batch, name):
    s, t, labels = batch
    extras = _inputs(name, labels)
    masked = ~_rows(name, labels, extras)
    assert masked.any()
    value, grad = _value_and_grad(_loss(name), s, t, labels, **extras)
    noise = torch.randn(s.shape, generator=torch.Generator().manual_seed(9), dtype=s.dtype) * 50
    s2 = torch.where(masked.unsqueeze(-1), s + noise, s)
    t2 = torch.where(masked.unsqueeze(-1), t - noise, t)
    value2, grad2 = _value_and_grad(_loss(name), s2, t2, labels, **extras)
    torch.testing.assert_close(value2, value, rtol=1e-10, atol=1e-12)
    assert grad2[masked].abs().max() == 0


@pytest.mark.parametrize("name", NAMES)
def test_gradient_accumulation_invariance(batch, name):
    """Two micro-batches, each divided by the whole batch's token count, sum to the whole batch's loss."""
    s, t, labels = batch
    extras = _inputs(name, labels)
    n_items = int(_rows(name, labels, extras).sum())
    value, grad = _value_and_grad(_loss(name), s, t, labels, **extras)
    halves = []
    for i in range(2):
        half = {key: value[i : i + 1] for key, value in extras.items()} | _counts(name, n_items)
        halves.append(_value_and_grad(_loss(name), s[i : i + 1], t[i : i + 1], labels[i : i + 1], **half))
    torch.testing.assert_close(halves[0][0] + halves[1][0], value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([halves[0][1], halves[1][1]]), grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs_are_finite_and_computed_in_float32(batch, name):
    s, t, labels = batch
    extras = _inputs(name, labels)
    s16, t16 = s.bfloat16(), t.bfloat16()
    got = _loss(name)(s16.requires_grad_(True), t16, labels, **extras)
    got.backward()
    reference = _loss(name)(s16.double(), t16.double(), labels, **extras)
    assert got.dtype == torch.float32 and torch.isfinite(got) and torch.isfinite(s16.grad).all()
    torch.testing.assert_close(got.double(), reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_declarations(name):
    """Paper, knobs, per-token inputs and optimizer group are declared where the rest of hf_kd reads them."""
    cls = LOSS_REGISTRY[name]
    assert cls.paper is None or isinstance(cls.paper, Paper)
    assert papers_used([name]) == ([cls.paper] if cls.paper else [])  # the model card cites the declared paper
    assert cls.knobs is None or dataclasses.is_dataclass(cls.knobs)
    if cls.requires:
        assert cls.build_inputs.__func__ is not LOSS_REGISTRY["fkl"].build_inputs.__func__
    has_parameters = any(True for _ in _loss(name).parameters())
    assert (cls.lr_knob is not None) == has_parameters


@pytest.mark.parametrize("name", NAMES)
def test_knobs_are_config_fields_that_reach_the_term(tmp_path, name):
    """Each knob is a DistillationConfig field with help text and the declared default; a constructor knob's
    value reaches the built term."""
    cls = LOSS_REGISTRY[name]
    fields = {f.name: f for f in dataclasses.fields(DistillationConfig)}
    changed = {}
    for knob in knobs_of(cls):
        assert fields[knob.field].metadata.get("help"), knob.field
        assert fields[knob.field].default == knob.default, knob.field
        if knob.arg is not None:
            changed[knob.field] = max(2, knob.default // 2) if isinstance(knob.default, int) else knob.default / 2
    config = DistillationConfig(output_dir=str(tmp_path), kd_loss=name, **changed)
    term = Recipe.from_config(config).build().terms[0]
    for knob in knobs_of(cls):
        if knob.arg is not None:
            assert getattr(term, knob.arg) == changed[knob.field], knob.field


def test_a_knob_without_a_config_field_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'late_knob' is not a DistillationConfig field.*loss_kwargs"):
        DistillationConfig(output_dir=str(tmp_path)).knob_value("late_knob")


def test_the_config_recipe_gives_knobs_over_plain_loss_kwargs_and_prefixed_ones_over_both(tmp_path):
    """One parse of kd_loss: a term's knob beats a plain `loss_kwargs` key, `<term>_<arg>` beats both, and
    kd_temperature reaches every term taking a temperature unless a prefixed key names another."""
    config = DistillationConfig(
        output_dir=str(tmp_path),
        kd_loss="akl+0.5*bild",
        akl_mu=0.3,
        kd_temperature=2.0,
        loss_kwargs={"mu": 0.9, "top_k": 4, "akl_temperature": 4.0},
    )
    akl, bild = Recipe.from_config(config).terms
    assert (akl.name, akl.weight, dict(akl.options)) == ("akl", 1.0, {"mu": 0.3, "temperature": 4.0})
    assert (bild.name, bild.weight, dict(bild.options)) == ("bild", 0.5, {"top_k": 8, "temperature": 2.0})
    built = Recipe.from_config(config).build()
    assert (built.terms[0].mu, built.terms[1].top_k, built.recipe) == (0.3, 8, "1*akl+0.5*bild")


def test_teacher_needs_is_a_teacher_signal():
    """Declared as the enum the teacher sources compare with, never a string converted where it is read."""
    assert all(isinstance(cls.teacher_needs, TeacherSignal) for cls in LOSS_REGISTRY.values())
    with pytest.raises(TypeError, match=r"teacher_needs must be a TeacherSignal.*got 'top_k'"):
        type("StringNeeds", (TokenLoss,), {"teacher_needs": "top_k"})


def test_a_knob_whose_constructor_default_differs_is_refused_at_registration():
    from hf_kd.knobs import check_knobs, knob

    knobs = dataclasses.make_dataclass("OddKnobs", [("odd_mu", float, knob(0.5, "help", arg="mu"))])
    odd = type("Odd", (), {"knobs": knobs, "lr_knob": None, "__init__": lambda self, mu=0.4: None})
    with pytest.raises(ValueError, match=r"'odd_mu' of Odd sets 'mu'.*default 0.5.*mu=OddKnobs.odd_mu"):
        check_knobs(odd)
