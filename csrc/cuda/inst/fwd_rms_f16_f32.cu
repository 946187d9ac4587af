// Forward kernels of RMSNorm, fp16 input, fp32 weight / bias: one small instantiation unit
// (parallel, incremental builds).
#include "../fwd_kernels.cuh"

LNEXT_DEFINE_FWD_KERNELS(fwd_kernels_rms_f16_f32, Kind::kRMSNorm, __half, float)
