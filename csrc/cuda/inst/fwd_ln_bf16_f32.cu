// Forward kernels of LayerNorm, bf16 input, fp32 weight / bias: one small instantiation unit
// (parallel, incremental builds).
#include "../fwd_kernels.cuh"

LNEXT_DEFINE_FWD_KERNELS(fwd_kernels_ln_bf16_f32, Kind::kLayerNorm, __nv_bfloat16, float)
