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


# ---- sentence spans over response tokens (hf_kd.losses.sentence_spans) ----

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from hf_kd.losses.sentence_spans import (  # noqa: E402
    _prefix_char_ends,
    _streamed_char_ends,
    sentence_starts,
    span_ids_for_batch,
    token_char_ends,
)


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer trained here on a few sentences (multi-byte characters stay split)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["Hi there. How are you? Fine. Dr. Smith is here. Ask me."] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def wordlevel():
    """A word-level tokenizer whose decoding inserts spaces between words (no byte-level round trip)."""
    words = "Hi there . How are you ? Fine".split()
    vocab = {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _spans_text(ids, spans, tok):
    """Decoded text of each span, in order of first appearance."""
    order = list(dict.fromkeys(s for s in spans.tolist() if s >= 0))
    return [tok.decode(ids[spans == s].tolist()) for s in order]


def test_token_char_ends_byte_level_multibyte(bpe):
    ids = bpe("Café ☕ ok.")["input_ids"]
    text, ends = token_char_ends(ids, bpe)
    assert text == "Café ☕ ok."
    assert ends[-1] == len(text) and ends == sorted(ends)
    # the two bytes of "é" and the three of "☕": the character goes to the token completing it
    pieces = [text[a:b] for a, b in zip([0, *ends[:-1]], ends)]
    assert "".join(pieces) == text
    assert "é" in pieces[pieces.index("f") + 2] and pieces[pieces.index("f") + 1] == ""


def test_span_ids_exact_boundaries(bpe):
    prompt = bpe("Ask me.")["input_ids"]
    response = bpe("Hi there. How are you? Fine.")["input_ids"] + [bpe.eos_token_id]
    second = bpe("Dr. Smith is here. Café ☕ ok.")["input_ids"]
    n = len(prompt) + len(response)
    input_ids = torch.full((2, max(n, len(second)) + 2), bpe.pad_token_id)
    labels = torch.full_like(input_ids, -100)
    input_ids[0, : len(prompt)] = torch.tensor(prompt)
    input_ids[0, len(prompt) : n] = torch.tensor(response)
    labels[0, len(prompt) : n] = input_ids[0, len(prompt) : n]
    input_ids[1, : len(second)] = torch.tensor(second)
    labels[1, : len(second)] = input_ids[1, : len(second)]

    spans = span_ids_for_batch(input_ids, labels, bpe)
    assert (spans[labels == -100] == -1).all() and (spans[labels != -100] >= 0).all()
    # sentence boundaries on known text; the EOS (special, zero width) joins the last sentence
    assert _spans_text(input_ids[0], spans[0], bpe) == ["Hi there.", " How are you?", " Fine.<eos>"]
    # pysbd keeps "Dr. Smith" in one sentence; multi-byte characters stay inside their sentence; here " "
    # is a token of its own (whitespace only), so it joins the sentence before it
    assert _spans_text(input_ids[1], spans[1], bpe) == ["Dr. Smith is here. ", "Café ☕ ok."]
    ids0, ids1 = set(spans[0].tolist()) - {-1}, set(spans[1].tolist()) - {-1}
    assert not ids0 & ids1  # unique per (sequence, span)
    # spans are contiguous runs of tokens
    for row in spans:
        seen = [s for s in row.tolist() if s >= 0]
        assert seen == sorted(seen)


def test_punct_rule_and_several_response_runs(bpe):
    a = bpe("Dr. Smith is here.")["input_ids"]
    b = bpe("Hi there. Fine.")["input_ids"]
    ids = torch.tensor([a + [bpe.pad_token_id] + b])
    labels = ids.clone()
    labels[0, len(a)] = -100  # two runs of response tokens, segmented separately
    spans = span_ids_for_batch(ids, labels, bpe, segmenter="punct")
    assert _spans_text(ids[0], spans[0], bpe) == ["Dr.", " Smith is here.", "Hi there.", " Fine."]
    assert spans[0, len(a)] == -1
    assert sentence_starts("One. Two!\nThree", "punct") == [0, 5, 10]
    assert sentence_starts("a b c", lambda text: [2]) == [0, 2]
    with pytest.raises(ValueError, match="segmenter"):
        sentence_starts("x", "nltk")


def test_word_level_tokenizer(wordlevel):
    ids = torch.tensor([wordlevel("Hi there . How are you ? Fine")["input_ids"]])
    spans = span_ids_for_batch(ids, ids.clone(), wordlevel)
    # decoded "Hi there . How are you ? Fine": pysbd sentences "Hi there . ", "How are you ? ", "Fine"
    assert spans.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]


def _metaspace():
    """A SentencePiece-style tokenizer (Metaspace, "▁" for spaces, a leading space stripped on decoding)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<eos>"])
    tok.train_from_iterator(["Hi there. How are you? Fine. Dr. Smith is here. Ask me."] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.mark.parametrize("kind", ["bpe", "wordlevel", "metaspace"])
def test_streamed_offsets_equal_prefix_decoding(bpe, wordlevel, kind):
    """The linear streaming decode gives exactly the offsets of decoding every prefix (the former method)."""
    tok = {"bpe": bpe, "wordlevel": wordlevel, "metaspace": _metaspace()}[kind]
    texts = ["Hi there . How are you ? Fine", "Fine", "Café ☕ ok. Dr. Smith is here.", "Ask me. Hi there."]
    g = torch.Generator().manual_seed(0)
    for text in texts:
        ids = tok(text)["input_ids"]
        with_special = [*ids[:1], tok.eos_token_id, *ids[1:], tok.pad_token_id]
        words = text.split()
        shuffled = tok(" ".join(words[i] for i in torch.randperm(len(words), generator=g).tolist()))["input_ids"]
        for seq in (ids, with_special, shuffled):
            streamed = _streamed_char_ends(seq, tok)
            assert streamed is not None and streamed == _prefix_char_ends(seq, tok), (kind, seq)
            assert token_char_ends(seq, tok) == streamed


def test_segmentation_decodes_linearly(bpe):
    """A response of n tokens is decoded once (n ids in all), not prefix by prefix (n (n + 1) / 2 ids)."""
    ids = bpe(" ".join(["Hi there. How are you? Fine."] * 30))["input_ids"]
    decoded = []
    for name in ("decode", "batch_decode"):
        original = getattr(bpe, name)

        def counting(seqs, *args, _original=original, _name=name, **kwargs):
            decoded.append(len(seqs) if _name == "decode" else sum(len(x) for x in seqs))
            return _original(seqs, *args, **kwargs)

        setattr(bpe, name, counting)
    try:
        spans = span_ids_for_batch(torch.tensor([ids]), torch.tensor([ids]), bpe, segmenter="punct")
    finally:
        del bpe.decode, bpe.batch_decode
    assert len(ids) > 200 and sum(decoded) <= len(ids)
    assert spans.max() + 1 == 90  # three sentences per repetition
