// Device helpers of the CUDA kernels (cluster_kernels.cuh, dispatch_kernels.cuh): tile loads from
// strided tensors into shared memory, per-pixel norms, the (slots x pixels) dot-product tile, the
// walk over a thread's register accumulators, and the backward kernels' common steps (slot-tile
// loads, chunk partial flushes, the dx epilogue through the normalisation).
//
// Conventions used by every kernel:
//   - a block has kThreads threads;
//   - a "tile" of rows (pixels or slots) x C channels lives in shared memory as fp32, row-major
//     with leading dimension ld = C | 1 (odd, so column walks and row walks are both free of bank
//     conflicts);
//   - register accumulators are arrays of ACC floats per thread; element i of thread t is the
//     flat index t + i * kThreads of a (rows x C) tile, so rows * C <= ACC * kThreads;
//   - every global offset is int64.
// No ATen or CUDA runtime header: the same code compiles with nvcc for the GPU and with the host
// compiler under emulation.h (GLMIX_CUDA_EMULATION), each in its own namespace GLMIX_CUDA_NS.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "plan.h"

#ifdef GLMIX_CUDA_EMULATION
#include "emulation.h"
#define GLMIX_CUDA_NS cuda_emulated_detail
#else
// All shared memory is dynamic, declared through this one macro (the emulation defines its own).
#define GLMIX_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#define GLMIX_CUDA_NS cuda_detail
#endif

namespace glmix {
namespace GLMIX_CUDA_NS {

using plan::kMaxChunks;
using plan::kMaxTile;
using plan::kThreads;
constexpr float kNormEps = 1e-12f;

// A (B, rows, C) tensor seen through its strides, as every kernel takes its operands.
struct View {
  int64_t sb, sr, sc;
};

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Bump allocator over dynamic shared memory; the host mirrors each kernel's sequence of takes
// with plan::SmemCount so the launch asks for exactly what the kernel carves.
struct SmemCarve {
  float* p;
  __device__ float* take(int n) {
    float* r = p;
    p += n;
    return r;
  }
};

// dst[r * ld + c] = float(src[(r0 + r) * sr + c * sc]) for r < n, c < C, where src points at the
// batch element. Consecutive threads walk the contiguous dimension of the source (pixels for the
// NCHW view of x, channels for row-major tensors) so global loads coalesce either way.
template <typename T>
__device__ __forceinline__ void load_tile(float* __restrict__ dst, int ld, const T* __restrict__ src, int64_t sr,
                                          int64_t sc, int64_t r0, int n, int C) {
  const int total = n * C;
  if (sr == 1 && sc != 1) {
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
      const int c = i / n, r = i - c * n;
      dst[r * ld + c] = to_f(src[(r0 + r) + static_cast<int64_t>(c) * sc]);
    }
  } else {
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
      const int r = i / C, c = i - r * C;
      dst[r * ld + c] = to_f(src[(r0 + r) * sr + static_cast<int64_t>(c) * sc]);
    }
  }
}

// Per-row reciprocal norm of a tile, as torch.nn.functional.normalize: rnorm = 1 / max(||v||, eps),
// and live = 1 where ||v|| > eps (the normalisation's gradient projects only there).
// One warp per row; writes rn[r] (and live[r] when given) for r < n.
__device__ __forceinline__ void row_rnorms(const float* __restrict__ tile, int ld, int n, int C, float* __restrict__ rn,
                                           float* __restrict__ live) {
  const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  for (int r = threadIdx.x >> 5; r < n; r += nw) {
    float s = 0.f;
    for (int c = lane; c < C; c += 32) {
      const float v = tile[r * ld + c];
      s = fmaf(v, v, s);
    }
    s = warp_sum(s);
    if (lane == 0) {
      const float nrm = sqrtf(s);
      rn[r] = 1.f / fmaxf(nrm, kNormEps);
      if (live != nullptr) live[r] = nrm > kNormEps ? 1.f : 0.f;
    }
  }
}

