"""DistillationConfig: every knob of hf_kd, as a dataclass with help text (Python, YAML and CLI alike).

The options of the loss terms and bridges (``akl_mu``, ``bild_top_k``, ``skew_alpha``, ``dac_kl_lr``,
``span_segmenter``, ``kd_rate``, ``projector_lr``) are not written here: each method declares them in a small
dataclass in its own file (``hf_kd.knobs``), which ``DistillationConfig`` inherits from.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from trl.experimental.gkd import GKDConfig

from .bridge import BRIDGE_REGISTRY, bridge_class
from .bridge.dskd import DSKDKnobs
from .losses import LOSS_REGISTRY, parse_recipe
from .losses.akl import AKLKnobs
from .losses.bild import BiLDKnobs
from .losses.dac_kl import DACKLKnobs
from .losses.divergences import SkewKnobs
from .losses.span import SpanKnobs
from .teacher_cache.encoding import TAIL_SHAPES


def _default_temperatures() -> str:
    """'1.0 for fkl/rkl/..., 3.0 for bild, 2.0 under the dskd bridge': read from the constructors and bridges."""
    by_value: dict[float, list[str]] = {}
    for name, cls in LOSS_REGISTRY.items():
        parameter = inspect.signature(cls.__init__).parameters.get("temperature")
        if parameter is not None:
            by_value.setdefault(parameter.default, []).append(name)
    parts = [f"{value} for {'/'.join(names)}" for value, names in by_value.items()]
    parts += [f"{cls.default_temperature} under the {name} bridge" for name, cls in BRIDGE_REGISTRY.items()]
    return ", ".join(parts)


# The methods' knobs, bases listed last first: dataclass fields follow the reversed MRO, so GKD's come first, then
# akl_mu ... projector_lr. The jsd term's knob is GKD's own `beta`.
@dataclass
class DistillationConfig(DSKDKnobs, SpanKnobs, SkewKnobs, DACKLKnobs, BiLDKnobs, AKLKnobs, GKDConfig):
    """Configuration of [`DistillationTrainer`]; extends TRL's `GKDConfig` (lmbda, beta, seq_kd, max_new_tokens,
    temperature keep their GKD meaning). With the defaults a run is GKD: generalized JSD with beta = 0.5.

    On a machine without CUDA, `bf16` and `gradient_checkpointing` default to False (TRL defaults them to True,
    which fails or slows down CPU runs); pass them explicitly to override. Without an accelerator,
    `dataloader_pin_memory` is off (pinning needs one).
    """

    kd_loss: str = field(
        default="jsd",
        metadata={
            "help": "Loss recipe: one term name or a weighted sum, e.g. 'akl', 'bild', '0.5*ce+0.5*akl', "
            f"'ce+dac_kl+span'. Terms: {', '.join(LOSS_REGISTRY)}."
        },
    )
    kd_temperature: float | None = field(
        default=None,
        metadata={
            "help": "Softmax temperature of the distillation terms. None keeps each method's paper default "
            f"({_default_temperatures()}). The GKD `temperature` field is the sampling temperature only."
        },
    )
    loss_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Extra keyword arguments of the loss terms, e.g. {'dac_kl_top_m': 64}."},
    )
    fused_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute logits from the last hidden states chunk by chunk inside the loss, so full "
            "[batch, tokens, vocab] logits never exist; each model's logit scaling and soft-capping are redone "
            "(hf_kd.heads) and checked against its own logits on the first step. False asks the models for full "
            "logits (slower, more memory), for a model whose logits that check rejects."
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Token rows per loss chunk. None picks about 64 MiB of float32 logits per chunk."},
    )
    bridge: str | None = field(
        default=None,
        metadata={
            "help": "Hidden-state bridge between teacher and student: None, or one of "
            + ", ".join(f"'{name}' ({cls.paper.citation_line})" for name, cls in BRIDGE_REGISTRY.items())
            + "; a cross-vocabulary bridge is required when the vocabularies differ (with `teacher_processing_class`)."
        },
    )
    teacher_cache_tail: str = field(
        default="student",
        metadata={
            "help": "Training from a teacher cache or a served teacher: how the teacher's mass outside its top-k is "
            "spread over the other tokens. 'student' (default): like the student's own tail, which makes the "
            "divergences those between top-k + one tail bucket (hf_kd.teacher_cache.encoding); 'flat': evenly."
        },
    )
    teacher_top_k: int = field(
        default=64,
        metadata={
            "help": "A teacher served by vLLM (`teacher_model` an http(s) URL such as 'http://127.0.0.1:8000/v1'): "
            "how many of its most likely next tokens it sends per position (`prompt_logprobs`), the rest rebuilt as "
            "one tail bucket (`teacher_cache_tail`). At most the server's `--max-logprobs`. Pass "
            "`hf_kd.teachers.ServedTeacher(url, top_k=..., timeout=..., retries=...)` as `teacher_model` for more "
            "options."
        },
    )
    teacher_prefetch: bool = field(
        default=True,
        metadata={
            "help": "A served teacher: request each batch's scores as soon as it is collated, so the server scores "
            "the next batch while the student trains on this one (not when every step generates: lmbda=1 or "
            "seq_kd). False: request them when the loss needs them."
        },
    )
    teacher_column: str = field(
        default="teacher",
        metadata={
            "help": "Several teachers (`teacher_model` a dict such as {'code': ..., 'chat': ...}, each a model, a "
            "path/id or a server URL): the dataset column naming, per row, the teacher that row is distilled from. "
            "Every row must name one of the dict's keys (checked before training)."
        },
    )
    scrg_corrections: int = field(
        default=0,
        metadata={
            "help": "MGSR SCRG: corrections per generated sequence (0 = off, 1 = the paper's default). Each "
            "replaces the student's worst token with the teacher's and lets the student re-generate the rest."
        },
    )
    use_vllm: bool = field(
        default=False,
        metadata={
            "help": "Generate on-policy rollouts (and SCRG's re-generations) with a vLLM engine instead of "
            "transformers' `generate`, with the same sampling (temperature, top-p, max_new_tokens, EOS, padded head "
            "rows suppressed); the student's weights are pushed into the engine every `vllm_sync_steps` optimizer "
            "steps (LoRA merged). See docs/vllm_rollouts.md."
        },
    )
    vllm_mode: str = field(
        default="server",
        metadata={
            "help": "With `use_vllm`: 'server' (an engine in another process: `vllm_server_url`, or one hf_kd starts "
            "with `vllm_python`) or 'colocate' (an engine in the training process, where vLLM imports in it).",
            "choices": ["server", "colocate"],
        },
    )
    vllm_server_url: str | None = field(
        default=None,
        metadata={
            "help": "With `use_vllm` in server mode: a running vLLM server serving the student's architecture, "
            "started with VLLM_SERVER_DEV_MODE=1 and `--worker-extension-cls vllm_sync_extension.WeightSyncExtension` "
            "(hf_kd/rollout on its PYTHONPATH), e.g. 'http://127.0.0.1:8000/v1'. None: hf_kd starts one on "
            "127.0.0.1 from the student and stops it when the trainer is closed or the process exits."
        },
    )
    vllm_python: str | None = field(
        default=None,
        metadata={
            "help": "The Python of the environment vLLM is installed in, for the server hf_kd starts (e.g. "
            "'.venv-vllm/bin/python', made by scripts/setup_vllm.sh). None: this Python, when vLLM imports here."
        },
    )
    vllm_sync_steps: int = field(
        default=1,
        metadata={
            "help": "With `use_vllm`: push the student's weights into the engine every this many optimizer steps "
            "(1: rollouts always sample from the current student; more: cheaper, slightly off-policy)."
        },
    )
    vllm_sync_dir: str | None = field(
        default=None,
        metadata={
            "help": "With `use_vllm`: the folder the student's weights are written to for the engine to reload; it "
            "must be readable by the server (a shared disk for a remote one). None: a temporary folder."
        },
    )
    vllm_server_timeout: float = field(
        default=300.0,
        metadata={"help": "With `use_vllm` (or seq_kd from a served teacher): seconds each server request may take."},
    )
    on_policy_normalization: str = field(
        default="generated",
        metadata={
            "help": "What the loss of a generated step (on-policy with probability `lmbda`, or `seq_kd`) is divided "
            "by. 'generated' (default): the tokens generated in the step, so each generated token counts as much as "
            "a dataset token. 'gkd': the dataset labels the generations replaced, as TRL's GKDTrainer divides (its "
            "on-policy loss and gradients then scale with the dataset answers' length over the generations'); set "
            "it to reproduce a GKDTrainer run's losses exactly.",
            "choices": ["generated", "gkd"],
        },
    )
    invalid_rows: str = field(
        default="error",
        metadata={
            "help": "What to do with rows that cannot be trained on (a conversation that does not end with the "
            "assistant's answer, text that is not valid UTF-8, a malformed turn), found before training (every "
            "row of a map-style dataset, the first rows of a stream): 'error' (default) stops, naming the first "
            "few rows and why; 'skip' drops them with a warning.",
            "choices": ["error", "skip"],
        },
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; None = on when CUDA supports it, off on CPU."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Gradient checkpointing; None = on with CUDA, off on CPU."}
    )

    def __post_init__(self):
        cuda = torch.cuda.is_available() and not self.use_cpu
        if self.bf16 is None:
            self.bf16 = bool(cuda and torch.cuda.is_bf16_supported()) and not self.fp16
        if self.gradient_checkpointing is None and self.activation_checkpointing is None:
            # Resolved through the new name: `gradient_checkpointing` is transformers' deprecated alias of it.
            self.activation_checkpointing = cuda
        if self.use_cpu or not torch.accelerator.is_available():
            self.dataloader_pin_memory = False
        parse_recipe(self.kd_loss)  # unknown terms fail here listing the known ones, as do weights summing to 0
        if self.kd_temperature is not None and not 0 < self.kd_temperature < math.inf:
            raise ValueError(
                f"kd_temperature must be a positive number, got {self.kd_temperature}: the logits are divided by "
                "it, so 0 gives NaN and a negative value trains the student towards the inverted distribution. "
                "Use 1.0 (the distributions as they are), a larger value for softer ones, or None for each "
                "method's default."
            )
        if self.bridge is not None:
            bridge_class(self.bridge)  # unknown names fail here, listing the known ones
        if self.teacher_top_k < 1:
            raise ValueError(f"teacher_top_k must be >= 1, got {self.teacher_top_k}.")
        if self.teacher_cache_tail not in TAIL_SHAPES:
            raise ValueError(f"teacher_cache_tail must be one of {TAIL_SHAPES}, got {self.teacher_cache_tail!r}.")
        if self.on_policy_normalization not in ("generated", "gkd"):
            raise ValueError(
                f"on_policy_normalization must be 'generated' or 'gkd', got {self.on_policy_normalization!r}."
            )
        if self.invalid_rows not in ("error", "skip"):
            raise ValueError(f"invalid_rows must be 'error' or 'skip', got {self.invalid_rows!r}.")
        if self.vllm_mode not in ("server", "colocate"):
            raise ValueError(f"vllm_mode must be 'server' or 'colocate', got {self.vllm_mode!r}.")
        if self.vllm_sync_steps < 1:
            raise ValueError(
                f"vllm_sync_steps must be >= 1, got {self.vllm_sync_steps}: it is how many optimizer steps pass "
                "between two pushes of the student's weights into the vLLM engine."
            )
        if self.vllm_server_timeout <= 0:
            raise ValueError(f"vllm_server_timeout must be > 0 seconds, got {self.vllm_server_timeout}.")
        if self.vllm_server_url is not None and not self.vllm_server_url.startswith(("http://", "https://")):
            raise ValueError(
                f"vllm_server_url must be an http(s) URL such as 'http://127.0.0.1:8000/v1', got "
                f"{self.vllm_server_url!r}."
            )
        if not self.use_vllm and (self.vllm_server_url is not None or self.vllm_python is not None):
            raise ValueError(
                "vllm_server_url / vllm_python are set but use_vllm is False, so rollouts would use transformers' "
                "generate and the server would be ignored: set use_vllm=True, or drop them."
            )
        if self.scrg_corrections < 0:
            raise ValueError(f"scrg_corrections must be >= 0, got {self.scrg_corrections}.")
        super().__post_init__()

    def knob_value(self, knob_field: str) -> Any:
        """The value of a term's or bridge's knob; a knob whose dataclass this class does not inherit has no field."""
        if not hasattr(self, knob_field):
            raise ValueError(
                f"'{knob_field}' is not a DistillationConfig field: its term or bridge declares knobs that "
                "DistillationConfig does not inherit. Add its knobs dataclass to DistillationConfig's bases "
                "(hf_kd/config.py), or reuse an existing knob, or pass constructor arguments through `loss_kwargs`."
            )
        return getattr(self, knob_field)
