#!/usr/bin/env bash
# Incremental in-place development build (ninja reuses build/ between runs).
# Serialised with a lock so that several shells can call it safely. CUDA (when nvcc is found) is
# compiled for sm_90 only unless TORCH_CUDA_ARCH_LIST says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec flock /tmp/layernorm_ext_build.lock env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py -q build_ext --inplace