// out[i * ldo + j] = sum_c a[i * lda + c] * b[j * ldb + c] for i < na, j < nb.
// Each group of G threads (G a power of two <= 32, chosen so the block stays busy even for a few
// long rows) owns a 2x2 micro-tile, rows {i, i + ceil(na/2)} x cols {j, j + ceil(nb/2)}, splits
// the channels among its lanes and reduces with shuffles. Every thread runs the same number of
// rounds, so the full-warp shuffles are always convergent. No barrier inside: the caller syncs.
__device__ __forceinline__ void pair_dots(const float* __restrict__ a, int lda, int na, const float* __restrict__ b,
                                          int ldb, int nb, int C, float* __restrict__ out, int ldo) {
  const int hi = (na + 1) >> 1, hj = (nb + 1) >> 1;
  const int ntile = hi * hj;
  int G = 1;
  while (G < 32 && ntile * G * 2 <= static_cast<int>(blockDim.x) && G * 2 <= C) G <<= 1;
  const int per_round = blockDim.x / G;
  const int g = threadIdx.x & (G - 1);
  for (int base = 0; base < ntile; base += per_round) {
    const int t = base + threadIdx.x / G;
    const bool ok = t < ntile;
    const int tt = ok ? t : 0;
    const int i0 = tt / hj, j0 = tt - i0 * hj;
    const int i1 = min(i0 + hi, na - 1), j1 = min(j0 + hj, nb - 1);
    const float* a0 = a + i0 * lda;
    const float* a1 = a + i1 * lda;
    const float* b0 = b + j0 * ldb;
    const float* b1 = b + j1 * ldb;
    float s00 = 0.f, s01 = 0.f, s10 = 0.f, s11 = 0.f;
    for (int c = g; c < C; c += G) {
      const float x0 = a0[c], x1 = a1[c], y0 = b0[c], y1 = b1[c];
      s00 = fmaf(x0, y0, s00);
      s01 = fmaf(x0, y1, s01);
      s10 = fmaf(x1, y0, s10);
      s11 = fmaf(x1, y1, s11);
    }
    for (int o = G >> 1; o > 0; o >>= 1) {
      s00 += __shfl_xor_sync(0xffffffffu, s00, o);
      s01 += __shfl_xor_sync(0xffffffffu, s01, o);
      s10 += __shfl_xor_sync(0xffffffffu, s10, o);
      s11 += __shfl_xor_sync(0xffffffffu, s11, o);
    }
    if (ok && g == 0) {
      out[i0 * ldo + j0] = s00;
      if (j0 + hj < nb) out[i0 * ldo + j0 + hj] = s01;
      if (i0 + hi < na) {
        out[(i0 + hi) * ldo + j0] = s10;
        if (j0 + hj < nb) out[(i0 + hi) * ldo + j0 + hj] = s11;
      }
    }
  }
}

// One online-softmax step of a row (FlashAttention style), as both forward kernels run it: the
// running max moves from m_old (-inf before the row's first tile) to m_new and the running sum l
// takes the tile's sum of exp(a - m_new); returns alpha = exp(m_old - m_new), the factor that
// rescales the row's earlier accumulators.
__device__ __forceinline__ float online_softmax_step(float m_old, float m_new, float sum, float& l) {
  const float alpha = m_old == -INFINITY ? 0.f : expf(m_old - m_new);
  l = l * alpha + sum;
  return alpha;
}

// The register-accumulator layout in one place: calls f(i, idx, r, c) for each element acc[i] this
// thread owns in a (rows x C) tile of n = rows * C elements, flat index idx = threadIdx.x + i *
// kThreads < n, row r and column c. Fully unrolled, so acc[i] stays a register. No barrier.
template <int ACC, typename F>
__device__ __forceinline__ void for_each_acc(int n, int C, F&& f) {
#pragma unroll
  for (int i = 0; i < ACC; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    if (idx < n) {
      const int r = idx / C;
      f(i, idx, r, idx - r * C);
    }
  }
}

// A block's split-L partial sums out to its fp32 workspace row: w[idx] = acc[i] over this thread's
// elements of an n-element tile, and w2[idx] = acc2[i] in the same pass when there is a second
// accumulator (dispatch's dslots beside dqs). No barrier.
template <int ACC>
__device__ __forceinline__ void store_acc(int n, float* w, const float (&acc)[ACC], float* w2 = nullptr,
                                          const float* acc2 = nullptr) {
  for_each_acc<ACC>(n, 1, [&](int i, int idx, int, int) {  // rows and columns unused: any C
    w[idx] = acc[i];
    if (acc2 != nullptr) w2[idx] = acc2[i];
  });
}

