"""Fixtures shared by the test suite.

* ``isa``: parametrizes a test over every CPU kernel set this build has and this CPU runs
  (``layernorm_ext.available_cpu_capabilities()``), selects it for the test and restores
  ``"auto"`` afterwards.
* A fixed, per-test seed (derived from the test id, so reordering or selecting tests never
  changes the data a test sees) applied to torch's global generator before every test; the
  ``seed`` and ``gen`` fixtures expose it.
* ``tol``: the tolerance helpers of norm_testing (reliability.md §2 and the 2× rule).
* ``restore_threads``: restores torch's intra-op thread count after a test that changes it.
"""

from __future__ import annotations

import contextlib
import os
import types
import warnings
import zlib

import norm_testing
import pytest
import torch

import layernorm_ext


def pytest_addoption(parser: pytest.Parser) -> None:
    """Accepts ``-n0`` / ``-n auto`` (ignored) when pytest-xdist is absent.

    One command line then serves machines with and without xdist. pytest reserves lowercase
    short options; ``OptionGroup._addoption`` (private) is how pytest-xdist itself registers
    ``-n``. If that method ever goes away the shim is skipped.
    """
    try:
        import xdist  # noqa: F401
    except ImportError:
        group = parser.getgroup("xdist-shim", "pytest-xdist is not installed")
        with contextlib.suppress(AttributeError, ValueError):
            group._addoption(
                "-n",
                "--numprocesses",
                dest="numprocesses",
                default=None,
                help="ignored: pytest-xdist is not installed, tests run in this process",
            )


def pytest_configure(config: pytest.Config) -> None:
    # torch warns on every mixed-dtype F.rms_norm call used as the comparison baseline.
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")


@pytest.fixture(params=norm_testing.ISAS)
def isa(request: pytest.FixtureRequest):
    """Each available CPU kernel set in turn; "auto" is restored after the test."""
    name = request.param
    layernorm_ext.set_cpu_capability(name)
    assert layernorm_ext.cpu_capability() == name
    try:
        yield name
    finally:
        layernorm_ext.set_cpu_capability("auto")


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The seed of this test (stable across runs and test selections)."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture(autouse=True)
def _seed_torch(seed: int) -> None:
    torch.manual_seed(seed)


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with this test's seed."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def tol() -> types.ModuleType:
    """norm_testing: fwd_tol / dx_tol / param_grad_tol / check_result / 2× rule helpers."""
    return norm_testing


@pytest.fixture
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _guard_global_state():
    """Fails a test that leaks a changed ISA, thread count or grad mode into the next one."""
    threads = torch.get_num_threads()
    capability = layernorm_ext.cpu_capability()
    yield
    assert torch.is_grad_enabled(), "test left grad mode disabled"
    assert torch.get_num_threads() == threads, "test changed torch's thread count"
    if "LAYERNORM_EXT_CPU_ISA" not in os.environ:
        assert layernorm_ext.cpu_capability() == capability, "test left another ISA selected"
