"""What every teacher source gives the trainer, and the one logit-space loss that live, cached and served share.

A teacher source is where the teacher's signal for a batch comes from, chosen once per run
(``make_teacher_source``). It declares what it can feed: the ``TeacherSignal``s it provides (each loss term declares
the one it reads, ``TokenLoss.teacher_needs``), whether it scores sequences generated during training (on-policy,
SCRG) and whether it generates (seq_kd). It gives the collator its batches need, the modules it trains beside the
student, and the loss of a batch: ``loss(model, inputs, num_items_in_batch, loss_fn) -> (loss, term values, student
outputs, teacher-row validity)``, the validity checked by the trainer for NaN/inf before the update. Sources whose
teacher is one row of logits per token (``LogitSpaceSource``: a live model, top-k rows) share that loss; a bridge
computes its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from trl.experimental.utils import DataCollatorForChatML
from trl.models import prepare_deepspeed
from trl.models.utils import prepare_fsdp
from trl.trainer.utils import disable_dropout_in_model

from ..finiteness import valid_rows
from ..formats import FormatCollator
from ..heads import FirstBatchHeadCheck, loss_forward, output_head
from ..losses import LOSS_REGISTRY, DistillationLoss, LogitSource, Recipe, TeacherSignal, TokenLoss
from ..sharding import gathered

if TYPE_CHECKING:
    from ..rollout import GeneratedBatch

POSITION_COUNTS = "position_counts"  # batch key: row counts of the terms computed off the response tokens

NEEDS = {
    TeacherSignal.NOTHING: "reads nothing of the teacher",
    TeacherSignal.TOP_K: "needs the teacher's distribution at the response tokens",
    TeacherSignal.FULL_ROWS: "needs the teacher's logits at the student's own top-k tokens or any other (full rows)",
    TeacherSignal.PROMPT_ROWS: "reads the teacher at the prompt positions",
    TeacherSignal.HIDDEN_STATES: "reads the teacher's hidden states",
}


def position_counts(
    loss_fn: DistillationLoss | None, batches: list[dict[str, Any]], tokenizer: Any, args: Any
) -> dict[str, torch.Tensor]:
    """{positions: number of those rows (after the shift) in ``batches``} for the recipe's terms computed off the
    response tokens (``TokenLoss.positions``, e.g. ``prompt_fkl``): their normaliser, as the label count is the
    others'."""
    terms = [t for t in loss_fn.terms if t.positions is not None] if loss_fn is not None else []
    counts: dict[str, torch.Tensor] = {}
    for term in terms:
        if term.positions not in counts:
            masks = [type(term).build_inputs(b, tokenizer, args)[term.positions] for b in batches]
            counts[term.positions] = sum(m[:, 1:].sum() for m in masks)
    return counts


def terms_fed_by(signals: frozenset[TeacherSignal]) -> list[str]:
    """The registered loss terms whose declared teacher signal is among ``signals``, in registry order."""
    return [name for name, cls in LOSS_REGISTRY.items() if cls.teacher_needs in signals]


