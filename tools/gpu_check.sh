#!/usr/bin/env bash
# Run on a lent GPU machine (PyTorch + CUDA present, nothing to install): every GPU check once; the report goes to
# ${OUT:-.}/gpu_check.md. Takes about 2-4 minutes on an H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
# Make the package importable without installing it (mirrors the setuptools package-dir mapping).
shim=$(mktemp -d)
mkdir -p "$shim/dllm_trt"
cp dllm_trt/*.py "$shim/dllm_trt/"
ln -s "$PWD/runtime" "$shim/dllm_trt/runtime"
ln -s "$PWD/export" "$shim/dllm_trt/export"
export PYTHONPATH="$shim:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 tools/gpu_check.py "${OUT:-.}/gpu_check.md"
