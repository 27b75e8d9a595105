#!/usr/bin/env bash
# Usage: tools/gpu_check.sh [--device cpu --quick]   (the flags are for a CPU smoke run; see tools/gpu_check.py)
# Run on a lent GPU machine (PyTorch + CUDA present, nothing to install): every GPU check once; the report goes to
# ${OUT:-.}/gpu_check.md. At most 8 minutes on an H100/H200 (sections past the 450 s budget are skipped; the report
# is rewritten after each section, so even the hard timeout below leaves what was measured). Needs only PyTorch.
set -uo pipefail
cd "$(dirname "$0")/.."
# Make the package importable without installing it (mirrors the setuptools package-dir mapping).
shim=$(mktemp -d)
mkdir -p "$shim/dllm_trt"
cp dllm_trt/*.py "$shim/dllm_trt/"
ln -s "$PWD/runtime" "$shim/dllm_trt/runtime"
ln -s "$PWD/export" "$shim/dllm_trt/export"
ln -s "$PWD/dllm_trt/evaluate" "$shim/dllm_trt/evaluate"
export PYTHONPATH="$shim:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
timeout 480 python3 tools/gpu_check.py "${OUT:-.}/gpu_check.md" "$@"
