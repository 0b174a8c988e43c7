"""The loss engine: what every distillation loss shares.

Every objective in hf_kd is a per-token (or per adjacent token pair) function of a student row and a
teacher row of logits. The engine owns everything else:

* token selection: only positions whose label is not -100 are computed (prompt and padding rows are
  never projected through a vocabulary head). A term may declare another set of rows (``positions``: the
  name of a boolean per-token input, e.g. BiLD's prompt positions); each set is selected, chunked and
  counted on its own;
* temperature and numerics: logits are cast to (at least) float32 inside, divided by each term's
  temperature, and log-probabilities are clamped so that -inf logits never produce NaN. Under autocast
  (``accelerator.autocast()``, bf16/fp16 training) the head matmuls run in the autocast dtype, as the model's
  own layers do, while every divergence stays in float32;
* chunking: rows are processed ``chunk_size`` at a time, so no more than one chunk of [rows, V]
  temporaries exists at once (on CPU, ``cpu_allocator.tune_for_chunks``, called by the trainer, keeps their pages
  mapped from chunk to chunk; the engine itself changes no process-wide setting). When
  gradients are needed, each chunk's gradient is computed right away (as in Liger-Kernel's fused linear losses)
  and the chunk's activations are freed;
* fused heads: a side may be given as hidden states plus its head (``LogitSource(hidden, head)``), in
  which case logits are only ever built one chunk at a time. A plain ``nn.Linear`` head runs outside
  autograd and its weight gradient is accumulated in place chunk after chunk (no [V, d] temporary per chunk);
* gradients: the common divergences attach a closed-form gradient to the student logits
  (``divergences.with_gradient``) instead of recording their formula for autograd;
* reduction: each term is summed and divided by the count of tokens (``num_items_in_batch`` under
  gradient accumulation, summed over the micro-batches and processes, as TRL does). Pairwise terms are
  divided by it too: a per-pair mean would need a pair count gathered the same way, and without it the
  weight of such a term grows with the accumulation steps and the process count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..knobs import knob_value, knobs_of

if TYPE_CHECKING:
    from ..papers import Paper

IGNORE_INDEX = -100
# 16M float32 elements = 64 MiB per [rows, V] buffer (a term keeps 5-8 alive, benchmarks/chunk_buffers.py): 110 rows
# at V = 151936, 64 at 262144. Fewer rows per chunk make the head matmuls re-read the [V, d] weights more often.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


@dataclass
class LogitSource:
    """One side of the distillation: rows of logits, or rows of hidden states and the head that maps them.

    ``rows`` has shape [..., d] (hidden states, with ``head``) or [..., V] (logits, ``head=None``); the
    leading dimensions must match the labels.
    """

    rows: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor] | None = None

    def head_parameters(self) -> list[torch.nn.Parameter]:
        """The head's trainable parameters: a module's, or what a callable head's ``parameters()`` returns."""
        parameters = getattr(self.head, "parameters", None)
        return [p for p in parameters() if p.requires_grad] if callable(parameters) else []


class TeacherSignal(str, Enum):
    """What a loss term (``TokenLoss.teacher_needs``) or a bridge reads of the teacher. A teacher source declares the
    signals it provides (``hf_kd.teachers``) and feeds exactly the terms whose signal is among them."""

    NOTHING = "nothing"  # the labels only (ce)
    TOP_K = "top_k"  # the teacher's distribution at the response tokens: its top-k plus a tail suffices
    FULL_ROWS = "full_rows"  # the teacher's logits at any token, e.g. at the student's own top-k (BiLD)
    PROMPT_ROWS = "prompt_rows"  # the teacher's distribution at the prompt positions too
    HIDDEN_STATES = "hidden_states"  # the teacher's hidden states (the bridges)


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one [rows, V] float32 temporary stays near 64 MiB."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab_size, 1))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``, or None when autocast is off."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _safe_log_softmax(logits: torch.Tensor, finite: bool = False, in_place: bool = False) -> torch.Tensor:
    # Clamp -inf to the most negative finite number: p * (log p - log q) stays finite where p == 0. Logits known
    # to be finite (a linear head's) give finite log-probabilities and skip the clamp's pass over [rows, V].
    # ``in_place`` writes them over ``logits`` (a [rows, V] buffer less).
    log_probs = torch.log_softmax(logits, dim=-1, out=logits) if in_place else torch.log_softmax(logits, dim=-1)
    if finite:
        return log_probs
    floor = torch.finfo(logits.dtype).min
    return log_probs.clamp(min=floor) if log_probs.requires_grad else log_probs.clamp_(min=floor)


