// Backward kernels of RMSNorm, bf16 input, bf16 weight / bias: one small instantiation unit
// (parallel, incremental builds).
#include "../bwd_kernels.cuh"

LNEXT_DEFINE_BWD_KERNELS(bwd_kernels_rms_bf16, Kind::kRMSNorm, __nv_bfloat16, __nv_bfloat16)
