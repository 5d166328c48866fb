// Host side of the dispatch on CUDA (kernels: dispatch_kernels.cuh): input checks, tile and chunk
// planning, workspaces and launches. Compiled by nvcc for the GPU, and as C++ for the emulation
// (GLMIX_CUDA_EMULATION, csrc/cuda/emulated/).
#include "../glmix_kernels.h"
#include "dispatch_kernels.cuh"
#include "host.cuh"

namespace glmix {

using namespace GLMIX_CUDA_NS;

std::tuple<Tensor, Tensor> GLMIX_CUDA_FN(dispatch_fwd)(const Tensor& x, const Tensor& qs, const Tensor& slots) {
  using namespace dispatch;
  const char* op = "glmix_kernels.dispatch_fwd";
  const int64_t S = check_inputs(x, qs, op);
  const DeviceGuard guard(x.device());
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  checks::check_arg(slots, "slots", op, x, {B, S, C}, x.scalar_type());
  auto out = empty_output({B, L, C}, x.options());
  auto lse = empty_output({B, L}, x.options().dtype(at::kFloat));
  if (B == 0 || L == 0) return {out, lse};

  const Stream stream = current_stream();
  if (use_mma_fwd(x, true)) {  // tensor cores: pixel tiles of kMmaRows, several per block
    const auto ch = plan::plan_dispatch_fwd_chunks(L, tc::kMmaRows, B, device_props());
    const View xv = view_of(x), qv = view_of(qs), sv = view_of(slots);
    const dim3 grid(static_cast<unsigned>(ch.n), static_cast<unsigned>(B));
    if (mma_fwd_wide(C, x.scalar_type() == at::kFloat)) {
      with_mma_type(x.scalar_type(), [&](auto e) {
        using E = decltype(e);
        launch(tc::dispatch_fwd_wide_mma<E>, grid, dim3(tc::kMmaThreads), tc::fwd_wide_mma_smem<E>(), stream,
               elems<E>(x), xv.sb, xv.sr, xv.sc, qs.data_ptr<float>(), qv.sb, qv.sr, qv.sc, elems<E>(slots), sv.sb,
               sv.sr, sv.sc, L, static_cast<int>(S), static_cast<int>(C), static_cast<int>(ch.len / tc::kMmaRows),
               elems<E>(out), lse.data_ptr<float>());
      });
      return {out, lse};
    }
    with_mma_types<tc::kMmaMaxChannels, tc::kMmaTf32MaxChannels>(x.scalar_type(), C, [&](auto e, auto cp) {
      using E = decltype(e);
      constexpr int CP = decltype(cp)::value;
      launch(tc::dispatch_fwd_mma<E, CP>, grid, dim3(tc::kMmaThreads), tc::dispatch_fwd_mma_smem<E>(CP), stream,
             elems<E>(x), xv.sb, xv.sr, xv.sc, qs.data_ptr<float>(), qv.sb, qv.sr, qv.sc, elems<E>(slots), sv.sb, sv.sr,
             sv.sc, L, static_cast<int>(S), static_cast<int>(C), static_cast<int>(ch.len / tc::kMmaRows), elems<E>(out),
             lse.data_ptr<float>());
    });
    return {out, lse};
  }

  const auto t =
      tiles_for(S, C, kFwdAcc * kThreads, [](int TL, int TS, int ld) { return fwd_smem(TL, TS, ld).bytes(); }, op);
  const auto ch = plan::plan_dispatch_fwd_chunks(L, t.TL, B, device_props());
  const size_t smem = fwd_smem(t.TL, t.TS, t.ld).bytes();
  GLMIX_DISPATCH_CUDA_TYPES(x.scalar_type(), "glmix_dispatch_fwd_cuda", [&] {
    launch(dispatch_fwd<scalar_t>, dim3(static_cast<unsigned>(ch.n), static_cast<unsigned>(B)), dim3(kThreads), smem,
           stream, x.data_ptr<scalar_t>(), view_of(x), qs.data_ptr<float>(), view_of(qs), slots.data_ptr<scalar_t>(),
           view_of(slots), L, static_cast<int>(S), static_cast<int>(C), t.TL, t.TS, t.ld, t.nst, ch.len,
           out.data_ptr<scalar_t>(), lse.data_ptr<float>());
  });
  return {out, lse};
}

// The backward on tensor cores: pixel_bwd_mma (dx, and delta' per pixel into a workspace), then
// slot_bwd_mma (chunk partials of dqs and dslots, tiles of 64 x 64, a block per channel chunk),
// then sum_chunks; wide: their _wide_ kernels.
static void mma_bwd(const Tensor& grad, const Tensor& x, const Tensor& qs, const Tensor& slots, const Tensor& lse,
                    bool wide, Tensor& dx, Tensor& dqs, Tensor& dslots) {
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2), S = qs.size(1);
  const int nst = static_cast<int>((S + tc::kMmaRows - 1) / tc::kMmaRows);
  const int ncc = tc::bwd_channel_chunks(static_cast<int>(C), x.scalar_type() == at::kFloat, false, wide);
  const auto chp = plan::plan_dispatch_fwd_chunks(L, tc::kMmaCols, B, device_props());
  const auto ch = plan::plan_mma_chunks(L, tc::kMmaCols, B * nst * ncc, device_props());
  TORCH_CHECK(ch.n <= 65535 && nst * ncc <= 65535, "glmix_kernels.dispatch_bwd: grid too large");
  auto f32 = x.options().dtype(at::kFloat);
  auto dl = empty_workspace({B, L}, f32);
  auto ws_dq = empty_workspace({B, ch.n, S, C}, f32);
  auto ws_dv = empty_workspace({B, ch.n, S, C}, f32);
  const Stream stream = current_stream();
  // The same arguments for the narrow and the wide kernels.
  const auto run = [&](auto e, auto pixel_bwd, auto slot_bwd, size_t smem) {
    using E = decltype(e);
    launch(pixel_bwd, dim3(static_cast<unsigned>(chp.n), static_cast<unsigned>(B)), dim3(tc::kMmaThreads), smem, stream,
           rows_of<E>(grad), rows_of<E>(x), rows_f32(qs), rows_of<E>(slots), lse.data_ptr<float>(), nullptr, L,
           static_cast<int>(S), static_cast<int>(C), static_cast<int>(chp.len / tc::kMmaCols), elems<E>(dx),
           dl.data_ptr<float>());
    launch(slot_bwd, dim3(nst * ncc, ch.n, static_cast<unsigned>(B)), dim3(tc::kMmaThreads), smem, stream,
           rows_of<E>(grad), rows_of<E>(x), rows_f32(qs), rows_of<E>(slots), lse.data_ptr<float>(),
           dl.data_ptr<float>(), static_cast<int>(L), static_cast<int>(S), static_cast<int>(C), ch.len, ch.n, nullptr,
           ws_dq.data_ptr<float>(), ws_dv.data_ptr<float>());
  };
  if (wide) {
    with_mma_type(x.scalar_type(), [&](auto e) {
      using E = decltype(e);
      run(e, tc::pixel_bwd_wide_mma<E, true>, tc::slot_bwd_wide_mma<E, true>, tc::bwd_wide_mma_smem<E>(true));
    });
  } else {
    with_mma_types<tc::kMmaBwdMaxChannels, tc::kMmaTf32BwdMaxChannels>(x.scalar_type(), C, [&](auto e, auto cp) {
      using E = decltype(e);
      constexpr int CP = decltype(cp)::value;
      run(e, tc::pixel_bwd_mma<E, CP, true>, tc::slot_bwd_mma<E, CP, true>, tc::bwd_mma_smem<E>(CP, true));
    });
  }
  GLMIX_DISPATCH_CUDA_TYPES(x.scalar_type(), "glmix_dispatch_bwd_cuda",
                            [&] { launch_sum_chunks<scalar_t>(ws_dv, dslots, B, ch.n, S * C, stream); });
  launch_sum_chunks<float>(ws_dq, dqs, B, ch.n, S * C, stream);
}

