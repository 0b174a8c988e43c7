"""Span correlation loss: hand computation, span/mask boundaries, gradients and chunking."""

import math

import pytest
import torch
from tiny import random_logits

from hf_kd.losses import build_loss

V = 5


def test_hand_computed_single_pair():
    # teacher uniform over 2 entries: p = [.5, .5]; student q = [.25, .75] at both positions
    t = torch.zeros(1, 2, 2, dtype=torch.float64)
    s = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64).expand(1, 2, 2)
    labels = torch.zeros(1, 2, dtype=torch.long)
    spans = torch.zeros(1, 2, dtype=torch.long)
    # c_t = [.25, .25], c_s = [.0625, .5625]: squared distance .1875^2 + .3125^2 = .1328125; one pair, two tokens
    squared = build_loss("span", squared=True)(s, t, labels, span_ids=spans)
    assert squared.item() == pytest.approx(0.1328125 / 2, abs=1e-15)
    plain = build_loss("span")(s, t, labels, span_ids=spans)
    assert plain.item() == pytest.approx(math.sqrt(0.1328125) / 2, abs=1e-15)


@pytest.fixture
def batch():
    s, t, labels = random_logits(seed=2, length=8, vocab_size=V)  # a prompt in row 0, padding at the end of row 1
    labels[0, 5] = -100  # a masked position inside a span
    labels[1, -2:] = -100  # more padding
    span_ids = torch.tensor([[-1, -1, 0, 0, 0, 0, 0, 1], [2, 2, 2, 3, 3, 4, 5, 5]])
    return s, t, labels, span_ids


def _reference(s, t, labels, span_ids, temperature=1.0, squared=False):
    p, q = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
    total, pairs = 0.0, []
    for b in range(s.shape[0]):
        for k in range(s.shape[1] - 1):
            both = labels[b, k] != -100 and labels[b, k + 1] != -100
            same = span_ids[b, k] == span_ids[b, k + 1] and span_ids[b, k] >= 0
            if both and same:
                pairs.append((b, k))
                sq = ((p[b, k] * p[b, k + 1] - q[b, k] * q[b, k + 1]) ** 2).sum()
                total = total + (sq if squared else sq.sqrt())
    return total / (labels != -100).sum(), pairs  # per response token, like every term (see hf_kd.losses.span)


@pytest.mark.parametrize("kw", [{}, {"squared": True}, {"temperature": 2.0}])
def test_exact_value_and_pairs(batch, kw):
    s, t, labels, span_ids = batch
    want, pairs = _reference(s, t, labels, span_ids, **kw)
    # pairs inside spans only, never across a masked position or a span boundary
    assert pairs == [(0, 2), (0, 3), (1, 0), (1, 1), (1, 3)]
    got = build_loss("span", **kw)(s, t, labels, span_ids=span_ids)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_divided_by_num_items_in_batch_like_token_terms(batch):
    """Under accumulation the engine divides every term, pairwise ones included, by the global token count."""
    s, t, labels, span_ids = batch
    loss = build_loss("span+fkl")
    local = int((labels != -100).sum())
    loss(s, t, labels, span_ids=span_ids)
    alone = dict(loss.last_values)
    loss(s, t, labels, num_items_in_batch=torch.tensor(4 * local), span_ids=span_ids)
    for name in ("span", "fkl"):
        torch.testing.assert_close(loss.last_values[name], alone[name] / 4)


def test_zero_for_identical_and_no_pairs(batch):
    s, t, labels, span_ids = batch
    loss = build_loss("span")
    assert loss(t.clone(), t, labels, span_ids=span_ids) == 0
    singletons = torch.arange(16).reshape(2, 8)  # every position its own span: no pair at all
    x = s.clone().requires_grad_()
    value = loss(x, t, labels, span_ids=singletons)
    value.backward()
    assert value == 0 and x.grad.abs().sum() == 0


def test_requires_span_ids(batch):
    s, t, labels, _ = batch
    with pytest.raises(ValueError, match="span_ids"):
        build_loss("span")(s, t, labels)


@pytest.mark.parametrize("squared", [False, True])
def test_gradcheck(batch, squared):
    s, t, labels, span_ids = batch
    loss = build_loss("span", squared=squared)
    x = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda y: loss(y, t, labels, span_ids=span_ids), (x,))


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_chunk_boundaries_splitting_pairs(batch, chunk):
    s, t, labels, span_ids = batch
    outs = []
    for size in (None, chunk):
        x = s.clone().requires_grad_()
        value = build_loss("ce+span", chunk_size=size)(x, t, labels, span_ids=span_ids)
        value.backward()
        outs.append((value.detach(), x.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1], outs[0][1])
    # the chunked span gradient against autograd through the direct reference
    x = s.clone().requires_grad_()
    _reference(x, t, labels, span_ids)[0].backward()
    span_only = s.clone().requires_grad_()
    build_loss("span", chunk_size=chunk)(span_only, t, labels, span_ids=span_ids).backward()
    torch.testing.assert_close(span_only.grad, x.grad)
