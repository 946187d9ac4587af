"""Build script for layernorm_ext.

What it builds (sources listed once in csrc/sources.txt, shared with CMakeLists.txt):
  * layernorm_ext._C: the schemas, autograd, meta and CPU launchers ("core" sources);
  * the CPU row kernels ("cpu_isa"), compiled once per instruction set (scalar, AVX2, AVX-512)
    into separate objects and linked into _C; the ISA is chosen at run time, never from the build
    machine, so a wheel built on an AVX-512 machine runs on an AVX2-only CPU;
  * the CUDA kernels ("cuda"), whenever nvcc is found. A GPU is never needed to build.

Environment knobs:
  CUDA_HOME / CUDA_PATH        CUDA toolkit to use (default: resolved from nvcc, /usr/local/cuda)
  LAYERNORM_EXT_FORCE_CPU=1    build without CUDA even if nvcc is found
  LAYERNORM_EXT_FORCE_CUDA=1   fail instead of falling back to a CPU-only build
  TORCH_CUDA_ARCH_LIST         CUDA archs (default: 8.0;8.6;8.9;9.0 and newer nvcc-supported ones)
  MAX_JOBS                     parallel compile jobs
  LAYERNORM_EXT_DEBUG=1        -O0 -g
  LAYERNORM_EXT_LINEINFO=1     nvcc -lineinfo (profilers, compute-sanitizer line numbers)
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()

# Per-ISA flags of the torch-free row kernels. The "scalar" object is the portable baseline.
AVX512_FLAGS = [
    *("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"),
    "-Wno-uninitialized",  # GCC 12 false positive in its own AVX-512 headers (GCC bug 105593)
]
ISA_FLAGS = {
    "scalar": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": AVX512_FLAGS,
    "avx512_bf16": [*AVX512_FLAGS, "-mavx512bf16"],
}
DEFAULT_CUDA_ARCHS = ["8.0", "8.6", "8.9", "9.0", "10.0", "12.0"]


def log(msg: str) -> None:
    print(f"layernorm_ext setup: {msg}", file=sys.stderr, flush=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def read_sources() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {"core": [], "cpu_isa": [], "cuda": []}
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        group, path = line.split()
        groups[group].append(path)
    return groups


def is_toolkit(path: str | None) -> bool:
    return (
        bool(path)
        and (Path(path) / "bin" / "nvcc").exists()
        and (Path(path) / "include" / "cuda_runtime.h").exists()
    )


def find_cuda_home() -> str | None:
    """The CUDA toolkit root, or None.

    torch guesses CUDA_HOME from the nvcc on PATH; when that nvcc is a wrapper script (as in
    /usr/local/bin here) the guess is wrong, so also read the wrapper's exec target.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidate = str(Path(real).parent.parent)
        if is_toolkit(candidate):
            return candidate
        try:
            text = Path(real).read_text(errors="ignore")[:4096]
        except OSError:
            text = ""
        for target in re.findall(r"(/\S+/bin/nvcc)\b", text):
            candidate = str(Path(target).parent.parent)
            if is_toolkit(candidate):
                return candidate
    for candidate in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if is_toolkit(candidate):
            return candidate
    return None


def torch_openmp_runtime(torch_lib: Path) -> Path | None:
    """The OpenMP runtime torch itself loads (e.g. torch/lib/libgomp.so.1).

    at::parallel_for is a header template: it uses torch's OpenMP pool only when compiled with
    -fopenmp. We link that same runtime file (same soname) so the process never maps a second
    OpenMP runtime (pytorch#176179).
    """
    for pattern in ("libgomp*.so*", "libiomp5*.so*", "libomp*.so*", "libomp*.dylib"):
        hits = sorted(torch_lib.glob(pattern))
        if hits:
            return hits[0]
    return None


cuda_home = None if env_flag("LAYERNORM_EXT_FORCE_CPU") else find_cuda_home()
if cuda_home:
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
    os.environ["CUDA_HOME"] = cuda_home

from torch.utils.cpp_extension import (  # noqa: E402
    BuildExtension,
    CppExtension,
    CUDAExtension,
    library_paths,
)

SOURCES = read_sources()
DEBUG = env_flag("LAYERNORM_EXT_DEBUG")
OPT = ["-O0", "-g"] if DEBUG else ["-O3"]
X86 = platform.machine().lower() in ("x86_64", "amd64")
ISAS = ["scalar", "avx2", "avx512", "avx512_bf16"] if X86 else ["scalar"]

