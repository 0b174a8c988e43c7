"""Every recipe under examples/recipes/ runs in its smoke form through examples/distill.py (in process), and
`hf-kd distill` reads every recipe as the example does (both run on hf_kd.distill)."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

import hf_kd.cli
import hf_kd.distill
from hf_kd.distill import DistillArguments

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
RECIPES = sorted((EXAMPLES_DIR / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def distill() -> ModuleType:
    """examples/distill.py as a module (examples/ on sys.path, as when the script runs)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLES_DIR))
        module = importlib.import_module("distill")
        importlib.import_module("smoke")
        yield module
    sys.modules.pop("distill", None)
    sys.modules.pop("smoke", None)


def read_recipe(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_recipes_found():
    names = {path.stem for path in RECIPES}
    assert {"akl", "bild", "lora_student", "smoke"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_smoke_run(distill, recipe, tmp_path):
    out = tmp_path / "out"
    result = distill.main(["--config", str(recipe), "--smoke", "--max_steps", "2", "--output_dir", str(out)])

    assert math.isfinite(result["train_loss"])
    assert result["global_step"] == 2  # the command line wins over the smoke defaults (3 steps)
    if read_recipe(recipe).get("use_peft"):
        assert (out / "adapter_model.safetensors").is_file()
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert not (out / "model.safetensors").exists()
    else:
        assert (out / "model.safetensors").is_file()
    assert (out / "README.md").is_file()  # model card


def test_recipe_values_reach_the_config(distill, tmp_path):
    argv = ["--config", str(EXAMPLES_DIR / "recipes" / "akl.yaml"), "--output_dir", str(tmp_path)]
    script_args, args = distill.parse_args(argv)
    assert (args.kd_loss, args.akl_mu, args.lmbda) == ("akl", 0.5, 0.0)
    assert script_args.teacher == "smollm2-135m-instruct" and script_args.student_layers == 10
    assert not script_args.smoke and args.per_device_train_batch_size == 8

    script_args, args = distill.parse_args(
        [*argv, "--smoke", "--kd_loss", "bild", "--per_device_train_batch_size", "3"]
    )
    assert script_args.smoke and args.use_cpu and args.report_to in ([], ["none"], "none")
    assert args.max_steps == distill.SMOKE_OVERRIDES["max_steps"] and not args.bf16
    assert (args.kd_loss, args.per_device_train_batch_size) == ("bild", 3)  # the command line wins
    assert args.akl_mu == 0.5  # recipe values the smoke form does not touch are kept


def test_smoke_switch_inside_a_recipe(distill, tmp_path):
    script_args, args = distill.parse_args(["--config", str(EXAMPLES_DIR / "recipes" / "smoke.yaml")])
    assert script_args.smoke and args.use_cpu and args.max_steps == distill.SMOKE_OVERRIDES["max_steps"]


def test_dataset_file_in_dolly_layout_becomes_messages(distill, tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"instruction": f"Say {i}.", "context": "", "response": f"{i}"} for i in range(5)]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    dataset = hf_kd.distill.load_train_dataset(DistillArguments(dataset=str(path), max_train_samples=3))

    assert len(dataset) == 3
    assert dataset[1]["messages"] == [{"role": "user", "content": "Say 1."}, {"role": "assistant", "content": "1"}]


def test_missing_dataset_file_is_named(distill, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        hf_kd.distill.load_train_dataset(DistillArguments(dataset=str(tmp_path / "missing.jsonl")))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"student": "s"}, "No teacher given"),
        ({"teacher": "t"}, "exactly one of `student`"),
        ({"teacher": "t", "student": "s", "student_layers": 2}, "exactly one of `student`"),
    ],
)
def test_model_arguments_are_checked(tmp_path, fields, message):
    _, args = hf_kd.distill.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true"])
    with pytest.raises(ValueError, match=message):
        hf_kd.distill.load_models(DistillArguments(**fields), args)


def test_student_cut_from_teacher_layers(distill, tmp_path):
    """`student_layers` builds the student from a (local) teacher folder's layers and shares its tokenizer."""
    from smoke import make_chat_tokenizer, make_tiny_model

    tokenizer = make_chat_tokenizer()
    teacher_dir = tmp_path / "teacher"
    make_tiny_model(tokenizer, hidden=32, layers=4, seed=0).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    _, args = hf_kd.distill.parse_args(["--output_dir", str(tmp_path / "out"), "--use_cpu", "true"])

    models = hf_kd.distill.load_models(DistillArguments(teacher=str(teacher_dir), student_layers=2), args)

    assert models.teacher.config.num_hidden_layers == 4 and models.student.config.num_hidden_layers == 2
    assert models.tokenizer.get_vocab() == tokenizer.get_vocab() and models.teacher_tokenizer is None
    last_teacher = models.teacher.model.layers[3].mlp.down_proj.weight
    assert (models.student.model.layers[1].mlp.down_proj.weight == last_teacher).all()


def test_real_model_names_resolve_to_converted_folders(monkeypatch, tmp_path):
    import hf_kd.assets

    converted = []
    monkeypatch.setattr(hf_kd.assets, "load_real_model", lambda name: converted.append(name) or tmp_path / name)

    assert hf_kd.distill.resolve_model_path("smollm2-135m-instruct") == str(tmp_path / "smollm2-135m-instruct")
    assert hf_kd.distill.resolve_model_path("hf_kd:gemma-3-270m") == str(tmp_path / "gemma-3-270m")
    assert (
        hf_kd.distill.resolve_model_path("HuggingFaceTB/SmolLM2-360M-Instruct")
        == "HuggingFaceTB/SmolLM2-360M-Instruct"
    )
    assert converted == ["smollm2-135m-instruct", "gemma-3-270m"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_hf_kd_distill_reads_recipes_as_the_example_does(distill, recipe, monkeypatch, tmp_path):
    """`hf-kd distill --config <recipe>` hands hf_kd.distill the arguments and config the example parses (the
    example's `smoke` switch aside, which `hf-kd distill` refuses by name)."""
    argv = ["--config", str(recipe), "--output_dir", str(tmp_path), "--max_steps", "2"]
    example_args, example_config = distill.parse_args(argv)
    received = []

    def record(arguments, config):
        received.append((arguments, config))
        return {"output_dir": config.output_dir}

    monkeypatch.setattr(hf_kd.distill, "run_distillation", record)

    if example_args.smoke:
        with pytest.raises(ValueError, match="smoke.*examples/distill.py"):
            hf_kd.cli.main(["distill", *argv])
        return
    assert hf_kd.cli.main(["distill", *argv]) == 0

    [(cli_args, cli_config)] = received
    assert type(cli_args) is DistillArguments and not example_args.record_shards
    assert vars(cli_args) == {name: getattr(example_args, name) for name in vars(cli_args)}
    assert cli_config.to_dict() == example_config.to_dict()
