"""The CMake build (CMakeLists.txt) configures, compiles the same sources as setup.py, and the
module it produces loads and computes a LayerNorm.

Slow (a full compile): skipped when LAYERNORM_EXT_SKIP_CMAKE_TEST=1 or when cmake / a C++
compiler is missing. The pip build of the same run already compiles the CUDA sources, so to bound
CI time the CMake build compiles the CPU sources (LAYERNORM_EXT_CMAKE_CUDA=ON compiles CUDA too,
for LAYERNORM_EXT_CMAKE_CUDA_ARCH, default 90), and the CUDA configuration is checked separately
by a configure-only run wherever a CUDA toolkit is present.

Where the compiler can link libstdc++ statically, the CMake build does (-static-libstdc++), as
some toolchain wrappers do to every shared object (the lent GPU machine's g++ is such a wrapper).
The library must keep that copy private (--exclude-libs): exported, the copy's streams ran on
the process's libstdc++ data, std::ifstream read nothing and TORCH_CHECK messages lost their
numbers. The loaded module's error message and results are checked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("LAYERNORM_EXT_SKIP_CMAKE_TEST") == "1"
    or shutil.which("cmake") is None
    or shutil.which(os.environ.get("CXX", "c++")) is None,
    reason="CMake build test disabled (LAYERNORM_EXT_SKIP_CMAKE_TEST=1) or cmake/c++ missing",
)


def _ninja() -> str | None:
    try:
        import ninja

        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        return shutil.which("ninja")


def _can_link_static_libstdcxx(tmp: Path) -> bool:
    """Whether the C++ compiler links a program with -static-libstdc++ (libstdc++.a present)."""
    src = tmp / "probe.cpp"
    src.write_text(
        "#include <string>\nint main() { return static_cast<int>(std::string().size()); }\n"
    )
    cxx = os.environ.get("CXX", "c++")
    probe = subprocess.run(
        [cxx, "-static-libstdc++", str(src), "-o", str(tmp / "probe")], capture_output=True
    )
    return probe.returncode == 0


def _configure_cmd(build: Path, pkg: Path, cuda: str) -> list[str]:
    cmd = [
        "cmake",
        "-S",
        str(ROOT),
        "-B",
        str(build),
        f"-DPython3_EXECUTABLE={sys.executable}",
        f"-DLAYERNORM_EXT_OUTPUT_DIR={pkg}",
        f"-DLAYERNORM_EXT_CUDA={cuda}",
        f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('LAYERNORM_EXT_CMAKE_CUDA_ARCH', '90')}",
    ]
    ninja = _ninja()
    if ninja:
        cmd += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    return cmd


def _has_cuda_toolkit() -> bool:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return any(r and (Path(r) / "bin" / "nvcc").exists() for r in roots)


@pytest.mark.skipif(not _has_cuda_toolkit(), reason="no CUDA toolkit")
def test_cmake_configures_with_cuda(tmp_path: Path) -> None:
    configure = subprocess.run(
        _configure_cmd(tmp_path / "build", tmp_path / "pkg", "ON"), capture_output=True, text=True
    )
    assert configure.returncode == 0, configure.stdout[-4000:] + configure.stderr[-4000:]
    assert "building CPU and CUDA kernels" in configure.stdout


def test_cmake_build_configures_compiles_and_loads(tmp_path: Path) -> None:
    build = tmp_path / "build"
    pkg = tmp_path / "pkg" / "layernorm_ext"
    pkg.mkdir(parents=True)
    cuda = "ON" if os.environ.get("LAYERNORM_EXT_CMAKE_CUDA") == "1" else "OFF"
    cmd = _configure_cmd(build, pkg, cuda)
    if _can_link_static_libstdcxx(tmp_path):
        cmd.append("-DCMAKE_MODULE_LINKER_FLAGS=-static-libstdc++")
    configure = subprocess.run(cmd, capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout[-4000:] + configure.stderr[-4000:]
    jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
    built = subprocess.run(
        ["cmake", "--build", str(build), "-j", jobs], capture_output=True, text=True
    )
    assert built.returncode == 0, built.stdout[-6000:] + built.stderr[-4000:]
    assert list(pkg.glob("_C*.so")), "CMake produced no _C module"

    # Load the CMake-built module as the package, in a fresh interpreter.
    for py in (ROOT / "layernorm_ext").glob("*.py"):
        shutil.copy(py, pkg / py.name)
    probe = (
        "import torch, layernorm_ext as L\n"
        f"assert L.__file__.startswith({str(pkg)!r}), L.__file__\n"
        "x = torch.tensor([[1., 2., 3., 4.], [5., 6., 7., 8.]])\n"
        "ref = torch.nn.functional.layer_norm(x.double(), (4,)).float()\n"
        "torch.testing.assert_close(L.layer_norm(x, (4,)), ref, atol=1e-6, rtol=1e-6)\n"
        # Many rows over the thread pool, long enough rows for the cache-size-dependent paths.
        "x = torch.randn(64, 4100, generator=torch.Generator().manual_seed(0))\n"
        "ref = torch.nn.functional.layer_norm(x.double(), (4100,)).float()\n"
        "torch.testing.assert_close(L.layer_norm(x, (4100,)), ref, atol=2e-5, rtol=2e-5)\n"
        # The error message, numbers included (a stream bound to the wrong runtime drops them).
        "try:\n"
        "    L.layer_norm(x[:, :3], (5,))\n"
        "except RuntimeError as e:\n"
        "    msg = str(e)\n"
        "else:\n"
        "    raise AssertionError('no error for a wrong normalized_shape')\n"
        "expected = ('Given normalized_shape=[5], expected input with shape [*, 5], '\n"
        "            'but got input of size[64, 3]')\n"
        "assert expected in msg, msg\n"
        "print(L.cpu_capability())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(pkg.parent))
    run = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stdout + run.stderr
