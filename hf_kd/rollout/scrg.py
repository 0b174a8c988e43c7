"""SCRG: sequence correction and re-generation (MGSR, arXiv 2407.10068, Sec. 3.1, Eq. 3-4).

On a student-generated batch, the teacher scores every generated position given the student's prefix.
Among the positions where the student's token differs from the teacher's choice, the one with the
largest KL(p_teacher || p_student) (the "semantic cognitive difference") is corrected: its token is
replaced by the teacher's, and the student re-generates everything after it from the corrected prefix.
A sequence where nothing differs is kept. This is repeated ``corrections`` times (the paper tries
0/1/3/5; 1 is its default).

Choices where the paper is silent:

* the teacher's token is its argmax (``teacher_choice="argmax"``) or a sample at
  ``teacher_temperature`` (``"sample"``); the KL is taken at temperature 1;
* a later correction only looks after the previous one (the prefix up to it was already judged), so
  every round makes progress;
* the total completion length never exceeds the generation config's ``max_new_tokens``: the
  re-generation of each sequence gets the budget its kept prefix leaves; a corrected token that is
  EOS ends the sequence;
* scoring uses one forward of each model over the whole batch, and re-generation one batched
  ``generate`` call over the corrected sequences (left-padded prefixes of different lengths), with
  the trainer's generation config (so the student samples as it does on-policy), through the run's
  rollout backend (``GenerationContext.generate_student``: e.g. a vLLM server);
* teacher and student must share one vocabulary (token ids are exchanged between them); both are
  compared over the tokenizer's real tokens only (rows a head is padded with are no token and never
  chosen). Different tokenizers raise a ValueError;
* a served teacher (no model in this process) is read through ``GenerationContext.score_teacher``: its top-1 is
  exact, the KL is over its top-k and the tail rebuilt as for a teacher cache.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from ..losses.core import IGNORE_INDEX, default_chunk_size
from ..losses.divergences import kl_rows
from .callbacks import GeneratedBatch, GenerationCallback, GenerationContext


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _accepts(model: nn.Module, name: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def completion_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Logits predicting the last ``n`` tokens of each row ([B, n, V], the model's dtype and device)."""
    device = _device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if _accepts(model, "position_ids"):  # as `generate` does for left-padded rows
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = n + 1
    logits = model(**kwargs).logits
    return logits[:, -(n + 1) : -1]


def length_to_eos(tokens: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """Per row, the number of tokens up to and including the first EOS (all of them when there is none)."""
    if tokens.shape[1] == 0:
        return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    is_eos = torch.isin(tokens, eos_ids)
    return torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, tokens.shape[1])


def shares_vocabulary(ctx: GenerationContext) -> bool:
    """True when no teacher tokenizer is given, or it maps every token string to the student's id."""
    teacher_tok = ctx.teacher_tokenizer
    return teacher_tok is None or teacher_tok is ctx.tokenizer or teacher_tok.get_vocab() == ctx.tokenizer.get_vocab()


