"""``replace_norms``: swap a model's normalisation layers for layernorm_ext ones, in place.

Recognised (and why each replacement computes the same thing):

* ``torch.nn.LayerNorm`` (exact type) -> :class:`layernorm_ext.LayerNorm`; ``torch.nn.RMSNorm``
  (exact type) -> :class:`layernorm_ext.RMSNorm`. Our modules subclass these, so the module
  object is kept (class swap): parameters, buffers, hooks, device and dtype are untouched.
  Subclasses with their own ``forward`` are left alone: their arithmetic may differ.
* Llama-style RMSNorm classes of model libraries (``LlamaRMSNorm``, ``MistralRMSNorm``,
  ``MixtralRMSNorm``, ``Qwen2RMSNorm``, ``Qwen2MoeRMSNorm``, ``Qwen3RMSNorm``,
  ``Qwen3MoeRMSNorm``, ``Phi3RMSNorm``, ``InternLM2RMSNorm``): a ``weight`` parameter and
  ``variance_epsilon`` (or ``eps``); they normalise in fp32, round to the input's dtype, then
  multiply by ``weight``. Replaced by :class:`layernorm_ext.LlamaStyleRMSNorm`, which keeps those
  rounding points and shares the weight.
* Gemma-style RMSNorm classes (``GemmaRMSNorm``, ``Gemma2RMSNorm``, ``Gemma3RMSNorm``): ``weight``
  and ``eps``, scale ``1 + weight``, everything in fp32, one rounding to the input's dtype.
  Replaced by :class:`layernorm_ext.RMSNorm` with ``zero_centered_weight=True`` sharing the weight.

Anything else (e.g. T5's ``T5LayerNorm``, which rounds to the *weight's* dtype) is not touched.
"""

from __future__ import annotations

import torch

from .modules import LayerNorm, LlamaStyleRMSNorm, RMSNorm

__all__ = ["replace_norms"]

LLAMA_STYLE_RMSNORMS = frozenset(
    {
        "LlamaRMSNorm",
        "MistralRMSNorm",
        "MixtralRMSNorm",
        "Qwen2RMSNorm",
        "Qwen2MoeRMSNorm",
        "Qwen3RMSNorm",
        "Qwen3MoeRMSNorm",
        "Phi3RMSNorm",
        "InternLM2RMSNorm",
    }
)
GEMMA_STYLE_RMSNORMS = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"})


def _eps_of(module: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _replacement(module: torch.nn.Module) -> torch.nn.Module | None:
    """The module to put in place of ``module`` (possibly itself, re-classed), or None."""
    kind = type(module)
    if kind is torch.nn.LayerNorm:
        module.__class__ = LayerNorm
        module.zero_centered_weight = False
        return module
    if kind is torch.nn.RMSNorm:
        module.__class__ = RMSNorm
        module.zero_centered_weight = False
        return module
    weight = getattr(module, "weight", None)
    eps = _eps_of(module)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1 or eps is None:
        return None
    if kind.__name__ in LLAMA_STYLE_RMSNORMS:
        return LlamaStyleRMSNorm(weight, eps)
    if kind.__name__ in GEMMA_STYLE_RMSNORMS:
        new = RMSNorm.__new__(RMSNorm)
        torch.nn.Module.__init__(new)
        new.normalized_shape = (weight.shape[0],)
        new.eps = eps
        new.elementwise_affine = True
        new.zero_centered_weight = True
        new.weight = weight
        return new
    return None


def replace_norms(model: torch.nn.Module) -> int:
    """Replace, in place, every recognised normalisation module of ``model``.

    See the module docstring for the recognised classes. Replacements share the original
    parameters (same device and dtype); ``model`` itself is replaced only if it is a recognised
    ``torch.nn`` norm (class swap).

    Returns:
        How many modules were replaced.
    """
    count = 0
    if type(model) in (torch.nn.LayerNorm, torch.nn.RMSNorm):
        _replacement(model)
        return 1
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (LayerNorm, RMSNorm, LlamaStyleRMSNorm)):
                continue
            new = _replacement(child)
            if new is None:
                continue
            if new is not child:
                setattr(parent, name, new)
            count += 1
    return count
