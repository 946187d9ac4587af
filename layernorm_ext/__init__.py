"""layernorm_ext: LayerNorm and RMSNorm kernels for PyTorch (CPU SIMD and CUDA).

Drop-in replacements for ``torch.nn.functional.layer_norm`` / ``rms_norm`` and
``torch.nn.LayerNorm`` / ``RMSNorm``, registered as PyTorch dispatcher ops
(``torch.ops.layernorm_ext.*``) with C++ autograd and meta kernels, so they work with autograd,
``torch.compile``, ``torch.export`` and CUDA graphs.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.layernorm_ext)
from ._version import __version__
from .functional import (
    add_layer_norm,
    add_rms_norm,
    available_cpu_capabilities,
    cpu_capability,
    cpu_stream_min_bytes,
    cpu_stream_policy,
    has_cuda_kernels,
    layer_norm,
    rms_norm,
    set_cpu_capability,
    set_cpu_stream_min_bytes,
    set_cpu_stream_policy,
)
from .modules import LayerNorm, LlamaStyleRMSNorm, RMSNorm
from .replace import replace_norms

__all__ = [
    "LayerNorm",
    "LlamaStyleRMSNorm",
    "RMSNorm",
    "__version__",
    "add_layer_norm",
    "add_rms_norm",
    "available_cpu_capabilities",
    "cpu_capability",
    "cpu_stream_min_bytes",
    "cpu_stream_policy",
    "has_cuda_kernels",
    "layer_norm",
    "replace_norms",
    "rms_norm",
    "set_cpu_capability",
    "set_cpu_stream_min_bytes",
    "set_cpu_stream_policy",
]
