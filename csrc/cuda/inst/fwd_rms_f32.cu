// Forward kernels of RMSNorm, fp32 input, fp32 weight / bias: one small instantiation unit
// (parallel, incremental builds).
#include "../fwd_kernels.cuh"

LNEXT_DEFINE_FWD_KERNELS(fwd_kernels_rms_f32, Kind::kRMSNorm, float, float)
