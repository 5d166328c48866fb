// Soft clustering on the CPU: slots = softmax_L(A) @ x and its backward, fused tile by tile (no
// (B, S, L) tensor). See plan.h for the partition of L and tile.h for the shared tile steps.
#include <ATen/Dispatch.h>

#include "../glmix_kernels.h"
#include "tile.h"

namespace glmix {
namespace {

using namespace cpu;

template <typename scalar_t>
void cluster_fwd(const Tensor& x, const Tensor& qs, Tensor& slots, Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2), S = qs.size(1);
  const auto acc_opts = qs.options();
  const Chunks ch = plan_chunks(L, C, kMaxChunks);
  const int64_t J = ch.n;
  const Rows<scalar_t> xs(x);
  const Operand qT(qs.transpose(1, 2), qs.scalar_type(), Scratch::CallOperand);

  // Each chunk runs an online softmax over its tiles (FlashAttention style) and leaves its
  // running max m, sum z and unnormalised slots acc; cluster_fwd_combine merges the chunks.
  const Tensor m = scratch(Scratch::CallMax, B * J * S, acc_opts);
  const Tensor z = scratch(Scratch::CallSum, B * J * S, acc_opts);
  const Tensor acc = scratch(Scratch::CallPartial, B * J * S * C, acc_opts);
  const auto cluster_fwd_chunk = [&](int64_t b, int64_t j) {
    PixelTile<acc_t> tile(ch.tile, C, acc_opts);
    const Tensor A_buf = scratch(Scratch::Logits, ch.tile * S, acc_opts);
    acc_t* a = A_buf.data_ptr<acc_t>();
    acc_t* acc_j = acc.data_ptr<acc_t>() + (b * J + j) * S * C;
    acc_t* m_j = m.data_ptr<acc_t>() + (b * J + j) * S;
    acc_t* z_j = z.data_ptr<acc_t>() + (b * J + j) * S;
    std::vector<acc_t> tile_max(S), tile_sum(S), rescale(S);
    for (int64_t l0 = ch.begin(j); l0 < ch.end(j); l0 += ch.tile) {
      const bool first = l0 == ch.begin(j);
      tile.load(xs, b, l0, std::min(ch.tile, ch.end(j) - l0));
      const int64_t n = tile.n();
      tile.times(qT.at<acc_t>(b), S, a);
      column_max(a, n, S, S, tile.rinv(), tile_max.data());
      for (const auto s : c10::irange(S)) {
        const acc_t new_max = first ? tile_max[s] : std::max(m_j[s], tile_max[s]);
        rescale[s] = first ? acc_t(0) : std::exp(m_j[s] - new_max);
        m_j[s] = new_max;
      }
      exp_columns(a, n, S, S, tile.rinv(), m_j, tile_sum.data());  // P up to normalisation
      for (const auto s : c10::irange(S)) z_j[s] = first ? tile_sum[s] : z_j[s] * rescale[s] + tile_sum[s];
      if (!first) scale_rows(acc_j, S, C, rescale.data());
      gemm_tn(S, C, n, a, S, tile.x(), C, acc_j, C, !first);  // acc += P^T @ x
    }
  };
  parallel_chunks(B, ch, cluster_fwd_chunk);

  // cluster_fwd_combine: the chunks merged in chunk order, lse = M + log sum_j e^(m_j - M) z_j,
  // slots = sum_j e^(m_j - M) acc_j / sum_j e^(m_j - M) z_j, left in acc_t for the backward's delta.
  const acc_t* mp = m.const_data_ptr<acc_t>();
  const acc_t* zp = z.const_data_ptr<acc_t>();
  const acc_t* ap = acc.const_data_ptr<acc_t>();
  acc_t* out = slots.data_ptr<acc_t>();
  acc_t* lse_p = lse.data_ptr<acc_t>();
  // About 32K multiply-adds per task: below that, waking a thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, 32768 / (J * C));
  at::parallel_for(0, B * S, grain, [&](int64_t i0, int64_t i1) {
    acc_t w[kMaxChunks];
    for (const auto i : c10::irange(i0, i1)) {
      const int64_t b = i / S, s = i % S;
      acc_t M = -std::numeric_limits<acc_t>::infinity();
      for (const auto j : c10::irange(J)) M = std::max(M, mp[(b * J + j) * S + s]);
      acc_t Z = 0;
      for (const auto j : c10::irange(J)) {
        const int64_t bjs = (b * J + j) * S + s;
        w[j] = std::exp(mp[bjs] - M);
        Z += w[j] * zp[bjs];
      }
      lse_p[i] = M + std::log(Z);
      weighted_sum(ap + (b * J * S + s) * C, J, S * C, C, w, acc_t(1) / Z, out + i * C);
    }
  });
}

template <typename scalar_t>
void cluster_bwd(const Tensor& grad, const Tensor& x, const Tensor& qs, const Tensor& slots, const Tensor& lse,
                 Tensor& dx, Tensor& dqs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2), S = qs.size(1);
  const auto acc_opts = qs.options();
  const Chunks ch = plan_chunks(L, C, kMaxChunks);
  const Rows<scalar_t> xs(x);
  const Tensor G_acc = grad.to(qs.scalar_type()).contiguous();
  const Tensor lse_c = lse.contiguous();

  // delta = rowsum(dP * P) = rowsum(G * slots), (B, S): no (S, L) product needed. The slots are
  // the forward's, in acc_t: the terms cancel, so rounded slots would bias delta.
  Tensor delta = at::empty({B, S}, acc_opts);
  const Tensor slots_acc = slots.contiguous();
  row_dots(G_acc.const_data_ptr<acc_t>(), slots_acc.const_data_ptr<acc_t>(), B * S, C, delta.data_ptr<acc_t>());

