// Soft dispatch on the CPU: out = softmax_S(A)^T @ slots and its backward, fused tile by tile (no
// (B, S, L) tensor). A pixel's S logits all lie in its tile, so the forward needs no merging
// across tiles; the backward's sums over pixels (dqs, dslots) go through per-split partials.
#include <ATen/Dispatch.h>

#include "../glmix_kernels.h"
#include "tile.h"

namespace glmix {
namespace {

using namespace cpu;

template <typename scalar_t>
void dispatch_fwd_impl(const Tensor& x, const Tensor& qs, const Tensor& slots, Tensor& out, Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2), S = qs.size(1);
  const auto acc_opts = qs.options();
  const Splits sp(L, C, /*max_splits=*/std::max<int64_t>(L, 1));  // one tile per task
  const Rows<scalar_t> xs(x);
  const Operand q(qs, qs.scalar_type()), V(slots, qs.scalar_type());
  acc_t* lse_p = lse.data_ptr<acc_t>();
  parallel_splits(B, sp, [&](int64_t b, int64_t j) {
    PixelTile<acc_t> tile(sp.tile, C, acc_opts);
    tile.load(xs, b, sp.begin(j), sp.end(j) - sp.begin(j));
    const int64_t n = tile.n(), l0 = sp.begin(j);
    Tensor D = at::empty({S, n}, acc_opts);
    tile.raw_logits(q[b], D);
    acc_t* d = D.data_ptr<acc_t>();
    std::vector<acc_t> col_max(n), col_sum(n);
    softmax_max(d, S, n, tile.rinv(), Over::Slots, col_max.data());
    softmax_exp(d, S, n, tile.rinv(), col_max.data(), Over::Slots, col_sum.data());
    for (const auto l : c10::irange(n)) {
      lse_p[b * L + l0 + l] = col_max[l] + std::log(col_sum[l]);
      col_sum[l] = acc_t(1) / col_sum[l];
    }
    scale_columns(d, S, n, col_sum.data());
    Tensor ot = result_rows<acc_t, scalar_t>(out, b, l0, n, result_buffer<acc_t, scalar_t>(n * C, acc_opts));
    at::cpu::mm_out(ot, D.t(), V[b]);
    flush_rows<acc_t, scalar_t>(ot, out, b, l0);
  });
}

template <typename scalar_t>
void dispatch_bwd_impl(const Tensor& grad, const Tensor& x, const Tensor& qs, const Tensor& slots,
                       const Tensor& lse, Tensor& dx, Tensor& dqs, Tensor& dslots) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2), S = qs.size(1);
  const auto acc_opts = qs.options();
  const Splits sp(L, C, kMaxSplits);
  const Rows<scalar_t> xs(x), gs(grad);
  const Operand q(qs, qs.scalar_type()), V(slots, qs.scalar_type());
  const Tensor lse_c = lse.contiguous();
  Tensor dqs_partial = at::empty({B, sp.count, S, C}, acc_opts);
  Tensor dslots_partial = at::empty({B, sp.count, S, C}, acc_opts);
  parallel_splits(B, sp, [&](int64_t b, int64_t j) {
    PixelTile<acc_t> tile(sp.tile, C, acc_opts);
    const Tensor D_buf = at::empty({S * sp.tile}, acc_opts), dA_buf = at::empty({S * sp.tile}, acc_opts);
    const Tensor g_buf = at::empty({sp.tile * C}, acc_opts), dx_buf = result_buffer<acc_t, scalar_t>(sp.tile * C, acc_opts);
    std::vector<acc_t> delta(sp.tile);
    const Tensor qb = q[b], Vb = V[b];
    Tensor dqs_j = dqs_partial[b][j], dslots_j = dslots_partial[b][j];
    for (int64_t l0 = sp.begin(j); l0 < sp.end(j); l0 += sp.tile) {
      const bool first = l0 == sp.begin(j);
      tile.load(xs, b, l0, std::min(sp.tile, sp.end(j) - l0));
      const int64_t n = tile.n();
      const Tensor g = gs.template read<acc_t>(b, l0, n, g_buf);
      Tensor dxt = result_rows<acc_t, scalar_t>(dx, b, l0, n, dx_buf);
      Tensor D = rows_view(D_buf, S, n);
      tile.raw_logits(qb, D);
      softmax_exp(D.data_ptr<acc_t>(), S, n, tile.rinv(), lse_c.const_data_ptr<acc_t>() + b * L + l0, Over::Slots,
                  static_cast<acc_t*>(nullptr));
      Tensor dA = rows_view(dA_buf, S, n);
      at::cpu::mm_out(dA, Vb, g.t());  // dD = slots @ grad^T
      // delta' = sum_s D dD per pixel, from the tile in acc_t: exact, where rowsum(grad * out)
      // would use the output rounded to x's dtype.
      slot_delta(D.const_data_ptr<acc_t>(), dA.const_data_ptr<acc_t>(), S, n, delta.data());
      softmax_backward(D.const_data_ptr<acc_t>(), dA.data_ptr<acc_t>(), S, n, delta.data(), Over::Slots,
                       tile.rinv());
      accumulate_mm(dslots_j, D, g, first);  // dslots = D @ grad
      tile.key_backward(dA, qb, dqs_j, first, dxt);
      flush_rows<acc_t, scalar_t>(dxt, dx, b, l0);
    }
  });
  sum_splits<acc_t, acc_t>(dqs_partial, dqs);
  sum_splits<acc_t, scalar_t>(dslots_partial, dslots);
}

}  // namespace

std::tuple<Tensor, Tensor> dispatch_fwd_cpu(const Tensor& x, const Tensor& qs, const Tensor& slots) {
  const int64_t S = check_x_qs(x, qs);
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  check_cpu(slots, "slots");
  check_shape(slots, "slots", {B, S, C});
  check_dtype(slots, "slots", x.scalar_type());
  Tensor out = at::empty({B, L, C}, x.options());
  Tensor lse = at::empty({B, L}, qs.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "glmix dispatch_fwd_cpu",
                                  [&] { dispatch_fwd_impl<scalar_t>(x, qs, slots, out, lse); });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> dispatch_bwd_cpu(const Tensor& grad, const Tensor& x, const Tensor& qs,
                                                    const Tensor& slots, const Tensor& lse) {
  const int64_t S = check_x_qs(x, qs);
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  for (const auto& [t, name, shape] : {std::tuple{&grad, "grad", std::vector<int64_t>{B, L, C}},
                                       std::tuple{&slots, "slots", std::vector<int64_t>{B, S, C}}}) {
    check_cpu(*t, name);
    check_shape(*t, name, shape);
    check_dtype(*t, name, x.scalar_type());
  }
  check_cpu(lse, "lse");
  check_shape(lse, "lse", {B, L});
  check_dtype(lse, "lse", qs.scalar_type());
  Tensor dx = at::empty({B, L, C}, x.options());
  Tensor dqs = at::empty({B, S, C}, qs.options());
  Tensor dslots = at::empty({B, S, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "glmix dispatch_bwd_cpu", [&] {
    dispatch_bwd_impl<scalar_t>(grad, x, qs, slots, lse, dx, dqs, dslots);
  });
  return {dx, dqs, dslots};
}

}  // namespace glmix
