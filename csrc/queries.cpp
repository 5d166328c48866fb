// The scaled queries and their backward (see queries.h), and the op schemas.
#include "queries.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "cpu/passes.h"

namespace glmix {
namespace {

// F.normalize's epsilon: the norm is clamped to it, so a zero slot gives a zero query.
constexpr double kNormEps = 1e-12;

at::ScalarType acc_dtype(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const Tensor& x, const Tensor& init_slots, const Tensor& scale) {
  TORCH_CHECK(x.dim() == 3, "glmix_kernels: x must be (B, L, C), got ", x.sizes());
  TORCH_CHECK(init_slots.dim() == 3 && (init_slots.size(0) == 1 || init_slots.size(0) == x.size(0)) &&
                  init_slots.size(1) >= 1 && init_slots.size(2) == x.size(2),
              "glmix_kernels: init_slots must be (", x.size(0), ", S, ", x.size(2), ") or (1, S, ", x.size(2),
              "), got ", init_slots.sizes());
  TORCH_CHECK(init_slots.scalar_type() == x.scalar_type(), "glmix_kernels: init_slots must have x's dtype ",
              x.scalar_type(), ", got ", init_slots.scalar_type());
  TORCH_CHECK(init_slots.device() == x.device(), "glmix_kernels: init_slots must be on x's device ", x.device(),
              ", got ", init_slots.device());
  TORCH_CHECK(scale.dim() == 0, "glmix_kernels: scale must be a 0-d tensor, got shape ", scale.sizes());
  TORCH_CHECK(scale.scalar_type() == x.scalar_type() || scale.scalar_type() == at::kFloat,
              "glmix_kernels: scale must be float32 or x's dtype ", x.scalar_type(), ", got ", scale.scalar_type());
  TORCH_CHECK(scale.device() == x.device(), "glmix_kernels: scale must be on x's device ", x.device(), ", got ",
              scale.device());
}

// ||init_slots|| per slot, (Bs, S, 1), and the fp64 copy it came from; contiguous, as pooled
// slots arrive NCHW-strided and every op below runs slower on those strides.
std::tuple<Tensor, Tensor> norms(const Tensor& init_slots) {
  // A copy even when already fp64 and contiguous: the callers divide it in place.
  Tensor s = init_slots.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
  return {s.norm(2, {-1}, /*keepdim=*/true), s};
}

// On the CPU the same math runs as loops (cpu/passes.h, compiled per ISA) over the rows of
// init_slots: the at:: chain below makes a dozen S x C fp64 temporaries per call, and at small L
// their allocation and page faults cost more than the kernels. Norms, projection and the batch sum
// in fp64, as there.

// init_slots as the loops take it: channels unit-strided (rows) or slots unit-strided
// (channels-major, as pooled slots arrive); any other layout is copied to rows.
Tensor query_source(const Tensor& init_slots) {
  return init_slots.stride(2) == 1 || init_slots.stride(1) == 1 ? init_slots : init_slots.contiguous();
}

// The loops run on blocks of kSlotBlock slots, in parallel when there are enough: at small L they
// are a good part of an op, and the rest of it runs on every thread. The blocks depend on the
// shapes only, so dscale (summed per block, then over blocks in order) does not depend on the
// thread count.
constexpr int64_t kSlotBlock = 16;

template <typename F>
void for_slot_blocks(int64_t S, int64_t C, const F& fn) {
  const int64_t blocks = (S + kSlotBlock - 1) / kSlotBlock;
  const int64_t grain = std::max<int64_t>(1, 16384 / (kSlotBlock * C));  // about 16K elements per task
  at::parallel_for(0, blocks, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) fn(k, k * kSlotBlock, std::min(S, (k + 1) * kSlotBlock));
  });
}

// qs (Bs, S, C) in acc; for channels-major init_slots the transpose of a contiguous (Bs, C, S)
// tensor, which the kernels' products (they read qs^T) take as it is.
template <typename scalar_t>
Tensor scaled_queries_cpu(const Tensor& init_slots, double scale, at::ScalarType acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tensor src = query_source(init_slots);
  const int64_t Bs = src.size(0), S = src.size(1), C = src.size(2), ss = src.stride(1), sc = src.stride(2);
  const bool channels_major = sc != 1;
  Tensor qs =
      at::empty(channels_major ? at::IntArrayRef{Bs, C, S} : at::IntArrayRef{Bs, S, C}, src.options().dtype(acc));
  for (int64_t b = 0; b < Bs; ++b) {
    const scalar_t* src_b = src.const_data_ptr<scalar_t>() + b * src.stride(0);
    acc_t* qs_b = qs.data_ptr<acc_t>() + b * S * C;
    for_slot_blocks(S, C, [&](int64_t, int64_t s0, int64_t s1) {
      cpu::scaled_queries(src_b + s0 * ss, s1 - s0, C, ss, sc, scale, qs_b + (channels_major ? s0 : s0 * C),
                          channels_major ? S : C);
    });
  }
  return channels_major ? qs.transpose(1, 2) : qs;
}

