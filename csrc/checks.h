// Input checks of the C++ ops, shared by every device's kernels, in one message style:
//   "<op>: <argument> must <what is expected>, got <what came>".
// Python validates first (glmix_kernels/_validate.py); these keep a direct torch.ops call from
// reading out of bounds.
#pragma once

#include <cstdint>
#include <initializer_list>

#include <ATen/core/Tensor.h>

namespace glmix::checks {

// The accumulation dtype of the kernels for x's dtype: float32, or float64 for float64 x.
inline at::ScalarType acc_dtype(at::ScalarType x_dtype) { return x_dtype == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_device(const at::Tensor& t, const char* name, const char* op, at::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, op, ": ", name, " must be a ", c10::DeviceTypeName(device),
              " tensor, got one on ", t.device());
}

inline void check_shape(const at::Tensor& t, const char* name, const char* op, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must have shape ", want, ", got ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, const char* name, const char* op, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must have dtype ", want, ", got ", t.scalar_type());
}

// A tensor the op reads beside x: on x's device, with this shape and dtype.
inline void check_arg(const at::Tensor& t, const char* name, const char* op, const at::Tensor& x, at::IntArrayRef shape,
                      at::ScalarType dtype) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ", t.device());
  check_shape(t, name, op, shape);
  check_dtype(t, name, op, dtype);
}

// x (B, L, C) on `device` in one of `dtypes`, qs (B, S, C) on x's device in the accumulation
// dtype; returns S.
inline int64_t check_x_qs(const at::Tensor& x, const at::Tensor& qs, const char* op, at::DeviceType device,
                          std::initializer_list<at::ScalarType> dtypes) {
  check_device(x, "x", op, device);
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, L, C), got ", x.sizes());
  bool dtype_ok = false;
  for (const auto d : dtypes) dtype_ok = dtype_ok || x.scalar_type() == d;
  TORCH_CHECK(dtype_ok, op, ": x must have dtype one of ", c10::ArrayRef<at::ScalarType>(dtypes), ", got ",
              x.scalar_type());
  TORCH_CHECK(qs.dim() == 3 && qs.size(0) == x.size(0) && qs.size(1) >= 1 && qs.size(2) == x.size(2), op,
              ": qs must be (B, S, C) = (", x.size(0), ", S >= 1, ", x.size(2), "), got ", qs.sizes());
  check_arg(qs, "qs", op, x, qs.sizes(), acc_dtype(x.scalar_type()));
  return qs.size(1);
}

}  // namespace glmix::checks
