// Soft dispatch on the CPU: out = softmax_S(A)^T @ slots and its backward, fused tile by tile (no
// (B, S, L) tensor). A pixel's S logits all lie in its tile, so the forward needs no merging
// across tiles; the backward's sums over pixels (dqs, dslots) go through per-chunk partials.
#include <ATen/Dispatch.h>

#include "../glmix_kernels.h"
#include "tile.h"

namespace glmix {
namespace {

using namespace cpu;

template <typename scalar_t>
void dispatch_fwd(const Tensor& x, const Tensor& qs, const Tensor& slots, Tensor& out, Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2), S = qs.size(1);
  const auto acc_opts = qs.options();
  const Chunks ch = plan_chunks(L, C, /*max_chunks=*/std::max<int64_t>(L, 1));  // one tile per task
  const Rows<scalar_t> xs(x);
  const Operand qT(qs.transpose(1, 2), qs.scalar_type(), Scratch::CallOperand);
  const Operand V(slots, qs.scalar_type(), Scratch::CallOperand2);
  acc_t* lse_p = lse.data_ptr<acc_t>();
  const auto dispatch_fwd_chunk = [&](int64_t b, int64_t j) {  // a chunk of one tile
    PixelTile<acc_t> tile(ch.tile, C, acc_opts);
    tile.load(xs, b, ch.begin(j), ch.end(j) - ch.begin(j));
    const int64_t n = tile.n(), l0 = ch.begin(j);
    const Tensor D = scratch(Scratch::Logits, n * S, acc_opts);
    acc_t* d = D.data_ptr<acc_t>();
    tile.times(qT.at<acc_t>(b), S, d);
    softmax_rows(d, n, S, S, tile.rinv(), lse_p + b * L + l0);
    Tensor ot = result_rows<acc_t, scalar_t>(out, b, l0, n, result_buffer<acc_t, scalar_t>(n * C, acc_opts));
    gemm_nn(n, C, S, d, S, V.at<acc_t>(b), C, ot.data_ptr<acc_t>(), C, false);
    flush_rows<acc_t, scalar_t>(ot, out, b, l0);
  };
  parallel_chunks(B, ch, dispatch_fwd_chunk);
}

template <typename scalar_t>
void dispatch_bwd(const Tensor& grad, const Tensor& x, const Tensor& qs, const Tensor& slots, const Tensor& lse,
                  Tensor& dx, Tensor& dqs, Tensor& dslots) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2), S = qs.size(1);
  const auto acc_opts = qs.options();
  const Chunks ch = plan_chunks(L, C, kMaxChunks);
  const Rows<scalar_t> xs(x), gs(grad);
  const Operand q(qs, qs.scalar_type(), Scratch::CallOperand);
  const Operand qT(qs.transpose(1, 2), qs.scalar_type(), Scratch::CallOperand2);
  const Operand VT(slots.transpose(1, 2), qs.scalar_type(), Scratch::CallOperand3);
  const Tensor lse_c = lse.contiguous();
  const acc_t* lse_p = lse_c.const_data_ptr<acc_t>();
  const Tensor dqs_partial = chunk_partials(dqs, ch.n, qs.scalar_type(), Scratch::CallPartial);
  const Tensor dslots_partial = chunk_partials(dslots, ch.n, qs.scalar_type(), Scratch::CallPartial2);
  // Per chunk, tile by tile: dx and delta' (pixel_bwd), the chunk's partial dqs and dslots (slot_bwd).
  const auto dispatch_bwd_chunk = [&](int64_t b, int64_t j) {
    PixelTile<acc_t> tile(ch.tile, C, acc_opts);
    const Tensor D_buf = scratch(Scratch::Logits, ch.tile * S, acc_opts);
    const Tensor dD_buf = scratch(Scratch::Logits2, ch.tile * S, acc_opts);
    const Tensor g_buf = scratch(Scratch::Grad, ch.tile * C, acc_opts);
    const Tensor dx_buf = result_buffer<acc_t, scalar_t>(ch.tile * C, acc_opts);
    acc_t* D = D_buf.data_ptr<acc_t>();
    acc_t* dD = dD_buf.data_ptr<acc_t>();
    acc_t* dqs_j = dqs_partial.data_ptr<acc_t>() + (b * ch.n + j) * S * C;
    acc_t* dslots_j = dslots_partial.data_ptr<acc_t>() + (b * ch.n + j) * S * C;
    for (int64_t l0 = ch.begin(j); l0 < ch.end(j); l0 += ch.tile) {
      const bool first = l0 == ch.begin(j);
      tile.load(xs, b, l0, std::min(ch.tile, ch.end(j) - l0));
      const int64_t n = tile.n();
      const acc_t* g = gs.template read<acc_t>(b, l0, n, g_buf).template const_data_ptr<acc_t>();
      tile.times(qT.at<acc_t>(b), S, D);
      gemm_nn(n, S, C, g, C, VT.at<acc_t>(b), S, dD, S, false);  // dD = grad @ slots^T
      // delta' = sum_s D dD per pixel, from the tile in acc_t: exact, where rowsum(grad * out)
      // would use the output rounded to x's dtype.
      softmax_backward(D, S, dD, S, n, S, tile.rinv(), lse_p + b * L + l0, nullptr, Over::Slots);
      gemm_tn(S, C, n, D, S, g, C, dslots_j, C, !first);  // dslots += D^T @ grad
      Tensor dxt = result_rows<acc_t, scalar_t>(dx, b, l0, n, dx_buf);
      acc_t* dxp = dxt.data_ptr<acc_t>();
      tile.key_backward(dD, S, S, q.at<acc_t>(b), dqs_j, first, dxp);
      flush_rows<acc_t, scalar_t>(dxt, dx, b, l0);
    }
  };
  parallel_chunks(B, ch, dispatch_bwd_chunk);
  sum_chunks<acc_t, acc_t>(dqs_partial, dqs);
  sum_chunks<acc_t, scalar_t>(dslots_partial, dslots);
}

}  // namespace

std::tuple<Tensor, Tensor> dispatch_fwd_cpu(const Tensor& x, const Tensor& qs, const Tensor& slots) {
  const char* op = "glmix_kernels.dispatch_fwd";
  const int64_t S = check_inputs(x, qs, op);
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  checks::check_arg(slots, "slots", op, x, {B, S, C}, x.scalar_type());
  Tensor out = at::empty({B, L, C}, x.options());
  Tensor lse = at::empty({B, L}, qs.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "glmix dispatch_fwd_cpu",
                                  [&] { dispatch_fwd<scalar_t>(x, qs, slots, out, lse); });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> dispatch_bwd_cpu(const Tensor& grad, const Tensor& x, const Tensor& qs,
                                                    const Tensor& slots, const Tensor& lse) {
  const char* op = "glmix_kernels.dispatch_bwd";
  const int64_t S = check_inputs(x, qs, op);
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  checks::check_arg(grad, "grad", op, x, {B, L, C}, x.scalar_type());
  checks::check_arg(slots, "slots", op, x, {B, S, C}, x.scalar_type());
  checks::check_arg(lse, "lse", op, x, {B, L}, qs.scalar_type());
  Tensor dx = at::empty({B, L, C}, x.options());
  Tensor dqs = at::empty({B, S, C}, qs.options());
  Tensor dslots = at::empty({B, S, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "glmix dispatch_bwd_cpu",
                                  [&] { dispatch_bwd<scalar_t>(grad, x, qs, slots, lse, dx, dqs, dslots); });
  return {dx, dqs, dslots};
}

}  // namespace glmix
