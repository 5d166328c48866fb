// Host side of the clustering on CUDA (kernels: cluster_kernels.cuh): input checks, tile and
// chunk planning, workspaces and launches. Compiled by nvcc for the GPU, and as C++ for the
// emulation (GLMIX_CUDA_EMULATION, csrc/cuda/emulated/).
#include "../glmix_kernels.h"
#include "cluster_kernels.cuh"
#include "host.cuh"

namespace glmix {

using namespace GLMIX_CUDA_NS;

std::tuple<Tensor, Tensor> GLMIX_CUDA_FN(cluster_fwd)(const Tensor& x, const Tensor& qs) {
  using namespace cluster;
  const char* op = "glmix_kernels.cluster_fwd";
  const int64_t S = check_inputs(x, qs, op);
  const DeviceGuard guard(x.device());
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  TORCH_CHECK(L >= 1, op, ": x must have at least one pixel (L >= 1) for clustering");
  auto f32 = x.options().dtype(at::kFloat);
  auto slots = empty_output({B, S, C}, f32);
  auto lse = empty_output({B, S}, f32);
  if (B == 0) return {slots, lse};

  // Tensor cores: slot tiles of kMmaRows, pixel tiles of kMmaCols (wide C: a block per slot tile
  // and channel block); else the planned CUDA-core tiles.
  const bool mma = use_mma_fwd(x, false);
  const bool tf32 = x.scalar_type() == at::kFloat, wide = mma_fwd_wide(C, tf32);
  const int ncb = wide ? tc::wide_blocks(static_cast<int>(C), tf32) : 1;
  const int mma_nst = static_cast<int>((S + tc::kMmaRows - 1) / tc::kMmaRows) * ncb;
  const auto t =
      mma ? plan::Tiles{tc::kMmaCols, tc::kMmaRows, mma_nst, 0}
          : tiles_for(
                S, C, kFwdAcc * kThreads, [](int TL, int TS, int ld) { return fwd_smem(TL, TS, ld).bytes(); }, op);
  const auto ch = mma ? plan::plan_mma_chunks(L, t.TL, B * t.nst, device_props())
                      : plan::plan_chunks(L, t.TL, B * t.nst, device_props());
  TORCH_CHECK(ch.n <= 65535 && t.nst <= 65535, op, ": grid too large");
  // One chunk per batch element (batches that fill the SMs): the tensor-core kernels write lse
  // and slots themselves (store_chunk), no workspace and no combine; else the partials.
  const bool direct = mma && ch.n == 1;
  Tensor ws_m, ws_l, ws_acc;
  if (!direct) {
    ws_m = empty_workspace({B, ch.n, S}, f32);
    ws_l = empty_workspace({B, ch.n, S}, f32);
    ws_acc = empty_workspace({B, ch.n, S, C}, f32);
  }
  float* out_m = direct ? lse.data_ptr<float>() : ws_m.data_ptr<float>();
  float* out_l = direct ? nullptr : ws_l.data_ptr<float>();
  float* out_acc = direct ? slots.data_ptr<float>() : ws_acc.data_ptr<float>();
  const Stream stream = current_stream();
  const dim3 grid(t.nst, ch.n, static_cast<unsigned>(B));

  if (mma && wide) {
    const View xv = view_of(x), qv = view_of(qs);
    with_mma_type(x.scalar_type(), [&](auto e) {
      using E = decltype(e);
      launch(tc::cluster_fwd_chunk_wide_mma<E>, grid, dim3(tc::kMmaThreads), tc::fwd_wide_mma_smem<E>(), stream,
             elems<E>(x), xv.sb, xv.sr, xv.sc, qs.data_ptr<float>(), qv.sb, qv.sr, qv.sc, static_cast<int>(L),
             static_cast<int>(S), static_cast<int>(C), ch.len, ch.n, out_m, out_l, out_acc);
    });
  } else if (mma) {
    const View xv = view_of(x), qv = view_of(qs);
    with_mma_types<tc::kMmaMaxChannels, tc::kMmaTf32MaxChannels>(x.scalar_type(), C, [&](auto e, auto cp) {
      using E = decltype(e);
      constexpr int CP = decltype(cp)::value;
      launch(tc::cluster_fwd_chunk_mma<E, CP>, grid, dim3(tc::kMmaThreads), tc::cluster_fwd_mma_smem<E>(CP), stream,
             elems<E>(x), xv.sb, xv.sr, xv.sc, qs.data_ptr<float>(), qv.sb, qv.sr, qv.sc, static_cast<int>(L),
             static_cast<int>(S), static_cast<int>(C), ch.len, ch.n, out_m, out_l, out_acc);
    });
  } else {
    GLMIX_DISPATCH_CUDA_TYPES(x.scalar_type(), "glmix_cluster_fwd_cuda", [&] {
      launch(cluster_fwd_chunk<scalar_t>, grid, dim3(kThreads), fwd_smem(t.TL, t.TS, t.ld).bytes(), stream,
             x.data_ptr<scalar_t>(), view_of(x), qs.data_ptr<float>(), view_of(qs), static_cast<int>(L),
             static_cast<int>(S), static_cast<int>(C), t.TL, t.TS, t.ld, ch.len, ch.n, ws_m.data_ptr<float>(),
             ws_l.data_ptr<float>(), ws_acc.data_ptr<float>());
    });
  }
  if (direct) return {slots, lse};
  launch(cluster_fwd_combine, dim3(S, B), dim3(kThreads), combine_smem(ch.n).bytes(), stream, ws_m.data_ptr<float>(),
         ws_l.data_ptr<float>(), ws_acc.data_ptr<float>(), static_cast<int>(S), static_cast<int>(C), ch.n,
         slots.data_ptr<float>(), lse.data_ptr<float>());
  return {slots, lse};
}

// (B, C) fp32: the mean key K = x / max(||x||, eps) of 32 pixels spread evenly over L, the pixels
// the Triton backend samples. It is about the direction the keys share, if they share one (an
// offset on x); the backward's dqs is centred on it (math.md#centred-dqs). Any m keeps dqs exact.
static Tensor key_mean(const Tensor& x) {
  constexpr int64_t kSample = 32;
  const auto rows = at::arange(kSample, x.options().dtype(at::kLong)).mul_(x.size(1)).div_(kSample, "floor");
  const auto k = x.index_select(1, rows).to(at::kFloat);
  return k.div(k.norm(2, {2}, true).clamp_min(kNormEps)).mean(1).contiguous();
}

std::tuple<Tensor, Tensor> GLMIX_CUDA_FN(cluster_bwd)(const Tensor& grad, const Tensor& x, const Tensor& qs,
                                                      const Tensor& slots, const Tensor& lse) {
  using namespace cluster;
  const char* op = "glmix_kernels.cluster_bwd";
  const int64_t S = check_inputs(x, qs, op);
  const DeviceGuard guard(x.device());
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  TORCH_CHECK(L >= 1, op, ": x must have at least one pixel (L >= 1) for clustering");
  checks::check_arg(grad, "grad", op, x, {B, S, C}, x.scalar_type());
  checks::check_arg(slots, "slots", op, x, {B, S, C}, at::kFloat);
  checks::check_arg(lse, "lse", op, x, {B, S}, at::kFloat);
  auto dx = empty_output({B, L, C}, x.options());
  auto dqs = empty_output({B, S, C}, qs.options());
  if (B == 0) return {dx, dqs};

  const auto lse_c = lse.contiguous();
  // Tensor cores: pixel_bwd_mma (dx) and slot_bwd_mma (chunk partials of dqs), tiles of 64 x 64,
  // a block per channel chunk (wide C: their _wide_ kernels); else cluster_bwd_chunk with the
  // planned CUDA-core tiles.
  const BwdKernels kernels = use_mma_bwd(x, false);
  const bool mma = kernels != BwdKernels::kCudaCores, wide = kernels == BwdKernels::kWide;
  const int mma_nst = static_cast<int>((S + tc::kMmaRows - 1) / tc::kMmaRows);
  const int mma_ncc = tc::bwd_channel_chunks(static_cast<int>(C), x.scalar_type() == at::kFloat, true, wide);
  const auto t =
      mma ? plan::Tiles{tc::kMmaCols, tc::kMmaRows, mma_nst, 0}
          : tiles_for(
                S, C, kBwdAcc * kThreads, [](int TL, int TS, int ld) { return bwd_smem(TL, TS, ld).bytes(); }, op);
  const auto ch = mma ? plan::plan_mma_chunks(L, t.TL, B * t.nst * mma_ncc, device_props())
                      : plan::plan_chunks(L, t.TL, B, device_props());
  TORCH_CHECK(ch.n <= 65535, op, ": grid too large");
  // One kernel for dx and dqs (fused_bwd_mma): no workspace, no sum_chunks.
  const bool fused = mma && fused_bwd_applies(B, L, S, C, x.scalar_type() == at::kFloat, false, device_props());
  auto f32 = x.options().dtype(at::kFloat);
  auto delta = empty_workspace({B, S}, f32);
  auto ws_dq = fused ? Tensor() : empty_workspace({B, ch.n, S, C}, f32);
  const auto kmean = key_mean(x);
  const size_t smem = mma ? 0 : bwd_smem(t.TL, t.TS, t.ld).bytes();
  const Stream stream = current_stream();

  GLMIX_DISPATCH_CUDA_TYPES(x.scalar_type(), "glmix_cluster_bwd_cuda", [&] {
    const int64_t rows = B * S, warps = kThreads / 32;
    launch(cluster_delta<scalar_t>, dim3(static_cast<unsigned>((rows + warps - 1) / warps)), dim3(kThreads), 0, stream,
           grad.data_ptr<scalar_t>(), view_of(grad), slots.data_ptr<float>(), view_of(slots), B, static_cast<int>(S),
           static_cast<int>(C), delta.data_ptr<float>());
    if (mma) return;
    launch(cluster_bwd_chunk<scalar_t>, dim3(ch.n, B), dim3(kThreads), smem, stream, grad.data_ptr<scalar_t>(),
           view_of(grad), x.data_ptr<scalar_t>(), view_of(x), qs.data_ptr<float>(), view_of(qs),
           lse_c.data_ptr<float>(), delta.data_ptr<float>(), static_cast<int>(L), static_cast<int>(S),
           static_cast<int>(C), t.TL, t.TS, t.ld, t.nst, ch.len, ch.n, kmean.data_ptr<float>(), dx.data_ptr<scalar_t>(),
           ws_dq.data_ptr<float>());
  });
  if (fused) {
    with_mma_types<tc::kMmaFusedMaxChannels, tc::kMmaFusedMaxChannels>(x.scalar_type(), C, [&](auto e, auto cp) {
      using E = decltype(e);
      constexpr int CP = decltype(cp)::value;
      launch(tc::fused_bwd_mma<E, CP, false>, dim3(static_cast<unsigned>(B)), dim3(tc::kMmaThreads),
             tc::fused_bwd_mma_smem<E>(CP, false), stream, rows_of<E>(grad), rows_of<E>(x), rows_f32(qs),
             rows_of<E>(grad), lse_c.data_ptr<float>(), delta.data_ptr<float>(), L, static_cast<int>(S),
             static_cast<int>(C), kmean.data_ptr<float>(), elems<E>(dx), dqs.data_ptr<float>(), nullptr);
    });
    return {dx, dqs};
  }
  if (mma) {
    const auto chp = plan::plan_dispatch_fwd_chunks(L, tc::kMmaCols, B, device_props());
    // The same arguments for the narrow and the wide kernels.
    const auto run = [&](auto e, auto pixel_bwd, auto slot_bwd, size_t mma_smem) {
      using E = decltype(e);
      launch(pixel_bwd, dim3(static_cast<unsigned>(chp.n), static_cast<unsigned>(B)), dim3(tc::kMmaThreads), mma_smem,
             stream, rows_of<E>(grad), rows_of<E>(x), rows_f32(qs), rows_of<E>(grad), lse_c.data_ptr<float>(),
             delta.data_ptr<float>(), L, static_cast<int>(S), static_cast<int>(C),
             static_cast<int>(chp.len / tc::kMmaCols), elems<E>(dx), nullptr);
      launch(slot_bwd, dim3(t.nst * mma_ncc, ch.n, static_cast<unsigned>(B)), dim3(tc::kMmaThreads), mma_smem, stream,
             rows_of<E>(grad), rows_of<E>(x), rows_f32(qs), rows_of<E>(grad), lse_c.data_ptr<float>(),
             delta.data_ptr<float>(), static_cast<int>(L), static_cast<int>(S), static_cast<int>(C), ch.len, ch.n,
             kmean.data_ptr<float>(), ws_dq.data_ptr<float>(), nullptr);
    };
    if (wide) {
      with_mma_type(x.scalar_type(), [&](auto e) {
        using E = decltype(e);
        run(e, tc::pixel_bwd_wide_mma<E, false>, tc::slot_bwd_wide_mma<E, false>, tc::bwd_wide_mma_smem<E>(false));
      });
    } else {
      with_mma_types<tc::kMmaBwdMaxChannels, tc::kMmaTf32BwdMaxChannels>(x.scalar_type(), C, [&](auto e, auto cp) {
        using E = decltype(e);
        constexpr int CP = decltype(cp)::value;
        run(e, tc::pixel_bwd_mma<E, CP, false>, tc::slot_bwd_mma<E, CP, false>, tc::bwd_mma_smem<E>(CP, false));
      });
    }
  }
  launch_sum_chunks<float>(ws_dq, dqs, B, ch.n, S * C, stream);
  return {dx, dqs};
}

}  // namespace glmix
