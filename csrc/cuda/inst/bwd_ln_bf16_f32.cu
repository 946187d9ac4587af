// Backward kernels of LayerNorm, bf16 input, fp32 weight / bias: one small instantiation unit
// (parallel, incremental builds).
#include "../bwd_kernels.cuh"

LNEXT_DEFINE_BWD_KERNELS(bwd_kernels_ln_bf16_f32, Kind::kLayerNorm, __nv_bfloat16, float)
