// sum_chunks: the fixed-order sum of the chunks' partial results, for the backward kernels' sums
// over L (dqs, dslots).
#pragma once

#include "device.cuh"

namespace glmix {
namespace GLMIX_CUDA_NS {

// ws is (B, nchunks, N) fp32 and out (B, N) contiguous: out[b, n] = sum_k ws[b, k, n] in
// increasing k, so the result is bitwise reproducible.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sum_chunks(const float* __restrict__ ws, T* __restrict__ out, int nchunks, int64_t N) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (n >= N) return;
  const float* p = ws + b * nchunks * N + n;
  float s = 0.f;
  for (int k = 0; k < nchunks; ++k) s += p[static_cast<int64_t>(k) * N];
  out[b * N + n] = static_cast<T>(s);
}

}  // namespace GLMIX_CUDA_NS
}  // namespace glmix
