"""A model's output head as a callable exact to the model's own logits, for losses that never build full logits.

Fused losses (and the DSKD bridge) rebuild logits from the last hidden states one chunk at a time, so they must
redo whatever a causal LM does between its last hidden state and ``logits``. In transformers 5.23 that is, per
family (read from each ``modeling_*.py``; the same attributes TRL 1.16 reads for its chunked kernel):

* a scale of the head's input: MiniCPM3 divides the hidden states by ``logits_scaling``;
* a scale of the head's output: Granite (all variants, and Granite-based vision models) divides by
  ``logits_scaling``, HyperCLOVA X multiplies by it; Cohere (1, 2, 2-MoE, Compass) multiplies by ``logit_scale``,
  Falcon-H1 by ``lm_head_multiplier``, Muse Glimmer/Spark by ``output_multiplier``;
* a soft-cap ``c * tanh(logits / c)`` after the scale: ``final_logit_softcapping`` (Gemma 2/3/3n/4, PaliGemma,
  VaultGemma, Nanochat, Beam, Mistral-Large-4, Muse, Inkling 2), ``logits_soft_cap`` (RecurrentGemma),
  ``output_logit_soft_cap`` (xLSTM);
* a cut to the first ``unpadded_vocab_size`` columns (Inkling, Inkling 2).

What no rule describes (e.g. Chameleon's masking of image-token logits, or a custom model) is caught by
:func:`verify_output_head`, which the trainer runs on the first step: the rebuilt logits at the position the
model kept (``logits_to_keep=1``) must equal the model's own.

A head may also be cut to ``vocab_size`` columns: the tokenizer's real tokens (padded head rows are no token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .finiteness import TRAINING_CAUSES, valid_rows
from .losses.core import LinearForm, autocast_dtype

MULTIPLY_BY_LOGITS_SCALING = ("hyperclovax", "hyperclovax_vision_v2")
"""Families whose logits are the head's output times ``logits_scaling`` (the other users of it divide)."""
SCALE_INPUT_BY_LOGITS_SCALING = ("minicpm3",)
"""Families that divide the hidden states by ``logits_scaling`` before the head (the others scale its output)."""
LOGIT_SCALE_FAMILIES = ("cohere", "cohere2", "cohere2_moe", "cohere_compass")
"""Families that apply ``logit_scale`` (MPT's config has the field but its forward ignores it)."""
OUTPUT_MULTIPLIERS = ("lm_head_multiplier", "output_multiplier")
SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


@dataclass(frozen=True)
class LogitTransform:
    """What a model does around its head: logits = softcap(output_scale * head(input_scale * h))[..., :columns]."""

    input_scale: float = 1.0
    output_scale: float = 1.0
    softcap: float | None = None
    columns: int | None = None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP/accelerate/compile wrappers and PEFT (its LoRA layers stay in place)."""
    while not hasattr(model, "get_output_embeddings"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    get_base_model = getattr(model, "get_base_model", None)  # a PeftModel
    return get_base_model() if callable(get_base_model) else model


def logit_transform(config: Any) -> LogitTransform:
    """The transform a model of this configuration applies around its head (see the module docstring)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    families = {getattr(config, "model_type", None), getattr(text, "model_type", None)}

    def field(name: str) -> float | None:
        value = getattr(text, name, None)
        return None if value is None else float(value)

    input_scale, output_scale = 1.0, 1.0
    scaling = field("logits_scaling")
    if scaling is not None:
        if families & set(SCALE_INPUT_BY_LOGITS_SCALING):
            input_scale = 1.0 / scaling
        elif families & set(MULTIPLY_BY_LOGITS_SCALING):
            output_scale = scaling
        else:
            output_scale = 1.0 / scaling
    if families & set(LOGIT_SCALE_FAMILIES) and field("logit_scale") is not None:
        output_scale *= field("logit_scale")
    for name in OUTPUT_MULTIPLIERS:
        if field(name) is not None:
            output_scale *= field(name)
    softcap = next((field(name) for name in SOFTCAP_FIELDS if field(name)), None)
    columns = getattr(text, "unpadded_vocab_size", None)
    return LogitTransform(input_scale, output_scale, softcap, columns)


