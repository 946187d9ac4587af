// Backward kernels of LayerNorm, fp64 input, fp64 weight / bias: one small instantiation unit
// (parallel, incremental builds).
#include "../bwd_kernels.cuh"

LNEXT_DEFINE_BWD_KERNELS(bwd_kernels_ln_f64, Kind::kLayerNorm, double, double)
