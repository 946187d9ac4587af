"""``nn.Module`` drop-ins for ``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm``.

They subclass the torch modules, so the constructor, parameters, ``reset_parameters``,
``extra_repr`` and state_dict keys are torch's own (a state_dict saved from either loads into the
other, and ``isinstance(m, torch.nn.LayerNorm)`` still holds); only ``forward`` runs our kernels.
"""

from __future__ import annotations

import torch

from .functional import layer_norm, rms_norm

__all__ = ["LayerNorm", "RMSNorm"]


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for :class:`torch.nn.LayerNorm` backed by layernorm_ext kernels.

    Args are torch's: ``normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
    device=None, dtype=None``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in for :class:`torch.nn.RMSNorm` backed by layernorm_ext kernels.

    Args are torch's: ``normalized_shape, eps=None, elementwise_affine=True, device=None,
    dtype=None``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)
