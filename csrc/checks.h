// Argument validation and row-layout helpers shared by every backend (CPU, CUDA, Meta).
//
// One home for: ATen-verbatim shape messages, the dtype contract, the device rule, which layouts
// are read in place, and the shapes / dtypes of every output. The Meta kernels call the same
// functions with symbolic sizes, so torch.compile sees exactly the eager errors and shapes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/util/SmallVector.h>

#include <optional>

namespace layernorm_ext {

// Validates a normalisation call: normalized_shape non-empty; weight / bias of exactly that shape;
// input ending in it (ATen's wording for all three); floating input; the dtype contract for the
// parameters; one device for all tensors. `op` names the op in every message.
void check_norm_inputs(const char* op, const at::Tensor& input,
                       c10::SymIntArrayRef normalized_shape,
                       const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias);

// Validates the extra tensors of a backward call against its input: grad_out has the input's
// shape and dtype; mean / rstd have M elements of the accumulation type.
void check_norm_backward_inputs(const char* op, const at::Tensor& grad_out, const at::Tensor& input,
                                int64_t normalized_ndim, const std::optional<at::Tensor>& mean,
                                const at::Tensor& rstd);

// Validates an out= tensor: the input's dtype, device and shape (never resized, see checks.cpp).
void check_out(const char* op, const at::Tensor& input, const at::Tensor& out);

// Statistics are kept in fp32 for fp16 / bf16 / fp32 input and in fp64 for fp64 input.
at::ScalarType acc_type(at::ScalarType input_dtype);

// Shape of mean / rstd: the input's leading dims followed by one 1 per normalized dim (ATen's
// native_layer_norm convention).
c10::SymDimVector stat_sym_shape(const at::Tensor& input, int64_t normalized_ndim);

// Concrete view of the problem as M rows of N elements.
struct RowShape {
  int64_t M;
  int64_t N;
};
RowShape row_shape(const at::Tensor& input, int64_t normalized_ndim);

// A tensor viewed as rows: the data to read and its row stride in elements. Inputs whose
// normalized block is contiguous and whose leading dims collapse to a single row stride
// (e.g. x[:, :N] of a wider tensor, or an expanded row) are read in place; anything else is made
// contiguous once.
struct Rows {
  at::Tensor data;
  int64_t stride;
};
Rows as_rows(const at::Tensor& t, int64_t normalized_ndim);

// Returns the row stride if `t` can be read in place as rows, or -1.
int64_t row_stride_or_neg(const at::Tensor& t, int64_t normalized_ndim);

// A parameter ([normalized_shape]) as a contiguous tensor, or an undefined one when absent.
at::Tensor contiguous_param(const std::optional<at::Tensor>& p);

}  // namespace layernorm_ext
