// Host code shared by cluster.cu and dispatch.cu: the CUDA kernels' input checks, tile planning
// against this device, and the launch of sum_chunks.
#pragma once

#include <cstdint>

#include "launch.cuh"
#include "sum_chunks_kernels.cuh"

namespace glmix {
namespace GLMIX_CUDA_NS {

// x (B, L, C) and qs (B, S, C) as every kernel of this backend takes them; returns S.
inline int64_t check_inputs(const at::Tensor& x, const at::Tensor& qs, const char* op) {
  const int64_t S = checks::check_x_qs(x, qs, op, kDevice, {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK(x.size(2) >= 1 && x.size(2) <= 1024, op, ": x must have C in 1..1024, got ", x.size(2));
  TORCH_CHECK(x.size(0) <= 65535, op, ": x must have a batch of at most 65535 (a grid dimension), got ",
              x.size(0));
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

// out[b, n] = sum_k ws[b, k, n] over the chunks k of a (B, nchunks, N) fp32 workspace.
template <typename T>
inline void launch_sum_chunks(const at::Tensor& ws, at::Tensor& out, int64_t B, int nchunks, int64_t N,
                              Stream stream) {
  const dim3 grid(static_cast<unsigned>((N + kThreads - 1) / kThreads), static_cast<unsigned>(B));
  launch(sum_chunks<T>, grid, dim3(kThreads), 0, stream, ws.data_ptr<float>(), out.data_ptr<T>(), nchunks, N);
}

}  // namespace GLMIX_CUDA_NS
}  // namespace glmix
