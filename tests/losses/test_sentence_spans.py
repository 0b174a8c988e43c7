"""Sentence spans over response tokens (the span loss's segmenter): sentence starts, token offsets, span ids."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hf_kd.losses.sentence_spans import (
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
