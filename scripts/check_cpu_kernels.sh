#!/usr/bin/env bash
# Memory and undefined-behaviour check of the torch-free CPU row kernels (csrc/cpu/norm_krnl.cpp)
# through scripts/kernel_driver.cpp, which calls every kernel of every ISA over many shapes and
# options on exact-size heap buffers:
#   bash scripts/check_cpu_kernels.sh            # AddressSanitizer + UBSan, every ISA this CPU has
#   bash scripts/check_cpu_kernels.sh valgrind   # valgrind memcheck (uninitialised reads too), on
#                                                # the scalar and AVX2 kernels (valgrind does not
#                                                # decode AVX-512), production flags (-O3)
# Exit status 0 when the checker reports nothing. Not part of CI: on 2 cores the sanitizer build
# of the four kernel objects takes ~15-20 min and its run ~15 min; the valgrind run ~20 min. Run it
# after changing the kernels, and on a machine whose CPU or compiler differs from CI's.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-asan}"
cxx="${CXX:-g++}"
work="${WORK:-$(mktemp -d)}"
mkdir -p "$work"
py="${PYTHON:-python3}"
# The per-ISA flags of the real build: setup.py's AVX512_FLAGS / ISA_FLAGS (not a copy of them).
isa_flags() {
  "$py" - "$1" <<'PY'
import ast, sys
env = {}
for node in ast.parse(open("setup.py").read()).body:
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") in ("AVX512_FLAGS", "ISA_FLAGS"):
        exec(compile(ast.Module([node], []), "setup.py", "exec"), env)
print(" ".join(env["ISA_FLAGS"][sys.argv[1]]))
PY
}
common=(-std=c++17 -g -ffp-contract=off -fno-math-errno -Wall -Wno-maybe-uninitialized)
case "$mode" in
  asan)
    opt=(-O2 -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
    run=(env ASAN_OPTIONS=detect_leaks=0)
    tables="scalar,avx2,avx512,avx512_bf16"
    ;;
  valgrind)
    command -v valgrind >/dev/null || { echo "valgrind not found" >&2; exit 2; }
    opt=(-O3)
    run=(valgrind -q --error-exitcode=3)
    tables="scalar,avx2"
    max_n=8
    max_long=4100
    ;;
  *) echo "usage: $0 [asan|valgrind]" >&2; exit 2 ;;
esac
isas=(scalar avx2 avx512 avx512_bf16)
echo "== building the kernels ($mode, ${opt[*]}) in $work"
pids=()
for isa in "${isas[@]}"; do
  # shellcheck disable=SC2046
  "$cxx" "${common[@]}" "${opt[@]}" -DLNEXT_CPU_CAPABILITY="$isa" $(isa_flags "$isa") \
    -c csrc/cpu/norm_krnl.cpp -o "$work/krnl_$isa.o" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done  # a failed compile stops the script (set -e)
"$cxx" "${common[@]}" "${opt[@]}" -mf16c -Icsrc scripts/kernel_driver.cpp "$work"/krnl_*.o \
  -o "$work/kernel_driver"
# Only the kernel sets this CPU can run.
flags=$(grep -m1 '^flags' /proc/cpuinfo)
run_tables=scalar
[[ $flags == *" avx2 "* && $tables == *avx2* ]] && run_tables+=",avx2"
[[ $flags == *" avx512bw "* && $tables == *avx512* ]] && run_tables+=",avx512"
[[ $flags == *" avx512_bf16 "* && $tables == *avx512_bf16* ]] && run_tables+=",avx512_bf16"
echo "== running: $run_tables"
"${run[@]}" "$work/kernel_driver" "$run_tables" "${max_n:-140}" "${max_long:-20000}"
echo "== $mode: clean"
