"""A small pre-norm transformer block that uses every public op, checked under eager,
torch.compile(fullgraph=True, dynamic=True), torch.export and TorchScript; and replace_norms on
torch.nn and model-library style norms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layernorm_ext as L

ops = torch.ops.layernorm_ext


class Block(nn.Module):
    """x -> (LN, attn-like mix, fused add + RMSNorm, MLP, fused add + LN)."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.ln1 = L.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.rms_w = nn.Parameter(torch.randn(d) * 0.1 + 1)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.ln_w = nn.Parameter(torch.randn(d) * 0.1 + 1)
        self.ln_b = nn.Parameter(torch.randn(d) * 0.1)
        self.rms = L.RMSNorm(d, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.ln1(x))
        normed, residual = L.add_rms_norm(h, x, x.shape[-1], self.rms_w, 1e-6)
        h = self.mlp(normed)
        out, _ = L.add_layer_norm(h, residual, x.shape[-1], self.ln_w, self.ln_b, 1e-5)
        return self.rms(out) + L.rms_norm(out, x.shape[-1], None, None, zero_centered_weight=False)


def _block_and_input(seed=0):
    torch.manual_seed(seed)
    return Block().eval(), torch.randn(2, 5, 32)


def test_compile_fullgraph_dynamic_matches_eager():
    torch._dynamo.reset()
    block, _ = _block_and_input()
    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in [(2, 5, 32), (3, 7, 32), (1, 1, 32)]:
        xi = torch.randn(shape, requires_grad=True)
        eager = block(xi)
        got = compiled(xi)
        torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
        (g_e,) = torch.autograd.grad(eager.sum(), xi)
        (g_c,) = torch.autograd.grad(got.sum(), xi)
        torch.testing.assert_close(g_c, g_e, atol=1e-5, rtol=1e-5)


def test_compile_inductor_matches_eager():
    torch._dynamo.reset()
    block, x = _block_and_input(1)
    with torch.no_grad():
        compiled = torch.compile(block, fullgraph=True, dynamic=True)
        torch.testing.assert_close(compiled(x), block(x), atol=1e-5, rtol=1e-5)


def test_export_and_run():
    block, x = _block_and_input(2)
    dim = torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(block, (x,), dynamic_shapes={"x": {1: dim}})
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    for name in ("layer_norm", "add_rms_norm", "add_layer_norm", "rms_norm"):
        assert any(f"layernorm_ext.{name}" in t for t in targets), (name, targets)
    x2 = torch.randn(2, 9, 32)
    torch.testing.assert_close(ep.module()(x2), block(x2), atol=1e-5, rtol=1e-5)


def test_ops_callable_from_torchscript():
    @torch.jit.script
    def f(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
        y = torch.ops.layernorm_ext.layer_norm(x, [x.size(-1)], w, b, 1e-5)
        z = torch.ops.layernorm_ext.rms_norm(x, [x.size(-1)], w, None)
        o, s = torch.ops.layernorm_ext.add_layer_norm(x, r, [x.size(-1)], w, b, 1e-5)
        o2, _ = torch.ops.layernorm_ext.add_rms_norm(x, r, [x.size(-1)], w, None)
        return y, z, o, s, o2

    x, r, w, b = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16), torch.randn(16)
    y, z, o, s, o2 = f(x, r, w, b)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (16,), w, b))
    torch.testing.assert_close(z, torch.nn.functional.rms_norm(x, (16,), w))
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(o, torch.nn.functional.layer_norm(x + r, (16,), w, b))
    torch.testing.assert_close(o2, torch.nn.functional.rms_norm(x + r, (16,), w))


# --- replace_norms ---------------------------------------------------------------------------


class LlamaRMSNorm(nn.Module):
    """Hugging Face's Llama RMSNorm, verbatim arithmetic."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class Gemma2RMSNorm(nn.Module):
    """Hugging Face's Gemma2 RMSNorm, verbatim arithmetic."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class T5LayerNorm(nn.Module):
    """Rounds to the weight's dtype: not Llama-style, must not be replaced."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


class CustomLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replace_norms_reproduces_each_module(dtype):
    torch.manual_seed(0)
    d = 64
    model = nn.Sequential(
        nn.LayerNorm(d),
        nn.RMSNorm(d, eps=1e-6),
        LlamaRMSNorm(d),
        Gemma2RMSNorm(d),
        T5LayerNorm(d),
        CustomLayerNorm(d),
    ).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(4, 7, d, dtype=dtype)
    before = [m(x) for m in model]
    params_before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert L.replace_norms(model) == 4
    assert isinstance(model[0], L.LayerNorm) and isinstance(model[1], L.RMSNorm)
    assert isinstance(model[2], L.LlamaStyleRMSNorm)
    assert isinstance(model[3], L.RMSNorm) and model[3].zero_centered_weight
    assert type(model[4]) is T5LayerNorm and type(model[5]) is CustomLayerNorm
    # parameters are shared, not copied; state_dict keys unchanged
    after_sd = model.state_dict()
    assert set(after_sd) == set(params_before)
    assert all(after_sd[k].data_ptr() == ptr for k, ptr in params_before.items())
    after = [m(x) for m in model]
    for i, (a, b) in enumerate(zip(after, before, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape
        tol = 1e-5 if dtype == torch.float32 else 1.6e-2
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=f"module {i}")
    assert L.replace_norms(model) == 0  # idempotent


def test_replace_norms_gpt2_style_block_and_top_level():
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(48, 4, 96, dropout=0.0, batch_first=True, norm_first=True)
    block.eval()
    x = torch.randn(2, 10, 48)
    # Grad mode on (parameters require grad): the module's own forward runs, not the fused
    # native fast path that reads the norm parameters directly.
    ref = block(x)
    assert L.replace_norms(block) == 2
    calls = []
    block.norm1.register_forward_hook(lambda *_: calls.append(1))
    torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)
    assert calls, "the replaced LayerNorm did not run"
    ln = nn.LayerNorm(8)
    assert L.replace_norms(ln) == 1 and isinstance(ln, L.LayerNorm)
