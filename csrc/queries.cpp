// The scaled queries and their backward (see queries.h), and the op schemas.
#include "queries.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

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

// On the CPU the same math runs as loops over the rows of init_slots: the at:: chain below makes a
// dozen S x C fp64 temporaries per call, and at small L their allocation and page faults cost
// more than the kernels. Norms, projection and the batch sum in fp64, as there.

// The row stride of the fp64 rows of C channels: whole cache lines, and never a multiple of 4 KiB
// (rows of C = 512 doubles would all compete for one L1 set).
int64_t row_stride(int64_t C) { return (C + 7) / 8 * 8 + 8; }

// rows (S, C), row stride row_stride(C) = init_slots' batch element b in fp64; norms[s] = the
// norm of row s (unclamped). Pooled slots arrive with channels strided by S: read row by row,
// every element would be a cache line of its own, so they are copied in blocks of 8 x 8 (8 source
// lines read along s, 8 destination lines written whole, all within L1).
template <typename scalar_t>
void load_rows(const Tensor& init_slots, int64_t b, double* rows, double* norms) {
  const int64_t S = init_slots.size(1), C = init_slots.size(2);
  const int64_t ss = init_slots.stride(1), sc = init_slots.stride(2), ld = row_stride(C);
  const scalar_t* src = init_slots.const_data_ptr<scalar_t>() + b * init_slots.stride(0);
  if (sc <= ss) {
    for (int64_t s = 0; s < S; ++s) {
      double* row = rows + s * ld;
      for (int64_t c = 0; c < C; ++c) row[c] = static_cast<double>(src[s * ss + c * sc]);
      double sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) sum += row[c] * row[c];
      norms[s] = std::sqrt(sum);
    }
    return;
  }
  // Here the squares are summed on the way, in channel order, one running sum per slot.
  std::fill(norms, norms + S, 0.0);
  constexpr int64_t kBlock = 8;
  for (int64_t s0 = 0; s0 < S; s0 += kBlock)
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t s1 = std::min(S, s0 + kBlock), c1 = std::min(C, c0 + kBlock);
      for (int64_t s = s0; s < s1; ++s) {
        double sum = norms[s];
        for (int64_t c = c0; c < c1; ++c) {
          const double v = static_cast<double>(src[s * ss + c * sc]);
          rows[s * ld + c] = v;
          sum += v * v;
        }
        norms[s] = sum;
      }
    }
  for (int64_t s = 0; s < S; ++s) norms[s] = std::sqrt(norms[s]);
}

// The calling thread's fp64 buffer for a batch element's rows and norms, reused from call to
// call (a fresh S x C fp64 buffer per call costs page faults at small L).
double* row_buffer(int64_t numel) {
  thread_local std::vector<double> buf;
  if (static_cast<int64_t>(buf.size()) < numel) buf.resize(numel);
  return buf.data();
}

template <typename scalar_t>
Tensor scaled_queries_cpu(const Tensor& init_slots, double scale, at::ScalarType acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Bs = init_slots.size(0), S = init_slots.size(1), C = init_slots.size(2);
  Tensor qs = at::empty({Bs, S, C}, init_slots.options().dtype(acc));
  acc_t* out = qs.data_ptr<acc_t>();
  const acc_t scale_acc = static_cast<acc_t>(scale);
  const int64_t ld = row_stride(C);
  double* rows = row_buffer(S * ld + S);
  double* norms = rows + S * ld;
  for (int64_t b = 0; b < Bs; ++b) {
    load_rows<scalar_t>(init_slots, b, rows, norms);
    for (int64_t s = 0; s < S; ++s) {
      // A product with 1 / r, not a division per element: divisions are the loop's cost, and
      // the fp64 results differ by at most an fp64 ulp.
      const double rinv = 1.0 / std::max(norms[s], kNormEps);
      const double* row = rows + s * ld;
      acc_t* q = out + (b * S + s) * C;
      // q rounded to acc before the product, as in the at:: path.
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) q[c] = static_cast<acc_t>(row[c] * rinv) * scale_acc;
    }
  }
  return qs;
}

// The same for init_slots with channels strided more than slots (pooled slots: (C, S) in memory),
// computed in that layout: the norms summed over channels (in channel order, as above) one
// running sum per slot, then qs written as (Bs, C, S) and returned as its (Bs, S, C) transpose.
// No fp64 copy and no transposes here; and the kernels' products, which read qs^T, take it as it is.
template <typename scalar_t>
Tensor scaled_queries_channels_major_cpu(const Tensor& init_slots, double scale, at::ScalarType acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Bs = init_slots.size(0), S = init_slots.size(1), C = init_slots.size(2);
  const int64_t ss = init_slots.stride(1), sc = init_slots.stride(2);
  Tensor qT = at::empty({Bs, C, S}, init_slots.options().dtype(acc));
  const acc_t scale_acc = static_cast<acc_t>(scale);
  double* rinv = row_buffer(S);
  for (int64_t b = 0; b < Bs; ++b) {
    const scalar_t* src = init_slots.const_data_ptr<scalar_t>() + b * init_slots.stride(0);
    acc_t* out = qT.data_ptr<acc_t>() + b * C * S;
    std::fill(rinv, rinv + S, 0.0);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) {
        const double v = static_cast<double>(src[c * sc + s * ss]);
        rinv[s] += v * v;
      }
    for (int64_t s = 0; s < S; ++s) rinv[s] = 1.0 / std::max(std::sqrt(rinv[s]), kNormEps);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s)
        out[c * S + s] = static_cast<acc_t>(static_cast<double>(src[c * sc + s * ss]) * rinv[s]) * scale_acc;
  }
  return qT.transpose(1, 2);
}

