"""What a user meets first at the `hf-kd` command: help text on every flag, one clear line for a bad command line,
and no warnings caused by hf_kd's own settings."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from hf_kd.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
SMOKE_RECIPE = ROOT / "examples" / "recipes" / "smoke.yaml"


@pytest.mark.parametrize("verb", sorted(COMMANDS))
def test_every_flag_has_help_text(verb):
    parser = COMMANDS[verb].parser(f"hf-kd {verb}")
    flags = [action for action in parser._actions if not isinstance(action, argparse._HelpAction)]
    assert flags
    bare = [action.option_strings[0] for action in flags if not (action.help or "").strip()]
    assert not bare, f"hf-kd {verb}: flags without help text: {bare}"


def test_demo_help_lists_flags_with_their_help(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "--student_layers" in text and "Teacher layers kept in the student" in text


def test_one_flag_style_across_verbs():
    """Every verb spells its multi-word flags with underscores, as TRL and transformers do."""
    for verb, command in COMMANDS.items():
        options = [opt for action in command.parser(verb)._actions for opt in action.option_strings]
        for option in options:
            if option.startswith("--") and "-" in option[2:]:
                assert option.replace("-", "_")[2:] in {opt[2:] for opt in options}, (verb, option)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["distill", "--config", "nope.yaml"], "No such recipe file: nope.yaml"),
        (["evaluate", "--model", "/nonexistent"], "No such model folder: /nonexistent"),
        (["distill", "--teacher", "/nonexistent", "--student_layers", "2"], "No such model folder: /nonexistent"),
        (["distill", "--config", str(SMOKE_RECIPE), "--bridge", "dskdd"], "Unknown bridge 'dskdd'"),
    ],
)
def test_bad_command_line_ends_with_one_clear_line(capsys, tmp_path, argv, message):
    assert main([*argv, *(["--output_dir", str(tmp_path)] if argv[0] == "distill" else [])]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert err.startswith(f"hf-kd {argv[0]}: error: ")


def test_bad_command_line_exits_without_traceback():
    code = "import sys; from hf_kd.cli import main; sys.exit(main())"
    command = [sys.executable, "-c", code, "evaluate", "--model", "/nonexistent"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "No such model folder: /nonexistent" in proc.stderr


def test_a_cli_run_warns_about_none_of_our_settings(tmp_path):
    """No `gradient_checkpointing` FutureWarning and no `pin_memory` UserWarning (CPU) from the defaults hf_kd chose;
    `--use_cpu false` lets the config pick the device, as a run without the smoke switch does."""
    argv = ["distill", "--config", str(SMOKE_RECIPE), "--max_steps", "1", "--output_dir", str(tmp_path)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*argv, "--use_cpu", "false"]) == 0
    ours = [str(w.message) for w in caught if any(name in str(w.message) for name in ("checkpointing", "pin_memory"))]
    assert not ours


REMOTE_CODE_RECIPES = {
    "trust_remote_code": "trust_remote_code: true\n",
    "model_init_kwargs.trust_remote_code": "model_init_kwargs:\n  trust_remote_code: true\n",
    "teacher_model_init_kwargs.trust_remote_code": "teacher_model_init_kwargs:\n  trust_remote_code: true\n",
}


@pytest.mark.parametrize("key", sorted(REMOTE_CODE_RECIPES))
def test_a_recipe_enabling_remote_code_is_logged_loudly_naming_the_key(tmp_path, caplog, key):
    from hf_kd.distill import parse_args

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"smoke: true\n{REMOTE_CODE_RECIPES[key]}")
    with caplog.at_level(logging.WARNING, logger="hf_kd.distill"):
        parse_args(["--config", str(recipe), "--output_dir", str(tmp_path)])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "remote code" in r.message]
    assert len(warned) == 1 and f"remote code ({key})" in warned[0]


def test_a_recipe_setting_environment_variables_is_logged_naming_them_not_their_values(tmp_path, caplog, monkeypatch):
    from hf_kd.distill import parse_args

    monkeypatch.setenv("HF_KD_RECIPE_TEST", "before")  # restored after the test
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("smoke: true\nenv:\n  HF_KD_RECIPE_TEST: secret-value\n")
    with caplog.at_level(logging.WARNING, logger="hf_kd.distill"):
        parse_args(["--config", str(recipe), "--output_dir", str(tmp_path)])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("environment variables HF_KD_RECIPE_TEST" in message for message in warned)
    assert not any("secret-value" in message for message in warned)


def test_a_recipe_that_runs_no_code_logs_no_warning_and_the_help_says_recipes_are_code(tmp_path, caplog, capsys):
    from hf_kd.distill import parse_args

    with caplog.at_level(logging.WARNING, logger="hf_kd.distill"):
        parse_args(["--config", str(SMOKE_RECIPE), "--output_dir", str(tmp_path)])
    assert not [r for r in caplog.records if r.name == "hf_kd.distill"]
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    assert "Recipes are code" in " ".join(capsys.readouterr().out.split())
