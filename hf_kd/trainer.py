"""DistillationTrainer: TRL's GKD trainer with hf_kd's losses, fused heads, bridges and generation callbacks.

The batch travels: collate -> rollout (dataset, student with probability lmbda, or teacher under seq_kd;
then the generation callbacks, e.g. SCRG) -> the teacher source's loss (``hf_kd.teachers``: a live teacher, a
teacher cache, a served teacher, a bridge or several teachers routed by a column, chosen once in ``__init__``) ->
log each term.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GenerationConfig, Trainer, TrainerCallback
from trl.experimental.gkd import GKDTrainer
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.sft_trainer import SFTTrainer
from trl.trainer.utils import disable_dropout_in_model

from .atomic import write_atomically, write_text_atomically
from .checkpoints import check_checkpoint, mark_rewrite, newest_complete_checkpoint
from .config import DistillationConfig
from .data import with_token_lengths
from .finiteness import TRAINING_CAUSES
from .formats import screen_rows, uses_chat_template
from .heads import padded_token_ids
from .hub import MODULES_FILE, TEACHERS_FILE, DistillationHubMixin
from .losses import DistillationLoss, Recipe
from .losses.cpu_allocator import tune_for_chunks
from .rollout import GeneratedBatch, GenerationCallback, GenerationContext, RolloutStep
from .rollout.backend import TransformersBackend, rollout_outputs
from .rollout.select import WeightSyncCallback, student_backend, teacher_backend
from .sharding import HELPER_OPTIMIZER_FILE, helper_optimizer_state_aside
from .teachers import ServedTeacher, make_teacher_source
from .teachers.base import POSITION_COUNTS, position_counts
from .validation import check_dataset, check_inherited_options, check_lora_targets, check_tokenizer

logger = get_logger(__name__)


def _checked_datasets(
    args: DistillationConfig | None, model: Any, processing_class: Any, train_dataset: Any, eval_dataset: Any
) -> tuple[Any, Any]:
    """The datasets after the checks that come before anything is loaded: the config's type and inherited options,
    the chat template, the datasets' types, the tokenizer, and every row (``formats.screen_rows``)."""
    if args is None:
        raise ValueError("Pass `args=DistillationConfig(output_dir=...)`.")
    if not isinstance(args, DistillationConfig):
        raise TypeError(f"`args` must be a DistillationConfig, got {type(args).__name__}.")
    check_inherited_options(args, student_is_loaded=model is not None and not isinstance(model, str))
    if args.chat_template_path is not None and processing_class is not None:  # SFTTrainer reads it after the check
        processing_class.chat_template = Path(args.chat_template_path).read_text(encoding="utf-8")
    check_dataset(train_dataset, "train_dataset", args)
    check_dataset(eval_dataset, "eval_dataset", args, evaluation=True)
    chat = uses_chat_template(train_dataset) or uses_chat_template(eval_dataset)
    check_tokenizer(processing_class, "processing_class (the student's tokenizer)", need_template=chat)
    train_dataset = screen_rows(train_dataset, "train_dataset", args.dataset_text_field, args.invalid_rows)
    eval_dataset = screen_rows(eval_dataset, "eval_dataset", args.dataset_text_field, args.invalid_rows)
    return train_dataset, eval_dataset


def _prepared_train_dataset(args: DistillationConfig, train_dataset: Any, processing_class: Any) -> Any:
    """The training data as the collator reads it: SFT's dataset preparation skipped (the collator tokenizes), its
    `shuffle_dataset` applied, token lengths added for length-grouped sampling."""
    args.remove_unused_columns = False
    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    if args.shuffle_dataset:  # SFTConfig's option, which SFT applies while preparing the (skipped) dataset
        train_dataset = train_dataset.shuffle(seed=args.seed)
    if args.train_sampling_strategy in ("group_by_length", "batch_rebalance"):
        train_dataset = with_token_lengths(train_dataset, processing_class, args.length_column_name)
    return train_dataset