// dqs (B, S, C) contiguous -> d_init_slots (Bs, S, C) in init_slots' dtype; adds sum(dqs * q) to dscale.
template <typename scalar_t>
Tensor scaled_queries_backward_cpu(const Tensor& dqs, const Tensor& init_slots, double scale, double& dscale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = dqs.size(0), Bs = init_slots.size(0), S = init_slots.size(1), C = init_slots.size(2);
  Tensor d_init = at::empty({Bs, S, C}, init_slots.options().memory_format(at::MemoryFormat::Contiguous));
  const acc_t* g = dqs.const_data_ptr<acc_t>();
  scalar_t* d = d_init.data_ptr<scalar_t>();
  const int64_t ld = row_stride(C);
  double* rows = row_buffer(S * ld + S + C);
  double* norms = rows + S * ld;
  double* dq = norms + S;
  for (int64_t b = 0; b < Bs; ++b) {
    load_rows<scalar_t>(init_slots, b, rows, norms);
    for (int64_t s = 0; s < S; ++s) {
      const double norm = norms[s], rinv = 1.0 / std::max(norm, kNormEps);
      double* q = rows + s * ld;
      std::fill(dq, dq + C, 0.0);
      // A (1, S, C) init_slots was broadcast over the batch: its gradient is the batch sum.
      for (int64_t bg = Bs == B ? b : 0; bg < (Bs == B ? b + 1 : B); ++bg) {
        const acc_t* gr = g + (bg * S + s) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dq[c] += static_cast<double>(gr[c]);
      }
      double dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < C; ++c) {
        q[c] *= rinv;
        dot += q[c] * dq[c];
      }
      dscale += dot;
      // (dq - q <q, dq>) / r with dq = scale * dqs; below eps the clamp passes no norm gradient.
      const double proj = norm >= kNormEps ? scale * dot : 0.0;
      scalar_t* dr = d + (b * S + s) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dr[c] = static_cast<scalar_t>((scale * dq[c] - q[c] * proj) * rinv);
    }
  }
  return d_init;
}

// The value of a CPU tensor's one element, read from its memory: item() would dispatch
// aten::_local_scalar_dense, the op that syncs a device with the host, which the ops never call.
double cpu_scalar(const Tensor& t) { return *t.to(at::kDouble).contiguous().const_data_ptr<double>(); }

}  // namespace

Tensor scaled_queries(const Tensor& x, const Tensor& init_slots, const Tensor& scale) {
  check_inputs(x, init_slots, scale);
  const auto acc = acc_dtype(x);
  if (x.device().is_cpu()) {
    Tensor qs;
    const bool channels_major = init_slots.stride(2) > init_slots.stride(1) && init_slots.size(1) > 1;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, init_slots.scalar_type(), "glmix scaled_queries", [&] {
      const double s = cpu_scalar(scale);
      qs = channels_major ? scaled_queries_channels_major_cpu<scalar_t>(init_slots, s, acc)
                          : scaled_queries_cpu<scalar_t>(init_slots, s, acc);
    });
    return qs.expand({x.size(0), -1, -1});
  }
  auto [r, s] = norms(init_slots);
  // q rounded to acc before the product, so qs = scale * q exactly as the reference's fp32 path.
  const Tensor q = s.div_(r.clamp_min_(kNormEps)).to(acc);
  return q.mul_(scale.to(acc)).expand({x.size(0), -1, -1});
}

std::tuple<Tensor, Tensor> scaled_queries_backward(const Tensor& dqs, const Tensor& init_slots, const Tensor& scale) {
  if (dqs.device().is_cpu()) {
    Tensor d_init_slots;
    double dscale = 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, init_slots.scalar_type(), "glmix queries_backward", [&] {
      d_init_slots = scaled_queries_backward_cpu<scalar_t>(dqs.contiguous(), init_slots, cpu_scalar(scale), dscale);
    });
    return {d_init_slots, at::scalar_tensor(dscale, scale.options())};
  }
  auto [r, s] = norms(init_slots);
  const Tensor mask = r >= kNormEps;                // where the clamp passes the norm's gradient on
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
