// Backward kernels of RMSNorm, fp16 input, fp16 weight / bias: one small instantiation unit
// (parallel, incremental builds).
#include "../bwd_kernels.cuh"

LNEXT_DEFINE_BWD_KERNELS(bwd_kernels_rms_f16, Kind::kRMSNorm, __half, __half)