class TokenRows:
    """The rows of one chunk, with cached temperature-scaled views that terms ask for.

    Student accessors carry gradients; teacher accessors are detached (the teacher is never trained).
    Pairwise terms (the span loss) read ``*_next`` rows: row k+1 for each row k of the chunk, with
    ``pair_mask`` telling where (k, k+1) are adjacent positions of one sequence inside one span.
    """

    def __init__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        extras: dict[str, torch.Tensor],
        num_rows: int,
        pair_mask: torch.Tensor | None = None,
        finite: tuple[bool, bool] = (False, False),
    ):
        self._student = student_logits  # [n (+1), V], compute dtype
        self._teacher = teacher_logits
        self._finite = {"s": finite[0], "t": finite[1]}  # logits that cannot be -inf (no clamping needed)
        self.labels = labels
        self.extras = extras
        self.n = num_rows
        self.pair_mask = pair_mask
        self._cache: dict[tuple, torch.Tensor] = {}

    def _get(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _own(self, rows: torch.Tensor) -> torch.Tensor:
        """The chunk's own rows (without the look-ahead row). Not a slice when there is no look-ahead row: a
        slice's backward would allocate and zero-fill a [rows, V] gradient to copy into."""
        return rows if rows.shape[0] == self.n else rows[: self.n]

    def _scaled(self, side: str, temperature: float) -> torch.Tensor:
        raw = self._student if side == "s" else self._teacher.detach()
        return raw if temperature == 1.0 else raw / temperature

    def _logprobs_all(self, side: str, temperature: float) -> torch.Tensor:
        return self._get(
            ("lp", side, temperature), lambda: _safe_log_softmax(self._scaled(side, temperature), self._finite[side])
        )

    def _probs_all(self, side: str, temperature: float) -> torch.Tensor:
        return self._get(("p", side, temperature), lambda: self._logprobs_all(side, temperature).exp())

    def detached_logprobs(self, side: str, temperature: float = 1.0) -> torch.Tensor:
        """Log-probabilities of ``side`` ("s" or "t") without a graph, for terms that write their own gradient.

        They are written over the scaled logits when those are a temporary, or over the raw logits themselves when
        those carry no gradient (the teacher's): from then on that side's ``*_logits`` are its log-probabilities,
        the logits shifted by a per-row constant, which everything read from them is invariant to (softmax, top-k
        differences, argmax)."""

        def make() -> torch.Tensor:
            if ("lp", side, temperature) in self._cache:
                return self._cache[("lp", side, temperature)].detach()
            with torch.no_grad():
                raw = self._student if side == "s" else self._teacher  # the chunk's own copies (or head outputs)
                in_place = temperature != 1.0 or not raw.requires_grad
                return _safe_log_softmax(self._scaled(side, temperature), self._finite[side], in_place=in_place)

        return self._own(self._get(("lp-const", side, temperature), make))

    def detached_probs(self, side: str, temperature: float = 1.0) -> torch.Tensor:
        """Probabilities of ``side`` ("s" or "t") without a graph (see ``detached_logprobs``)."""
        return self._get(("p-const", side, temperature), lambda: self.detached_logprobs(side, temperature).exp())

    def student_logits(self, temperature: float = 1.0) -> torch.Tensor:
        return self._own(self._scaled("s", temperature))

    def teacher_logits(self, temperature: float = 1.0) -> torch.Tensor:
        return self._own(self._scaled("t", temperature))

    def student_logprobs(self, temperature: float = 1.0) -> torch.Tensor:
        return self._own(self._logprobs_all("s", temperature))

    def teacher_logprobs(self, temperature: float = 1.0) -> torch.Tensor:
        return self._own(self._logprobs_all("t", temperature))

    def student_probs(self, temperature: float = 1.0) -> torch.Tensor:
        return self._own(self._probs_all("s", temperature))

    def teacher_probs(self, temperature: float = 1.0) -> torch.Tensor:
        return self._own(self._probs_all("t", temperature))

    def student_probs_next(self, temperature: float = 1.0) -> torch.Tensor:
        return self._probs_all("s", temperature)[1 : self.n + 1]

    def teacher_probs_next(self, temperature: float = 1.0) -> torch.Tensor:
        return self._probs_all("t", temperature)[1 : self.n + 1]

    def teacher_logits_with_grad(self) -> torch.Tensor:
        """Teacher-side logits without detaching, for bridges whose teacher side is trainable (DSKD)."""
        return self._own(self._teacher)


class TokenLoss(nn.Module):
    """Base class of every loss term: subclasses write their formula in ``per_token`` and declare the rest.

    ``per_token(rows)`` returns one value per row ([n]); for ``pairwise`` terms one value per row k
    for the pair (k, k+1), zero where ``rows.pair_mask`` is False. Every term is summed and divided by the
    token count (``num_items_in_batch`` under accumulation), pairwise ones included.

    What the rest of hf_kd asks of a term is declared on its class, once:

    * ``paper``: the paper the model card cites when a run uses the term (None for textbook divergences);
    * ``knobs``: the dataclass of its ``DistillationConfig`` fields (CLI flags, YAML keys), see ``hf_kd.knobs``;
      ``config_options`` reads the ones that set constructor arguments from a run's config;
    * ``requires`` and ``build_inputs``: the per-token inputs it needs beyond logits and labels, and how a
      trainer builds them from a batch;
    * ``lr_knob``: the knob holding the learning rate of its trainable parameters (their own optimizer group);
      required when the term has parameters;
    * ``teacher_needs``: the ``TeacherSignal`` member (checked when the class is made) it reads of the teacher,
      which decides the teacher sources it can train from (``hf_kd.teachers``): ``TOP_K`` (the default: from a
      cache, the top-k plus a tail) and ``NOTHING`` train from every source, ``FULL_ROWS`` and ``PROMPT_ROWS``
      need a teacher in memory;
    * ``positions``: None for the response tokens (labels != -100), else the name of a boolean per-token input
      (listed in ``requires``) selecting the rows the term is computed on. Such a term is divided by the count
      of its own rows (``position_counts[positions]``, gathered by the trainer like ``num_items_in_batch``).
    """

    name: str = ""
    pairwise: bool = False
    paper: Paper | None = None
    knobs: type | None = None
    requires: tuple[str, ...] = ()  # names of per-token extras the term needs (e.g. "span_ids")
    lr_knob: str | None = None
    teacher_needs: TeacherSignal = TeacherSignal.TOP_K
    positions: str | None = None

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if not isinstance(cls.teacher_needs, TeacherSignal):
            raise TypeError(
                f"{cls.__name__}.teacher_needs must be a TeacherSignal (e.g. TeacherSignal.TOP_K), got "
                f"{cls.teacher_needs!r}: the teacher sources compare it with the signals they provide."
            )

    @classmethod
    def config_options(cls, config: Any) -> dict[str, Any]:
        """The constructor arguments ``config`` (a run's ``DistillationConfig``) sets through this term's knobs."""
        return {item.arg: knob_value(config, item) for item in knobs_of(cls) if item.arg is not None}

    @classmethod
    def build_inputs(cls, batch: dict[str, Any], tokenizer: Any, options: Any) -> dict[str, torch.Tensor]:
        """The ``requires`` inputs for a batch: [B, T] tensors aligned with ``batch["input_ids"]`` (the trainer
        shifts them with the labels). ``options`` is the run's config, read through this term's knobs."""
        if cls.requires:
            raise NotImplementedError(f"{cls.__name__} requires {cls.requires} but defines no build_inputs().")
        return {}

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define per_token()")


@dataclass
class _Plan:
    terms: list[TokenLoss]
    weights: list[float]
    index: torch.Tensor  # flat positions of selected tokens, [N]
    labels: torch.Tensor  # [N]
    extras: dict[str, torch.Tensor]
    pair_mask: torch.Tensor | None  # [N], row k pairs with row k+1
    counts: list[float]
    chunk_size: int
    lookahead: bool
    term_values: list[torch.Tensor] = field(default_factory=list)


def _flatten(x: torch.Tensor, lead: int) -> torch.Tensor:
    return x.reshape(lead, *x.shape[-1:]) if x.dim() > 1 else x


def _pair_mask(index: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
    """Row k pairs with row k+1 when both are consecutive positions of one sequence in one span."""
    span = extras.get("span_ids")
    n = index.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=index.device)
    if n < 2 or span is None:
        return mask
    adjacent = index[1:] == index[:-1] + 1
    same_span = (span[1:] == span[:-1]) & (span[:-1] >= 0)
    mask[:-1] = adjacent & same_span
    return mask


class LossEngine:
    """Runs weighted loss terms over selected, chunked token rows (see the module docstring)."""

    def __init__(self, terms: Sequence[TokenLoss], weights: Sequence[float], chunk_size: int | None = None):
        self.terms = list(terms)
        self.weights = [float(w) for w in weights]
        self.chunk_size = chunk_size
        self.last_values: dict[str, torch.Tensor] = {}

    def __call__(
        self,
        student: LogitSource,
        teacher: LogitSource,
        labels: torch.Tensor,
        num_items_in_batch: int | torch.Tensor | None = None,
        extras: dict[str, torch.Tensor] | None = None,
        trainable: Sequence[torch.nn.Parameter] = (),
        position_counts: dict[str, int | torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The weighted loss. Terms computed on other rows than the response tokens (``TokenLoss.positions``) run
        as their own pass, divided by ``position_counts[positions]`` (default: the local count of those rows)."""
        extras = extras or {}
        groups: dict[str | None, list[int]] = {}
        for i, term in enumerate(self.terms):
            groups.setdefault(term.positions, []).append(i)
        flat_s = _flatten(student.rows, labels.numel())
        flat_t = _flatten(teacher.rows, labels.numel())
        params = list(dict.fromkeys([*student.head_parameters(), *teacher.head_parameters(), *trainable]))
        needs_grad = torch.is_grad_enabled() and (
            flat_s.requires_grad or flat_t.requires_grad or any(p.requires_grad for p in params)
        )
        total, values = None, {}
        for positions, members in groups.items():
            count = num_items_in_batch if positions is None else (position_counts or {}).get(positions)
            plan = self._plan(student, teacher, labels, count, extras, positions, members)
            if needs_grad:
                part = _ChunkedLoss.apply(self, plan, student, teacher, len(params) > 0, flat_s, flat_t, *params)
            else:
                with torch.no_grad():
                    part = self._run(plan, student, teacher, flat_s, flat_t, [])[0]
            total = part if total is None else total + part
            values |= {t.name: v for t, v in zip(plan.terms, plan.term_values)}
        self.last_values = {t.name: values[t.name] for t in self.terms}
        return total

    def _plan(self, student, teacher, labels, num_items, extras, positions, members) -> _Plan:
        if student.rows.shape[:-1] != labels.shape or teacher.rows.shape[:-1] != labels.shape:
            raise ValueError(
                f"Student rows {tuple(student.rows.shape)}, teacher rows {tuple(teacher.rows.shape)} and labels "
                f"{tuple(labels.shape)} must share their leading dimensions: pass logits (or hidden states) "
                "already aligned with the labels (position t predicts labels[..., t])."
            )
        terms = [self.terms[i] for i in members]
        for term in terms:
            for key in term.requires:
                if key not in extras:
                    raise ValueError(f"Loss term '{term.name}' needs the per-token input '{key}'; pass {key}=...")
        flat_labels = labels.reshape(-1)
        selected = flat_labels != IGNORE_INDEX if positions is None else extras[positions].reshape(-1).bool()
        index = selected.nonzero().squeeze(-1)
        sel_extras = {key: value.reshape(-1)[index] for key, value in extras.items()}
        lookahead = any(t.pairwise for t in terms)
        pair_mask = _pair_mask(index, sel_extras) if lookahead else None
        # Pairwise terms too are divided by the token count: it is the one count the Trainer gathers over the
        # accumulated micro-batches and the processes, so every term gives the same update at any split.
        n_tokens = float(num_items) if num_items is not None else float(index.numel())
        counts = [n_tokens] * len(terms)
        chunk = self.chunk_size or default_chunk_size(max(_vocab_size(student), _vocab_size(teacher)))
        weights = [self.weights[i] for i in members]
        return _Plan(terms, weights, index, flat_labels[index], sel_extras, pair_mask, counts, chunk, lookahead)

    def _run(self, plan: _Plan, student, teacher, flat_s, flat_t, grad_targets):
        """One pass over the chunks. Returns (total, grads of ``grad_targets`` or None)."""
        n_rows = plan.index.numel()
        device = flat_s.device
        sums = [torch.zeros((), device=device, dtype=torch.float64) for _ in plan.terms]
        grads = [None] * len(grad_targets)
        heads = _HeadPrecision(autocast_dtype(device))
        for start in range(0, n_rows, plan.chunk_size):
            self._run_chunk(plan, start, student, teacher, flat_s, flat_t, grad_targets, heads, sums, grads)
        for j, target in enumerate(grad_targets):
            if grads[j] is None and target.requires_grad:  # e.g. no selected rows: a zero gradient, not None
                grads[j] = torch.zeros_like(target)
        out_dtype = torch.promote_types(flat_s.dtype, torch.float32)
        values = []
        total = torch.zeros((), device=device, dtype=out_dtype)
        for s, weight, count in zip(sums, plan.weights, plan.counts):
            value = (s / count if count > 0 else s * 0).to(out_dtype)
            values.append(value)
            total = total + weight * value
        plan.term_values = values
        return total, grads

    def _run_chunk(self, plan: _Plan, start, student, teacher, flat_s, flat_t, grad_targets, heads, sums, grads):
        """One chunk: term values added to ``sums``, gradients to ``grads``. Its own function so that every
        [rows, V] buffer of the chunk is freed when it returns, before the next chunk allocates its own."""
        n_rows = plan.index.numel()
        end = min(start + plan.chunk_size, n_rows)
        stop = min(end + 1, n_rows) if plan.lookahead else end
        idx = plan.index[start:stop]
        student_side = _ChunkSide(student, flat_s[idx], 0, grad_targets, heads)
        sides = [student_side, _ChunkSide(teacher, flat_t[idx], 1, grad_targets, heads, student_side.logits)]
        with torch.enable_grad() if grad_targets else torch.no_grad(), heads.off(flat_s.device):
            rows = TokenRows(
                sides[0].logits,
                sides[1].logits,
                plan.labels[start:end],
                {k: v[start:end] for k, v in plan.extras.items()},
                end - start,
                plan.pair_mask[start:end] if plan.pair_mask is not None else None,
                (sides[0].finite, sides[1].finite),
            )
            chunk_total = None
            for i, (term, weight, count) in enumerate(zip(plan.terms, plan.weights, plan.counts)):
                value = term.per_token(rows).sum()
                sums[i] += value.detach().double()
                contrib = value * (weight / count) if count > 0 else value * 0.0
                chunk_total = contrib if chunk_total is None else chunk_total + contrib
        del rows  # the chunk's cached [rows, V] temporaries, before the backward allocates its gradient
        if not (grad_targets and chunk_total is not None and chunk_total.requires_grad):
            return
        inputs = [*(side.grad_input for side in sides), *grad_targets[2:]]
        wanted = [x for x in inputs if x.requires_grad]
        got = list(torch.autograd.grad(chunk_total, wanted, allow_unused=True))
        for j, x in enumerate(inputs):
            g = got.pop(0) if x.requires_grad else None  # popped: a [rows, V] gradient is freed once used
            if g is None:
                continue
            if j < 2:
                g = sides[j].backward(g, grads)
                if g is None:
                    continue
                full = grads[j]
                if full is None:
                    full = grads[j] = torch.zeros_like(grad_targets[j])
                full.index_add_(0, idx, g.to(full.dtype))
            else:
                _accumulate(grads, j, g)


def _vocab_size(source: LogitSource) -> int:
    """Width of the logits a source produces (a head's output features, or the rows themselves)."""
    if source.head is None:
        return source.rows.shape[-1]
    weight = getattr(source.head, "weight", None)
    return weight.shape[0] if weight is not None else source.rows.shape[-1]


class _HeadPrecision:
    """The dtype of the head matmuls in one engine call: the autocast dtype (weights cast once per call, not once
    per chunk), or the weights' own dtype when autocast is off. ``off`` runs the divergences without autocast."""

    def __init__(self, dtype: torch.dtype | None):
        self.dtype = dtype
        self._casts: dict[int, torch.Tensor] = {}

    def weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.dtype is None or weight.dtype == self.dtype or not weight.is_floating_point():
            return weight
        if id(weight) not in self._casts:
            self._casts[id(weight)] = weight.detach().to(self.dtype)
        return self._casts[id(weight)]

    def on(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def off(self, device: torch.device):
        return torch.autocast(device.type, enabled=False) if self.dtype is not None else contextlib.nullcontext()


def _compute_logits(source: LogitSource, rows: torch.Tensor, student_logits: torch.Tensor | None) -> torch.Tensor:
    """The side's logits; a teacher head that ``reads_student_logits`` (a cache's student-shaped tail) gets the
    chunk's student logits, detached."""
    if source.head is None:
        logits = rows
    elif getattr(source.head, "reads_student_logits", False):
        logits = source.head(rows, student_logits=student_logits.detach())
    else:
        logits = source.head(rows)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _accumulate(grads: list, j: int, g: torch.Tensor) -> None:
    if grads[j] is None:
        grads[j] = g
    else:
        grads[j].add_(g)  # in place: a head gradient is [V, d]


@dataclass
class LinearForm:
    """A head the engine may apply outside autograd (see ``_ChunkSide``):
    ``logits = finish((input_scale * h) @ weight[:columns].T + bias[:columns])``, ``finish`` elementwise or None.

    ``nn.Linear`` heads have this form; other heads offer it through a ``linear_form()`` method (``hf_kd.heads``:
    logit scales and soft-caps after a plain linear layer). ``trainable=False`` keeps gradients off the weights.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    input_scale: float = 1.0
    columns: int | None = None
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None
    trainable: bool = True


def _linear_form(head: Callable | None) -> LinearForm | None:
    if type(head) is nn.Linear:
        return LinearForm(head.weight, head.bias)
    form = getattr(head, "linear_form", None)
    return form() if callable(form) else None


class _ChunkSide:
    """One side (student or teacher) of a chunk: its input rows and logits, and how its gradient flows back.

    A head of linear form (:class:`LinearForm`) is applied outside autograd: its pre-activation z = x W^T + b
    becomes a leaf (only an elementwise ``finish`` stays in the graph), and ``backward`` writes the head's
    gradient by hand, accumulating dW += g^T x in place (``addmm_``) instead of letting autograd allocate a fresh
    [V, d] gradient per chunk and add it. Other heads (LoRA-adapted ones, say) and logits given directly stay in
    the autograd graph.
    """

    def __init__(
        self,
        source: LogitSource,
        rows: torch.Tensor,
        position: int,
        grad_targets: Sequence[torch.Tensor],
        precision: _HeadPrecision,
        student_logits: torch.Tensor | None = None,
    ):
        flat = grad_targets[position] if grad_targets else rows
        self.rows = rows.detach().requires_grad_(flat.requires_grad) if grad_targets else rows
        self.form = _linear_form(source.head) if grad_targets else None
        self.finite = self.form is not None  # x W^T + b (scaled, soft-capped): never -inf
        if self.form is None:
            with torch.enable_grad() if grad_targets else torch.no_grad(), precision.on(rows.device):
                self.logits = _compute_logits(source, self.rows, student_logits)
            self.grad_input = self.rows
            return
        form = self.form
        ids = [id(t) for t in grad_targets[2:]]
        params = (form.weight, form.bias) if form.trainable else ()
        self.param_slots = [
            (2 + ids.index(id(p)) if id(p) in ids else None, p) for p in params if p is not None and p.requires_grad
        ]
        weight = precision.weight(form.weight)
        self.weight = weight[: form.columns] if form.columns else weight
        with torch.no_grad():
            self.x = self.rows.detach().to(self.weight.dtype)
            if form.input_scale != 1.0:
                self.x = self.x * form.input_scale
            bias = None if form.bias is None else precision.weight(form.bias)[: self.weight.shape[0]]
            z = torch.nn.functional.linear(self.x, self.weight, bias)
            z = z.to(torch.promote_types(z.dtype, torch.float32))
        self.grad_input = z.requires_grad_(self.rows.requires_grad or any(j is not None for j, _ in self.param_slots))
        with torch.enable_grad():
            self.logits = form.finish(self.grad_input) if form.finish is not None else self.grad_input

    def backward(self, grad: torch.Tensor, grads: list) -> torch.Tensor | None:
        """The gradient for this side's input rows; head gradients go straight into ``grads``."""
        if self.form is None:
            return grad
        weight = self.weight
        grad = grad.to(weight.dtype)
        for j, param in self.param_slots:
            if j is None:
                continue
            is_weight = param is self.form.weight
            if grads[j] is None and param.shape[0] == weight.shape[0] and param.dtype == grad.dtype:
                grads[j] = grad.t() @ self.x if is_weight else grad.sum(0)  # first chunk: no zero-filled [V, d]
                continue
            if grads[j] is None:
                grads[j] = torch.zeros_like(param)
            target = grads[j][: weight.shape[0]]  # rows past ``columns`` (padded vocabulary) get no gradient
            if not is_weight:
                target.add_(grad.sum(0))
            elif target.dtype == grad.dtype:
                target.addmm_(grad.t(), self.x)
            else:  # autocast: the product in the compute dtype, accumulated into the float32 gradient
                target.add_(grad.t() @ self.x)
        if not self.rows.requires_grad:
            return None
        grad_rows = grad @ weight
        return grad_rows * self.form.input_scale if self.form.input_scale != 1.0 else grad_rows


class _ChunkedLoss(torch.autograd.Function):
    """Loss value in forward, with each chunk's gradient computed on the spot; backward only scales.

    Backward hands the gradients over instead of keeping a reference, so that autograd adopts a head's [V, d]
    gradient as its ``.grad`` rather than copying it (a copy costs a [V, d] pass and a second [V, d] buffer at
    the step's peak). A later backward through the same graph (``retain_graph=True``, gradcheck) recomputes them.
    """

    @staticmethod
    def forward(ctx, engine, plan, student, teacher, _has_params, flat_s, flat_t, *params):
        targets = [flat_s, flat_t, *params]
        total, ctx.grads = engine._run(plan, student, teacher, flat_s, flat_t, targets)
        ctx.recompute = lambda: engine._run(plan, student, teacher, flat_s, flat_t, targets)[1]
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            grads = ctx.recompute()
        if not torch.equal(grad_output, torch.ones_like(grad_output)):
            grads = [None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grads]
        return (None, None, None, None, None, *grads)


__all__ = [
    "IGNORE_INDEX",
    "LinearForm",
    "LogitSource",
    "LossEngine",
    "TeacherSignal",
    "TokenLoss",
    "TokenRows",
    "default_chunk_size",
]
