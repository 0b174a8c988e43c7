"""Every recipe under examples/recipes/ runs in its smoke form through the distillation script (hf_kd.distill, in
process), which `hf-kd distill` and examples/distill.py both run."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import yaml
from trl import ModelConfig

import hf_kd.cli
import hf_kd.distill
from hf_kd.distill import SMOKE_OVERRIDES, DistillScriptArguments, parse_args

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
RECIPES = sorted((EXAMPLES_DIR / "recipes").glob("*.yaml"))


def read_recipe(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_recipes_found():
    names = {path.stem for path in RECIPES}
    assert {"akl", "bild", "lora_student", "smoke"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_smoke_run(recipe, tmp_path):
    out = tmp_path / "out"
    argv = ["--config", str(recipe), "--smoke", "--max_steps", "2", "--output_dir", str(out)]
    result = hf_kd.distill.main(*parse_args(argv))

    assert math.isfinite(result["train_loss"])
    assert result["global_step"] == 2  # the command line wins over the smoke defaults (3 steps)
    if read_recipe(recipe).get("use_peft"):
        assert (out / "adapter_model.safetensors").is_file()
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert not (out / "model.safetensors").exists()
    else:
        assert (out / "model.safetensors").is_file()
    assert (out / "README.md").is_file()  # model card


def test_recipe_values_reach_the_config(tmp_path):
    argv = ["--config", str(EXAMPLES_DIR / "recipes" / "akl.yaml"), "--output_dir", str(tmp_path)]
    script_args, args, model_args = parse_args(argv)
    assert (args.kd_loss, args.akl_mu, args.lmbda) == ("akl", 0.5, 0.0)
    assert script_args.teacher == "smollm2-135m-instruct" and script_args.student_layers == 10
    assert not script_args.smoke and args.per_device_train_batch_size == 8
    assert model_args.model_name_or_path is None and not model_args.use_peft

    script_args, args, _ = parse_args([*argv, "--smoke", "--kd_loss", "bild", "--per_device_train_batch_size", "3"])
    assert script_args.smoke and args.use_cpu and args.report_to in ([], ["none"], "none")
    assert args.max_steps == SMOKE_OVERRIDES["max_steps"] and not args.bf16
    assert (args.kd_loss, args.per_device_train_batch_size) == ("bild", 3)  # the command line wins
    assert args.akl_mu == 0.5  # recipe values the smoke form does not touch are kept


def test_student_and_lora_fields_reach_trls_model_config(tmp_path):
    recipe = EXAMPLES_DIR / "recipes" / "lora_student.yaml"
    _, _, model_args = parse_args(["--config", str(recipe), "--output_dir", str(tmp_path), "--lora_r", "8"])
    assert model_args.model_name_or_path == read_recipe(recipe)["model_name_or_path"]
    assert model_args.use_peft and (model_args.lora_r, model_args.lora_alpha) == (8, 32)


def test_smoke_switch_inside_a_recipe(tmp_path):
    script_args, args, _ = parse_args(["--config", str(EXAMPLES_DIR / "recipes" / "smoke.yaml")])
    assert script_args.smoke and args.use_cpu and args.max_steps == SMOKE_OVERRIDES["max_steps"]


def test_dataset_file_in_dolly_layout_becomes_messages(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"instruction": f"Say {i}.", "context": "", "response": f"{i}"} for i in range(5)]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    dataset = hf_kd.distill.load_train_dataset(DistillScriptArguments(dataset_name=str(path), max_train_samples=3))

    assert len(dataset) == 3
    assert dataset[1]["messages"] == [{"role": "user", "content": "Say 1."}, {"role": "assistant", "content": "1"}]


def test_missing_dataset_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="missing.jsonl"):
        hf_kd.distill.load_train_dataset(DistillScriptArguments(dataset_name=str(tmp_path / "missing.jsonl")))


@pytest.mark.parametrize(
    ("fields", "student", "message"),
    [
        ({}, "s", "No teacher given"),
        ({"teacher": "t"}, None, "exactly one of `model_name_or_path`"),
        ({"teacher": "t", "student_layers": 2}, "s", "exactly one of `model_name_or_path`"),
    ],
)
def test_model_arguments_are_checked(tmp_path, fields, student, message):
    _, args, _ = parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true"])
    with pytest.raises(ValueError, match=message):
        hf_kd.distill.load_models(DistillScriptArguments(**fields), args, ModelConfig(model_name_or_path=student))


def test_student_cut_from_teacher_layers(tmp_path):
    """`student_layers` builds the student from a (local) teacher folder's layers and shares its tokenizer."""
    from hf_kd.smoke import make_chat_tokenizer, make_tiny_model

    tokenizer = make_chat_tokenizer()
    teacher_dir = tmp_path / "teacher"
    make_tiny_model(tokenizer, hidden=32, layers=4, seed=0).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    _, args, model_args = parse_args(["--output_dir", str(tmp_path / "out"), "--use_cpu", "true"])

    models = hf_kd.distill.load_models(
        DistillScriptArguments(teacher=str(teacher_dir), student_layers=2), args, model_args
    )

    assert models.teacher.config.num_hidden_layers == 4 and models.student.config.num_hidden_layers == 2
    assert models.tokenizer.get_vocab() == tokenizer.get_vocab() and models.teacher_tokenizer is None
    last_teacher = models.teacher.model.layers[3].mlp.down_proj.weight
    assert (models.student.model.layers[1].mlp.down_proj.weight == last_teacher).all()


def test_real_model_names_resolve_to_converted_folders(monkeypatch, tmp_path):
    import hf_kd.real_models

    converted = []
    monkeypatch.setattr(hf_kd.real_models, "load_real_model", lambda name: converted.append(name) or tmp_path / name)

    assert hf_kd.distill.resolve_model_path("smollm2-135m-instruct") == str(tmp_path / "smollm2-135m-instruct")
    assert hf_kd.distill.resolve_model_path("hf_kd:gemma-3-270m") == str(tmp_path / "gemma-3-270m")
    assert (
        hf_kd.distill.resolve_model_path("HuggingFaceTB/SmolLM2-360M-Instruct")
        == "HuggingFaceTB/SmolLM2-360M-Instruct"
    )
    assert converted == ["smollm2-135m-instruct", "gemma-3-270m"]


def test_hf_kd_distill_and_the_example_run_the_same_script(monkeypatch, tmp_path):
    """`hf-kd distill <flags>` and `python examples/distill.py <flags>` hand hf_kd.distill.main the same parsed
    arguments, config and model config."""
    argv = ["--config", str(EXAMPLES_DIR / "recipes" / "akl.yaml"), "--output_dir", str(tmp_path), "--max_steps", "2"]
    received = []

    def record(*parsed):
        received.append(parsed)
        return {"output_dir": parsed[1].output_dir}

    monkeypatch.setattr(hf_kd.distill, "main", record)
    assert hf_kd.cli.main(["distill", *argv]) == 0
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES_DIR / "distill.py"), *argv])
    runpy.run_path(str(EXAMPLES_DIR / "distill.py"), run_name="__main__")

    [(cli_args, cli_config, cli_model), (example_args, example_config, example_model)] = received
    assert cli_args == example_args and cli_model == example_model
    assert cli_config.to_dict() == example_config.to_dict()
    assert cli_config.max_steps == 2 and cli_args.student_layers == 10