class TeacherSource:
    """Base class of the teacher sources; see the module docstring. Subclasses set the class attributes they change
    and define ``loss``.

    ``model`` is the teacher model in this process (None without one), prepared by ``prepare``; ``vocab_size`` the
    tokens both sides are compared over (None when the source's rows set the width, as a cache's do).
    """

    description: str = "this teacher"  # for messages: "a teacher cache", "the dskd bridge"
    signals: frozenset[TeacherSignal] = frozenset(TeacherSignal)
    scores_generated: bool = True  # can score sequences generated during training (lmbda > 0, SCRG)
    generates: bool = True  # can generate them (seq_kd); its tokens may then enter the student's sequences
    refusal: str = "This teacher cannot serve the run: {needs}."  # the error for what it cannot do, see check_args
    holds: str = "it does not hold that"  # what it holds, for the error refusing a loss term
    teacher_name: str | None = None  # where the teacher comes from (its path/id or server), for cards and records
    model: nn.Module | None = None
    vocab_size: int | None = None
    # The teacher's log-probabilities of generated tokens when it is no model in this process (a served teacher):
    # (input_ids, attention_mask, the student's logits [B, n, V] at the last n tokens) -> [B, n, V]; SCRG reads it.
    score_completions: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def collator(self, tokenizer: Any, args: Any) -> Callable:
        """The data collator its batches need: TRL's dataset formats normalised per row (``FormatCollator``) in front
        of ``chat_collator``."""
        return FormatCollator(self.chat_collator(tokenizer, args), tokenizer, args.dataset_text_field)

    def chat_collator(self, tokenizer: Any, args: Any) -> Callable:
        """The collator of chat rows (TRL's, unless the source needs more in a batch)."""
        return DataCollatorForChatML(tokenizer=tokenizer, max_length=args.max_length)

    def check_args(self, args: Any) -> None:
        """Refuse, before training, the run's options this source cannot serve (generation-time needs, a bridge)."""
        needs = []
        if args.lmbda > 0 and not self.scores_generated:
            needs.append(
                f"on-policy distillation (lmbda={args.lmbda}) scores student-generated sequences; set lmbda=0"
            )
        if args.seq_kd and not self.generates:
            needs.append("seq_kd generates with the teacher; set seq_kd=False")
        if args.scrg_corrections > 0 and not self.scores_generated:
            needs.append(f"SCRG (scrg_corrections={args.scrg_corrections}) corrects with the teacher; set it to 0")
        if args.bridge is not None and TeacherSignal.HIDDEN_STATES not in self.signals:
            needs.append(f"the {args.bridge} bridge reads the teacher's hidden states; set bridge=None")
        if needs:
            raise ValueError(self.refusal.format(needs="; ".join(needs)))

    def check_terms(self, terms: list[TokenLoss]) -> None:
        """Refuse a loss term whose declared teacher signal this source does not provide, naming those it feeds."""
        for term in terms:
            if term.teacher_needs not in self.signals:
                raise ValueError(
                    f"Loss term '{term.name}' {NEEDS[term.teacher_needs]}, and {self.description} holds "
                    f"{self.holds}. From {self.description} use terms that work from it "
                    f"({', '.join(terms_fed_by(self.signals))}), or train '{term.name}' with a live teacher_model."
                )

    def build_loss(self, recipe: Recipe, args: Any) -> DistillationLoss | None:
        """The run's recipe built for ``loss``, its terms checked against this source (None when the source builds
        its own terms, as a bridge does)."""
        loss_fn = recipe.build(args.loss_chunk_size)
        self.check_terms(list(loss_fn.terms))
        return loss_fn.to(args.device)

    def prepare(self, trainer: Any) -> None:
        """Set-up once the student is wrapped: reads the trainer's ``model``, ``processing_class``, ``args``,
        ``accelerator`` and its DeepSpeed/FSDP state."""

    def modules(self) -> dict[str, nn.Module]:
        """The modules it trains beside the student, by name (saved in checkpoints under that name)."""
        return {}

    def inputs_for_generated(self, batch: GeneratedBatch, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """What a generated batch needs beyond the student's tokens (e.g. the teacher's tokenization of it)."""
        return {}

    def loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any,
        loss_fn: DistillationLoss | None,
        all_logits: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any, torch.Tensor | None]:
        """(loss, {term name: value}, the student's outputs or None, the teacher rows' validity or None) of one
        batch. The validity is [B, T - 1] bool, False where a teacher row holds NaN/+inf (``finiteness.valid_rows``);
        the trainer stops on it before the update. ``all_logits``: the student's outputs keep their logits at every
        position (for ``compute_metrics``)."""
        raise NotImplementedError(f"{type(self).__name__} must define loss()")

    def rows_name(self, fused: bool) -> str:
        """What its teacher rows are, for messages: the model's last hidden states (``fused``) or its logits."""
        return "last hidden states" if fused else "logits"

    def batch_metrics(self) -> dict[str, float]:
        """Metrics of the batch ``loss`` last saw, logged beside its terms (e.g. each routed teacher's share)."""
        return {}

    def record(self) -> dict[str, Any] | None:
        """What identifies the teachers, saved in every checkpoint and checked on resume (None: nothing to save)."""
        return None


