// Shared pieces of the CUDA kernels (cluster.cu, dispatch.cu): tile loads from strided tensors
// into shared memory, per-pixel normalisation, the (slots x pixels) dot-product tile, the walk over
// a thread's register accumulators, the backward kernels' common steps (slot-tile loads, split-L
// partial flushes, the dx epilogue through the normalisation), the fixed-order reduction of
// split-L partial sums, and the host-side choice of tile sizes.
//
// Conventions used by every kernel:
//   - a block has kThreads threads;
//   - a "tile" of rows (pixels or slots) x C channels lives in shared memory as fp32, row-major
//     with leading dimension ld = C | 1 (odd, so column walks and row walks are both free of bank
//     conflicts);
//   - register accumulators are arrays of ACC floats per thread; element i of thread t is the
//     flat index t + i * kThreads of a (rows x C) tile, so rows * C <= ACC * kThreads;
//   - every global offset is int64.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace glmix {
namespace cuda_detail {

constexpr int kThreads = 256;
constexpr float kNormEps = 1e-12f;
constexpr int kMaxTile = 64;     // at most 64 pixels and 64 slots per tile
constexpr int kMaxChunks = 1024; // split-L partials per batch element

// A (B, rows, C) tensor seen through its strides, as every kernel takes its operands.
struct View {
  int64_t sb, sr, sc;
};

inline View view_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

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
// with SmemCount so the launch asks for exactly what the kernel carves.
struct SmemCarve {
  float* p;
  __device__ float* take(int n) {
    float* r = p;
    p += n;
    return r;
  }
};
struct SmemCount {
  size_t n = 0;
  SmemCount& take(int k) {
    n += static_cast<size_t>(k);
    return *this;
  }
  size_t bytes() const { return n * sizeof(float); }
};

// dst[r * ld + c] = float(src[(r0 + r) * sr + c * sc]) for r < n, c < C, where src points at the
// batch element. Consecutive threads walk the contiguous dimension of the source (pixels for the
// NCHW view of x, channels for row-major tensors) so global loads coalesce either way.
template <typename T>
__device__ __forceinline__ void load_tile(float* __restrict__ dst, int ld,
                                          const T* __restrict__ src, int64_t sr, int64_t sc,
                                          int64_t r0, int n, int C) {
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
__device__ __forceinline__ void row_rnorms(const float* __restrict__ tile, int ld, int n, int C,
                                           float* __restrict__ rn, float* __restrict__ live) {
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
__device__ __forceinline__ void pair_dots(const float* __restrict__ a, int lda, int na,
                                          const float* __restrict__ b, int ldb, int nb, int C,
                                          float* __restrict__ out, int ldo) {
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
__device__ __forceinline__ void store_acc(int n, float* w, const float (&acc)[ACC],
                                          float* w2 = nullptr, const float* acc2 = nullptr) {
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
__device__ __forceinline__ void flush_acc(int n, bool first, float* w, float (&acc)[ACC],
                                          float* w2 = nullptr, float* acc2 = nullptr) {
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
__device__ __forceinline__ bool load_slot_tile(int st, int TS, int S, int C, int ld, int& loaded,
                                               int& ns, float* q_sh, const float* qb, View qv,
                                               float* y_sh, const T* yb, View yv) {
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
__device__ __forceinline__ void dx_epilogue(const float* x_sh, float* dk_sh, int ld,
                                            const float* rn_sh, const float* live_sh,
                                            float* dot_sh, int nl, int C, const float (&dk)[ACC],
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

// Partial-sum rows of a split-L reduction: ws is (B, nchunks, N) fp32 and out (B, N) contiguous;
// out[b, n] = sum_k ws[b, k, n] in increasing k, so the result is bitwise reproducible.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    reduce_chunks_kernel(const float* __restrict__ ws, T* __restrict__ out, int nchunks, int64_t N) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (n >= N) return;
  const float* p = ws + b * nchunks * N + n;
  float s = 0.f;
  for (int k = 0; k < nchunks; ++k) s += p[static_cast<int64_t>(k) * N];
  out[b * N + n] = static_cast<T>(s);
}

template <typename T>
inline void reduce_chunks(const at::Tensor& ws, at::Tensor& out, int64_t B, int nchunks, int64_t N,
                          cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((N + kThreads - 1) / kThreads), static_cast<unsigned>(B));
  reduce_chunks_kernel<T><<<grid, kThreads, 0, stream>>>(ws.data_ptr<float>(),
                                                         out.data_ptr<T>(), nchunks, N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Host side

// Tile sizes: TL pixels and TS slots per tile, powers of two up to 64 (TS also at most S), with
// TL * C and TS * C within `budget` (the register accumulators' reach, ACC * kThreads).
struct Tiles {
  int TL, TS, nst, ld;
};

inline int pow2_tile(int C, int budget) {
  int t = kMaxTile;
  while (t > 1 && t * C > budget) t >>= 1;
  return t;
}

// Shrinks the tiles until smem_bytes(TL, TS, ld) fits the device's opt-in limit.
template <typename F>
inline Tiles choose_tiles(int64_t S, int64_t C, int budget, F smem_bytes) {
  Tiles t;
  t.ld = static_cast<int>(C) | 1;
  t.TL = pow2_tile(static_cast<int>(C), budget);
  t.TS = static_cast<int>(std::min<int64_t>(pow2_tile(static_cast<int>(C), budget), S));
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  while (smem_bytes(t.TL, t.TS, t.ld) > limit && (t.TL > 1 || t.TS > 1)) {
    if (t.TL >= t.TS && t.TL > 1)
      t.TL >>= 1;
    else
      t.TS >>= 1;
  }
  TORCH_CHECK(smem_bytes(t.TL, t.TS, t.ld) <= limit, "glmix_kernels: C = ", C,
              " needs more shared memory than this device offers");
  t.nst = static_cast<int>((S + t.TS - 1) / t.TS);
  return t;
}

// Split of L into chunks of whole tiles, aiming at about four blocks per SM in all.
struct Chunks {
  int64_t len;  // pixels per chunk, a multiple of TL
  int n;        // number of chunks, each non-empty
};

inline Chunks choose_chunks(int64_t L, int TL, int64_t blocks_per_chunk) {
  const int64_t ntiles = (L + TL - 1) / TL;
  const int64_t target = 4LL * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t n = (target + blocks_per_chunk - 1) / std::max<int64_t>(blocks_per_chunk, 1);
  n = std::max<int64_t>(1, std::min<int64_t>({n, ntiles, kMaxChunks}));
  Chunks c;
  c.len = ((ntiles + n - 1) / n) * TL;
  c.n = static_cast<int>((L + c.len - 1) / c.len);
  return c;
}

template <typename K>
inline void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

inline void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, L, C), got ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": the CUDA kernels take float16, bfloat16 or float32 x, got ", t,
              " (float64 runs on the reference or CPU backends)");
  TORCH_CHECK(x.size(2) >= 1 && x.size(2) <= 1024, op, ": C must be in 1..1024, got ", x.size(2));
  TORCH_CHECK(x.size(0) <= 65535, op, ": batch ", x.size(0), " exceeds the grid limit 65535");
  TORCH_CHECK(x.size(1) <= INT32_MAX, op, ": L = ", x.size(1), " exceeds the kernels' int32 pixel index");
}

inline void check_qs(const at::Tensor& qs, const at::Tensor& x, const char* op) {
  TORCH_CHECK(qs.device() == x.device(), op, ": qs must be on x's device");
  TORCH_CHECK(qs.scalar_type() == at::kFloat, op, ": qs must be float32, got ", qs.scalar_type());
  TORCH_CHECK(qs.dim() == 3 && qs.size(0) == x.size(0) && qs.size(2) == x.size(2) && qs.size(1) >= 1,
              op, ": qs must be (B, S, C) matching x ", x.sizes(), ", got ", qs.sizes());
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape,
                       const char* name, const char* op) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// A float32 tensor the forward produced for the backward: lse, clustering's slots.
inline void check_stat(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape,
                       const char* name, const char* op) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device");
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

}  // namespace cuda_detail
}  // namespace glmix

// float32, float16, bfloat16 only: float64 never reaches these kernels (checked above), so no
// double instantiation is compiled.
#define GLMIX_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)     \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                             AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