  // Two products with x give the raw logits and dP = x @ G^T side by side, (n, 2S), which the
  // softmax steps turn into [P | dA_r]. (Two calls, not one with [qs^T | G^T]: stacking copied
  // the broadcast qs^T once per batch element.)
  const Operand q(qs, qs.scalar_type(), Scratch::CallOperand), G(G_acc, qs.scalar_type(), Scratch::CallOperand2);
  const Operand qT(qs.transpose(1, 2), qs.scalar_type(), Scratch::CallOperand3);
  const Operand GT(G_acc.transpose(1, 2), qs.scalar_type(), Scratch::CallOperand4);
  const Tensor dqs_partial = chunk_partials(dqs, ch.n, qs.scalar_type(), Scratch::CallPartial);
  // dqs = dA K - (sum_l dA) m, exact as sum_l dA = 0 over L, but the sum the tiles compute is not:
  // delta comes from the forward's rounded slots, and that error would reach dqs along the keys'
  // shared direction (docs/math.md#centred-dqs). Each chunk subtracts its own sum times the same m.
  const std::vector<acc_t> key_mean = sampled_key_means<acc_t>(xs, B, L);
  // Per chunk, tile by tile: dx (pixel_bwd) and the chunk's partial dqs (slot_bwd).
  const auto cluster_bwd_chunk = [&](int64_t b, int64_t j) {
    PixelTile<acc_t> tile(ch.tile, C, acc_opts);
    const Tensor PD_buf = scratch(Scratch::Logits, ch.tile * 2 * S, acc_opts);
    const Tensor dx_buf = result_buffer<acc_t, scalar_t>(ch.tile * C, acc_opts);
    acc_t* pd = PD_buf.data_ptr<acc_t>();
    acc_t* dqs_j = dqs_partial.data_ptr<acc_t>() + (b * ch.n + j) * S * C;
    const acc_t* lse_b = lse_c.const_data_ptr<acc_t>() + b * S;
    const acc_t* delta_b = delta.const_data_ptr<acc_t>() + b * S;
    std::vector<acc_t> da_sum(S, acc_t(0));
    for (int64_t l0 = ch.begin(j); l0 < ch.end(j); l0 += ch.tile) {
      tile.load(xs, b, l0, std::min(ch.tile, ch.end(j) - l0));
      const int64_t n = tile.n();
      tile.times(qT.at<acc_t>(b), S, pd, 2 * S);
      tile.times(GT.at<acc_t>(b), S, pd + S, 2 * S);
      softmax_backward(pd, 2 * S, pd + S, 2 * S, n, S, tile.rinv(), lse_b, delta_b, Over::Pixels);
      Tensor dxt = result_rows<acc_t, scalar_t>(dx, b, l0, n, dx_buf);
      acc_t* dxp = dxt.data_ptr<acc_t>();
      tile.key_backward(pd + S, 2 * S, S, q.at<acc_t>(b), dqs_j, l0 == ch.begin(j), dxp);
      column_sums(pd + S, n, S, 2 * S, tile.rinv(), da_sum.data());
      gemm_nn(n, C, S, pd, 2 * S, G.at<acc_t>(b), C, dxp, C, true);  // the value path, P @ G
      flush_rows<acc_t, scalar_t>(dxt, dx, b, l0);
    }
    subtract_outer(dqs_j, S, C, da_sum.data(), key_mean.data() + b * C);
  };
  parallel_chunks(B, ch, cluster_bwd_chunk);
  sum_chunks<acc_t, acc_t>(dqs_partial, dqs);
}

}  // namespace

std::tuple<Tensor, Tensor> cluster_fwd_cpu(const Tensor& x, const Tensor& qs) {
  const char* op = "glmix_kernels.cluster_fwd";
  const int64_t S = check_inputs(x, qs, op);
  const int64_t B = x.size(0), C = x.size(2);
  TORCH_CHECK(x.size(1) >= 1, op, ": x must have at least one pixel (L >= 1) for clustering, got ", x.sizes());
  Tensor slots = at::empty({B, S, C}, qs.options());
  Tensor lse = at::empty({B, S}, qs.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "glmix cluster_fwd_cpu",
                                  [&] { cluster_fwd<scalar_t>(x, qs, slots, lse); });
  return {slots, lse};
}

std::tuple<Tensor, Tensor> cluster_bwd_cpu(const Tensor& grad, const Tensor& x, const Tensor& qs, const Tensor& slots,
                                           const Tensor& lse) {
  const char* op = "glmix_kernels.cluster_bwd";
  const int64_t S = check_inputs(x, qs, op);
  const int64_t B = x.size(0), C = x.size(2);
  TORCH_CHECK(x.size(1) >= 1, op, ": x must have at least one pixel (L >= 1) for clustering, got ", x.sizes());
  checks::check_arg(grad, "grad", op, x, {B, S, C}, x.scalar_type());
  checks::check_arg(slots, "slots", op, x, {B, S, C}, qs.scalar_type());
  checks::check_arg(lse, "lse", op, x, {B, S}, qs.scalar_type());
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor dqs = at::empty({B, S, C}, qs.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "glmix cluster_bwd_cpu",
                                  [&] { cluster_bwd<scalar_t>(grad, x, qs, slots, lse, dx, dqs); });
  return {dx, dqs};
}

}  // namespace glmix