class OutputHead:
    """``hidden -> logits`` exactly as the model's forward computes them, for the loss engine.

    ``frozen=True`` runs the head with detached parameters: gradients reach the input, never the head (DSKD's
    projected logits). ``vocab_size`` keeps only the first columns (the tokenizer's real tokens). Not an
    ``nn.Module`` on purpose: the engine trains what ``parameters()`` returns, and the head's weights are read at
    every call, so a wrapper that gathers sharded weights around the loss sees them.
    """

    def __init__(self, model: nn.Module, frozen: bool = False, vocab_size: int | None = None):
        model = unwrap_model(model)
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
            raise ValueError(
                f"{type(model).__name__} has no output embeddings with weights: fused losses and DSKD need a causal "
                "LM whose get_output_embeddings() returns its vocabulary head (or set fused_loss=False)."
            )
        self.model_name = type(model).__name__
        self.module = head
        self.frozen = frozen
        self.transform = logit_transform(model.config)
        limits = [n for n in (self.transform.columns, vocab_size) if n is not None]
        self.vocab_size = min(limits) if limits else None

    @property
    def weight(self) -> torch.Tensor:
        """The head's (base) weight, [rows, hidden]."""
        return self.module.weight

    def parameters(self) -> list[nn.Parameter]:
        """Parameters that gradients should reach (none when frozen)."""
        return [] if self.frozen else [p for p in self.module.parameters() if p.requires_grad]

    def linear_form(self) -> LinearForm | None:
        """This head as a :class:`~hf_kd.losses.core.LinearForm` when its module is a plain ``nn.Linear`` (the
        loss engine then applies it outside autograd, chunk by chunk); None for other modules (e.g. LoRA)."""
        if type(self.module) is not nn.Linear:
            return None
        t = self.transform
        finish = self._finish if (t.output_scale != 1.0 or t.softcap) else None
        return LinearForm(
            self.module.weight, self.module.bias, t.input_scale, self.vocab_size, finish, trainable=not self.frozen
        )

    def _finish(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's post-processing of its head's output: logit scale, then soft-cap."""
        t = self.transform
        logits = logits.float()  # as precise as the model's own post-processing, whatever its dtype
        if t.output_scale != 1.0:
            logits = logits * t.output_scale
        if t.softcap:
            logits = torch.tanh(logits / t.softcap) * t.softcap
        return logits

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        t = self.transform
        hidden = hidden.to(self.weight.dtype)
        if t.input_scale != 1.0:
            hidden = hidden * t.input_scale
        if self.frozen:
            detached = {name: p.detach() for name, p in self.module.named_parameters()}
            logits = functional_call(self.module, detached, (hidden,))
        else:
            logits = self.module(hidden)
        if self.vocab_size is not None and self.vocab_size < logits.shape[-1]:
            logits = logits[..., : self.vocab_size]
        return self._finish(logits) if (t.output_scale != 1.0 or t.softcap) else logits


def output_head(model: nn.Module, frozen: bool = False, vocab_size: int | None = None) -> OutputHead:
    """The model's output head, exact to its logits (see :class:`OutputHead`)."""
    return OutputHead(model, frozen=frozen, vocab_size=vocab_size)


def verify_output_head(head: OutputHead, outputs: Any) -> None:
    """Fail unless ``head`` reproduces the model's own logits at the position it kept.

    ``outputs`` is the model's output of a forward with ``output_hidden_states=True`` (and typically
    ``logits_to_keep=1``): its last logits row is compared with the head applied to the last hidden state there,
    within a tolerance of a few rounding steps of the model's dtype (of the autocast dtype, under autocast: call it
    under the autocast the model ran in). Logits holding NaN or +inf fail as such: nothing can be compared.
    """
    logits = outputs.logits[:, -1:].detach()
    if not valid_rows(logits).all():
        raise FloatingPointError(
            f"{head.model_name} gives non-finite logits (NaN or inf) at the last position of this batch, so the "
            "fused head cannot be checked against them: the model's own outputs are broken, whatever its logit "
            f"transforms. Likely causes: {TRAINING_CAUSES}."
        )
    with torch.no_grad():
        rebuilt = head(outputs.hidden_states[-1][:, -1:].detach())
    expected = logits[..., : rebuilt.shape[-1]].float()
    rebuilt = rebuilt.float()
    computed_in = autocast_dtype(logits.device) or logits.dtype
    eps = max(torch.finfo(logits.dtype).eps, torch.finfo(computed_in).eps)  # bf16 autocast: bf16 rounding
    tolerance = max(1e-3, 4 * eps) * max(1.0, expected.abs().max().item())
    error = (rebuilt - expected).abs().max().item() if rebuilt.shape == expected.shape else float("inf")
    if not error <= tolerance:
        raise ValueError(
            f"fused_loss cannot reproduce {head.model_name}'s logits: its last hidden state through the output "
            f"head ({head.transform}) differs from the model's own logits by up to {error:.4g} (tolerance "
            f"{tolerance:.2g}), so this model transforms its logits in a way hf_kd does not know. Train it with "
            "fused_loss=False (--fused_loss false), which uses the model's own logits."
        )


def loss_forward(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, fused: bool, all_logits: bool = False
) -> Any:
    """A model's forward for a loss: ``fused`` keeps the hidden states (for the head, chunk by chunk) and only the
    last position's logits (for ``verify_output_head``), else the logits. ``all_logits`` keeps the logits at every
    position under ``fused`` too (what evaluation hands ``compute_metrics``). The student and teacher forwards of
    every teacher source and bridge."""
    kwargs = {"output_hidden_states": True, "logits_to_keep": 0 if all_logits else 1} if fused else {}
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)


class FirstBatchHeadCheck:
    """``verify_output_head`` on the first batch only: the check runs the head on one row per sequence, and a head
    that reproduces its model's logits once does so for every batch."""

    def __init__(self):
        self.pending = True

    def __call__(self, head: OutputHead, outputs: Any) -> None:
        if self.pending:
            verify_output_head(head, outputs)

    def done(self) -> None:
        self.pending = False


def real_vocab_size(model: nn.Module, tokenizer: Any) -> int:
    """Head rows that stand for a token: ``len(tokenizer)``, or fewer when the head is smaller."""
    config = unwrap_model(model).config.get_text_config()
    return min(len(tokenizer), int(config.vocab_size))


def padded_token_ids(models: list[nn.Module], vocab_size: int) -> list[int]:
    """Ids from ``vocab_size`` up to the widest head: padded rows that generation must never emit."""
    rows = max(int(unwrap_model(m).config.get_text_config().vocab_size) for m in models)
    return list(range(vocab_size, rows))


__all__ = [
    "FirstBatchHeadCheck",
    "LogitTransform",
    "OutputHead",
    "logit_transform",
    "loss_forward",
    "output_head",
    "padded_token_ids",
    "real_vocab_size",
    "unwrap_model",
    "verify_output_head",
]
