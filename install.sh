#!/usr/bin/env bash
# Installs vllm-flashmla into a virtual environment ($VENV, default .venv):
#   1. vLLM 0.26.0, which pins torch 2.11.0 (CUDA 13), plus the CUTLASS headers and build tools;
#   2. this package, building the `flashmla_kernels` CUDA extension against that same torch
#      (--no-build-isolation: an isolated build would download a second torch, and must not).
# Works on a CPU-only machine with nvcc 13 (the extension compiles; the kernels need an H100/H200).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet "setuptools>=77,<82" wheel ninja
python -m pip install --quiet vllm==0.26.0 nvidia-cutlass==4.2.0.0 "pytest>=8"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=${MAX_JOBS:-$(nproc)}
python -m pip install --quiet --no-build-isolation -e .
python -c "import torch, flashmla_kernels, vllm_flashmla; print('vllm-flashmla', vllm_flashmla.__version__, 'installed in $VENV')"
