// Host code shared by cluster.cu and dispatch.cu: the CUDA kernels' input checks, tile planning
// against this device, and the launch of sum_chunks.
#pragma once

#include <cstdint>
#include <type_traits>

#include "launch.cuh"
#include "mma_kernels.cuh"
#include "sum_chunks_kernels.cuh"

namespace glmix {
namespace GLMIX_CUDA_NS {

// x (B, L, C) and qs (B, S, C) as every kernel of this backend takes them; returns S.
inline int64_t check_inputs(const at::Tensor& x, const at::Tensor& qs, const char* op) {
  const int64_t S = checks::check_x_qs(x, qs, op, kDevice, {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK(x.size(2) >= 1 && x.size(2) <= 1024, op, ": x must have C in 1..1024, got ", x.size(2));
  TORCH_CHECK(x.size(0) <= 65535, op, ": x must have a batch of at most 65535 (a grid dimension), got ", x.size(0));
  TORCH_CHECK(x.size(1) <= INT32_MAX, op, ": x must have L < 2^31 (int32 pixel indices), got ", x.size(1));
  return S;
}

template <typename F>
inline plan::Tiles tiles_for(int64_t S, int64_t C, int budget, F smem_bytes, const char* op) {
  bool ok = false;
  const plan::Tiles t = plan::plan_tiles(S, C, budget, device_props(), smem_bytes, ok);
  TORCH_CHECK(ok, op, ": C = ", C, " needs more shared memory than this device offers");
  return t;
}

// Whether the forwards take C channels through the wide kernels (the channels streamed through
// shared memory in blocks): fp16/bf16 C > 256, fp32 C > 128.
inline bool mma_fwd_wide(int64_t C, bool tf32) { return C > (tf32 ? tc::kMmaTf32MaxChannels : tc::kMmaMaxChannels); }

// Dynamic shared memory of the forward kernel that takes C channels.
inline size_t mma_fwd_smem(int64_t C, bool tf32, bool dispatch) {
  if (mma_fwd_wide(C, tf32)) return tf32 ? tc::fwd_wide_mma_smem<mma::Tf32>() : tc::fwd_wide_mma_smem<mma::F16>();
  const int cp = tc::padded_channels(static_cast<int>(C));
  if (tf32) return dispatch ? tc::dispatch_fwd_mma_smem<mma::Tf32>(cp) : tc::cluster_fwd_mma_smem<mma::Tf32>(cp);
  return dispatch ? tc::dispatch_fwd_mma_smem<mma::F16>(cp) : tc::cluster_fwd_mma_smem<mma::F16>(cp);
}

// Whether the forward's tensor-core kernel for C channels (any C of the backend) fits a device
// whose blocks may opt in to smem_optin bytes: every C on an A100 (163 KB) and an H100 (227 KB),
// the kernels taking at most 132 KB; 16-bit C <= 128 and fp32 C <= 64 on sm_86 / sm_89 (99 KB).
inline bool mma_fwd_fits(int64_t C, bool tf32, bool dispatch, size_t smem_optin) {
  return mma_fwd_smem(C, tf32, dispatch) <= smem_optin;
}

// The forward kernels run on tensor cores (mma_kernels.cuh) on sm_80 and newer where
// mma_fwd_fits; the rest on the CUDA-core kernels.
inline bool use_mma_fwd(const at::Tensor& x, bool dispatch) {
  return has_tensor_cores() &&
         mma_fwd_fits(x.size(2), x.scalar_type() == at::kFloat, dispatch, device_props().smem_optin);
}

// The backward's kernels for C channels on a device whose blocks may opt in to smem_optin bytes:
// pixel_bwd_mma / slot_bwd_mma (all channels in shared memory) at fp16/bf16 C <= 256 and fp32
// C <= 128 where their four (dispatch five) tiles fit, else the wide ones, whose 69 KB (dispatch
// 86 KB) fit every device of sm_80 and newer (99 KB on sm_86 / sm_89), else the CUDA cores.
enum class BwdKernels { kCudaCores, kNarrow, kWide };
inline BwdKernels mma_bwd_kernels(int64_t C, bool tf32, bool dispatch, size_t smem_optin) {
  if (C <= (tf32 ? tc::kMmaTf32BwdMaxChannels : tc::kMmaBwdMaxChannels)) {
    const int cp = tc::padded_channels(static_cast<int>(C));
    const size_t smem = tf32 ? tc::bwd_mma_smem<mma::Tf32>(cp, dispatch) : tc::bwd_mma_smem<mma::F16>(cp, dispatch);
    if (smem <= smem_optin) return BwdKernels::kNarrow;
  }
  const size_t wide = tf32 ? tc::bwd_wide_mma_smem<mma::Tf32>(dispatch) : tc::bwd_wide_mma_smem<mma::F16>(dispatch);
  return wide <= smem_optin ? BwdKernels::kWide : BwdKernels::kCudaCores;
}

// The backward kernels for x on this device: tensor cores (sm_80 and newer) where mma_bwd_kernels
// says, independently of the forward's (which may not fit where the backward's do: sm_86 / sm_89).
inline BwdKernels use_mma_bwd(const at::Tensor& x, bool dispatch) {
  if (!has_tensor_cores()) return BwdKernels::kCudaCores;
  return mma_bwd_kernels(x.size(2), x.scalar_type() == at::kFloat, dispatch, device_props().smem_optin);
}

// Whether the backward takes fused_bwd_mma (one kernel per op, a block per batch element) where
// use_mma_bwd holds: one slot tile (S <= 64), C <= 64, a plan of one chunk per batch element for
// its B blocks (plan_mma_chunks: small grids split L and keep pixel_bwd_mma and slot_bwd_mma), and
// its shared memory within the device's.
inline bool fused_bwd_applies(int64_t B, int64_t L, int64_t S, int64_t C, bool tf32, bool dispatch,
                              const plan::Device& dev) {
  if (S > tc::kMmaCols || C > tc::kMmaFusedMaxChannels) return false;
  const int cp = tc::padded_channels(static_cast<int>(C));
  const size_t smem =
      tf32 ? tc::fused_bwd_mma_smem<mma::Tf32>(cp, dispatch) : tc::fused_bwd_mma_smem<mma::F16>(cp, dispatch);
  return smem <= dev.smem_optin && plan::plan_mma_chunks(L, tc::kMmaCols, B, dev).n == 1;
}

// f(e, std::integral_constant<int, CP>{}) for the padded channels cp, CP from 16 up to kMax (the
// last one standing for all wider cp): only the instantiations a launch can pick are compiled.
template <int CP, int kMax, class E, class F>
void with_padded_channels(int cp, E e, F& f) {
  if constexpr (CP <= kMax) {
    if (cp == CP || CP == kMax) return f(e, std::integral_constant<int, CP>{});
    with_padded_channels<CP * 2, kMax>(cp, e, f);
  }
}

// Calls f(E{}, std::integral_constant<int, CP>{}): E the tensor-core tag of x's dtype, CP the
// padded channels of C (the kernels' template arguments), at most kMax16 (fp16/bf16) or kMaxTf32
// (fp32): the bounds of the caller's use_mma_* test.
template <int kMax16, int kMaxTf32, typename F>
void with_mma_types(at::ScalarType type, int64_t C, F&& f) {
  const int cp = tc::padded_channels(static_cast<int>(C));
  if (type == at::kHalf)
    with_padded_channels<16, kMax16>(cp, mma::F16{}, f);
  else if (type == at::kBFloat16)
    with_padded_channels<16, kMax16>(cp, mma::Bf16{}, f);
  else
    with_padded_channels<16, kMaxTf32>(cp, mma::Tf32{}, f);
}

// Calls f(E{}): E the tensor-core tag of x's dtype (the wide forwards' template argument).
template <typename F>
void with_mma_type(at::ScalarType type, F&& f) {
  if (type == at::kHalf)
    f(mma::F16{});
  else if (type == at::kBFloat16)
    f(mma::Bf16{});
  else
    f(mma::Tf32{});
}

// A tensor's storage as the tensor-core kernels of operand type E take it (16-bit: bit patterns).
template <class E>
inline tc::Elem<E>* elems(const at::Tensor& t) {
  return static_cast<tc::Elem<E>*>(t.data_ptr());
}
// A (B, rows, C) tensor as the tensor-core backward kernels take it.
template <class E>
inline tc::Rows<tc::Elem<E>> rows_of(const at::Tensor& t) {
  return {elems<E>(t), t.stride(0), t.stride(1), t.stride(2)};
}
inline tc::Rows<float> rows_f32(const at::Tensor& t) {
  return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
}

// out[b, n] = sum_k ws[b, k, n] over the chunks k of a (B, nchunks, N) fp32 workspace.
template <typename T>
inline void launch_sum_chunks(const at::Tensor& ws, at::Tensor& out, int64_t B, int nchunks, int64_t N, Stream stream) {
  const dim3 grid(static_cast<unsigned>((N + kThreads - 1) / kThreads), static_cast<unsigned>(B));
  launch(sum_chunks<T>, grid, dim3(kThreads), 0, stream, ws.data_ptr<float>(), out.data_ptr<T>(), nchunks, N);
}

}  // namespace GLMIX_CUDA_NS
}  // namespace glmix