def prepare_teacher_model(teacher: nn.Module, trainer: Any) -> nn.Module:
    """A teacher model frozen, in eval mode, without dropout (``disable_dropout``) and placed as the student is:
    DeepSpeed, FSDP or the accelerator's evaluation-mode preparation."""
    teacher.requires_grad_(False)
    teacher.eval()
    if trainer.args.disable_dropout:
        disable_dropout_in_model(teacher)
    if trainer.is_deepspeed_enabled:
        return prepare_deepspeed(teacher, trainer.accelerator)
    if trainer.is_fsdp_enabled:
        return prepare_fsdp(teacher, trainer.accelerator)
    return trainer.accelerator.prepare_model(teacher, evaluation_mode=True)


def logit_rows(outputs: Any, fused_model: nn.Module | None, vocab_size: int | None) -> LogitSource:
    """One side's rows aligned with the shifted labels: last hidden states + head (fused), or logits."""
    if fused_model is None:
        return LogitSource(outputs.logits[:, :-1, :vocab_size])
    return LogitSource(outputs.hidden_states[-1][:, :-1], output_head(fused_model, vocab_size=vocab_size))


@dataclass
class TeacherLogits:
    """The teacher's side of a logit-space loss for one batch: its rows, and for a model read through a fused head
    that head's module (gathered around the loss when sharded) and the forward's outputs (to check the head)."""

    rows: LogitSource
    head_module: nn.Module | None = None
    outputs: Any = None


class LogitSpaceSource(TeacherSource):
    """A source whose teacher is one row of logits per token: ``teacher_logits`` gives it, ``loss`` is shared."""

    def prepare(self, trainer: Any) -> None:
        self.args, self.tokenizer, self.accelerator = trainer.args, trainer.processing_class, trainer.accelerator
        self.head_check = FirstBatchHeadCheck()

    def teacher_logits(self, inputs: dict[str, Any], device: torch.device, fused: bool) -> TeacherLogits:
        """The teacher's rows for a batch (on ``device``), through its fused head when ``fused`` and it has one."""
        raise NotImplementedError(f"{type(self).__name__} must define teacher_logits()")

    def loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any,
        loss_fn: DistillationLoss | None,
        all_logits: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any, torch.Tensor | None]:
        fused = self.args.fused_loss
        student_out = loss_forward(model, inputs["input_ids"], inputs["attention_mask"], fused, all_logits)
        student = logit_rows(student_out, model if fused else None, self.vocab_size)
        teacher = self.teacher_logits(inputs, student.rows.device, fused)
        # Teacher rows without NaN/+inf, or padding: the trainer checks them with the loss (one host sync per step)
        valid = valid_rows(teacher.rows.rows) | ~inputs["attention_mask"][:, :-1].bool()
        labels = inputs["labels"][:, 1:]
        extras = self._loss_extras(inputs, loss_fn)
        heads = [self.accelerator.unwrap_model(model).get_output_embeddings(), teacher.head_module] if fused else []
        # Sharded (FSDP2/ZeRO-3) heads are whole for the loss only; under bf16/fp16 the head matmuls run in that
        # dtype, as in the models' own forward (the engine keeps the divergences in float32).
        with gathered(*[h for h in heads if h is not None]), self.accelerator.autocast():
            # The models kept their last position's logits: check the rebuilt heads (first batch). A non-finite
            # teacher is no head to check: the trainer stops on it, naming the step and rows.
            if fused and self.head_check.pending and bool(valid.all()):
                self.head_check(student.head, student_out)
                if teacher.outputs is not None:
                    self.head_check(teacher.rows.head, teacher.outputs)
                self.head_check.done()
            counts = inputs.get(POSITION_COUNTS)
            loss = loss_fn.forward_sources(student, teacher.rows, labels, num_items_in_batch, counts, **extras)
        return loss, loss_fn.last_values, student_out, valid

    def _loss_extras(self, inputs: dict[str, Any], loss_fn: DistillationLoss) -> dict[str, torch.Tensor]:
        """The per-token inputs the terms require, built by each term class and shifted with the labels."""
        extras: dict[str, torch.Tensor] = {}
        for term in loss_fn.terms:
            if any(key not in extras for key in term.requires):
                extras |= type(term).build_inputs(inputs, self.tokenizer, self.args)
        return {key: value[:, 1:] for key, value in extras.items()}
