"""layernorm_ext.LayerNorm / RMSNorm are drop-ins for torch.nn.LayerNorm / RMSNorm: same
constructor, parameters, initialisation, repr and state_dict; same outputs."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from norm_testing import check_result, fwd_tol

import layernorm_ext
from layernorm_ext._reference import layer_norm_ref, rms_norm_ref

# (args, kwargs) of the module constructors.
LN_CONFIGS = [
    ((8,), {}),
    ((torch.Size([3, 5]),), {}),
    (([4, 6],), {"eps": 1e-3}),
    ((7,), {"elementwise_affine": False}),
    ((7,), {"bias": False}),
    ((7,), {"elementwise_affine": False, "bias": False}),
    (((2, 3),), {"dtype": torch.float64}),
    ((16,), {"dtype": torch.bfloat16, "device": "cpu"}),
]
RMS_CONFIGS = [
    ((8,), {}),
    (((3, 5),), {"eps": 1e-6}),
    ((7,), {"elementwise_affine": False}),
    ((torch.Size([2, 3]),), {"dtype": torch.float64}),
    ((16,), {"dtype": torch.float16, "device": torch.device("cpu"), "eps": None}),
]


def _pair(kind, args, kwargs):
    ours_cls, theirs_cls = (
        (layernorm_ext.LayerNorm, torch.nn.LayerNorm)
        if kind == "ln"
        else (layernorm_ext.RMSNorm, torch.nn.RMSNorm)
    )
    return ours_cls(*args, **kwargs), theirs_cls(*args, **kwargs)


def _configs():
    return [("ln", a, k) for a, k in LN_CONFIGS] + [("rms", a, k) for a, k in RMS_CONFIGS]


def _ids():
    return [f"{kind}-{a}-{k}" for kind, a, k in _configs()]


@pytest.mark.parametrize("kind,args,kwargs", _configs(), ids=_ids())
def test_module_structure_matches_torch(kind, args, kwargs):
    ours, theirs = _pair(kind, args, kwargs)
    assert isinstance(ours, type(theirs)), "must subclass the torch module"
    assert ours.normalized_shape == theirs.normalized_shape
    assert ours.eps == theirs.eps
    assert ours.elementwise_affine == theirs.elementwise_affine
    assert ours.extra_repr() == theirs.extra_repr()
    assert repr(ours) == repr(theirs).replace(type(theirs).__name__, type(ours).__name__)
    named_ours = dict(ours.named_parameters())
    named_theirs = dict(theirs.named_parameters())
    assert named_ours.keys() == named_theirs.keys()
    for name, p in named_ours.items():
        q = named_theirs[name]
        assert p.shape == q.shape and p.dtype == q.dtype and p.device == q.device, name
        assert torch.equal(p, q), f"{name}: initial values differ"
    for attr in ("weight", "bias"):
        if hasattr(theirs, attr):
            assert (getattr(ours, attr) is None) == (getattr(theirs, attr) is None), attr
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize("kind,args,kwargs", _configs(), ids=_ids())
def test_state_dict_round_trip_and_reset(kind, args, kwargs):
    ours, theirs = _pair(kind, args, kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape))
    # torch -> ours
    ours.load_state_dict(theirs.state_dict())
    for (n, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q), n
    # ours -> torch (strict)
    fresh = type(theirs)(*args, **kwargs)
    fresh.load_state_dict(ours.state_dict())
    for p, q in zip(fresh.parameters(), ours.parameters(), strict=True):
        assert torch.equal(p, q)
    # reset_parameters restores torch's initialisation.
    ours.reset_parameters()
    theirs.reset_parameters()
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)
    # Deep copy and pickling keep the class and the parameters.
    clone = copy.deepcopy(ours)
    assert type(clone) is type(ours)
    loaded = pickle.loads(pickle.dumps(ours))
    assert type(loaded) is type(ours) and loaded.extra_repr() == ours.extra_repr()


@pytest.mark.parametrize("kind,args,kwargs", _configs(), ids=_ids())
def test_forward_matches_torch_module(isa, kind, args, kwargs):
    ours, theirs = _pair(kind, args, kwargs)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape))
    theirs.load_state_dict(ours.state_dict())
    dtype = kwargs.get("dtype", torch.float32)
    x = (torch.randn(5, *ours.normalized_shape) * 2 + 1).to(dtype)
    y = ours(x)
    expected = theirs(x)
    w = ours.weight
    if kind == "ln":
        ref = layer_norm_ref(x, ours.normalized_shape, w, ours.bias, ours.eps)
    else:
        ref = rms_norm_ref(x, ours.normalized_shape, w, ours.eps)
    check_result(y, ref, fwd_tol(dtype), f"[{isa} {kind} {args} {kwargs}]", expected, dtype)
    assert y.requires_grad == expected.requires_grad


def test_rms_eps_none_semantics():
    """eps=None: torch 2.14 uses fp32's epsilon for fp16 / bf16 input (measured), fp64's for fp64.

    Inputs of magnitude 1e-4 make mean(x²) ≈ 1e-8, so the answer depends on which epsilon is
    used; the test checks that the alternatives differ, so it can tell them apart.
    """
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        magnitude = 1e-9 if dtype == torch.float64 else 1e-4
        x = (torch.rand(3, 8) * magnitude + magnitude).to(dtype)
        ours = layernorm_ext.RMSNorm(8, dtype=dtype)
        theirs = torch.nn.RMSNorm(8, dtype=dtype)
        assert ours.eps is None and theirs.eps is None
        y = ours(x).detach()
        expected = theirs(x).detach()
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        with_compute_eps = F.rms_norm(x, (8,), eps=torch.finfo(compute).eps)
        with_input_eps = F.rms_norm(x, (8,), eps=torch.finfo(dtype).eps)
        assert torch.equal(expected, with_compute_eps), f"{dtype}: torch's eps=None changed"
        if dtype in (torch.float16, torch.bfloat16):
            assert not torch.allclose(with_input_eps.double(), expected.double(), rtol=0.1)
        torch.testing.assert_close(y, expected, atol=0, rtol=2**-7 if dtype.itemsize == 2 else 1e-6)
        check_result(y, rms_norm_ref(x, 8), fwd_tol(dtype), f"{dtype} eps=None", expected, dtype)


def test_module_int_and_tuple_shapes_agree():
    x = torch.randn(4, 9)
    a = layernorm_ext.LayerNorm(9)
    b = layernorm_ext.LayerNorm((9,))
    c = layernorm_ext.LayerNorm([9])
    assert a.normalized_shape == b.normalized_shape == c.normalized_shape == (9,)
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), c(x))
    r1, r2 = layernorm_ext.RMSNorm(9), layernorm_ext.RMSNorm((9,))
    assert torch.equal(r1(x), r2(x))


def test_module_device_dtype_and_to():
    m = layernorm_ext.LayerNorm(6, device="cpu", dtype=torch.float16)
    assert m.weight.dtype == torch.float16 and m.weight.device.type == "cpu"
    m = m.to(torch.float64)
    assert m.weight.dtype == torch.float64 and m.bias.dtype == torch.float64
    y = m(torch.randn(2, 6, dtype=torch.float64))
    assert y.dtype == torch.float64
    # fp32 parameters with bf16 activations (the mixed-dtype contract).
    m32 = layernorm_ext.LayerNorm(6)
    x = torch.randn(3, 6).to(torch.bfloat16)
    y = m32(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, torch.nn.LayerNorm(6)(x).detach(), atol=0, rtol=2**-7)
    r32 = layernorm_ext.RMSNorm(6)
    assert r32(x).dtype == torch.bfloat16


def test_module_repr_names_our_class():
    assert repr(layernorm_ext.LayerNorm(4)).startswith("LayerNorm((4,), eps=1e-05")
    assert repr(layernorm_ext.RMSNorm(4)).startswith("RMSNorm((4,), eps=None")
    assert type(layernorm_ext.LayerNorm(4)).__module__.startswith("layernorm_ext")
