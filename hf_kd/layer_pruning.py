"""Students initialised from a teacher's layers (DistilBERT-style): which layers to keep, and the pruned model.

:func:`student_layers` chooses the layers (evenly spaced, or by ShortGPT's block influence on calibration data);
:func:`prune_layers` builds the shallower model in memory and :func:`make_layer_pruned_student` saves it with the
teacher's tokenizer as a plain Hugging Face folder.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch


def evenly_spaced_layers(num_layers: int, num_total: int) -> list[int]:
    """``num_layers`` indices spread evenly over ``range(num_total)``, always the first and (for n >= 2) the last.

    Index i is ``round(i * (num_total - 1) / (num_layers - 1))`` with halves rounded up; e.g. 30 -> 10 gives
    [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]. ``num_layers == 1`` keeps only the first layer.
    """
    if not 1 <= num_layers <= num_total:
        raise ValueError(f"num_layers must be between 1 and the teacher's {num_total} layers, got {num_layers}")
    if num_layers == 1:
        return [0]
    span, steps = num_total - 1, num_layers - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(num_layers)]


@torch.no_grad()
def block_influence(model: torch.nn.Module, tokenizer, conversations: list[list[dict[str, str]]], batch_size: int = 8):
    """Block influence of each decoder layer (ShortGPT, Men et al., arXiv 2403.03853, Eq. 2): 1 - cos(x_in, x_out).

    The cosine similarity between a layer's input and output hidden states is averaged over every non-padding token
    of ``conversations`` (chat messages, rendered with the tokenizer's chat template). A layer that barely turns
    its input has a low influence and is the cheapest to drop. Returns a float tensor [num_layers].
    """
    if not conversations:
        raise ValueError("block_influence needs at least one conversation to measure the layers on.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(model.config.num_hidden_layers, dtype=torch.float64)
    tokens = 0
    for start in range(0, len(conversations), batch_size):
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations[start : start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        hidden = model(**batch, output_hidden_states=True).hidden_states
        keep = batch["attention_mask"].bool()
        for layer in range(len(total)):
            cos = torch.nn.functional.cosine_similarity(hidden[layer][keep], hidden[layer + 1][keep], dim=-1)
            total[layer] += (1.0 - cos.double()).sum().cpu()
        tokens += int(keep.sum())
    model.train(was_training)
    return (total / tokens).float()


def calibration_conversations(dataset, count: int = 32) -> list[list[dict[str, str]]]:
    """``count`` conversations (``messages``) evenly spread over ``dataset``, to measure block influence on."""
    step = max(1, len(dataset) // count)
    return [dataset[i]["messages"] for i in range(0, len(dataset), step)][:count]


def student_layers(teacher: torch.nn.Module, tokenizer, dataset, num_layers: int, selection: str) -> list[int]:
    """The teacher layers a pruned student keeps: ``"influence"`` (highest block influence on ``dataset``, first and
    last always kept) or ``"even"`` (evenly spaced)."""
    if selection == "even":
        return evenly_spaced_layers(num_layers, teacher.config.num_hidden_layers)
    if selection != "influence":
        raise ValueError(f"layer selection must be 'influence' or 'even', got {selection!r}.")
    return influential_layers(block_influence(teacher, tokenizer, calibration_conversations(dataset)), num_layers)


def influential_layers(influence: torch.Tensor, num_layers: int) -> list[int]:
    """The ``num_layers`` layers to keep: the first and the last always, then those of highest block influence."""
    total = len(influence)
    if not 2 <= num_layers <= total:
        raise ValueError(f"num_layers must be between 2 and the teacher's {total} layers, got {num_layers}")
    middle = sorted(range(1, total - 1), key=lambda i: float(influence[i]), reverse=True)
    return sorted([0, total - 1, *middle[: num_layers - 2]])


def _decoder_layers_prefix(model: torch.nn.Module) -> str:
    """State-dict prefix of the decoder-layer list (``model.layers`` for Llama/Gemma/Qwen-style models)."""
    num = model.config.num_hidden_layers
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] == "layers" and len(module) == num
    ]
    if len(candidates) != 1:
        raise ValueError(
            f"Cannot find a unique decoder-layer list of length {num} named '*.layers' in "
            f"{type(model).__name__} (found {candidates}); layer pruning supports decoder-only models whose blocks "
            "live in `model.model.layers`."
        )
    return candidates[0] + "."


def _pruned_config(config, keep: list[int]):
    """Copy of a teacher config with only the kept layers (per-layer lists such as ``layer_types`` are subset)."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    config.name_or_path = ""
    return config


def prune_layers(teacher: torch.nn.Module, keep_layers: list[int] | int) -> torch.nn.Module:
    """In-memory student keeping the teacher's embeddings, the listed decoder layers (in order), final norm and head.

    ``keep_layers`` is either an explicit, strictly increasing list of teacher layer indices, or an int ``n``
    meaning :func:`evenly_spaced_layers` (n, teacher layers). The student is built fresh from the pruned config, so
    every layer knows its new index (KV cache), and the teacher's weights are copied in.
    """
    total = teacher.config.num_hidden_layers
    keep = evenly_spaced_layers(keep_layers, total) if isinstance(keep_layers, int) else list(keep_layers)
    if not keep or any(not 0 <= i < total for i in keep) or keep != sorted(set(keep)):
        raise ValueError(f"keep_layers must be strictly increasing indices in [0, {total}), got {keep_layers}")
    prefix = _decoder_layers_prefix(teacher)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix):
            old, rest = key[len(prefix) :].split(".", 1)
            if int(old) not in new_index:
                continue
            key = f"{prefix}{new_index[int(old)]}.{rest}"
        state[key] = value
    dtype = next(teacher.parameters()).dtype
    student = type(teacher)(_pruned_config(teacher.config, keep)).to(dtype)
    student.load_state_dict(state, strict=True)
    student.tie_weights()
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


def make_layer_pruned_student(
    teacher_path_or_model: str | os.PathLike | torch.nn.Module,
    keep_layers: list[int] | int,
    out_dir: str | os.PathLike,
    tokenizer=None,
) -> Path:
    """Save a layer-pruned student (see :func:`prune_layers`) with the teacher's tokenizer as a plain HF folder.

    When the teacher is a folder its tokenizer (and chat template) is loaded from there; when it is a model object,
    pass ``tokenizer``. Returns ``out_dir``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(teacher_path_or_model, torch.nn.Module):
        teacher = teacher_path_or_model
        if tokenizer is None:
            raise ValueError("Pass `tokenizer=` when the teacher is a model object, so the student can ship with it.")
    else:
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path_or_model, dtype=torch.float32)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(teacher_path_or_model)
    student = prune_layers(teacher, keep_layers)
    out_dir = Path(out_dir)
    student.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
