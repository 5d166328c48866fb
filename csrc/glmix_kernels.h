// The four kernel functions every device implements, in terms of the scaled queries
// qs = scale * normalize(init_slots): csrc/queries.h wraps them into the four ops of the contract
// (glmix_kernels/backends/contract.py states the ops' signatures, shapes and dtypes), and
// csrc/glmix_kernels.cpp registers those. Here, beyond the contract:
//   qs     (B, S, C) in the accumulation dtype (float32; float64 for float64 x), any strides
//          (batch stride 0 when the slots are broadcast)
//   dqs    the gradient of qs, (B, S, C) contiguous in the accumulation dtype
// x, slots, lse and grad are the ops' own; outputs are contiguous.
#pragma once
#include <tuple>

#include <ATen/core/Tensor.h>

namespace glmix {

using at::Tensor;

#define GLMIX_DECLARE_KERNELS(device)                                                                             \
  std::tuple<Tensor, Tensor> cluster_fwd_##device(const Tensor& x, const Tensor& qs);                             \
  std::tuple<Tensor, Tensor> cluster_bwd_##device(const Tensor& grad, const Tensor& x, const Tensor& qs,          \
                                                  const Tensor& slots, const Tensor& lse);                        \
  std::tuple<Tensor, Tensor> dispatch_fwd_##device(const Tensor& x, const Tensor& qs, const Tensor& slots);       \
  std::tuple<Tensor, Tensor, Tensor> dispatch_bwd_##device(const Tensor& grad, const Tensor& x, const Tensor& qs, \
                                                           const Tensor& slots, const Tensor& lse);

GLMIX_DECLARE_KERNELS(cpu)
GLMIX_DECLARE_KERNELS(cuda)
GLMIX_DECLARE_KERNELS(cuda_emulated)  // the CUDA kernels under the host emulation, on CPU tensors

#undef GLMIX_DECLARE_KERNELS

}  // namespace glmix
