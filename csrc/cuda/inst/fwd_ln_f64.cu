// Forward kernels of LayerNorm, fp64 input, fp64 weight / bias: one small instantiation unit
// (parallel, incremental builds).
#include "../fwd_kernels.cuh"

LNEXT_DEFINE_FWD_KERNELS(fwd_kernels_ln_f64, Kind::kLayerNorm, double, double)
