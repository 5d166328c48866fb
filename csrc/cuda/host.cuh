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

// The forward kernels run on tensor cores (mma_kernels.cuh) for fp16/bf16 x with C <= 256; fp32
// x and wider C stay on the CUDA-core kernels.
inline bool use_mma_fwd(const at::Tensor& x) {
  const auto t = x.scalar_type();
  return (t == at::kHalf || t == at::kBFloat16) && x.size(2) <= tc::kMmaMaxChannels && has_tensor_cores();
}

// The backward kernels run on tensor cores for fp16/bf16 x with C <= 128 (two accumulator sets
// per warp), the rest on the CUDA-core kernels.
inline bool use_mma_bwd(const at::Tensor& x) { return use_mma_fwd(x) && x.size(2) <= tc::kMmaBwdMaxChannels; }

// Calls f(E{}, std::integral_constant<int, CP>{}): E the tensor-core tag of x's 16-bit dtype, CP
// the padded channels of C (the kernels' template arguments).
template <typename F>
void with_mma_types(at::ScalarType type, int64_t C, F&& f) {
  const auto with_cp = [&](auto e) {
    switch (tc::padded_channels(static_cast<int>(C))) {
      case 16:
        return f(e, std::integral_constant<int, 16>{});
      case 32:
        return f(e, std::integral_constant<int, 32>{});
      case 64:
        return f(e, std::integral_constant<int, 64>{});
      case 128:
        return f(e, std::integral_constant<int, 128>{});
      default:
        return f(e, std::integral_constant<int, 256>{});
    }
  };
  if (type == at::kHalf)
    with_cp(mma::F16{});
  else
    with_cp(mma::Bf16{});
}

// A 16-bit tensor's storage as the kernels take it (bit patterns).
inline const uint16_t* bits16(const at::Tensor& t) { return static_cast<const uint16_t*>(t.data_ptr()); }
inline uint16_t* bits16(at::Tensor& t) { return static_cast<uint16_t*>(t.data_ptr()); }

// A (B, rows, C) tensor as the tensor-core backward kernels take it.
inline tc::Rows<uint16_t> rows16(const at::Tensor& t) { return {bits16(t), t.stride(0), t.stride(1), t.stride(2)}; }
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
