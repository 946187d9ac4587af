// Backward kernels of LayerNorm, fp16 input, fp16 weight / bias: one small instantiation unit
// (parallel, incremental builds).
#include "../bwd_kernels.cuh"

LNEXT_DEFINE_BWD_KERNELS(bwd_kernels_ln_f16, Kind::kLayerNorm, __half, __half)
