"""torch.compile (fullgraph, static and dynamic shapes, forward and backward) and torch.export of
models built from layernorm_ext modules: same results as eager, the ops stay in the graph."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import layernorm_ext

ops = torch.ops.layernorm_ext


class Block(torch.nn.Module):
    """LN → Linear → RMSNorm → Linear (with a multi-dim LN at the input)."""

    def __init__(self, hidden: int = 24):
        super().__init__()
        self.ln = layernorm_ext.LayerNorm(hidden)
        self.fc = torch.nn.Linear(hidden, hidden)
        self.rms = layernorm_ext.RMSNorm(hidden, eps=1e-6)
        self.head = torch.nn.Linear(hidden, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rms(torch.relu(self.fc(self.ln(x)))))


def _model() -> Block:
    torch.manual_seed(0)
    m = Block()
    with torch.no_grad():
        for p in (m.ln.weight, m.ln.bias, m.rms.weight):
            p.copy_(torch.randn_like(p))
    return m


def _grads(model: torch.nn.Module, fn, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    xs = x.clone().requires_grad_()
    out = fn(xs)
    out.square().sum().backward()
    return out.detach(), [xs.grad] + [p.grad for p in model.parameters()]


def _assert_close_all(got, expected, what):
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=f"{what} [{i}]")


def test_compile_fullgraph_matches_eager():
    m = _model()
    x = torch.randn(6, 24)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(m, fullgraph=True, backend=counter)
    eager_out, eager_grads = _grads(m, m, x)
    out, grads = _grads(m, compiled, x)
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    _assert_close_all(grads, eager_grads, "static backward")
    assert counter.frame_count == 1
    # The inference path (no grad) goes through the same graph shapes.
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x), atol=1e-5, rtol=1e-5)


def test_compile_dynamic_matches_eager():
    m = _model()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(m, fullgraph=True, dynamic=True, backend=counter)
    frames = None
    # (Sizes 0 and 1 are specialised by dynamo itself, so they are not in this list.)
    for rows in (3, 7, 16, 33):
        x = torch.randn(rows, 24)
        eager_out, eager_grads = _grads(m, m, x)
        out, grads = _grads(m, compiled, x)
        torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5, msg=f"rows={rows}")
        _assert_close_all(grads, eager_grads, f"dynamic backward rows={rows}")
        # The first call may restart tracing once (dynamo re-traces after specialising the
        # float eps); after that, no new batch size may trigger a recompile.
        frames = counter.frame_count if frames is None else frames
        assert counter.frame_count == frames, f"recompiled for rows={rows}"


def test_compile_functional_ops_multi_dim_and_mixed():
    def f(x, w, b, w32):
        y = layernorm_ext.layer_norm(x, (3, 4), w, b)
        z = layernorm_ext.rms_norm(y.to(torch.bfloat16), (3, 4), w32)
        return y, z

    x = torch.randn(5, 3, 4)
    w, b, w32 = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for got, expected in zip(compiled(x, w, b, w32), f(x, w, b, w32), strict=True):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_compile_out_variant():
    """Code that writes into a preallocated buffer must compile too."""

    def f(x, buf):
        layernorm_ext.layer_norm(x, 8, out=buf)
        return buf * 2

    x = torch.randn(4, 8)
    expected = f(x, torch.empty(4, 8))
    buf = torch.empty(4, 8)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, buf)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(buf, expected / 2, atol=0, rtol=0)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_export(dynamic):
    m = _model().eval()
    x = torch.randn(6, 24)
    dynamic_shapes = {"x": {0: torch.export.Dim("rows", min=1, max=1024)}} if dynamic else None
    ep = torch.export.export(m, (x,), dynamic_shapes=dynamic_shapes)
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert ops.layer_norm.default in targets, f"layer_norm not in exported graph: {targets}"
    assert ops.rms_norm.default in targets, f"rms_norm not in exported graph: {targets}"
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), m(x), atol=1e-6, rtol=1e-6)
        if dynamic:
            x2 = torch.randn(11, 24)
            torch.testing.assert_close(ep.module()(x2), m(x2), atol=1e-6, rtol=1e-6)
