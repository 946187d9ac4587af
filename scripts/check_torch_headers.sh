#!/usr/bin/env bash
# Compiles (syntax only) every torch-facing C++ source against the headers of another torch
# release, e.g. the oldest one supported:
#   bash scripts/check_torch_headers.sh 2.11.0
# The extension must build against torch 2.11 through 2.14 (the GPU machine's image has 2.11),
# while CI installs the newest. This catches API drift (e.g. autograd nodes moved from
# std::shared_ptr to c10::intrusive_ptr in 2.12) without installing a second torch: only the
# wheel's include/ directory is unpacked. The torch-free kernels (csrc/cpu/norm_krnl.cpp,
# csrc/cuda/inst/*.cu) include no torch header and are not checked here.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:?usage: bash scripts/check_torch_headers.sh TORCH_VERSION}"
py="${PYTHON:-.venv/bin/python}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== torch $version headers"
"$py" -m pip download -q --no-deps --only-binary=:all: "torch==$version" -d "$work" >/dev/null
wheel="$(ls "$work"/torch-*.whl)"
"$py" -m zipfile -e "$wheel" "$work/unpacked" >/dev/null 2>&1 || true
# zipfile -e extracts everything; keep only what the compiler needs.
inc="$work/unpacked/torch/include"
[ -d "$inc" ] || { echo "no torch/include in $wheel" >&2; exit 1; }

pyinc="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
cuda_home="${CUDA_HOME:-/usr/local/cuda}"
flags=(-std=c++20 -fsyntax-only -Wall -Wno-unknown-pragmas -DTORCH_API_INCLUDE_EXTENSION_H
  -DTORCH_EXTENSION_NAME=_C -Icsrc -I"$inc" -I"$inc/torch/csrc/api/include" -I"$pyinc")
sources=()
while read -r group path; do
  case "$group" in
    core) sources+=("$path") ;;
    cuda) [[ "$path" == *.cpp && -d "$cuda_home/include" ]] && sources+=("$path") ;;
  esac
done < <(grep -v '^#' csrc/sources.txt)
if [ -d "$cuda_home/include" ]; then
  flags+=(-DLNEXT_WITH_CUDA -I"$cuda_home/include")
fi
status=0
for src in "${sources[@]}"; do
  if ! "${CXX:-c++}" "${flags[@]}" "$src" 2>"$work/err.txt"; then
    echo "FAILED: $src against torch $version" >&2
    head -n 40 "$work/err.txt" >&2
    status=1
  fi
done
[ "$status" = 0 ] && echo "== ${#sources[@]} sources compile against torch $version headers"
exit "$status"