// dqs (B, S, C) contiguous -> d_init_slots (Bs, S, C) contiguous in init_slots' dtype; adds
// sum(dqs * q) to dscale, or sum(dqs * (q - the queries' mean)) where dqs sums to zero over the slots.
template <typename scalar_t>
Tensor scaled_queries_backward_cpu(const Tensor& dqs, const Tensor& init_slots, double scale, Dqs dqs_sum,
                                   double& dscale) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tensor src = query_source(init_slots);
  const int64_t B = dqs.size(0), Bs = src.size(0), S = src.size(1), C = src.size(2);
  const int64_t ss = src.stride(1), sc = src.stride(2);
  Tensor d_init = at::empty({Bs, S, C}, init_slots.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t summed = Bs == B ? 1 : B;  // a (1, S, C) init_slots takes the batch sum
  std::vector<double> block_dscale((S + kSlotBlock - 1) / kSlotBlock);
  const bool centred = dqs_sum == Dqs::ZeroOverSlots;
  std::vector<double> q_mean(centred ? C : 0);
  for (int64_t b = 0; b < Bs; ++b) {
    const scalar_t* src_b = src.const_data_ptr<scalar_t>() + b * src.stride(0);
    if (centred) cpu::query_mean(src_b, S, C, ss, sc, q_mean.data());
    for_slot_blocks(S, C, [&](int64_t k, int64_t s0, int64_t s1) {
      block_dscale[k] = 0;
      cpu::scaled_queries_backward(dqs.const_data_ptr<acc_t>() + (b * S + s0) * C, summed, S * C, src_b + s0 * ss,
                                   s1 - s0, C, ss, sc, scale, centred ? q_mean.data() : nullptr,
                                   d_init.data_ptr<scalar_t>() + (b * S + s0) * C, &block_dscale[k]);
    });
    for (const double d : block_dscale) dscale += d;
  }
  return d_init;
}

// The value of a CPU tensor's one element, read from its memory: item() would dispatch
// aten::_local_scalar_dense, the op that syncs a device with the host, which the ops never call.
double cpu_scalar(const Tensor& t) {
  double v = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "glmix cpu_scalar",
                                  [&] { v = static_cast<double>(*t.const_data_ptr<scalar_t>()); });
  return v;
}

}  // namespace

Tensor scaled_queries(const Tensor& x, const Tensor& init_slots, const Tensor& scale) {
  check_inputs(x, init_slots, scale);
  const auto acc = acc_dtype(x);
  if (x.device().is_cpu()) {
    Tensor qs;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, init_slots.scalar_type(), "glmix scaled_queries",
                                    [&] { qs = scaled_queries_cpu<scalar_t>(init_slots, cpu_scalar(scale), acc); });
    return qs.expand({x.size(0), -1, -1});
  }
  auto [r, s] = norms(init_slots);
  // q rounded to acc before the product, so qs = scale * q exactly as the reference's fp32 path.
  const Tensor q = s.div_(r.clamp_min_(kNormEps)).to(acc);
  return q.mul_(scale.to(acc)).expand({x.size(0), -1, -1});
}

std::tuple<Tensor, Tensor> scaled_queries_backward(const Tensor& dqs, const Tensor& init_slots, const Tensor& scale,
                                                   Dqs dqs_sum) {
  if (dqs.device().is_cpu()) {
    Tensor d_init_slots;
    double dscale = 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, init_slots.scalar_type(), "glmix queries_backward", [&] {
      d_init_slots =
          scaled_queries_backward_cpu<scalar_t>(dqs.contiguous(), init_slots, cpu_scalar(scale), dqs_sum, dscale);
    });
    return {d_init_slots, at::scalar_tensor(dscale, scale.options())};
  }
  auto [r, s] = norms(init_slots);
  const Tensor mask = r >= kNormEps;                // where the clamp passes the norm's gradient on
  const Tensor q = s.div_(r.clamp_min_(kNormEps));  // (Bs, S, C)
  Tensor dqs64 = dqs.to(at::kDouble);
  if (init_slots.size(0) != dqs.size(0)) dqs64 = dqs64.sum(0, /*keepdim=*/true);  // the broadcast's backward
  const Tensor q_dscale = dqs_sum == Dqs::ZeroOverSlots ? q - q.mean(1, /*keepdim=*/true) : q;
  const Tensor dscale = (dqs64 * q_dscale).sum().to(scale.scalar_type());
  // d init_slots = (dq - q <q, dq>) / r with dq = scale * dqs: the projection cancels, in fp64.
  const Tensor dq = dqs64.mul_(scale.to(at::kDouble));
  const Tensor proj = q * (q * dq).sum(-1, /*keepdim=*/true).mul_(mask);
  return {dq.sub_(proj).div_(r).to(init_slots.scalar_type()), dscale};
}

void define_ops(torch::Library& m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("cluster_fwd(Tensor x, Tensor init_slots, Tensor scale) -> (Tensor slots, Tensor lse)", tags);
  m.def(
      "cluster_bwd(Tensor grad, Tensor x, Tensor init_slots, Tensor scale, Tensor slots, Tensor lse)"
      " -> (Tensor dx, Tensor d_init_slots, Tensor dscale)",
      tags);
  m.def("dispatch_fwd(Tensor x, Tensor init_slots, Tensor scale, Tensor slots) -> (Tensor out, Tensor lse)", tags);
  m.def(
      "dispatch_bwd(Tensor grad, Tensor x, Tensor init_slots, Tensor scale, Tensor slots, Tensor lse)"
      " -> (Tensor dx, Tensor d_init_slots, Tensor dscale, Tensor dslots)",
      tags);
}

}  // namespace glmix
