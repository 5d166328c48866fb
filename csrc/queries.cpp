// The scaled queries and their backward (see queries.h), and the op schemas.
#include "queries.h"

#include <ATen/ATen.h>

namespace glmix {
namespace {

// F.normalize's epsilon: the norm is clamped to it, so a zero slot gives a zero query.
constexpr double kNormEps = 1e-12;

at::ScalarType acc_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

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

}  // namespace

Tensor scaled_queries(const Tensor& x, const Tensor& init_slots, const Tensor& scale) {
  check_inputs(x, init_slots, scale);
  const auto acc = acc_dtype(x);
  auto [r, s] = norms(init_slots);
  // q rounded to acc before the product, so qs = scale * q exactly as the reference's fp32 path.
  const Tensor q = s.div_(r.clamp_min_(kNormEps)).to(acc);
  return q.mul_(scale.to(acc)).expand({x.size(0), -1, -1});
}

std::tuple<Tensor, Tensor> scaled_queries_backward(const Tensor& dqs, const Tensor& init_slots,
                                                   const Tensor& scale) {
  auto [r, s] = norms(init_slots);
  const Tensor mask = r >= kNormEps;  // where the clamp passes the norm's gradient on
  const Tensor q = s.div_(r.clamp_min_(kNormEps));  // (Bs, S, C)
  Tensor dqs64 = dqs.to(at::kDouble);
  if (init_slots.size(0) != dqs.size(0)) dqs64 = dqs64.sum(0, /*keepdim=*/true);  // the broadcast's backward
  const Tensor dscale = (dqs64 * q).sum().to(scale.scalar_type());
  // d init_slots = (dq - q <q, dq>) / r with dq = scale * dqs: the projection cancels, in fp64.
  const Tensor dq = dqs64.mul_(scale.to(at::kDouble));
  const Tensor proj = q * (q * dq).sum(-1, /*keepdim=*/true).mul_(mask);
  return {dq.sub_(proj).div_(r).to(init_slots.scalar_type()), dscale};
}

void define_ops(torch::Library& m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("cluster_fwd(Tensor x, Tensor init_slots, Tensor scale) -> (Tensor slots, Tensor lse)", tags);
  m.def("cluster_bwd(Tensor grad, Tensor x, Tensor init_slots, Tensor scale, Tensor slots, Tensor lse)"
        " -> (Tensor dx, Tensor d_init_slots, Tensor dscale)",
        tags);
  m.def("dispatch_fwd(Tensor x, Tensor init_slots, Tensor scale, Tensor slots) -> (Tensor out, Tensor lse)", tags);
  m.def("dispatch_bwd(Tensor grad, Tensor x, Tensor init_slots, Tensor scale, Tensor slots, Tensor lse)"
        " -> (Tensor dx, Tensor d_init_slots, Tensor dscale, Tensor dslots)",
        tags);
}

}  // namespace glmix
