"""Fused residual add + norm: results equal the unfused ops bitwise, gradients match float64,
in-place forms mutate exactly what their schemas say, on every CPU kernel set."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import layernorm_ext as L

ops = torch.ops.layernorm_ext
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(params=L.available_cpu_capabilities())
def isa(request):
    previous = L.set_cpu_capability(request.param)
    yield request.param
    L.set_cpu_capability(previous)


def _inputs(M, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, N, generator=g).to(dtype)
    r = (torch.randn(M, N, generator=g) * 3).to(dtype)
    w = torch.randn(N, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    return x, r, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 7, 64, 769, 4097])
def test_add_layer_norm_equals_unfused_bitwise(isa, dtype, N):
    x, r, w, b = _inputs(9, N, dtype)
    for weight, bias in [(w, b), (w, None), (None, b), (None, None)]:
        out, res = L.add_layer_norm(x, r, N, weight, bias, 1e-5)
        s = x + r
        assert torch.equal(res, s)
        assert torch.equal(out, L.layer_norm(s, N, weight, bias, 1e-5))
        # the sum is what gets normalised: compare with the float64 reference of the rounded sum
        ref = torch.nn.functional.layer_norm(
            s.double(), (N,), None if weight is None else weight.double(),
            None if bias is None else bias.double(), 1e-5,
        )  # fmt: skip
        tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 5e-2)
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [3, 128, 1000])
def test_add_rms_norm_equals_unfused_bitwise(isa, dtype, N):
    x, r, w, _ = _inputs(5, N, dtype, seed=1)
    for weight in (w, None):
        for zc in (False, True):
            if zc and weight is None:
                continue
            out, res = L.add_rms_norm(x, r, N, weight, None, zero_centered_weight=zc)
            s = x + r
            assert torch.equal(res, s)
            assert torch.equal(out, L.rms_norm(s, N, weight, None, zero_centered_weight=zc))


@pytest.mark.parametrize("fn", ["layer", "rms"])
def test_inplace_forms_update_residual_and_out(isa, fn):
    x, r, w, b = _inputs(6, 300, torch.bfloat16, seed=2)
    s = x + r
    if fn == "layer":
        expected = L.layer_norm(s, 300, w, b)
        call = lambda inp, res, out: L.add_layer_norm(inp, res, 300, w, b, inplace=True, out=out)  # noqa: E731
    else:
        expected = L.rms_norm(s, 300, w)
        call = lambda inp, res, out: L.add_rms_norm(inp, res, 300, w, inplace=True, out=out)  # noqa: E731
    res = r.clone()
    x_before = x.clone()
    out, res_out = call(x, res, None)
    assert res_out is res and torch.equal(res, s) and torch.equal(out, expected)
    # without out=, the norm goes to a fresh contiguous tensor (allocated by the C++ entry), even
    # for a non-contiguous input, which is left as it was
    assert out.data_ptr() not in (x.data_ptr(), res.data_ptr()) and torch.equal(x, x_before)
    x_nc = torch.zeros(6, 600, dtype=torch.bfloat16)[:, 1::2]
    x_nc.copy_(x)
    res = r.clone()
    out, _ = call(x_nc, res, None)
    assert out.is_contiguous() and out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, expected) and torch.equal(res, s) and torch.equal(x_nc, x)
    with pytest.raises((RuntimeError, TypeError)):
        call(x, r.clone(), True)  # out must be a tensor
    # out aliasing the input (vLLM-style decode step): input overwritten with the norm
    inp, res = x.clone(), r.clone()
    out, _ = call(inp, res, inp)
    assert out is inp and torch.equal(inp, expected) and torch.equal(res, s)
    # a non-contiguous residual is updated in place through a temporary
    wide = torch.zeros(6, 600, dtype=torch.bfloat16)[:, ::2]
    wide.copy_(r)
    call(x, wide, None)
    assert torch.equal(wide, s)
    with pytest.raises(RuntimeError, match="out and the updated residual must be different"):
        res = r.clone()
        call(x, res, res)


def test_fused_errors():
    x, r, w, b = _inputs(2, 8, torch.float32)
    with pytest.raises(
        RuntimeError,
        match=r"layernorm_ext::add_layer_norm: expected residual to have the input's shape",
    ):
        L.add_layer_norm(x, r[:, :4], 8, w, b)
    with pytest.raises(RuntimeError, match=r"expected residual to have the input's dtype"):
        L.add_layer_norm(x, r.double(), 8, w, b)
    with pytest.raises(RuntimeError, match=r"layernorm_ext::add_rms_norm: Given normalized_shape"):
        L.add_rms_norm(x, r, 5, None)


@pytest.mark.parametrize("fn", ["layer", "rms"])
def test_fused_gradients_float64(isa, fn):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 11, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(4, 3, 11, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 11, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, 11, dtype=torch.float64, generator=g, requires_grad=True)
    if fn == "layer":
        f = lambda x, r, w, b: L.add_layer_norm(x, r, (3, 11), w, b, 0.5)  # noqa: E731
        args = (x, r, w, b)
    else:
        f = lambda x, r, w: L.add_rms_norm(x, r, (3, 11), w, 1e-3)  # noqa: E731
        args = (x, r, w)
    assert torch.autograd.gradcheck(f, args, check_undefined_grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_backward_matches_unfused(isa, dtype):
    x, r, w, b = _inputs(33, 257, dtype, seed=4)
    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    out, res = L.add_layer_norm(*leaves[:2], 257, *leaves[2:])
    g1 = torch.randn_like(out)
    g2 = torch.randn_like(res)
    torch.autograd.backward((out, res), (g1, g2))
    fused = [t.grad for t in leaves]
    ref_leaves = [t.double().requires_grad_() for t in (x, r, w, b)]
    s = ref_leaves[0] + ref_leaves[1]
    ref_out = torch.nn.functional.layer_norm(s, (257,), ref_leaves[2], ref_leaves[3])
    torch.autograd.backward((ref_out, s), (g1.double(), g2.double()))
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    for got, leaf in zip(fused, ref_leaves, strict=True):
        torch.testing.assert_close(got.double(), leaf.grad, atol=tol, rtol=tol)
    # input and residual receive equal but distinct gradient tensors
    assert torch.equal(fused[0], fused[1])
    assert fused[0].data_ptr() != fused[1].data_ptr()


def test_fused_opcheck():
    x, r, w, b = _inputs(4, 16, torch.float32)
    for args in [(x, r, (16,), w, b, 1e-5), (x.requires_grad_(), r, (16,), w, None, 1e-5)]:
        opcheck(ops.add_layer_norm.default, args)
    x, r, w, b = _inputs(4, 16, torch.float32)
    opcheck(ops.add_rms_norm.default, (x, r, (16,), w, None))
    opcheck(ops.add_layer_norm_fwd.default, (x, r, (16,), w, b, 1e-5))
    opcheck(ops.add_rms_norm_fwd.default, (x, r, (16,), w, None))
    opcheck(
        ops.add_layer_norm_inplace.default,
        (x, r.clone(), (16,), w, b, 1e-5),
        {"out": torch.empty(4, 16)},
    )
    opcheck(
        ops.add_rms_norm_inplace.default,
        (x, r.clone(), (16,), w, None),
        {"out": torch.empty(4, 16)},
    )
