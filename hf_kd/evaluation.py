"""Held-out evaluation of a student: greedy generation scored by Rouge-L and first-sentence match, and KL to a teacher.

Rouge-L is computed locally with the ``rouge_score`` package (Google's reference implementation, the one behind
``evaluate.load("rouge")``); ``evaluate.load`` itself fetches its script from the Hub and is not used.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pysbd
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from transformers import Trainer, TrainerCallback

from .heads import padded_token_ids

logger = logging.getLogger(__name__)

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
_SEGMENTER = pysbd.Segmenter(language="en", clean=False)


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F1 x 100 (longest common subsequence of lower-cased alphanumeric words)."""
    return 100.0 * _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` (pysbd segmentation), stripped; empty for blank text."""
    text = text.strip()
    return _SEGMENTER.segment(text)[0].strip() if text else ""


_WORD = re.compile(r"[a-z0-9']+")


def _repeats_back_to_back(words: list[str], span: int, times: int) -> bool:
    """True when some run of ``span`` words occurs ``times`` times in a row."""
    for start in range(len(words) - span * times + 1):
        unit = words[start : start + span]
        if all(words[start + k * span : start + (k + 1) * span] == unit for k in range(1, times)):
            return True
    return False


def has_repetition_loop(text: str, max_span: int = 12, repeats: int = 3) -> bool:
    """True when the text repeats a run of words back to back: a span of 2 to ``max_span`` words ``repeats`` times
    in a row, or one word ``repeats + 1`` times in a row (lower-cased alphanumeric words, punctuation ignored).

    Catches the degenerate greedy loops of small models ("a moment of stillness, a moment of stillness, a moment of
    stillness"), not legitimate repetition spread over a text.
    """
    words = _WORD.findall(text.lower())
    return any(
        _repeats_back_to_back(words, span, repeats + 1 if span == 1 else repeats) for span in range(1, max_span + 1)
    )


def repeats_a_run(text: str, min_span: int = 6, max_span: int = 40) -> bool:
    """True when a run of ``min_span`` to ``max_span`` words is said twice in a row ("I am not so cruel, and I am
    not so cruel. I am not so cruel, and ..."): the sentence-level repetition that a short answer cannot fit three
    times, so ``has_repetition_loop`` lets it through. A stricter count, for reading answers, not a loop verdict."""
    words = _WORD.findall(text.lower())
    return any(_repeats_back_to_back(words, span, 2) for span in range(min_span, max_span + 1))


SHORT_ANSWER_WORDS = 10


def word_count(text: str) -> int:
    """Words of an answer (runs of non-space characters): the unit of the answer-length columns."""
    return len(text.split())


def _split_conversation(messages: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """(prompt turns, reference answer): the last turn must be the assistant's answer."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("Each evaluation example needs `messages` ending with an assistant turn (the reference).")
    return list(messages[:-1]), messages[-1]["content"]


def _prompt_text(tokenizer, prompt: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class Answer:
    """A generated answer and whether it ended with the end-of-turn token (False: cut by ``max_new_tokens``)."""

    text: str
    finished: bool


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: list[list[dict[str, str]]], max_new_tokens: int, batch_size: int
) -> list[Answer]:
    """Greedy answers (special tokens removed) to chat prompts, in the order given.

    Prompts are batched by token length (less padding) with left padding, the layout decoder-only ``generate``
    needs. Rows a head is padded with (ids from ``len(tokenizer)`` on) are never generated.
    """
    device = next(model.parameters()).device
    texts = [_prompt_text(tokenizer, p) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(tokenizer(texts[i], add_special_tokens=False)["input_ids"]))
    answers: list[Answer | None] = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in index], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        ).to(device)
        out = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            suppress_tokens=padded_token_ids([model], len(tokenizer)) or None,
        )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        for row, i in enumerate(index):
            text = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
            answers[i] = Answer(text, bool((new_tokens[row] == tokenizer.eos_token_id).any()))
    return answers


def _conversation_ids(tokenizer, messages: Sequence[dict[str, str]]) -> tuple[list[int], int]:
    """Token ids of a whole conversation and the number of prompt tokens (prompt and answer tokenized apart)."""
    prompt, _ = _split_conversation(messages)
    prompt_text = _prompt_text(tokenizer, prompt)
    full_text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("The chat template's generation prompt is not a prefix of the full conversation.")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, len(prompt_ids)


def token_kl(student, teacher, tokenizer, conversations: list[Sequence[dict[str, str]]], batch_size: int) -> float:
    """Mean over answer tokens of KL(teacher || student) in nats, fp32, on the reference conversations.

    At each position that predicts an answer token (the answer's own tokens, including the end-of-turn marker),
    KL = sum_v p_t(v) (log p_t(v) - log p_s(v)) over the tokenizer's tokens v (rows a head is padded with are no
    token); the mean is over all such positions of all conversations.
    """
    sums, counts = token_kl_per_conversation(student, teacher, tokenizer, conversations, batch_size)
    return sum(sums) / max(sum(counts), 1)


@torch.no_grad()
def token_kl_per_conversation(
    student, teacher, tokenizer, conversations: list[Sequence[dict[str, str]]], batch_size: int
) -> tuple[list[float], list[int]]:
    """Per conversation, the sum of :func:`token_kl`'s per-token KL over its answer tokens and their number (what
    a bootstrap over conversations resamples)."""
    device = next(student.parameters()).device
    teacher_device = next(teacher.parameters()).device
    sums: list[float] = []
    counts: list[int] = []
    for start in range(0, len(conversations), batch_size):
        encoded = [_conversation_ids(tokenizer, c) for c in conversations[start : start + batch_size]]
        length = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), length), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        answer = torch.zeros_like(input_ids, dtype=torch.bool)  # positions whose next token is an answer token
        for row, (ids, prompt_len) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            answer[row, prompt_len - 1 : len(ids) - 1] = True
        s_logits = student(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        t_logits = teacher(input_ids=input_ids.to(teacher_device), attention_mask=attention.to(teacher_device)).logits
        vocab = len(tokenizer)
        if min(s_logits.shape[-1], t_logits.shape[-1]) < vocab:
            raise ValueError(
                f"Student and teacher vocabularies differ ({s_logits.shape[-1]} vs {t_logits.shape[-1]} head rows "
                f"for a tokenizer of {vocab} tokens): token-level KL needs one shared tokenizer; evaluate without "
                "`teacher=`."
            )
        s_logp = F.log_softmax(s_logits[answer.to(device)][:, :vocab].float(), dim=-1)
        t_logp = F.log_softmax(t_logits[answer.to(teacher_device)][:, :vocab].float(), dim=-1).to(device)
        per_token = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
        rows = answer.sum(-1).tolist()  # answer positions per conversation, in row order
        sums += [float(part.sum()) for part in per_token.split(rows)]
        counts += rows
    return sums, counts


def evaluate_student(
    model,
    tokenizer,
    dataset,
    teacher=None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    max_samples: int | None = None,
    return_predictions: bool = False,
    per_sample: bool = False,
) -> dict[str, Any]:
    """Score a model on held-out conversations (rows with ``messages`` ending in the reference answer).

    ``dataset`` is a ``datasets.Dataset`` or a list of such rows; ``max_samples`` keeps the first rows only.

    Returns ``rouge_l`` (mean Rouge-L F1 x 100 of greedy answers vs references), ``exact_match`` (percentage of
    answers whose first sentence equals the reference's), ``loop_rate`` (percentage of answers caught in a
    repetition loop, :func:`has_repetition_loop`), ``answer_words`` (mean words per answer, :func:`word_count`),
    ``short_answer_rate`` (percentage of answers under ten words), ``num_samples``, and with a teacher sharing the
    tokenizer, ``kl`` (mean per-token KL(teacher || student) on the references). ``predictions`` is added when
    ``return_predictions`` is set; ``per_sample`` adds ``per_sample``: per conversation its ``rouge_l``,
    ``exact_match`` (0/1), ``loop`` (0/1), ``words`` and, with a teacher, ``kl_sum`` and ``kl_tokens`` (for
    bootstraps over conversations). The model's train/eval mode is restored afterwards.
    """
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    conversations = [list(dataset[i]["messages"]) for i in range(count)]
    if not conversations:
        raise ValueError("The evaluation dataset is empty.")
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token` before evaluating.")
    prompts, references = zip(*(_split_conversation(c) for c in conversations))
    was_training = model.training
    model.eval()
    try:
        answers = generate_answers(model, tokenizer, list(prompts), max_new_tokens, batch_size)
        predictions = [answer.text for answer in answers]
        samples: dict[str, list] = {
            "rouge_l": [rouge_l(p, r) for p, r in zip(predictions, references)],
            "exact_match": [int(first_sentence(p) == first_sentence(r)) for p, r in zip(predictions, references)],
            "loop": [int(has_repetition_loop(p)) for p in predictions],
            "words": [word_count(p) for p in predictions],
        }
        results: dict[str, Any] = {
            "rouge_l": sum(samples["rouge_l"]) / len(references),
            "exact_match": 100.0 * sum(samples["exact_match"]) / len(references),
            "loop_rate": 100.0 * sum(samples["loop"]) / len(predictions),
            "answer_words": sum(samples["words"]) / len(predictions),
            "short_answer_rate": 100.0 * sum(w < SHORT_ANSWER_WORDS for w in samples["words"]) / len(predictions),
            "num_samples": len(references),
        }
        if teacher is not None:
            teacher_was_training = teacher.training
            teacher.eval()
            sums, counts = token_kl_per_conversation(model, teacher, tokenizer, conversations, batch_size)
            samples |= {"kl_sum": sums, "kl_tokens": counts}
            results["kl"] = sum(sums) / max(sum(counts), 1)
            teacher.train(teacher_was_training)
        if per_sample:
            results["per_sample"] = samples
    finally:
        model.train(was_training)
    if return_predictions:
        results["predictions"] = predictions
    return results