with_cuda = bool(cuda_home) and bool(SOURCES["cuda"])
if env_flag("LAYERNORM_EXT_FORCE_CUDA") and not with_cuda:
    raise RuntimeError("LAYERNORM_EXT_FORCE_CUDA=1 but no CUDA toolkit (nvcc) was found")
if with_cuda:
    log(f"building CPU and CUDA kernels (CUDA toolkit: {cuda_home})")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(DEFAULT_CUDA_ARCHS)
    log(f"CUDA archs: {os.environ['TORCH_CUDA_ARCH_LIST']}")
else:
    log(
        "nvcc not found (or LAYERNORM_EXT_FORCE_CPU=1): building the CPU kernels only; "
        "set CUDA_HOME to a CUDA toolkit to build the CUDA kernels"
    )

torch_lib = Path(library_paths()[0])
omp_runtime = torch_openmp_runtime(torch_lib)
omp_compile = ["-fopenmp"] if omp_runtime else []
if not omp_runtime:
    log("torch ships no OpenMP runtime here: CPU kernels will run on the calling thread only")

cxx_flags = [*OPT, "-Wall", "-Wno-unknown-pragmas", *omp_compile]
# -lineinfo (source lines for profilers / compute-sanitizer) triples the size of the CUDA code:
# only on request (the GPU check script sets it).
LINEINFO = ["-lineinfo"] if env_flag("LAYERNORM_EXT_LINEINFO") or DEBUG else []
nvcc_flags = [*OPT, *LINEINFO, "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC"]
define_macros = [("LNEXT_WITH_CUDA", None)] if with_cuda else []
link_args = [str(omp_runtime)] if omp_runtime else []
if sys.platform.startswith("linux"):
    # Symbols of any static archive linked in stay private to this library. A toolchain wrapper
    # may link libstdc++ statically (-static-libstdc++); exported, that copy's functions run on
    # the data of the process's shared libstdc++ (its locale facets, whose layout differs between
    # versions), so streams inside this library misbehave: ostringstream dropped every number
    # of a TORCH_CHECK message, and std::ifstream read nothing (reproduced with g++ 12).
    link_args.append("-Wl,--exclude-libs,ALL")

Extension = CUDAExtension if with_cuda else CppExtension
ext_modules = [
    Extension(
        name="layernorm_ext._C",
        sources=SOURCES["core"] + (SOURCES["cuda"] if with_cuda else []),
        include_dirs=[str(ROOT / "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if with_cuda else cxx_flags,
        extra_link_args=link_args,
    )
]


class BuildExt(BuildExtension):
    """BuildExtension plus the per-ISA CPU kernel objects (compiled in parallel, incrementally)."""

    def build_extensions(self) -> None:
        for ext in self.extensions:
            ext.extra_objects = list(ext.extra_objects or []) + self._isa_objects()
        super().build_extensions()

    def _isa_objects(self) -> list[str]:
        cxx = os.environ.get("CXX") or self.compiler.compiler_cxx[0]
        out_dir = Path(self.build_temp) / "cpu_isa"
        out_dir.mkdir(parents=True, exist_ok=True)
        deps = [ROOT / p for p in SOURCES["cpu_isa"]]
        deps += [*(ROOT / "csrc" / "cpu").glob("*.h"), ROOT / "csrc" / "welford.h"]
        newest_dep = max(p.stat().st_mtime for p in deps)
        jobs = []
        for src in SOURCES["cpu_isa"]:
            for isa in ISAS:
                obj = out_dir / f"{Path(src).stem}_{isa}.o"
                cmd = [
                    cxx,
                    "-std=c++17",
                    *OPT,
                    "-fPIC",
                    "-fvisibility=hidden",
                    "-ffp-contract=off",
                    "-fno-math-errno",
                    "-Wall",
                    "-Wno-maybe-uninitialized",
                    f"-DLNEXT_CPU_CAPABILITY={isa}",
                    *ISA_FLAGS[isa],
                    "-c",
                    str(ROOT / src),
                    "-o",
                    str(obj),
                ]
                jobs.append((obj, cmd, not obj.exists() or obj.stat().st_mtime < newest_dep))

        def run(job: tuple[Path, list[str], bool]) -> str:
            obj, cmd, stale = job
            if stale:
                subprocess.run(cmd, check=True)
            return str(obj)

        workers = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            objs = list(pool.map(run, jobs))
        log(f"CPU kernel objects: {', '.join(ISAS)}")
        return objs


setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
