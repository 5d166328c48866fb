// The four kernels every device implements; csrc/glmix_kernels.cpp registers them as
// torch.library ops in the glmix_kernels namespace. Signatures and dtypes follow
// glmix_kernels/backends/__init__.py:
//   x      (B, L, C) any strides, float16/bfloat16/float32/float64
//   qs     (B, S, C) = scale * normalize(init_slots), float32 (float64 for float64 x), any strides
//          (batch stride 0 when the slots are broadcast)
//   lse    float32 (float64 for float64 x) log-sum-exp statistics: (B, S) over pixels for
//          clustering, (B, L) over slots for dispatch
//   slots  clustering: cluster_fwd's result in qs's dtype, which cluster_bwd reads back for
//          delta = rowsum(grad * slots) (terms that cancel: a rounded output would bias it);
//          dispatch: its (B, S, C) values, in x's dtype, any strides
// Outputs are contiguous; lse, dqs and clustering's slots in qs's dtype, everything else in x's.
#pragma once
#include <tuple>

#include <ATen/core/Tensor.h>

namespace glmix {

using at::Tensor;

#define GLMIX_DECLARE_KERNELS(device)                                                              \
  std::tuple<Tensor, Tensor> cluster_fwd_##device(const Tensor& x, const Tensor& qs);             \
  std::tuple<Tensor, Tensor> cluster_bwd_##device(const Tensor& grad, const Tensor& x,            \
                                                  const Tensor& qs, const Tensor& slots,          \
                                                  const Tensor& lse);                             \
  std::tuple<Tensor, Tensor> dispatch_fwd_##device(const Tensor& x, const Tensor& qs,             \
                                                   const Tensor& slots);                          \
  std::tuple<Tensor, Tensor, Tensor> dispatch_bwd_##device(                                       \
      const Tensor& grad, const Tensor& x, const Tensor& qs, const Tensor& slots,                 \
      const Tensor& lse);

GLMIX_DECLARE_KERNELS(cpu)
GLMIX_DECLARE_KERNELS(cuda)
GLMIX_DECLARE_KERNELS(cuda_emulated)  // the CUDA kernels under the host emulation, on CPU tensors

#undef GLMIX_DECLARE_KERNELS

}  // namespace glmix
