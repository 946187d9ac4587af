"""``nn.Module`` drop-ins for ``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm``.

They subclass the torch modules, so the constructor, parameters, ``reset_parameters``,
``extra_repr`` and state_dict keys are torch's own (a state_dict saved from either loads into the
other, and ``isinstance(m, torch.nn.LayerNorm)`` still holds); only ``forward`` runs our kernels.
One keyword is added: ``zero_centered_weight`` (scale by ``1 + weight``, Gemma style; the weight
then starts at zero).
"""

from __future__ import annotations

import torch

from .functional import _is_compiling, _layer_norm_fast, _rms_norm_fast, layer_norm, rms_norm

__all__ = ["LayerNorm", "LlamaStyleRMSNorm", "RMSNorm"]


class _ZeroCenteredWeight:
    """The ``zero_centered_weight`` keyword shared by both modules: with it the effective scale
    is ``1 + weight``, so the weight is initialised to zero (identity scale) instead of one."""

    zero_centered_weight: bool = False
    weight: torch.nn.Parameter | None

    def __init__(self, *args, zero_centered_weight: bool = False, **kwargs) -> None:
        # Set before the torch constructor runs, since it calls reset_parameters().
        self.zero_centered_weight = zero_centered_weight
        super().__init__(*args, **kwargs)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.zero_centered_weight and self.weight is not None:
            torch.nn.init.zeros_(self.weight)

    def extra_repr(self) -> str:
        zc = ", zero_centered_weight=True" if self.zero_centered_weight else ""
        return super().extra_repr() + zc


class LayerNorm(_ZeroCenteredWeight, torch.nn.LayerNorm):
    """Drop-in for :class:`torch.nn.LayerNorm` backed by layernorm_ext kernels.

    Args are torch's: ``normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
    device=None, dtype=None``, plus ``zero_centered_weight=False``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Eagerly, the functional API's fast entry directly (one Python frame less per call).
        if not _is_compiling():
            return _layer_norm_fast(
                input, self.normalized_shape, self.weight, self.bias, self.eps,
                self.zero_centered_weight, None,
            )  # fmt: skip
        return layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps,
            zero_centered_weight=self.zero_centered_weight,
        )  # fmt: skip


class RMSNorm(_ZeroCenteredWeight, torch.nn.RMSNorm):
    """Drop-in for :class:`torch.nn.RMSNorm` backed by layernorm_ext kernels.

    Args are torch's: ``normalized_shape, eps=None, elementwise_affine=True, device=None,
    dtype=None``, plus ``zero_centered_weight=False``. Everything is computed in fp32 and rounded
    once to the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _is_compiling():
            return _rms_norm_fast(
                x, self.normalized_shape, self.weight, self.eps, self.zero_centered_weight, None
            )
        return rms_norm(
            x, self.normalized_shape, self.weight, self.eps,
            zero_centered_weight=self.zero_centered_weight,
        )  # fmt: skip


class LlamaStyleRMSNorm(torch.nn.Module):
    """The RMSNorm of Llama / Mistral / Qwen-style model code, with its exact rounding points.

    Those modules normalise in fp32, round the normalised activations to the input's dtype, and
    only then multiply by ``weight`` (in torch's promoted dtype). This module reproduces that:
    our kernel computes and rounds the normalised activations, torch does the weight product.

    Args:
        weight: the scale, of shape ``[hidden]`` (shared with the module it replaces).
        eps: the epsilon (``variance_epsilon`` in those modules).
    """

    def __init__(self, weight: torch.nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = rms_norm(hidden_states, (hidden_states.shape[-1],), None, self.variance_epsilon)
        return self.weight * normed

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
