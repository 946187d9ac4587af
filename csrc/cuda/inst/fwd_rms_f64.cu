// Forward kernels of RMSNorm, fp64 input, fp64 weight / bias: one small instantiation unit
// (parallel, incremental builds).
#include "../fwd_kernels.cuh"

LNEXT_DEFINE_FWD_KERNELS(fwd_kernels_rms_f64, Kind::kRMSNorm, double, double)