class _ZeroHelperGradients(TrainerCallback):
    """The Trainer zeroes only the student's gradients after each optimizer step; do it for the helper modules."""

    def __init__(self, trainer: DistillationTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        for module in self.trainer.distillation_modules().values():
            module.zero_grad(set_to_none=True)


class DistillationTrainer(DistillationHubMixin, GKDTrainer):
    """Knowledge distillation on TRL's `GKDTrainer`, with AKL, BiLD, MGSR (DAC-KL, span, SCRG) and DSKD.

    Args beyond GKDTrainer's:
        teacher_processing_class: the teacher's tokenizer when it differs from the student's (requires
            `bridge="dskd"`); each model then tokenizes the same conversation with its own chat template.
        generation_callbacks: [`GenerationCallback`]s called after every on-policy/seq-kd generation.

    With `teacher_model=None` and a teacher cache as `train_dataset` (`hf_kd.load_teacher_cache`), training is
    off-policy from the cached top-k distributions, with no teacher in memory (see `hf_kd.teacher_cache`). With
    `teacher_model` a vLLM server's URL ("http://127.0.0.1:8000/v1", top-k `teacher_top_k`) or a
    `hf_kd.teachers.ServedTeacher`, each batch's token ids, generated ones included, are scored by that server.
    With `teacher_model` a dict of teachers ({"code": ..., "chat": ...}, each any of the above), each row is
    distilled from the teacher its `teacher_column` names (`hf_kd.teachers.TeacherRouter`).

    Inheritance: `GKDTrainer.__init__` is not run (it refuses differing vocabularies); `SFTTrainer.__init__` is,
    and the GKD set-up is redone here: the chat collator (`DataCollatorForChatML`, datasets left unprepared),
    `disable_dropout` (student and teacher), the teacher's preparation, `lmbda`/`beta`/`temperature`/`seq_kd`/
    `max_new_tokens` and the generation config. `training_step` (GKD's rollout) and `compute_loss` (the `kd_loss`
    recipe) are replaced. Options of the replaced code paths are honoured or refused, never ignored:

    * honoured: `activation_offloading` (the training step runs in SFTTrainer's offloading context), `max_length`
      (the collators cut conversations), `eos_token`, `use_liger_kernel` (SFTTrainer's set-up patches the
      models' kernels; its fused linear cross-entropy stays off), `chat_template_path` (a .jinja file),
      `shuffle_dataset`, `teacher_model_name_or_path` (when `teacher_model` is None) and the Trainer's own options;
    * refused with an error (`hf_kd.validation.check_inherited_options`): `packing`, `eval_packing`,
      `padding_free`, `assistant_only_loss`, `completion_only_loss=False`, `pad_to_multiple_of`, `loss_type` other
      than "nll", `label_smoothing_factor`, `truncation_mode="keep_end"`, `pad_token`, `dataset_num_proc`,
      `dataset_kwargs` beyond `skip_prepare_dataset`, `model_init_kwargs` with a loaded student, and an MoE
      student's router loss, whose code paths (SFT's dataset preparation, collator and loss) never run.

    docs/trl_compatibility.md lists every inherited option with what hf_kd does with it.
    """

    _tag_names = ["trl", "gkd", "hf_kd", "knowledge-distillation"]
    _name = "hf_kd"

    def __init__(
        self,
        model: nn.Module | str | None = None,
        teacher_model: nn.Module | ServedTeacher | str | dict[str, Any] | None = None,
        args: DistillationConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        preprocess_logits_for_metrics: Any = None,
        peft_config: Any = None,
        formatting_func: Any = None,
        teacher_processing_class: Any = None,
        generation_callbacks: list[GenerationCallback] | None = None,
    ):
        train_dataset, eval_dataset = _checked_datasets(args, model, processing_class, train_dataset, eval_dataset)
        self.teacher_source = make_teacher_source(
            teacher_model, model, train_dataset, eval_dataset, args, processing_class, teacher_processing_class
        )
        if teacher_processing_class is not None:
            check_tokenizer(teacher_processing_class, "teacher_processing_class", need_template=False)
        if peft_config is not None and not isinstance(model, str):
            check_lora_targets(model, peft_config)
        train_dataset = _prepared_train_dataset(args, train_dataset, processing_class)
        if data_collator is None:
            data_collator = self.teacher_source.collator(processing_class, args)
        # GKDTrainer.__init__ refuses differing vocabularies outright; its remaining set-up is done below.
        SFTTrainer.__init__(
            self,
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        self._check_student(model, peft_config)
        self.teacher_processing_class = teacher_processing_class
        self._setup_distillation(generation_callbacks)

    # ------------------------------------------------------------------ set-up
    def _check_student(self, model: nn.Module | str | None, peft_config: Any) -> None:
        """Refuse, once SFTTrainer has loaded it, a student whose LoRA config matches no module or whose MoE router
        loss SFT would add (this trainer's loss is `kd_loss` alone)."""
        if peft_config is not None and isinstance(model, str):
            check_lora_targets(self.model, peft_config)
        if self.aux_loss_enabled:  # set by SFTTrainer for MoE students; its compute_loss, not this one, adds the loss
            raise ValueError(
                "The student is a Mixture-of-Experts model whose router load-balancing loss SFT adds (coefficient "
                f"{self.router_aux_loss_coef}), but DistillationTrainer's loss is `kd_loss` alone. Set "
                "`router_aux_loss_coef=0.0` to distill without it."
            )

    def _setup_distillation(self, generation_callbacks: list[GenerationCallback] | None) -> None:
        """GKD's set-up that GKDTrainer.__init__ would do, and hf_kd's: dropout off, sharding checked, the recipe's
        loss built against the teacher source, the source prepared, generation and its callbacks."""
        args = self.args
        if args.disable_dropout:
            disable_dropout_in_model(self.model)
        self._check_sharding()
        self.recipe = Recipe.from_config(args)  # kd_loss parsed once: the loss, a bridge and the card read it
        self.loss_fn = self.teacher_source.build_loss(self.recipe, args)  # None when a bridge builds its own terms
        if args.device.type == "cpu":  # chunk temporaries reuse their pages (HF_KD_TUNE_MALLOC=0 opts out)
            tune_for_chunks()
        self.teacher_source.prepare(self)
        self.teacher_model = self.teacher_source.model
        self._setup_generation()
        self._reference_loss, self._generated_loss = self._split_reference_terms()
        self.generation_callbacks = list(generation_callbacks or [])
        if args.scrg_corrections > 0:
            from .rollout.scrg import SCRGCallback

            self.generation_callbacks.insert(0, SCRGCallback(corrections=args.scrg_corrections))
        self.add_callback(_ZeroHelperGradients(self))
        # compute_loss always normalises by num_items_in_batch when given: the Trainer must not rescale.
        self.model_accepts_loss_kwargs = True

    def _check_sharding(self) -> None:
        """Warn when an FSDP request did not shard; refuse head-reading losses where heads cannot be gathered.

        The fused loss and the DSKD bridge read LM-head (and embedding) weights outside the forward pass; under
        FSDP2 and DeepSpeed ZeRO-3 they are gathered around the loss (`hf_kd.sharding.gathered`), under FSDP1
        (flat parameters) they cannot be.
        """
        fsdp_requested = bool(self.args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
        if fsdp_requested and not self.is_fsdp_enabled:
            logger.warning(
                f"FSDP was requested but this run is not sharded: accelerate runs it as "
                f"{self.accelerator.distributed_type} (on CPU it turns an FSDP request into DDP), so every process "
                "holds a full student and teacher. Shard on GPUs, or wrap the models with "
                "torch.distributed.fsdp.fully_shard yourself.",
                main_process_only=True,
            )
        reads_heads = self.args.fused_loss or self.args.bridge
        if reads_heads and self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            logger.warning(
                "fused_loss / the DSKD bridge under DeepSpeed ZeRO-3 gather the heads with "
                "deepspeed.zero.GatheredParameters; this path has not been run yet (see docs/scaling.md). FSDP2 "
                "is the tested configuration; fused_loss=False without a bridge avoids reading heads at all.",
                main_process_only=True,
            )
        if reads_heads and self.is_fsdp_enabled and not self.accelerator.is_fsdp2:
            raise ValueError(
                "fused_loss and the DSKD bridge read LM-head weights outside the forward pass, which FSDP1's flat "
                "parameters cannot expose: use FSDP2 (accelerate `fsdp_version: 2`, as in "
                "examples/accelerate/fsdp.yaml), DeepSpeed ZeRO-3, or fused_loss=False without a bridge."
            )

    def _setup_generation(self) -> None:
        args = self.args
        self.lmbda, self.beta, self.temperature, self.seq_kd = args.lmbda, args.beta, args.temperature, args.seq_kd
        self.generation_kwargs = {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "do_sample": True,
            "top_k": 0,
            "top_p": 1.0,
            "use_cache": not args.gradient_checkpointing,
            "pad_token_id": self.processing_class.pad_token_id,
        }
        self.generation_config = GenerationConfig(**self.generation_kwargs)
        # Sequences never hold a padded head row (no token) of the student, or of a teacher that may write into them.
        teacher_writes = self.teacher_source.generates and self.teacher_model is not None
        generators = [self.model, self.teacher_model] if teacher_writes else [self.model]
        vocab_size = self.teacher_source.vocab_size
        padded = padded_token_ids(generators, vocab_size) if vocab_size is not None else []
        if padded:  # on-policy, seq-kd and SCRG generations never emit a padded head row
            self.generation_config.suppress_tokens = padded
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        self.generation_config.eos_token_id = eos if eos is not None else self.processing_class.eos_token_id
        if args.use_vllm and args.lmbda == 0:
            raise ValueError(
                "use_vllm=True generates the student's rollouts with vLLM, but lmbda=0 never lets the student "
                "generate: set lmbda > 0, or use_vllm=False (seq_kd from a served teacher generates with its server "
                "either way)."
            )
        # the student's rollouts (and SCRG's re-generations); seq_kd from a served teacher generates with its server
        self.rollout_backend = student_backend(args, self.model, self.processing_class, self.accelerator)
        self.teacher_rollout_backend = teacher_backend(self.teacher_source, args) or TransformersBackend()
        if args.use_vllm:
            self.add_callback(WeightSyncCallback(self))

    def _split_reference_terms(self) -> tuple[DistillationLoss | None, DistillationLoss | None]:
        """(the recipe's `ce` term, the other terms), each as a loss sharing the recipe's term modules.

        On generated steps the SFT term belongs to the dataset's reference answers, not to the generated (student
        or SCRG-corrected) sequences: imitating its own samples teaches the student nothing (MGSR's L_SFT, and
        the SFT term of a mixed recipe). `compute_loss` runs `ce` on the reference batch and the other terms on the
        generated one; this costs one more forward and backward of the student (and a teacher forward) on
        generated steps. None, None when the recipe has no `ce` term."""
        if self.loss_fn is None or "ce" not in [t.name for t in self.loss_fn.terms]:
            return None, None
        chunk = self.args.loss_chunk_size
        pairs = list(zip(self.loss_fn.terms, self.loss_fn.weights))
        ce = [(t, w) for t, w in pairs if t.name == "ce"]
        others = [(t, w) for t, w in pairs if t.name != "ce"]
        reference = DistillationLoss([t for t, _ in ce], [w for _, w in ce], chunk)
        generated = DistillationLoss([t for t, _ in others], [w for _, w in others], chunk) if others else None
        return reference, generated

    @property
    def bridge(self) -> nn.Module | None:
        """The bridge's trainable modules (DSKD's projectors) when the teacher source is a bridge, else None."""
        return self.teacher_source.modules().get("bridge")

    @property
    def cache_reconstruction(self) -> nn.Module | None:
        """How top-k teacher rows are rebuilt (``TopKReconstruction``) when the source delivers them, else None."""
        return getattr(self.teacher_source, "reconstruction", None)

    def distillation_modules(self) -> dict[str, nn.Module]:
        """Trainable helper modules beside the student (DAC-KL sub-network, DSKD projectors)."""
        modules = {"loss": self.loss_fn, **self.teacher_source.modules()}
        return {k: m for k, m in modules.items() if m is not None and any(True for _ in m.parameters())}

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer plus one parameter group per trainable loss term and per bridge, each at the learning
        rate its class declares (``lr_knob``), without weight decay."""
        optimizer = super().create_optimizer(model)
        terms = list(self.loss_fn.terms) if self.loss_fn is not None else []
        owners = [*self.teacher_source.modules().values(), *terms]
        for owner in owners:
            params = [p for p in owner.parameters() if p.requires_grad]
            if not params or any(p is q for g in optimizer.param_groups for q in g["params"] for p in params):
                continue
            if owner.lr_knob is None:
                raise ValueError(
                    f"{type(owner).__name__} has trainable parameters but declares no `lr_knob`: declare the knob "
                    "that holds their learning rate."
                )
            lr = self.args.knob_value(owner.lr_knob)
            optimizer.add_param_group({"params": params, "lr": lr, "weight_decay": 0.0})
        return optimizer

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        """Clip to `max_grad_norm` by one global norm over the student and the helper modules, as if they were one
        model (the Trainer alone would clip the student only). Under DeepSpeed, FSDP or mixed device meshes the
        student is clipped by the Trainer's own means and the helpers by their own norm."""
        helpers = [p for m in self.distillation_modules().values() for p in m.parameters() if p.grad is not None]
        if not helpers:
            return super()._clip_grad_norm(model)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or self._has_mixed_mesh_grads(model):
            norm = super()._clip_grad_norm(model)
            torch.nn.utils.clip_grad_norm_(helpers, self.args.max_grad_norm)
            return norm
        return self.accelerator.clip_grad_norm_([*model.parameters(), *helpers], self.args.max_grad_norm)

    # ------------------------------------------------------------------ rollout
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """GKD's rollout (student with probability lmbda, else teacher under seq_kd), then the callbacks.

        Fixes TRL's normalisation on generated steps: the loss is divided by the generated tokens of the
        micro-batch (times the accumulation steps), not by the count of the collated labels it replaced;
        `on_policy_normalization="gkd"` keeps TRL's count, to reproduce a GKDTrainer run.
        """
        source = "student" if random.random() < self.lmbda else ("teacher" if self.seq_kd else None)
        if source is not None:
            generated = self._rollout(model, inputs, source)
            reference = None
            if self._reference_loss is not None:  # see _split_reference_terms
                reference = {key: inputs[key] for key in ("input_ids", "attention_mask", "labels")}
            if self.args.on_policy_normalization == "generated":
                steps = self.current_gradient_accumulation_steps
                count = (generated["labels"][:, 1:] != -100).sum()
                generated[POSITION_COUNTS] = {k: v * steps for k, v in self._position_counts([generated]).items()}
                inputs = RolloutStep(generated, count.clamp_min(1) * steps, reference, num_items_in_batch)
            else:  # "gkd": TRL's count, the replaced batch's labels (gathered, as are its position counts)
                inputs = RolloutStep(generated, num_items_in_batch, reference, num_items_in_batch, gathered=True)
            num_items_in_batch = inputs.num_items
        with self.maybe_activation_offload_context:  # SFTTrainer's `activation_offloading`
            loss = Trainer.training_step(self, model, inputs, num_items_in_batch)
        self._sync_helper_gradients()
        return loss

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """Trainer's micro-batches of one optimizer step and their token count, plus the row count of every term
        computed off the response tokens (``TokenLoss.positions``, e.g. ``prompt_fkl``), summed over the
        micro-batches and gathered over processes like ``num_items_in_batch``; stored in each batch."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = self._position_counts(batches)
        if counts and self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = {key: self.accelerator.gather(value.to(device)).sum() for key, value in counts.items()}
        for batch in batches:
            batch[POSITION_COUNTS] = counts
        return batches, num_items_in_batch

    def _position_counts(self, batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return position_counts(self.loss_fn, batches, self.processing_class, self.args)

    def _rollout(self, model: nn.Module, inputs: dict[str, Any], source: str) -> dict[str, Any]:
        """Generate completions of the batch's prompts with the student (on-policy) or the teacher (seq_kd), each with
        its rollout backend, then run the generation callbacks on them."""
        generator = model if source == "student" else self.teacher_model
        backend = self.rollout_backend if source == "student" else self.teacher_rollout_backend
        unwrapping = (
            unwrap_model_for_generation(
                generator,
                self.accelerator,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs if source == "student" else None,
            )
            if generator is not None  # a served teacher generates in its server
            else contextlib.nullcontext()
        )
        prompts, prompt_mask = inputs["prompts"], inputs["prompt_attention_mask"]
        with unwrapping as unwrapped:
            sequences = backend.generate(unwrapped, prompts, prompt_mask, self.generation_config)
            ids, mask, labels = rollout_outputs(sequences, prompt_mask, self.generation_config)
            batch = GeneratedBatch(ids, mask, labels, prompts.shape[1], source)
            if self.generation_callbacks:
                student = unwrapped if source == "student" else self.accelerator.unwrap_model(model)
                ctx = GenerationContext(
                    student=student,
                    teacher=unwrapped if source == "teacher" else self._unwrapped_teacher(),
                    tokenizer=self.processing_class,
                    teacher_tokenizer=self.teacher_processing_class,
                    generation_config=self.generation_config,
                    args=self.args,
                    score_teacher=self.teacher_source.score_completions,
                    generate_student=functools.partial(self.rollout_backend.generate, student),
                )
                for callback in self.generation_callbacks:
                    batch = callback.on_generation(batch, ctx)
        for key, value in batch.stats.items():
            self._metrics["train"][key].append(float(value))
        new_inputs = {**inputs, "input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        new_inputs["labels"] = batch.labels
        new_inputs.update(self.teacher_source.inputs_for_generated(batch, inputs))
        return new_inputs

    def _unwrapped_teacher(self) -> nn.Module | None:
        """The teacher model for the generation callbacks; None when it is not in this process (a served teacher)."""
        return None if self.teacher_model is None else self.accelerator.unwrap_model(self.teacher_model)

    def _sync_helper_gradients(self) -> None:
        """Average helper-module gradients across processes (they live outside the DDP-wrapped student)."""
        if self.accelerator.num_processes <= 1:
            return
        for module in self.distillation_modules().values():
            for p in module.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)

    # ------------------------------------------------------------------ loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any] | RolloutStep,
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        """The teacher source's loss of a micro-batch, one call per batch. A generated micro-batch (RolloutStep) is
        normalised by its own count; its recipe's `ce` term trains on the batch it replaced (_split_reference_terms).
        ``return_outputs``: the student's outputs with their logits at every position (what evaluation hands
        `compute_metrics`, as transformers' Trainer does); the loss is the same.
        """
        if not isinstance(inputs, RolloutStep):
            parts = [(inputs, num_items_in_batch, self.loss_fn, self._process_scale(num_items_in_batch))]
        else:  # a generated batch; its count is gathered over processes under on_policy_normalization="gkd"
            scale = self._process_scale(inputs.num_items) if inputs.gathered else 1
            parts = [(inputs.inputs, inputs.num_items, self.loss_fn, scale)]  # loss_fn None: the bridge's own terms
            if inputs.reference is not None:
                ref_items = inputs.reference_num_items
                parts = [(inputs.reference, ref_items, self._reference_loss, self._process_scale(ref_items))]
                if self._generated_loss is not None:
                    parts.append((inputs.inputs, inputs.num_items, self._generated_loss, scale))
        loss, terms, outputs, checked = 0, {}, None, []
        for batch, num_items, loss_fn, scale in parts:
            value, values, outputs, valid = self.teacher_source.loss(model, batch, num_items, loss_fn, return_outputs)
            loss, terms = loss + value * scale, {**terms, **values}
            checked += [(batch, valid)] if valid is not None else []
        self._stop_on_non_finite(inputs, checked, loss)
        mode = "train" if model.training else "eval"
        for name, value in terms.items():
            self._metrics[mode][f"loss/{name}"].append(float(value))
        for name, value in self.teacher_source.batch_metrics().items():
            self._metrics[mode][name].append(value)
        if return_outputs and outputs is None:  # a bridge or a router runs its own forwards: the logits need one more
            with torch.no_grad():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return (loss, outputs) if return_outputs else loss

    def _process_scale(self, num_items_in_batch: Any) -> int:
        """The process count when `num_items_in_batch` was summed over processes (DDP then averages), else 1."""
        summed = num_items_in_batch is not None and self.args.average_tokens_across_devices
        return self.accelerator.num_processes if summed else 1

    def _stop_on_non_finite(
        self,
        inputs: dict[str, Any],
        checked: list[tuple[dict[str, Any], torch.Tensor]],
        loss: torch.Tensor | None = None,
    ) -> None:
        """Raise, before the update, when a teacher row or the loss is NaN/inf: the Trainer would log the step's
        loss as 0 (its NaN filter) and save a NaN student. ``checked`` holds each batch with its teacher-row
        validity ([B, T], ``valid_rows``); ``inputs`` is the step's batch. One host sync when all is finite."""
        flags = [valid.all() for _, valid in checked] + ([] if loss is None else [loss.detach().isfinite().all()])
        if not flags or bool(torch.stack(flags).all()):
            return
        step = self.state.global_step
        where = f"training step {step + 1}" if self.model.training else f"evaluation at global step {step}"
        rows = self.teacher_source.rows_name(self.args.fused_loss)
        found = []
        for batch, valid in checked:
            bad = (~valid).any(-1).nonzero().flatten().tolist()
            if bad:
                found.append(
                    f"the teacher's {rows} hold NaN or inf in {len(bad)} of the batch's {len(valid)} sequences "
                    f"(rows {bad[:8]}; row {bad[0]} reads {self._row_text(batch, bad[0])!r})"
                )
        if not found:  # the teacher is fine: the loss itself (the student, a temperature, a term) is not
            found.append(
                f"the loss is {loss.item()} on the batch of {len(inputs['input_ids'])} sequences (row 0 reads "
                f"{self._row_text(inputs, 0)!r})"
            )
        raise FloatingPointError(
            f"Non-finite values at {where}: {'; '.join(found)}. Stopped before this step's update, so the student "
            f"is not ruined (nor saved or pushed NaN). Likely causes: {TRAINING_CAUSES}."
        )

    def _row_text(self, batch: dict[str, Any], row: int, chars: int = 80) -> str:
        """The start of one sequence of a batch, as text, to find it in the dataset."""
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        return self.processing_class.decode(ids, skip_special_tokens=True)[:chars]

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        target = Path(output_dir or self.args.output_dir)
        record = self.teacher_source.record()
        if record is not None:
            write_text_atomically(target / TEACHERS_FILE, json.dumps(record, indent=2))
        modules = self.distillation_modules()
        if modules:
            tensors = {
                f"{name}.{key}": value.detach().contiguous().cpu()
                for name, module in modules.items()
                for key, value in module.state_dict().items()
            }
            write_atomically(target / MODULES_FILE, lambda partial: save_file(tensors, str(partial)))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Trainer's save; under FSDP the helper modules' optimizer state goes to a file of its own (see
        `hf_kd.sharding.helper_optimizer_state_aside`: accelerate's FSDP optimizer checkpoint knows the student's
        parameters only)."""
        with self._fsdp_helper_state(output_dir, save=True):
            super()._save_optimizer_and_scheduler(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        with self._fsdp_helper_state(checkpoint, save=False):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _fsdp_helper_state(self, folder: str | None, save: bool):
        helpers = [p for m in self.distillation_modules().values() for p in m.parameters()]
        if folder is None or not (self.is_fsdp_enabled and helpers) or self.optimizer is None:
            return contextlib.nullcontext()
        return helper_optimizer_state_aside(self.optimizer, helpers, folder, save)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """Trainer's `train`, resuming from complete checkpoints only (`hf_kd.checkpoints`): with
        `resume_from_checkpoint=True` the newest complete `checkpoint-N` of `output_dir` (a folder whose save was cut
        short is skipped with a warning); a path to an incomplete folder is refused with the reason."""
        required = self._checkpoint_helper_files()
        if resume_from_checkpoint is True:
            resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir, required)
        elif resume_from_checkpoint:
            check_checkpoint(resume_from_checkpoint, required)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Trainer's checkpoint save; a folder it rewrites reads as incomplete until saved again (`mark_rewrite`)."""
        if self.args.should_save:
            mark_rewrite(self._get_output_dir(trial=trial), self.state.global_step)
        super()._save_checkpoint(model, trial)

    def _checkpoint_helper_files(self) -> list[str]:
        """hf_kd's files in every checkpoint of this run: the teachers' record (several teachers), the helper modules
        (and, under FSDP, their optimizer)."""
        files = [TEACHERS_FILE] if self.teacher_source.record() is not None else []
        if self.distillation_modules():
            files += [MODULES_FILE, HELPER_OPTIMIZER_FILE] if self.is_fsdp_enabled else [MODULES_FILE]
        return files

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self._check_teacher_record(resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.load_distillation_modules(resume_from_checkpoint)

    def _check_teacher_record(self, folder: str | os.PathLike) -> None:
        """Refuse to resume with other teachers than the checkpoint was trained with (its ``TEACHERS_FILE``)."""
        record, path = self.teacher_source.record(), Path(folder) / TEACHERS_FILE
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if saved != record:
            raise ValueError(
                f"{folder} was trained with the teachers {saved} but this run has {record}: resuming would "
                "continue the run from other teachers. Pass the checkpoint's teachers, or start a new run."
            )

    def load_distillation_modules(self, folder: str | os.PathLike) -> None:
        """Restore the helper modules saved beside a student (an error if they are expected but missing)."""
        modules = self.distillation_modules()
        if not modules:
            return
        path = Path(folder) / MODULES_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: this run has trainable distillation modules ({', '.join(modules)}) but the "
                "checkpoint has no saved state for them, so it cannot be resumed exactly."
            )
        tensors = load_file(str(path))
        for name, module in modules.items():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