// The backward kernels' slot-side split-L sums (dqs; dispatch also dslots, as w2/acc2 in the same
// pass) when S spans several slot tiles: the accumulators hold one slot tile at a time, so after
// each (pixel tile, slot tile) step they are flushed into that slot tile's part w of the chunk's
// workspace row (written on the chunk's first pixel tile, added to after: the order of additions
// of one running accumulator) and zeroed. No barrier.
template <int ACC>
__device__ __forceinline__ void flush_acc(int n, bool first, float* w, float (&acc)[ACC], float* w2 = nullptr,
                                          float* acc2 = nullptr) {
#pragma unroll
  for (int i = 0; i < ACC; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    if (idx < n) {
      w[idx] = first ? acc[i] : w[idx] + acc[i];
      if (acc2 != nullptr) w2[idx] = first ? acc2[i] : w2[idx] + acc2[i];
    }
    acc[i] = 0.f;
    if (acc2 != nullptr) acc2[i] = 0.f;
  }
}

// The pixel-tile kernels' loop over slot tiles: puts slot tile st of qs and of a second (S, C)
// operand y (clustering's G, dispatch's slots) in q_sh / y_sh and sets ns to its number of slots,
// unless `loaded` says that tile is already there (so one slot tile holding all S loads once per
// block). Its barrier (the previous slot tile's readers are done) is taken only when it loads, a
// block-uniform condition: every thread of the block must call it, with the same st. Returns whether
// it loaded; the caller syncs before reading the tiles.
template <typename T>
__device__ __forceinline__ bool load_slot_tile(int st, int TS, int S, int C, int ld, int& loaded, int& ns, float* q_sh,
                                               const float* qb, View qv, float* y_sh, const T* yb, View yv) {
  if (st == loaded) return false;
  __syncthreads();
  const int s0 = st * TS;
  ns = min(TS, S - s0);
  load_tile(q_sh, ld, qb, qv.sr, qv.sc, s0, ns, C);
  load_tile(y_sh, ld, yb, yv.sr, yv.sc, s0, ns, C);
  loaded = st;
  return true;
}

// The backward kernels' dx through the normalisation (docs/math.md#normalisation), for a pixel tile with
// dK = sum_s dA[s][l] qs[s][c] in this thread's accumulators dk:
//   dx = [value] + (dK - K <K, dK>) / max(||x||, eps),  K = x / max(||x||, eps),
// the projection only where ||x|| > eps (live_sh). Stages dK in dk_sh (free of readers on entry),
// takes <K, dK> per pixel (one warp per pixel, into dot_sh) and writes dx to dxb, the tile's first
// row. value: the value path's accumulators (clustering's P^T G), or nullptr (dispatch has none).
// Contains two __syncthreads(): every thread of the block must call it.
template <int ACC, typename T>
__device__ __forceinline__ void dx_epilogue(const float* x_sh, float* dk_sh, int ld, const float* rn_sh,
                                            const float* live_sh, float* dot_sh, int nl, int C, const float (&dk)[ACC],
                                            const float* value, T* dxb) {
  const int nx = nl * C;
  for_each_acc<ACC>(nx, C, [&](int i, int, int l, int c) { dk_sh[l * ld + c] = dk[i]; });
  __syncthreads();
  const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  for (int l = threadIdx.x >> 5; l < nl; l += nw) {
    float a = 0.f;
    for (int c = lane; c < C; c += 32) a = fmaf(x_sh[l * ld + c], dk_sh[l * ld + c], a);
    a = warp_sum(a);
    if (lane == 0) dot_sh[l] = a * rn_sh[l];  // <K, dK>
  }
  __syncthreads();
  for_each_acc<ACC>(nx, C, [&](int i, int idx, int l, int c) {
    const float r = rn_sh[l];
    const float kk = x_sh[l * ld + c] * r;
    if (value != nullptr)
      dxb[idx] = static_cast<T>(value[i] + (dk[i] - live_sh[l] * kk * dot_sh[l]) * r);
    else
      dxb[idx] = static_cast<T>((dk[i] - live_sh[l] * kk * dot_sh[l]) * r);
  });
}

}  // namespace GLMIX_CUDA_NS
}  // namespace glmix
