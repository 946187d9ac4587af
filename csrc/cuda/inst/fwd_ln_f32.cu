// Forward kernels of LayerNorm, fp32 input, fp32 weight / bias: one small instantiation unit
// (parallel, incremental builds).
#include "../fwd_kernels.cuh"

LNEXT_DEFINE_FWD_KERNELS(fwd_kernels_ln_f32, Kind::kLayerNorm, float, float)
