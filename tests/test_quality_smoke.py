"""Smoke test of benchmarks/quality.py: its per-method function trains tiny random models for 2 steps and reports
its fields; the page renders from the records. Only presence and range of the fields are checked, never quality."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_conversations, make_model, make_tokenizer
from datasets import Dataset

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
TINY_METHODS = ["teacher", "student-init", "sft", "trl-gkd", "jsd", "akl", "bild", "mgsr", "dskd", "dskd-cma"]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_budget(quality):
    return quality.Budget(
        steps=2,
        batch=2,
        learning_rate=1e-3,
        max_length=64,
        eval_samples=4,
        max_new_tokens=4,
        lmbda=0.0,
        mgsr_lmbda=1.0,  # every MGSR step generates, so SCRG runs
        seeds=1,
        eval_batch=2,
    )


def tiny_pair(quality, method: str):
    """Fresh tiny models; the dskd-cma row's teacher gets a tokenizer with a different vocabulary."""
    tokenizer = make_tokenizer()
    student = make_model(len(tokenizer), hidden=32, layers=1, seed=1)
    kl_teacher = make_model(len(tokenizer), hidden=48, layers=2, seed=2)
    if quality.METHODS[method].teacher == quality.SMOLLM2:
        return quality.Pair(student, tokenizer, kl_teacher, kl_teacher)
    teacher_tokenizer = make_tokenizer(extra_words=["sun", "moon", "sky"])
    teacher = make_model(len(teacher_tokenizer), hidden=48, layers=2, seed=3)
    return quality.Pair(student, tokenizer, teacher, kl_teacher, teacher_tokenizer)


@pytest.mark.parametrize("method", TINY_METHODS)
def test_run_method_fields(quality, method, tmp_path):
    spec = quality.RunSpec(
        method=method,
        seed=0,
        budget=tiny_budget(quality),
        output_dir=str(tmp_path / method),
        config_overrides={"loss_kwargs": {"dac_kl_hidden": 8}} if method == "mgsr" else {},
    )
    assert quality.RunSpec.from_dict(json.loads(json.dumps(dataclasses.asdict(spec)))) == spec
    train = Dataset.from_list(make_conversations(8, seed=0))
    heldout = Dataset.from_list(make_conversations(6, seed=1))
    record = quality.run_method(spec, tiny_pair(quality, method), train, heldout)

    assert record["method"] == method and record["seed"] == 0
    assert 0 <= record["rouge_l"] <= 100 and 0 <= record["exact_match"] <= 100
    assert record["num_samples"] == 4 and record["eval_s"] > 0 and record["eval_cpu_s"] > 0
    assert record["mean_answer_words"] >= 0 and 0 <= record["empty_answers_pct"] <= 100
    assert len(record["predictions"]) == 4 and all(isinstance(x, str) for x in record["predictions"])
    assert record["rouge_l_se"] >= 0
    trained = quality.METHODS[method].trainer is not None
    evaluates_teacher = quality.METHODS[method].evaluates == "teacher"
    assert ("kl" in record) == (not evaluates_teacher)
    if "kl" in record:
        assert record["kl"] >= 0
    assert ("train_s" in record) == trained
    if trained:
        assert record["global_step"] == 2 and record["train_s"] > 0 and record["train_cpu_s"] > 0
        assert torch.isfinite(torch.tensor(record["train_loss"]))
        assert record["lmbda"] == (1.0 if method == "mgsr" else 0.0)
    if method == "mgsr":
        assert {"loss/ce", "loss/dac_kl", "loss/span"} <= set(record["last_logged"])
        assert any(key.startswith("scrg/") for key in record["last_logged"])


def test_page_renders_from_records(quality, tmp_path):
    budget = tiny_budget(quality)
    records = [
        {"method": "teacher", "seed": 0, "lmbda": 0.0, "rouge_l": 80.0, "exact_match": 50.0, "num_samples": 4},
        {
            "method": "akl",
            "seed": 0,
            "lmbda": 0.0,
            "rouge_l": 20.0,
            "exact_match": 5.0,
            "kl": 1.5,
            "train_s": 3.0,
            "train_cpu_s": 6.0,
        },
        {
            "method": "akl",
            "seed": 1,
            "lmbda": 0.0,
            "rouge_l": 22.0,
            "exact_match": 7.0,
            "kl": 1.3,
            "train_s": 3.2,
            "train_cpu_s": 6.0,
        },
        {"method": "bild", "seed": 0, "error": "exit 1: boom"},
    ]
    payload = {
        "budget_name": "tiny",
        "budget": dataclasses.asdict(budget),
        "threads": 1,
        "environment": {"cpu": "x86_64", "cpu_count": 2, "python": "3", "torch": "t", "transformers": "x", "trl": "y"},
        "methods": list(quality.METHODS),
        "commands": ["python benchmarks/quality.py --budget tiny"],
        "wall_s": 60.0,
        "results": records,
        "commentary": "Observed on this run only.",
    }
    page = quality.write_outputs(payload, tmp_path / "quality_tiny.json")
    assert (tmp_path / "quality_tiny.md").read_text() == page
    assert (
        "| akl | kd_loss=akl, mu 0.5 | 0 | 2 | 21.00 ± 1.41 | - | 6.0 ± 1.4 | 1.400 ± 0.141 | - | 3 ± 0 | 6 ± 0 |"
        in page
    )
    assert "| teacher |" in page and "error: exit 1: boom" in page
    assert "lmbda = 0 for every distillation row" in page and "Observed on this run only." in page
    assert json.loads((tmp_path / "quality_tiny.json").read_text())["results"] == records
