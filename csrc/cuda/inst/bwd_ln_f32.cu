// Backward kernels of LayerNorm, fp32 input, fp32 weight / bias: one small instantiation unit
// (parallel, incremental builds).
#include "../bwd_kernels.cuh"

LNEXT_DEFINE_BWD_KERNELS(bwd_kernels_ln_f32, Kind::kLayerNorm, float, float)
