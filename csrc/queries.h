// The device-agnostic part of the op contract (glmix_kernels/backends/contract.py): the scaled
// queries qs = scale * normalize(init_slots) every kernel reads, their backward, and the four ops
// of a device built from its four (x, qs) kernel functions. Written with at:: ops on S x C
// tensors (tiny next to the kernels' B x L x C work), so any device's tensors run them.
#pragma once
#include <tuple>

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace glmix {

using at::Tensor;

// Checks init_slots and scale against x (the contract's rules) and returns
// qs = scale * normalize(init_slots), (B, S, C) in the accumulation dtype, batch stride 0 for a
// (1, S, C) init_slots; on the CPU, for init_slots with channels strided more than slots (pooled
// slots), the transpose of a contiguous (Bs, C, S) tensor. The normalisation runs in fp64.
Tensor scaled_queries(const Tensor& x, const Tensor& init_slots, const Tensor& scale);

// What is known of dqs's sum over the slots: dispatch's is zero (its dA sums to zero over S per
// pixel), so its dscale = sum <dqs, q> is taken as sum <dqs, q - the queries' mean>, equal in exact
// arithmetic, without the products' rounding along the direction the queries share
// (docs/math.md#centred-dscale).
enum class Dqs { Any, ZeroOverSlots };

// The backward of scaled_queries: dqs (B, S, C) -> (d_init_slots like init_slots, summed over the
// batch for a (1, S, C) init_slots; dscale 0-d in scale's dtype), in fp64 until the final cast.
std::tuple<Tensor, Tensor> scaled_queries_backward(const Tensor& dqs, const Tensor& init_slots, const Tensor& scale,
                                                   Dqs dqs_sum);

// The op schemas, for a namespace's TORCH_LIBRARY block.
void define_ops(torch::Library& m);

// The four ops of one device, wrapped around its four kernel functions, which take qs:
//   cluster_fwd(x, qs) -> (slots, lse)           cluster_bwd(grad, x, qs, slots, lse) -> (dx, dqs)
//   dispatch_fwd(x, qs, slots) -> (out, lse)     dispatch_bwd(grad, x, qs, slots, lse) -> (dx, dqs, dslots)
// The backwards recompute qs: S x C work, cheaper than saving it. Each op runs below autograd:
// nothing inside needs it, and otherwise every view a kernel takes of a tile (select, narrow)
// went through ADInplaceOrView and built autograd view metadata.
template <auto kClusterFwd, auto kClusterBwd, auto kDispatchFwd, auto kDispatchBwd>
struct QueryOps {
  static std::tuple<Tensor, Tensor> cluster_fwd(const Tensor& x, const Tensor& init_slots, const Tensor& scale) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return kClusterFwd(x, scaled_queries(x, init_slots, scale));
  }

  static std::tuple<Tensor, Tensor, Tensor> cluster_bwd(const Tensor& grad, const Tensor& x, const Tensor& init_slots,
                                                        const Tensor& scale, const Tensor& slots, const Tensor& lse) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dqs] = kClusterBwd(grad, x, scaled_queries(x, init_slots, scale), slots, lse);
    auto [d_init_slots, dscale] = scaled_queries_backward(dqs, init_slots, scale, Dqs::Any);
    return {dx, d_init_slots, dscale};
  }

  static std::tuple<Tensor, Tensor> dispatch_fwd(const Tensor& x, const Tensor& init_slots, const Tensor& scale,
                                                 const Tensor& slots) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return kDispatchFwd(x, scaled_queries(x, init_slots, scale), slots);
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor> dispatch_bwd(const Tensor& grad, const Tensor& x,
                                                                 const Tensor& init_slots, const Tensor& scale,
                                                                 const Tensor& slots, const Tensor& lse) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dqs, dslots] = kDispatchBwd(grad, x, scaled_queries(x, init_slots, scale), slots, lse);
    auto [d_init_slots, dscale] = scaled_queries_backward(dqs, init_slots, scale, Dqs::ZeroOverSlots);
    return {dx, d_init_slots, dscale, dslots};
  }

  static void register_kernels(torch::Library& m) {
    m.impl("cluster_fwd", TORCH_FN(cluster_fwd));
    m.impl("cluster_bwd", TORCH_FN(cluster_bwd));
    m.impl("dispatch_fwd", TORCH_FN(dispatch_fwd));
    m.impl("dispatch_bwd", TORCH_FN(dispatch_bwd));
  }
};

}  // namespace glmix

// The ops of namespace `ns` on dispatch key `key` from the kernel functions named
// glmix::{cluster_fwd,cluster_bwd,dispatch_fwd,dispatch_bwd}_<device>, e.g.
//   GLMIX_REGISTER_KERNELS(glmix_kernels, CPU, cpu)
// (the namespace's schemas come from glmix::define_ops in its TORCH_LIBRARY block).
#define GLMIX_REGISTER_KERNELS(ns, key, device)                                                                \
  TORCH_LIBRARY_IMPL(ns, key, m) {                                                                             \
    glmix::QueryOps<&glmix::cluster_fwd_##device, &glmix::cluster_bwd_##device, &glmix::dispatch_fwd_##device, \
                    &glmix::dispatch_bwd_##device>::register_kernels(m);                                       \
  }
