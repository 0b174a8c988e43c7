"""hf_kd installed from its wheel, outside the source checkout, has everything it reads at run time: the model-card
template (the top-level model_cards/ folder, shipped as hf_kd/model_cards/) and the bundled conversations."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "hf_kd", "model_cards")
"""What a wheel is built from (copied, so that the build leaves nothing in the checkout)."""

INSTALLED_RUN = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import hf_kd
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from hf_kd.hub import DistillationHubMixin

    site = Path(sys.argv[1]).resolve()
    assert Path(hf_kd.__file__).resolve().is_relative_to(site), f"imported {hf_kd.__file__}, not the wheel"
    assert len(hf_kd.load_bundled_dataset("heldout")) > 0
    assert len(hf_kd.load_bundled_dataset("heldout_general")) > 0


    class CardTrainer(DistillationHubMixin, Trainer):
        pass


    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    out = Path(sys.argv[2])
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", save_strategy="no")
    CardTrainer(model=model, args=args).save_model()
    print((out / "README.md").read_text())
    """
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)]
    proc = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [built] = dist.glob("hf_kd-*.whl")
    return built


def test_wheel_ships_the_card_templates_and_the_bundled_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {f"hf_kd/model_cards/{path.name}" for path in (ROOT / "model_cards").glob("*.j2")}
    assert templates and templates <= names
    assert {"hf_kd/data/train.jsonl", "hf_kd/data/heldout.jsonl"} <= names


def test_installed_wheel_writes_the_model_card_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)]
    proc = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}

    run = [sys.executable, "-c", INSTALLED_RUN, str(site), str(tmp_path / "student")]
    proc = subprocess.run(run, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)

    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    card = (tmp_path / "student" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert "knowledge distillation" in card