class SCRGCallback(GenerationCallback):
    """Correct each student generation's worst token with the teacher's and re-generate the rest (see module doc)."""

    def __init__(self, corrections: int = 1, teacher_choice: str = "argmax", teacher_temperature: float = 1.0):
        if corrections < 0:
            raise ValueError(f"SCRG: corrections must be >= 0, got {corrections}.")
        if teacher_choice not in ("argmax", "sample"):
            raise ValueError(f"SCRG: teacher_choice must be 'argmax' or 'sample', got '{teacher_choice}'.")
        if teacher_temperature <= 0:
            raise ValueError(f"SCRG: teacher_temperature must be > 0, got {teacher_temperature}.")
        self.corrections = corrections
        self.teacher_choice = teacher_choice
        self.teacher_temperature = teacher_temperature

    def on_generation(self, batch: GeneratedBatch, ctx: GenerationContext) -> GeneratedBatch:
        if self.corrections == 0 or batch.source != "student":
            return batch
        if not shares_vocabulary(ctx):
            raise ValueError(
                "SCRG needs teacher and student to share one vocabulary (it puts the teacher's token ids into "
                "the student's sequence), but the teacher tokenizer differs from the student's. Set "
                "scrg_corrections=0 for this pair, or use a teacher with the student's tokenizer."
            )
        max_new = ctx.generation_config.max_new_tokens
        if max_new is None:
            raise ValueError("SCRG needs generation_config.max_new_tokens to bound the re-generated length.")
        rows = batch.input_ids.shape[0]
        after = torch.full((rows,), batch.prompt_length - 1, device=batch.input_ids.device)
        corrected = 0
        with _eval_mode(ctx.student), torch.no_grad():
            for _ in range(self.corrections):
                choice = self._select(batch, ctx, after)
                if choice is None:
                    break
                fix_rows, fix_cols, fix_tokens = choice
                batch = self._regenerate(batch, ctx, fix_rows, fix_cols, fix_tokens, max_new)
                after = after.clone()
                after[fix_rows] = fix_cols
                done = torch.ones(rows, dtype=torch.bool, device=after.device)
                done[fix_rows] = False
                after[done] = batch.input_ids.shape[1]  # rows without a correction this round are final
                corrected += int(fix_rows.numel())
        batch.stats["scrg/corrected_tokens"] = float(corrected)
        return batch

    def _select(self, batch: GeneratedBatch, ctx: GenerationContext, after: torch.Tensor):
        """Per row, the generated column with the largest KL among those where the teacher's token differs
        from the student's (and lying after ``after``): (rows, columns, teacher tokens) or None."""
        prompt_len = batch.prompt_length
        n = batch.input_ids.shape[1] - prompt_len
        if n == 0:
            return None
        device = batch.input_ids.device
        s_logits = completion_logits(ctx.student, batch.input_ids, batch.attention_mask, n).to(device)
        if ctx.score_teacher is not None:  # a served teacher: its top-k, the tail rebuilt
            t_logits = ctx.score_teacher(batch.input_ids, batch.attention_mask, s_logits).to(device)
        else:
            t_logits = completion_logits(ctx.teacher, batch.input_ids, batch.attention_mask, n).to(device)
        vocab = min(len(ctx.tokenizer), s_logits.shape[-1], t_logits.shape[-1])
        kl, teacher_tokens = self._divergence_and_choice(s_logits[..., :vocab], t_logits[..., :vocab])
        completion = batch.input_ids[:, prompt_len:]
        columns = torch.arange(prompt_len, prompt_len + n, device=device)
        candidate = (
            (batch.labels[:, prompt_len:] != IGNORE_INDEX)
            & (teacher_tokens != completion)
            & (columns.unsqueeze(0) > after.unsqueeze(1))
        )
        has = candidate.any(-1)
        if not has.any():
            return None
        best = kl.masked_fill(~candidate, float("-inf")).argmax(-1)
        fix_rows = has.nonzero().squeeze(-1)
        offsets = best[fix_rows]
        return fix_rows, offsets + prompt_len, teacher_tokens[fix_rows, offsets]

    def _divergence_and_choice(self, s_logits: torch.Tensor, t_logits: torch.Tensor):
        """KL(p_teacher || p_student) and the teacher's token per position ([B, n] each), computed
        ``default_chunk_size`` rows at a time in float32 (both logits of one width)."""
        vocab = s_logits.shape[-1]
        flat_s, flat_t = s_logits.reshape(-1, s_logits.shape[-1]), t_logits.reshape(-1, t_logits.shape[-1])
        kl = torch.empty(flat_s.shape[0], device=flat_s.device)
        tokens = torch.empty(flat_s.shape[0], dtype=torch.long, device=flat_s.device)
        step = default_chunk_size(vocab)
        for start in range(0, flat_s.shape[0], step):
            t_chunk = flat_t[start : start + step].float()
            floor = torch.finfo(torch.float32).min  # -inf logits (masked entries) must not give NaN
            log_p = torch.log_softmax(t_chunk, -1).clamp_min(floor)
            log_q = torch.log_softmax(flat_s[start : start + step].float(), -1).clamp_min(floor)
            kl[start : start + step] = kl_rows(log_p, log_q)
            if self.teacher_choice == "argmax":
                tokens[start : start + step] = log_p.argmax(-1)
            else:
                probs = torch.softmax(t_chunk / self.teacher_temperature, -1)
                tokens[start : start + step] = torch.multinomial(probs, 1).squeeze(-1)
        return kl.reshape(s_logits.shape[:-1]), tokens.reshape(s_logits.shape[:-1])

    def _regenerate(self, batch, ctx, fix_rows, fix_cols, fix_tokens, max_new: int) -> GeneratedBatch:
        """Put the teacher's tokens in, let the student continue each corrected prefix, rebuild the batch."""
        prompt_len = batch.prompt_length
        device = batch.input_ids.device
        config = ctx.generation_config
        pad_id = config.pad_token_id if config.pad_token_id is not None else ctx.tokenizer.pad_token_id
        eos = config.eos_token_id
        eos_ids = torch.tensor([] if eos is None else eos, device=device, dtype=torch.long).reshape(-1)

        ids = batch.input_ids.clone()
        ids[fix_rows, fix_cols] = fix_tokens
        kept = fix_cols - prompt_len + 1  # completion tokens kept, the corrected one included
        budget = (max_new - kept).clamp_min(0)
        budget[torch.isin(fix_tokens, eos_ids)] = 0  # an EOS correction ends the sequence

        # left-padded prefixes (columns 0..fix_col of each corrected row)
        width = int(fix_cols.max()) + 1
        source = torch.arange(width, device=device).unsqueeze(0) - (width - 1 - fix_cols).unsqueeze(1)
        valid = source >= 0
        prefix = ids[fix_rows].gather(1, source.clamp_min(0)).masked_fill(~valid, pad_id)
        prefix_mask = batch.attention_mask[fix_rows].gather(1, source.clamp_min(0)) * valid

        n_new = int(budget.max())
        if n_new > 0:
            gen_config = copy.deepcopy(config)
            gen_config.max_new_tokens = n_new
            if gen_config.min_new_tokens is not None:
                gen_config.min_new_tokens = min(gen_config.min_new_tokens, n_new)
            student_device = _device(ctx.student)
            prefix, prefix_mask = prefix.to(student_device), prefix_mask.to(student_device)
            if ctx.generate_student is not None:  # the run's rollout backend (e.g. a vLLM server)
                out = ctx.generate_student(prefix, prefix_mask, gen_config)
            else:
                out = ctx.student.generate(input_ids=prefix, attention_mask=prefix_mask, generation_config=gen_config)
            suffix = out[:, width:].to(device)
        else:
            suffix = torch.empty(fix_rows.numel(), 0, dtype=ids.dtype, device=device)
        suffix_len = torch.minimum(length_to_eos(suffix, eos_ids), budget)

        lengths = batch.attention_mask[:, prompt_len:].sum(-1)
        lengths[fix_rows] = kept + suffix_len
        new_n = int(lengths.max()) if lengths.numel() else 0
        completion = ids[:, prompt_len:]
        if completion.shape[1] < new_n:
            completion = torch.nn.functional.pad(completion, (0, new_n - completion.shape[1]), value=pad_id)
        completion = completion[:, :new_n].clone()
        pos = torch.arange(new_n, device=device).unsqueeze(0)
        rel = pos - kept.unsqueeze(1)
        take = (rel >= 0) & (rel < suffix_len.unsqueeze(1))
        from_suffix = suffix.gather(1, rel.clamp(0, max(suffix.shape[1] - 1, 0))) if suffix.shape[1] else None
        fixed = completion[fix_rows]
        fixed = torch.where(take, from_suffix, fixed) if from_suffix is not None else fixed
        fixed = fixed.masked_fill(rel >= suffix_len.unsqueeze(1), pad_id)
        completion[fix_rows] = fixed

        completion_mask = (pos < lengths.unsqueeze(1)).to(batch.attention_mask.dtype)
        input_ids = torch.cat([ids[:, :prompt_len], completion], dim=1)
        attention_mask = torch.cat([batch.attention_mask[:, :prompt_len], completion_mask], dim=1)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        labels[:, :prompt_len] = IGNORE_INDEX
        return GeneratedBatch(input_ids, attention_mask, labels, prompt_len, batch.source, dict(batch.stats))


__all__ = ["SCRGCallback", "completion_logits", "length_to_eos", "shares_vocabulary"]