std::tuple<Tensor, Tensor, Tensor> GLMIX_CUDA_FN(dispatch_bwd)(const Tensor& grad, const Tensor& x, const Tensor& qs,
                                                               const Tensor& slots, const Tensor& lse) {
  using namespace dispatch;
  const char* op = "glmix_kernels.dispatch_bwd";
  const int64_t S = check_inputs(x, qs, op);
  const DeviceGuard guard(x.device());
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  checks::check_arg(grad, "grad", op, x, {B, L, C}, x.scalar_type());
  checks::check_arg(slots, "slots", op, x, {B, S, C}, x.scalar_type());
  checks::check_arg(lse, "lse", op, x, {B, L}, at::kFloat);
  auto dx = empty_output({B, L, C}, x.options());
  auto dqs = empty_output({B, S, C}, qs.options());
  auto dslots = empty_output({B, S, C}, x.options());
  if (B == 0) return {dx, dqs, dslots};
  if (L == 0) {  // no pixel: the slot gradients are exactly zero
    dqs.zero_();
    dslots.zero_();
    return {dx, dqs, dslots};
  }

  const auto lse_c = lse.contiguous();
  const BwdKernels kernels = use_mma_bwd(x, true);
  const bool tf32 = x.scalar_type() == at::kFloat;
  if (kernels != BwdKernels::kCudaCores && fused_bwd_applies(B, L, S, C, tf32, true, device_props())) {
    // One kernel for dx, dqs and dslots (fused_bwd_mma): no workspaces, no sum_chunks.
    with_mma_types<tc::kMmaFusedMaxChannels, tc::kMmaFusedMaxChannels>(x.scalar_type(), C, [&](auto e, auto cp) {
      using E = decltype(e);
      constexpr int CP = decltype(cp)::value;
      launch(tc::fused_bwd_mma<E, CP, true>, dim3(static_cast<unsigned>(B)), dim3(tc::kMmaThreads),
             tc::fused_bwd_mma_smem<E>(CP, true), current_stream(), rows_of<E>(grad), rows_of<E>(x), rows_f32(qs),
             rows_of<E>(slots), lse_c.data_ptr<float>(), nullptr, L, static_cast<int>(S), static_cast<int>(C), nullptr,
             elems<E>(dx), dqs.data_ptr<float>(), elems<E>(dslots));
    });
    return {dx, dqs, dslots};
  }
  if (kernels != BwdKernels::kCudaCores) {
    mma_bwd(grad, x, qs, slots, lse_c, kernels == BwdKernels::kWide, dx, dqs, dslots);
    return {dx, dqs, dslots};
  }
  const auto t =
      tiles_for(S, C, kBwdAcc * kThreads, [](int TL, int TS, int ld) { return bwd_smem(TL, TS, ld).bytes(); }, op);
  const auto ch = plan::plan_chunks(L, t.TL, B, device_props());
  TORCH_CHECK(ch.n <= 65535, op, ": grid too large");
  auto f32 = x.options().dtype(at::kFloat);
  auto ws_dq = empty_workspace({B, ch.n, S, C}, f32);
  auto ws_dv = empty_workspace({B, ch.n, S, C}, f32);
  const size_t smem = bwd_smem(t.TL, t.TS, t.ld).bytes();
  const Stream stream = current_stream();

  GLMIX_DISPATCH_CUDA_TYPES(x.scalar_type(), "glmix_dispatch_bwd_cuda", [&] {
    launch(dispatch_bwd_chunk<scalar_t>, dim3(ch.n, static_cast<unsigned>(B)), dim3(kThreads), smem, stream,
           grad.data_ptr<scalar_t>(), view_of(grad), x.data_ptr<scalar_t>(), view_of(x), qs.data_ptr<float>(),
           view_of(qs), slots.data_ptr<scalar_t>(), view_of(slots), lse_c.data_ptr<float>(), L, static_cast<int>(S),
           static_cast<int>(C), t.TL, t.TS, t.ld, t.nst, ch.len, ch.n, dx.data_ptr<scalar_t>(), ws_dq.data_ptr<float>(),
           ws_dv.data_ptr<float>());
    launch_sum_chunks<scalar_t>(ws_dv, dslots, B, ch.n, S * C, stream);
  });
  launch_sum_chunks<float>(ws_dq, dqs, B, ch.n, S * C, stream);
  return {dx, dqs, dslots};
}

}  // namespace glmix
