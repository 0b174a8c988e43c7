"""DSKD: Dual-Space Knowledge Distillation (Zhang et al., arXiv 2406.17328), with and without a shared vocabulary.

Two linear projectors map last-layer hidden states across models: P_t2s (d_t -> d_s) and P_s2t (d_s -> d_t).

* Student space: logits_t2s = W_s P_t2s(h_t) with the student head W_s detached.
  L_t2s_ce = CE(logits_t2s, y) trains P_t2s; L_stu = D(student || logits_t2s detached) trains the student, D being
  the configured divergence recipe (``args.kd_loss``) at the KD temperature.
* Teacher space: logits_s2t = W_t P_s2t(h_s) with the (frozen) teacher head; L_tea = KL(teacher || s2t) at the KD
  temperature trains P_s2t and, through h_s, the student.
* L = (1 - kd_rate) CE + kd_rate (L_stu + L_t2s_ce + L_tea). As in the official code every term is summed over
  its positions and divided by the number of the student's response tokens (or ``num_items_in_batch``); with
  different tokenizers the teacher-space sum thus runs over the teacher's tokens but is divided by the student's
  count. The KD temperature (``kd_temperature``, 2.0 when None as in the official scripts) applies to L_stu and
  L_tea, never to the CE terms.

With different tokenizers (``teacher_tokenizer`` given) the projected states are aligned by cross-model attention
(:mod:`hf_kd.bridge.cma`) and L_stu is kept only at positions where argmax(logits_t2s) is the target token.

Everything runs through the chunked loss engine with heads applied chunk by chunk, so no [B, T, V] logits exist.
Each head is the model's own output head as :mod:`hf_kd.heads` defines it: LoRA-adapted when LoRA targets it, with
the model's logit scaling and soft-capping, cut to the tokenizer's real tokens when the tokenizers are given, and
checked against the model's own logits on the first call.
Differences from the official code: the extra ``teacher_temperature`` of the official CMA criterion (default 1.0)
is not exposed; heads scale and cap logits as their models do (the official code multiplies by the raw head
weight); the projected accuracy ``t2s_acc`` is logged as a fraction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..heads import FirstBatchHeadCheck, loss_forward, output_head, real_vocab_size, unwrap_model
from ..knobs import knob
from ..losses import IGNORE_INDEX, LogitSource, LossEngine, Recipe, TokenLoss, TokenRows
from ..losses.registry import loss_class
from ..papers import Paper
from ..sharding import gathered
from .cma import CrossModelAttention, index_embeddings
from .registry import register_bridge
from .tokenization import generated_teacher_inputs

DSKD_DEFAULT_TEMPERATURE = 2.0
"""The KD temperature of the official DSKD scripts, used when ``args.kd_temperature`` is None."""


class TermSum(TokenLoss):
    """Weighted sum of divergence terms under one name, optionally kept only where the t2s logits are right.

    ``keep_if_teacher_correct``: multiply by 1[argmax(teacher-side logits) == label] (DSKD-CMA's L_stu).
    """

    def __init__(
        self, name: str, terms: Sequence[TokenLoss], weights: Sequence[float], keep_if_teacher_correct: bool = False
    ):
        super().__init__()
        for term in terms:
            if term.pairwise or term.requires:
                raise ValueError(
                    f"Loss term '{term.name}' needs adjacent positions or extra inputs and cannot be used inside "
                    "DSKD; use a per-token divergence such as fkl, rkl, jsd, sfkl, srkl or akl."
                )
        self.name = name
        self.terms = nn.ModuleList(terms)
        self.weights = [float(w) for w in weights]
        self.keep_if_teacher_correct = keep_if_teacher_correct

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        total = sum(w * term.per_token(rows) for w, term in zip(self.weights, self.terms))
        if self.keep_if_teacher_correct:
            total = total * (rows.teacher_logits().argmax(-1) == rows.labels)
        return total


class ProjectedCE(TokenLoss):
    """CE of the teacher-side (projected) logits on the labels, with gradient: DSKD's L_t2s_ce. No temperature."""

    name = "t2s_ce"

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        logprobs = torch.log_softmax(rows.teacher_logits_with_grad(), dim=-1)
        return -logprobs.gather(-1, rows.labels.unsqueeze(-1)).squeeze(-1)


class ProjectedAccuracy(TokenLoss):
    """1 where argmax of the teacher-side logits is the label: logged (weight 0) as ``t2s_acc``."""

    name = "t2s_acc"

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        return (rows.teacher_logits().argmax(-1) == rows.labels).to(rows.teacher_logits().dtype)


def _hidden_size(model: nn.Module) -> int:
    return output_head(model).weight.shape[-1]


def _divergence_terms(recipe: Recipe, temperature: float) -> tuple[list[TokenLoss], list[float]]:
    """The recipe's terms, every term that takes a temperature at the bridge's KD temperature unless the recipe's
    options set one (``kd_temperature``, ``loss_kwargs``)."""
    if "ce" in recipe.names:
        raise ValueError(
            f"kd_loss '{recipe.text}' contains 'ce': under the DSKD bridge the CE term is mixed in by kd_rate "
            "(L = (1 - kd_rate) CE + kd_rate KD); give only the divergence, e.g. kd_loss='fkl'."
        )
    return [term.build(temperature) for term in recipe.terms], [term.weight for term in recipe.terms]


@dataclass
class DSKDKnobs:
    """DSKD's options (``DistillationConfig`` fields)."""

    kd_rate: float = knob(0.5, "DSKD: L = (1 - kd_rate) * CE + kd_rate * (L_stu + L_t2s_ce + L_tea).")
    projector_lr: float = knob(1e-3, "Learning rate of the DSKD projectors.")


@register_bridge("dskd")
class DSKDBridge(nn.Module):
    """Projectors of DSKD (and the CMA query projector when vocabularies differ) and the loss that trains them.

    ``args`` needs ``kd_loss``, ``kd_temperature``, ``kd_rate`` and ``loss_chunk_size`` (a ``DistillationConfig``);
    ``teacher_tokenizer`` is None when both models share one tokenizer, which selects the same-vocabulary DSKD,
    and is the teacher's tokenizer otherwise, which selects DSKD-CMA. ``tokenizer`` (the student's), when given,
    limits both heads to the real tokens of their tokenizers. ``recipe`` is the run's parsed ``kd_loss`` (the
    trainer's; parsed from ``args`` when None). The projectors are created in float32 on the student's device.
    """

    paper = Paper(
        "DSKD",
        "Dual-Space Knowledge Distillation for Large Language Models",
        "2406.17328",
        """@article{zhang2024dskd,
  title   = {Dual-Space Knowledge Distillation for Large Language Models},
  author  = {Zhang, Songming and Zhang, Xue and Sun, Zengkui and Chen, Yufeng and Xu, Jinan},
  journal = {arXiv preprint arXiv:2406.17328},
  year    = {2024}
}""",
    )
    knobs = DSKDKnobs
    lr_knob = "projector_lr"
    cross_vocabulary = True
    default_temperature = DSKD_DEFAULT_TEMPERATURE

    def __init__(
        self,
        student_model: nn.Module,
        teacher_model: nn.Module,
        args: Any,
        teacher_tokenizer: Any | None = None,
        tokenizer: Any | None = None,
        recipe: Recipe | None = None,
    ):
        super().__init__()
        d_s, d_t = _hidden_size(student_model), _hidden_size(teacher_model)
        self.vocabularies_differ = teacher_tokenizer is not None
        self.t2s = nn.Linear(d_t, d_s)
        self.s2t = nn.Linear(d_s, d_t)
        self.cma = CrossModelAttention(d_s, d_t) if self.vocabularies_differ else None
        kd_temperature = getattr(args, "kd_temperature", None)
        self.temperature = self.default_temperature if kd_temperature is None else float(kd_temperature)
        self.kd_rate = float(args.kd_rate)
        if not 0.0 <= self.kd_rate <= 1.0:
            raise ValueError(f"kd_rate must be in [0, 1], got {self.kd_rate}.")
        terms, weights = _divergence_terms(recipe or Recipe.from_config(args), self.temperature)
        chunk_size = getattr(args, "loss_chunk_size", None)
        self.student_kd = TermSum("kd_student", terms, weights, keep_if_teacher_correct=self.vocabularies_differ)
        self.teacher_kd = TermSum("kd_teacher", [loss_class("fkl")(temperature=self.temperature)], [1])
        r = self.kd_rate
        self.student_engine = LossEngine(
            [loss_class("ce")(), self.student_kd, ProjectedCE(), ProjectedAccuracy()],
            [1.0 - r, r, r, 0.0],
            chunk_size,
        )
        self.teacher_engine = LossEngine([self.teacher_kd], [r], chunk_size)
        device = next(unwrap_model(student_model).parameters()).device
        self.to(device=device, dtype=torch.float32)
        # Heads are compared over the tokenizers' real tokens (padded head rows are no token), when given.
        self.student_vocab_size = real_vocab_size(student_model, tokenizer) if tokenizer is not None else None
        teacher_tok = teacher_tokenizer if self.vocabularies_differ else tokenizer
        self.teacher_vocab_size = real_vocab_size(teacher_model, teacher_tok) if teacher_tok is not None else None
        self.head_check = FirstBatchHeadCheck()

    def _teacher_batch(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.vocabularies_differ:
            ids = inputs.get("teacher_input_ids", inputs["input_ids"])
            if ids.shape != inputs["input_ids"].shape:
                raise ValueError(
                    "Same-vocabulary DSKD compares teacher and student position by position, but the batch holds "
                    "teacher_input_ids of another shape; pass teacher_tokenizer to the bridge (DSKD-CMA) when the "
                    "tokenizers differ."
                )
            return inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        missing = [k for k in ("teacher_input_ids", "teacher_attention_mask", "teacher_labels") if k not in inputs]
        if missing:
            raise ValueError(
                f"DSKD with different tokenizers needs {missing} in the batch: collate with "
                "hf_kd.bridge.DualTokenizationCollator, and after generation merge "
                "DSKDBridge.teacher_inputs_for_generated(...) into the inputs."
            )
        return inputs["teacher_input_ids"], inputs["teacher_attention_mask"], inputs["teacher_labels"]

    def compute_loss(
        self,
        model: nn.Module,
        teacher_model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run both models and return (loss, {term name: detached value}).

        ``inputs`` holds the student's input_ids, attention_mask and labels (position t's label is the token at t,
        shifted inside), plus teacher_input_ids, teacher_attention_mask and teacher_labels when vocabularies differ.
        Logged terms: ce, kd_student, t2s_ce, kd_teacher (each a mean over the student's response tokens) and
        t2s_acc (fraction of tokens where the projected teacher predicts the label; not part of the loss).
        """
        t_ids, t_mask, t_labels_full = self._teacher_batch(inputs)
        s_out = loss_forward(model, inputs["input_ids"], inputs["attention_mask"], fused=True)
        teacher_model.eval()
        with torch.no_grad():
            t_out = loss_forward(teacher_model, t_ids, t_mask, fused=True)
        h_s = s_out.hidden_states[-1][:, :-1]
        h_t = t_out.hidden_states[-1][:, :-1].detach()
        labels = inputs["labels"][:, 1:]
        t_labels = t_labels_full[:, 1:]
        if num_items_in_batch is None:
            num_items_in_batch = (labels != IGNORE_INDEX).sum()
        if self.vocabularies_differ:
            ids = (inputs["input_ids"][:, :-1], t_ids[:, :-1])
            t2s_hidden, s2t_hidden = self._aligned(model, teacher_model, ids, (h_s, h_t), (labels, t_labels))
        else:
            t2s_hidden = self.t2s(h_t.to(self.t2s.weight.dtype))
            s2t_hidden = self.s2t(h_s.to(self.s2t.weight.dtype))
        with gathered(unwrap_model(model).get_output_embeddings()):  # sharded models: one head at a time
            student_head = output_head(model, vocab_size=self.student_vocab_size)
            self.head_check(student_head, s_out)  # the model kept its last position's logits: check the rebuilt head
            student_space = self.student_engine(
                LogitSource(h_s, student_head),
                LogitSource(t2s_hidden, output_head(model, frozen=True, vocab_size=self.student_vocab_size)),
                labels,
                num_items_in_batch,
                trainable=[*student_head.parameters(), *self.student_kd.parameters()],
            )
        with gathered(unwrap_model(teacher_model).get_output_embeddings()):
            teacher_head = output_head(teacher_model, frozen=True, vocab_size=self.teacher_vocab_size)
            self.head_check(teacher_head, t_out)
            self.head_check.done()
            teacher_space = self.teacher_engine(
                LogitSource(s2t_hidden, teacher_head), LogitSource(h_t, teacher_head), t_labels, num_items_in_batch
            )
        values = {**self.student_engine.last_values, **self.teacher_engine.last_values}
        return student_space + teacher_space, {k: v.detach() for k, v in values.items()}

    def _aligned(
        self,
        model: nn.Module,
        teacher_model: nn.Module,
        ids: tuple[torch.Tensor, torch.Tensor],
        hidden: tuple[torch.Tensor, torch.Tensor],
        labels: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DSKD-CMA: (teacher states in the student's space at the student's positions, student states in the
        teacher's space at the teacher's), aligned by cross-model attention. Each pair is (student, teacher), shifted
        as the loss reads them."""
        student_table, teacher_table = (unwrap_model(m).get_input_embeddings() for m in (model, teacher_model))
        with gathered(student_table):  # sharded models: one whole table at a time
            student_index = index_embeddings(student_table, ids[0], labels[0])
        with gathered(teacher_table):
            teacher_index = index_embeddings(teacher_table, ids[1], labels[1])
        masks = (labels[0] != IGNORE_INDEX, labels[1] != IGNORE_INDEX)
        aligned = self.cma(student_index, teacher_index, *hidden, *masks, self.t2s, self.s2t)
        return aligned.t2s_hidden, aligned.s2t_hidden

    def teacher_inputs_for_generated(
        self,
        generated_batch: Any,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        prompt_messages: list[list[dict[str, str]]] | None = None,
        max_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The teacher's tokenization of a generated batch (empty dict when the tokenizers are shared).

        ``prompt_messages`` are the conversations' prompt turns, as the collator returns them under
        ``"prompt_messages"``; see :func:`hf_kd.bridge.tokenization.generated_teacher_inputs`.
        """
        if not self.vocabularies_differ:
            return {}
        if prompt_messages is None:
            raise ValueError(
                "Re-tokenizing generations for the teacher needs the prompt turns: pass "
                "prompt_messages=inputs['prompt_messages'] (DualTokenizationCollator puts them in every batch)."
            )
        return generated_teacher_inputs(
            generated_batch, student_tokenizer, teacher_tokenizer, prompt_messages, max_length
        )


__all__ = ["DSKD_DEFAULT_TEMPERATURE", "DSKDBridge", "ProjectedAccuracy", "ProjectedCE", "TermSum"]