class EvaluationCallback(TrainerCallback):
    """Runs :func:`evaluate_student` every ``eval_steps`` optimizer steps and at the end of training (and before
    the first step with ``at_start``, the starting point of a training curve).

    Metrics are logged as ``eval/rouge_l``, ``eval/exact_match``, ``eval/kl`` (with a teacher) and
    ``eval/num_samples``. Pass the trainer (``trainer.add_callback(EvaluationCallback(ds, trainer=trainer))``) so
    they go through ``Trainer.log`` and reach every reporting integration; without it they are appended to
    ``state.log_history`` only. Every process evaluates (sharded models need all ranks to run the forward).
    """

    def __init__(
        self,
        eval_dataset,
        eval_steps: int = 50,
        teacher=None,
        trainer=None,
        max_new_tokens: int = 128,
        batch_size: int = 8,
        max_samples: int | None = None,
        prefix: str = "eval/",
        at_start: bool = False,
    ):
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1, got {eval_steps}")
        self.eval_dataset = eval_dataset
        self.eval_steps = eval_steps
        self.teacher = teacher
        self.trainer = trainer
        self.kwargs = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "max_samples": max_samples}
        self.prefix = prefix
        self.at_start = at_start
        self.history: list[dict[str, float]] = []
        self._last_step: int | None = None

    def _run(self, state, model, processing_class) -> None:
        if model is None or processing_class is None:
            raise ValueError("EvaluationCallback needs the trainer's model and processing_class (the tokenizer).")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor wraps its tokenizer
        metrics = evaluate_student(model, tokenizer, self.eval_dataset, teacher=self.teacher, **self.kwargs)
        logs = {f"{self.prefix}{key}": float(value) for key, value in metrics.items()}
        self.history.append({**logs, "step": state.global_step})
        self._last_step = state.global_step
        if self.trainer is not None:
            # The base Trainer.log: subclasses such as TRL's SFTTrainer fold in and clear their running training
            # averages on every log call, which would mix them into this entry and drop them from the next one.
            Trainer.log(self.trainer, logs)
        else:
            state.log_history.append({**logs, "step": state.global_step})

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.at_start:
            self._run(state, model, processing_class)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.eval_steps == 0:
            self._run(state, model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self._last_step != state.global_step:
            self._run(state, model, processing_class)
