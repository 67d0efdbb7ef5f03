"""Test setup: without CUDA, run the Triton kernels under Triton's interpreter.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it is set here, before any test module
imports ``hiera_fast.kernels``.
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_report_header(config) -> str:
    """Which backend fused=True gets here, so a run on a Triton whose interpreter cannot run the kernels (the kernel
    tests then fail inside the interpreter) says why at the top."""
    from hiera_fast import ops

    backend, reason = ops.fused_backend(DEVICE)
    return f"hiera-fast: fused=True on {DEVICE}: {backend} ({reason})"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test (fresh random inputs, replayable failures)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield


@pytest.fixture(autouse=True)
def _kernels_for_global_attention(request):
    """On CUDA, fused=True runs global attention (one window) by SDPA (``ops.set_global_attention``). The tests check
    that our Triton kernels run, and are right, in every attention block, so they pin ``"triton"``; the SDPA route's
    own tests are marked ``default_global_attention``. (On a CPU the route does not apply either way.)"""
    if request.node.get_closest_marker("default_global_attention"):
        yield
        return
    from hiera_fast import ops

    with ops.global_attention("triton"):
        yield


@pytest.fixture
def forced_eager(monkeypatch):
    """Every device's backend is "eager" (as on a machine without Triton), with the routes decided so far forgotten
    before and after (they are cached: ``hiera_fast.ops.routing.clear_routes``)."""
    from hiera_fast.ops import routing

    routing.clear_routes()
    monkeypatch.setattr(routing, "device_backend", lambda device: ("eager", "forced by the test"))
    yield
    monkeypatch.undo()
    routing.clear_routes()
