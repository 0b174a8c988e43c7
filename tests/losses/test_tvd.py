"""Total variation distance: exact values, symmetry and Pinsker's bound (the shared contract is test_contract.py)."""

import pytest
import torch
from tiny import random_logits

from hf_kd.losses import build_loss


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_exact_value(temperature):
    s, t, labels = random_logits(seed=5, length=6, vocab_size=9)
    p, q = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
    per_token = 0.5 * (p - q).abs().sum(-1)
    mask = labels != -100
    expected = per_token[mask].sum() / mask.sum()
    got = build_loss("tvd", temperature=temperature)(s, t, labels)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_symmetric_bounded_and_below_pinsker():
    """TVD(p, q) = TVD(q, p) <= 1 per token, and TVD <= sqrt(KL(p || q) / 2) per token (Pinsker's inequality)."""
    s, t, labels = random_logits(seed=6, length=1, vocab_size=7)
    s, t, labels = s * 3, t * 3, labels.clamp(min=0)
    for row in range(2):
        args = (s[row : row + 1], t[row : row + 1], labels[row : row + 1])
        tvd = build_loss("tvd")(*args)
        assert 0 < tvd <= 1
        torch.testing.assert_close(build_loss("tvd")(args[1], args[0], args[2]), tvd)
        assert tvd <= torch.sqrt(build_loss("fkl")(*args) / 2)
