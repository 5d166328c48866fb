// The forward kernels on tensor cores (csrc/cuda/mma.cuh), for 16-bit x: cluster_fwd_chunk_mma
// and dispatch_fwd_mma compute what the CUDA-core cluster_fwd_chunk and dispatch_fwd compute.
//
// A block has kMmaWarps warps; each warp owns 16 rows of the logits (clustering: slots; dispatch:
// pixels) and all their columns in a tile of 64 (pixels; slots) as accumulator fragments:
//   - x's pixel tile goes to shared memory as 16-bit values (channels padded with zeros to CP, a
//     power of two from 16 to 256), with 1 / ||x|| per pixel beside it; so do the S x C operands
//     (qs, split as qs_hi + qs_lo in the 16-bit type: two products keep qs's fp32 accuracy, as on
//     the other backends; dispatch's slots);
//   - logits = the product, scaled by 1 / ||x|| once per pixel afterwards (not per product);
//   - an online softmax along the columns on the accumulator registers (a row's 8 columns of a
//     block sit in 4 lanes: two shuffles per reduction);
//   - the value product with the probabilities rounded to the 16-bit type straight from the
//     logits' registers (no trip through shared memory).
// Shared rows have ld = CP + 8 elements (ld % 16 == 8: conflict-free ldmatrix). The kernels'
// __launch_bounds__ say one block per SM at least: without it ptxas capped registers at 96 and
// spilled. No ATen here.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

// Shared memory through device.cuh's macro (under the emulation: NaN-filled per block), unless the
// includer brings its own (the fiber runner of tests/test_mma.py, csrc/tests/mma_harness.cpp).
#ifndef GLMIX_DYNAMIC_SMEM
#include "device.cuh"
#endif
#include "mma.cuh"

namespace glmix {
namespace GLMIX_CUDA_NS {
namespace tc {

using namespace mma;

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kMmaRows = 16 * kMmaWarps;  // logit rows per block: slots (clustering), pixels (dispatch)
constexpr int kMmaCols = 64;              // logit columns per tile: pixels (clustering), slots (dispatch)
constexpr int kMmaNB = kMmaCols / 8;      // accumulator blocks of a warp's logits
constexpr float kMmaNormEps = 1e-12f;
constexpr int kMmaMaxChannels = 256;  // C above this: the wide forwards, the backward on CUDA cores
// fp32 x: dispatch_fwd_mma's four fp32 tiles at CP = 256 take 267 KB, above any SM's shared memory
// (wider C: the wide forwards).
constexpr int kMmaTf32MaxChannels = 128;

// Shared-memory storage of an operand type: 16-bit bit patterns, or fp32 for tf32 (split into hi
// and lo as the fragments load: 3xTF32). Row padding for conflict-free fragment loads (mma.cuh):
// ld % 16 == 8 for ldmatrix, ld % 32 == 4 for the fp32 loads (CP is a multiple of 16).
template <class E>
struct Store {
  using T = uint16_t;
  static constexpr int kPad = 8;
};
template <>
struct Store<Tf32> {
  using T = float;
  static constexpr int kPad = 4;
};
template <class E>
using Elem = typename Store<E>::T;
template <class E>
constexpr bool kIsTf32 = std::is_same<E, Tf32>::value;
template <class E, int CP>
__host__ __device__ constexpr int tile_ld() {
  return CP + Store<E>::kPad;
}
template <class E>
__device__ __forceinline__ float value_of(Elem<E> v) {
  if constexpr (kIsTf32<E>)
    return v;
  else
    return from_bits(v, E{});
}
template <class E>
__device__ __forceinline__ Elem<E> elem_of(float v) {
  if constexpr (kIsTf32<E>)
    return v;
  else
    return to_bits(v, E{});
}

// Channels padded for the products: CP in {16, 32, 64, 128, 256}, the smallest holding C. A warp's
// accumulators take CP / 2 registers per lane: 256 fits (about 230 registers, no spill), 512 not.
inline int padded_channels(int C) {
  int cp = 16;
  while (cp < C) cp <<= 1;
  return cp;
}
// Dynamic shared memory: three 64-row 16-bit tiles (qs hi and lo, and x; dispatch one more for the
// slots) and 64 floats of 1 / ||x||.
// (fp32 tiles for tf32: qs whole in the hi tile, the lo tile unused.)
template <class E = F16>
inline size_t cluster_fwd_mma_smem(int CP) {
  return static_cast<size_t>(3 * 64) * (CP + Store<E>::kPad) * sizeof(Elem<E>) + 64 * 4;
}
template <class E = F16>
inline size_t dispatch_fwd_mma_smem(int CP) {
  return static_cast<size_t>(4 * 64) * (CP + Store<E>::kPad) * sizeof(Elem<E>) + 64 * 4;
}

__device__ __forceinline__ float warp_sum32(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// dst[r][c] = src row r0 + r, channel c (strides sr, sc) for r < n, c < C; zeros up to 64 rows and
// CP channels. Consecutive threads walk the source's contiguous dimension.
template <class T>
__device__ inline void load_rows(T* dst, int ld, int CP, const T* src, int64_t sr, int64_t sc, int64_t r0, int n,
                                 int C) {
  const bool row_minor = sr == 1 && sc != 1;  // the NCHW view of x
  for (int i = threadIdx.x; i < 64 * CP; i += blockDim.x) {
    int r, c;
    if (row_minor) {
      c = i / 64;
      r = i - c * 64;
    } else {
      r = i / CP;
      c = i - r * CP;
    }
    dst[r * ld + c] = (r < n && c < C) ? src[(r0 + r) * sr + c * sc] : T{0};
  }
}

// The same for fp32 rows (qs), split into hi and lo 16-bit tiles with v ~ hi + lo (tf32: whole
// into hi, split later as the fragments load).
template <class E>
__device__ inline void load_rows_split(Elem<E>* hi, Elem<E>* lo, int ld, int CP, const float* src, int64_t sr,
                                       int64_t sc, int64_t r0, int n, int C) {
  if constexpr (kIsTf32<E>) {
    load_rows(hi, ld, CP, src, sr, sc, r0, n, C);
  } else {
    for (int i = threadIdx.x; i < 64 * CP; i += blockDim.x) {
      const int r = i / CP, c = i - r * CP;
      const float v = (r < n && c < C) ? src[(r0 + r) * sr + c * sc] : 0.f;
      const uint16_t h = to_bits(v, E{});
      hi[r * ld + c] = h;
      lo[r * ld + c] = to_bits(v - from_bits(h, E{}), E{});
    }
  }
}

// ss[r] = (first) or += (else) the sum of squares of the 64 rows of a tile of KB channels, a warp
// per row (the same rows for the same warp at every call); rnorm_of(ss) is 1 / max(||x||, eps). At
// the last channel block (last), what tile_rnorms writes instead: rn in ss, liveness in live.
template <class E>
__device__ inline void tile_sumsq(const Elem<E>* x_sh, int ld, int KB, float* ss, bool first, bool last = false,
                                  float* live = nullptr) {
  const int lane = lane_id();
  for (int r = static_cast<int>(threadIdx.x) >> 5; r < 64; r += static_cast<int>(blockDim.x) >> 5) {
    float s = 0.f;
    for (int c = lane; c < KB; c += 32) {
      const float v = value_of<E>(x_sh[r * ld + c]);
      s += v * v;
    }
    s = warp_sum32(s);
    if (lane == 0) {
      if (!first) s += ss[r];
      const float nrm = sqrtf(s);
      ss[r] = last ? 1.f / fmaxf(nrm, kMmaNormEps) : s;
      if (last && live != nullptr) live[r] = nrm > kMmaNormEps ? 1.f : 0.f;
    }
  }
}

// rn[r] = 1 / max(||x_r||, eps) for the 64 rows of a tile; live[r] = 1 where ||x_r|| > eps (the
// normalisation's gradient projects only there), when live is given.
template <class E>
__device__ inline void tile_rnorms(const Elem<E>* x_sh, int ld, int CP, float* rn, float* live = nullptr) {
  tile_sumsq<E>(x_sh, ld, CP, rn, true, true, live);
}
__device__ __forceinline__ float rnorm_of(float ss) { return 1.f / fmaxf(sqrtf(ss), kMmaNormEps); }

// a[j] = A B^T over CP channels for a warp's 16 rows x 64 columns: A's rows at a_hi (+ a_lo, the
// small part of a split operand, when kSplitA), B's 64 rows at b_hi (+ b_lo when kSplitB), both
// channel-minor. The small products go first. kRolled keeps the 3xTF32 channel loop rolled: the
// backward's two logits of one tile share an operand, and unrolled, ptxas kept its split fragments
// live from one to the other (slot_bwd_mma spilled 0.9-3 KB at fp32 CP = 64, 128).
// logits_add adds the product to a (the wide forwards' channel blocks).
template <class E, int CP, bool kSplitA, bool kSplitB, bool kRolled = false>
__device__ __forceinline__ void logits_add(FragC (&a)[kMmaNB], const Elem<E>* a_hi, const Elem<E>* a_lo,
                                           const Elem<E>* b_hi, const Elem<E>* b_lo, int ld) {
  if constexpr (kIsTf32<E>) {  // 3xTF32 on the fp32 tiles (a_lo, b_lo unused)
#pragma unroll(kRolled ? 1 : CP / 8)
    for (int k0 = 0; k0 < CP; k0 += 8) {
      FragA3 af;
      load_a(af, a_hi + k0, ld);
#pragma unroll
      for (int j = 0; j < kMmaNB; ++j) {
        FragB3 bf;
        load_b(bf, b_hi + 8 * j * ld + k0, ld);
        mma::mma(a[j], af, bf);
      }
    }
  } else {
#pragma unroll
    for (int k0 = 0; k0 < CP; k0 += 16) {
      FragA<E> ah, al;
      load_a(ah, a_hi + k0, ld);
      if (kSplitA) load_a(al, a_lo + k0, ld);
#pragma unroll
      for (int j = 0; j < kMmaNB; ++j) {
        FragB<E> bh, bl;
        load_b(bh, b_hi + 8 * j * ld + k0, ld);  // B[c][n] = b[n][c]: stored n-major
        if (kSplitA) mma::mma(a[j], al, bh);
        if (kSplitB) {
          load_b(bl, b_lo + 8 * j * ld + k0, ld);
          mma::mma(a[j], ah, bl);
        }
        mma::mma(a[j], ah, bh);
      }
    }
  }
}

template <class E, int CP, bool kSplitA, bool kSplitB, bool kRolled = false>
__device__ __forceinline__ void logits(FragC (&a)[kMmaNB], const Elem<E>* a_hi, const Elem<E>* a_lo,
                                       const Elem<E>* b_hi, const Elem<E>* b_lo, int ld) {
#pragma unroll
  for (int j = 0; j < kMmaNB; ++j) zero(a[j]);
  logits_add<E, CP, kSplitA, kSplitB, kRolled>(a, a_hi, a_lo, b_hi, b_lo, ld);
}

// Online softmax along the rows of a warp's logits (rows g and g + 8 of its 16; statistics alike
// in the 4 lanes sharing a row). step() takes masked logits (-inf outside), turns them into
// exp(a - m), and returns the factor alpha that rescales the rows' earlier accumulators.
struct RowSoftmax {
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  __device__ void step(FragC (&a)[kMmaNB], float (&alpha)[2]) {
    float mt[2] = {-INFINITY, -INFINITY}, sum[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < kMmaNB; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) mt[i >> 1] = fmaxf(mt[i >> 1], a[j].r[i]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m_new = fmaxf(m[h], row_max(mt[h]));
      alpha[h] = m[h] == -INFINITY ? 0.f : expf(m[h] - m_new);
      m[h] = m_new;
    }
#pragma unroll
    for (int j = 0; j < kMmaNB; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float p = expf(a[j].r[i] - m[i >> 1]);  // exp(-inf) = 0 for masked columns
        a[j].r[i] = p;
        sum[i >> 1] += p;
      }
#pragma unroll
    for (int h = 0; h < 2; ++h) l[h] = l[h] * alpha[h] + row_sum(sum[h]);
  }
};

// acc += P V: P a warp's 16 x 64 logit-shaped values (registers; as hi + lo 16-bit parts when
// kSplitP), V 64 rows x CP channels at v_hi (+ v_lo when kSplitV), channel-minor: B[k][n] = v[k][n],
// stored k-major. The small products go first.
template <class E, int CP, bool kSplitP, bool kSplitV>
__device__ __forceinline__ void rows_product(FragC (&acc)[CP / 8], const FragC (&p)[kMmaNB], const Elem<E>* v_hi,
                                             const Elem<E>* v_lo, int ld) {
  if constexpr (kIsTf32<E>) {  // 3xTF32, P's columns paired (mma.cuh's a3_from_c); v_lo unused
#pragma unroll
    for (int kb = 0; kb < kMmaNB; ++kb) {
      const FragA3 pa = a3_from_c(p[kb]);
#pragma unroll
      for (int j = 0; j < CP / 8; ++j) {
        FragB3 vf;
        load_b3_t_pairs(vf, v_hi + 8 * kb * ld + 8 * j, ld);
        mma::mma(acc[j], pa, vf);
      }
    }
  } else {
#pragma unroll
    for (int kk = 0; kk < kMmaNB / 2; ++kk) {
      FragA<E> ph, pl;
      if (kSplitP)
        split_a_from_c<E>(p[2 * kk], p[2 * kk + 1], ph, pl);
      else
        ph = a_from_c<E>(p[2 * kk], p[2 * kk + 1]);
#pragma unroll
      for (int j = 0; j < CP / 8; ++j) {
        FragB<E> vh, vl;
        load_b_t(vh, v_hi + 16 * kk * ld + 8 * j, ld);
        if (kSplitP) mma::mma(acc[j], pl, vh);
        if (kSplitV) {
          load_b_t(vl, v_lo + 16 * kk * ld + 8 * j, ld);
          mma::mma(acc[j], ph, vl);
        }
        mma::mma(acc[j], ph, vh);
      }
    }
  }
}

// acc = alpha acc + P V (the forward's value product, P rounded to the 16-bit type).
template <class E, int CP>
__device__ inline void value_product(FragC (&acc)[CP / 8], const FragC (&p)[kMmaNB], const float (&alpha)[2],
                                     const Elem<E>* v, int ld) {
#pragma unroll
  for (int j = 0; j < CP / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j].r[i] *= alpha[i >> 1];
  rows_product<E, CP, false, false>(acc, p, v, nullptr, ld);
}

// ---------------------------------------------------------------------------------------------
// Clustering forward: per-chunk partials (running max m, sum l and acc = sum_l exp(A - m) x per
// slot) for cluster_fwd_combine; with one chunk, the outputs themselves. A block: 64 slots (warp
// w: slots 16 w ..), its chunk of pixels in tiles of 64.

// A warp's results for its 16 slots from row0 (rows of out_m, out_l, and C-long rows of out_acc),
// of which the first `rows`, columns below `cols` of acc, and m, l where `stats`. nchunks > 1: the
// partials m, l, acc. One chunk: what cluster_fwd_combine makes of it, lse = m + log l into out_m
// and slots = acc / l into out_acc (the outputs' layouts are the workspaces' at nchunks = 1), so
// no workspace and no combine launch; out_l is unused. Every lane of a row's four holds its m, l.
template <int CP>
__device__ __forceinline__ void store_chunk(FragC (&acc)[CP / 8], const RowSoftmax& sm, int nchunks, bool stats,
                                            float* out_m, float* out_l, float* out_acc, int64_t row0, int rows, int C,
                                            int cols) {
  const int lane = lane_id();
  const bool one = nchunks == 1;
  if (stats)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int s = (lane >> 2) + 8 * h;
      if ((lane & 3) == 0 && s < rows) {
        out_m[row0 + s] = one ? sm.m[h] + logf(sm.l[h]) : sm.m[h];
        if (!one) out_l[row0 + s] = sm.l[h];
      }
    }
  if (one) {  // the chunk is all of L (at least one pixel, checked on entry): l > 0
    const float inv[2] = {1.f / sm.l[0], 1.f / sm.l[1]};
#pragma unroll
    for (int j = 0; j < CP / 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j].r[i] *= inv[i >> 1];
  }
  store_rows<CP>(acc, out_acc, row0, rows, C, cols);
}

// grid (slot tiles, chunks, B), kMmaThreads threads. x: 16-bit storage of type E; qs fp32.
// Writes ws_m, ws_l (B, nchunks, S) and ws_acc (B, nchunks, S, C) as cluster_fwd_chunk does, or
// with one chunk lse (B, S) into ws_m and slots (B, S, C) into ws_acc (store_chunk).
template <class E, int CP>
__global__ void __launch_bounds__(kMmaThreads, 1)
    cluster_fwd_chunk_mma(const Elem<E>* __restrict__ x, int64_t xsb, int64_t xsr, int64_t xsc,
                          const float* __restrict__ qs, int64_t qsb, int64_t qsr, int64_t qsc, int L, int S, int C,
                          int64_t chunk_len, int nchunks, float* __restrict__ ws_m, float* __restrict__ ws_l,
                          float* __restrict__ ws_acc) {
#if GLMIX_MMA_ARCH_OK
  constexpr int ld = tile_ld<E, CP>();
  GLMIX_DYNAMIC_SMEM(float, smem);
  Elem<E>* qh_sh = reinterpret_cast<Elem<E>*>(smem);
  Elem<E>* ql_sh = qh_sh + 64 * ld;
  Elem<E>* x_sh = ql_sh + 64 * ld;
  float* rn_sh = reinterpret_cast<float*>(x_sh + 64 * ld);

  const int st = blockIdx.x, chunk = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int s0 = st * kMmaRows, ns = min(kMmaRows, S - s0);
  const int64_t l_begin = chunk * chunk_len;
  const int64_t l_end = min(static_cast<int64_t>(L), l_begin + chunk_len);
  const int lane = lane_id(), warp = static_cast<int>(threadIdx.x) >> 5;

  load_rows_split<E>(qh_sh, ql_sh, ld, CP, qs + b * qsb, qsr, qsc, s0, ns, C);
  RowSoftmax sm;
  FragC acc[CP / 8];
#pragma unroll
  for (int j = 0; j < CP / 8; ++j) zero(acc[j]);

  for (int64_t l0 = l_begin; l0 < l_end; l0 += kMmaCols) {
    const int nl = static_cast<int>(min(static_cast<int64_t>(kMmaCols), l_end - l0));
    __syncthreads();  // the previous tile's readers of x_sh / rn_sh are done
    load_rows(x_sh, ld, CP, x + b * xsb, xsr, xsc, l0, nl, C);
    __syncthreads();
    tile_rnorms<E>(x_sh, ld, CP, rn_sh);
    __syncthreads();

    FragC a[kMmaNB];  // the warp's 16 slots x 64 pixels; block j: pixels 8 j .. 8 j + 7
    logits<E, CP, true, false>(a, qh_sh + 16 * warp * ld, ql_sh + 16 * warp * ld, x_sh, nullptr, ld);
#pragma unroll
    for (int j = 0; j < kMmaNB; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int l = 8 * j + c_rc(lane, i).col;
        a[j].r[i] = l < nl ? a[j].r[i] * rn_sh[l] : -INFINITY;
      }
    float alpha[2];
    sm.step(a, alpha);
    value_product<E, CP>(acc, a, alpha, x_sh, ld);
  }

  const int64_t row0 = (b * nchunks + chunk) * S + s0 + 16 * warp;  // workspace row of the warp's slot 0
  store_chunk<CP>(acc, sm, nchunks, true, ws_m, ws_l, ws_acc, row0, ns - 16 * warp, C, C);
#else
  __trap();  // never launched below sm_80
#endif
}

// ---------------------------------------------------------------------------------------------
// Dispatch forward: out = softmax_S(A)^T slots and lse = logsumexp_S(A) per pixel. A block: tiles
// of 64 pixels (warp w: pixels 16 w ..), tiles_per_block of them; all S slots in tiles of 64, an
// online softmax across slot tiles (the S x C operands load once per block when S <= 64).

// grid (ceil(pixel tiles / tiles_per_block), B), kMmaThreads threads. x, slots: 16-bit storage
// of type E; qs fp32. out (B, L, C) contiguous, 16-bit; lse (B, L) fp32.
template <class E, int CP>
__global__ void __launch_bounds__(kMmaThreads, 1)
    dispatch_fwd_mma(const Elem<E>* __restrict__ x, int64_t xsb, int64_t xsr, int64_t xsc, const float* __restrict__ qs,
                     int64_t qsb, int64_t qsr, int64_t qsc, const Elem<E>* __restrict__ sl, int64_t ssb, int64_t ssr,
                     int64_t ssc, int64_t L, int S, int C, int tiles_per_block, Elem<E>* __restrict__ out,
                     float* __restrict__ lse) {
#if GLMIX_MMA_ARCH_OK
  constexpr int ld = tile_ld<E, CP>();
  GLMIX_DYNAMIC_SMEM(float, smem);
  Elem<E>* qh_sh = reinterpret_cast<Elem<E>*>(smem);
  Elem<E>* ql_sh = qh_sh + 64 * ld;
  Elem<E>* sl_sh = ql_sh + 64 * ld;
  Elem<E>* x_sh = sl_sh + 64 * ld;
  float* rn_sh = reinterpret_cast<float*>(x_sh + 64 * ld);

  const int64_t b = blockIdx.y;
  const int lane = lane_id(), warp = static_cast<int>(threadIdx.x) >> 5;
  const int nst = (S + kMmaCols - 1) / kMmaCols;
  const float* qsb_ = qs + b * qsb;
  const Elem<E>* slb = sl + b * ssb;
  if (nst == 1) {  // read after the first tile's barriers
    load_rows_split<E>(qh_sh, ql_sh, ld, CP, qsb_, qsr, qsc, 0, S, C);
    load_rows(sl_sh, ld, CP, slb, ssr, ssc, 0, S, C);
  }

  const int64_t t_begin = static_cast<int64_t>(blockIdx.x) * tiles_per_block;
  for (int64_t t = t_begin; t < t_begin + tiles_per_block && t * 64 < L; ++t) {
    const int64_t l0 = t * 64;
    const int nl = static_cast<int>(min(static_cast<int64_t>(64), L - l0));
    __syncthreads();  // the previous tile's readers of x_sh / rn_sh (and of the slot tiles) are done
    load_rows(x_sh, ld, CP, x + b * xsb, xsr, xsc, l0, nl, C);
    __syncthreads();
    tile_rnorms<E>(x_sh, ld, CP, rn_sh);

    RowSoftmax sm;
    FragC acc[CP / 8];
#pragma unroll
    for (int j = 0; j < CP / 8; ++j) zero(acc[j]);
    float rn[2];
    for (int st = 0; st < nst; ++st) {
      if (nst > 1) {
        __syncthreads();  // the previous slot tile's readers are done
        const int s0 = st * kMmaCols, ns = min(kMmaCols, S - s0);
        load_rows_split<E>(qh_sh, ql_sh, ld, CP, qsb_, qsr, qsc, s0, ns, C);
        load_rows(sl_sh, ld, CP, slb, ssr, ssc, s0, ns, C);
      }
      __syncthreads();
      if (st == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) rn[h] = rn_sh[16 * warp + (lane >> 2) + 8 * h];
      }
      FragC a[kMmaNB];  // the warp's 16 pixels x 64 slots; block j: slots 8 j .. 8 j + 7
      logits<E, CP, false, true>(a, x_sh + 16 * warp * ld, nullptr, qh_sh, ql_sh, ld);
#pragma unroll
      for (int j = 0; j < kMmaNB; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          a[j].r[i] = st * kMmaCols + 8 * j + c_rc(lane, i).col < S ? a[j].r[i] * rn[i >> 1] : -INFINITY;
      float alpha[2];
      sm.step(a, alpha);
      value_product<E, CP>(acc, a, alpha, sl_sh, ld);
    }

#pragma unroll
    for (int j = 0; j < CP / 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const RC rc = c_rc(lane, i);
        const int l = 16 * warp + rc.row, c = 8 * j + rc.col;
        if (l < nl && c < C) out[(b * L + l0 + l) * C + c] = elem_of<E>(acc[j].r[i] / sm.l[i >> 1]);
      }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int l = 16 * warp + (lane >> 2) + 8 * h;
      if ((lane & 3) == 0 && l < nl) lse[b * L + l0 + l] = sm.m[h] + logf(sm.l[h]);
    }
  }
#else
  __trap();  // never launched below sm_80
#endif
}

// ---------------------------------------------------------------------------------------------
// The wide forwards: C above kMmaMaxChannels (16-bit) or kMmaTf32MaxChannels (fp32), up to the
// backend's limit. Whole 64-row tiles of all channels no longer fit shared memory (four 16-bit
// tiles of 512 channels take 266 KB) nor their accumulators the registers, so the channels pass
// through shared memory in blocks of kWide channels: the logits accumulate over the blocks (x and
// qs hi + lo, a block at a time; the squared norms of x beside them), and the value product runs
// per output block of kWide channels, against that block of its V operand. Same precision as the
// kernels above. One instantiation per operand type serves every wide C.
template <class E>
constexpr int kWide = kIsTf32<E> ? kMmaTf32MaxChannels : kMmaMaxChannels;

// Dynamic shared memory of both: four 64-row tiles of kWide channels (the logits' x and qs hi, lo
// blocks; the value product's V block) and 64 floats of squared norms. 132 KB at 16-bit and fp32.
template <class E>
inline size_t fwd_wide_mma_smem() {
  return static_cast<size_t>(4 * 64) * tile_ld<E, kWide<E>>() * sizeof(Elem<E>) + 64 * 4;
}
// Channel blocks of C channels: the clustering's blocks per slot tile.
inline int wide_blocks(int C, bool tf32) {
  const int w = tf32 ? kWide<Tf32> : kWide<F16>;
  return (C + w - 1) / w;
}

// grid (slot tiles x channel blocks, chunks, B), kMmaThreads threads; blockIdx.x = slot tile x
// channel blocks + channel block. As cluster_fwd_chunk_mma, but a block writes the partial acc of
// its channel block only (with one chunk: its slots); every block of a slot tile computes the
// same logits (same order), and the first writes ws_m, ws_l (with one chunk: lse).
template <class E>
__global__ void __launch_bounds__(kMmaThreads, 1)
    cluster_fwd_chunk_wide_mma(const Elem<E>* __restrict__ x, int64_t xsb, int64_t xsr, int64_t xsc,
                               const float* __restrict__ qs, int64_t qsb, int64_t qsr, int64_t qsc, int L, int S, int C,
                               int64_t chunk_len, int nchunks, float* __restrict__ ws_m, float* __restrict__ ws_l,
                               float* __restrict__ ws_acc) {
#if GLMIX_MMA_ARCH_OK
  constexpr int W = kWide<E>, ld = tile_ld<E, W>();
  GLMIX_DYNAMIC_SMEM(float, smem);
  Elem<E>* qh_sh = reinterpret_cast<Elem<E>*>(smem);
  Elem<E>* ql_sh = qh_sh + 64 * ld;
  Elem<E>* x_sh = ql_sh + 64 * ld;  // the logits' channel block of x
  Elem<E>* v_sh = x_sh + 64 * ld;   // this block's output channels of x
  float* ss_sh = reinterpret_cast<float*>(v_sh + 64 * ld);

  const int ncb = (C + W - 1) / W;
  const int st = static_cast<int>(blockIdx.x) / ncb, cv = static_cast<int>(blockIdx.x) % ncb * W;
  const int nv = min(W, C - cv);
  const int chunk = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int s0 = st * kMmaRows, ns = min(kMmaRows, S - s0);
  const int64_t l_begin = chunk * chunk_len;
  const int64_t l_end = min(static_cast<int64_t>(L), l_begin + chunk_len);
  const int lane = lane_id(), warp = static_cast<int>(threadIdx.x) >> 5;
  const Elem<E>* xb = x + b * xsb;
  const float* qsb_ = qs + b * qsb;

  RowSoftmax sm;
  FragC acc[W / 8];
#pragma unroll
  for (int j = 0; j < W / 8; ++j) zero(acc[j]);

  for (int64_t l0 = l_begin; l0 < l_end; l0 += kMmaCols) {
    const int nl = static_cast<int>(min(static_cast<int64_t>(kMmaCols), l_end - l0));
    FragC a[kMmaNB];  // the warp's 16 slots x 64 pixels; block j: pixels 8 j .. 8 j + 7
#pragma unroll
    for (int j = 0; j < kMmaNB; ++j) zero(a[j]);
    for (int c0 = 0; c0 < C; c0 += W) {
      const int nc = min(W, C - c0);
      __syncthreads();  // the previous block's (and tile's) readers are done
      load_rows_split<E>(qh_sh, ql_sh, ld, W, qsb_ + c0 * qsc, qsr, qsc, s0, ns, nc);
      load_rows(x_sh, ld, W, xb + c0 * xsc, xsr, xsc, l0, nl, nc);
      __syncthreads();
      tile_sumsq<E>(x_sh, ld, W, ss_sh, c0 == 0);
      logits_add<E, W, true, false>(a, qh_sh + 16 * warp * ld, ql_sh + 16 * warp * ld, x_sh, nullptr, ld);
    }
    // v_sh has its own buffer: the first channel block's barrier above ended the last tile's reads.
    load_rows(v_sh, ld, W, xb + cv * xsc, xsr, xsc, l0, nl, nv);
    __syncthreads();  // v_sh and ss_sh complete
#pragma unroll
    for (int j = 0; j < kMmaNB; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int l = 8 * j + c_rc(lane, i).col;
        a[j].r[i] = l < nl ? a[j].r[i] * rnorm_of(ss_sh[l]) : -INFINITY;
      }
    float alpha[2];
    sm.step(a, alpha);
    value_product<E, W>(acc, a, alpha, v_sh, ld);
  }

  // Every channel block holds the same m, l (same logits, same order): each scales its own acc
  // by them when there is one chunk; the first writes them.
  const int64_t row0 = (b * nchunks + chunk) * S + s0 + 16 * warp;  // workspace row of the warp's slot 0
  store_chunk<W>(acc, sm, nchunks, cv == 0, ws_m, ws_l, ws_acc + cv, row0, ns - 16 * warp, C, nv);
#else
  __trap();  // never launched below sm_80
#endif
}

// grid (ceil(pixel tiles / tiles_per_block), B), kMmaThreads threads; arguments as
// dispatch_fwd_mma's. Per pixel tile and output channel block: the online softmax over the slot
// tiles, whose logits (over all channel blocks) are computed once when one slot tile holds all S
// and kept in registers for every output block, else recomputed per output block.
template <class E>
__global__ void __launch_bounds__(kMmaThreads, 1)
    dispatch_fwd_wide_mma(const Elem<E>* __restrict__ x, int64_t xsb, int64_t xsr, int64_t xsc,
                          const float* __restrict__ qs, int64_t qsb, int64_t qsr, int64_t qsc,
                          const Elem<E>* __restrict__ sl, int64_t ssb, int64_t ssr, int64_t ssc, int64_t L, int S,
                          int C, int tiles_per_block, Elem<E>* __restrict__ out, float* __restrict__ lse) {
#if GLMIX_MMA_ARCH_OK
  constexpr int W = kWide<E>, ld = tile_ld<E, W>();
  GLMIX_DYNAMIC_SMEM(float, smem);
  Elem<E>* qh_sh = reinterpret_cast<Elem<E>*>(smem);
  Elem<E>* ql_sh = qh_sh + 64 * ld;
  Elem<E>* sl_sh = ql_sh + 64 * ld;
  Elem<E>* x_sh = sl_sh + 64 * ld;
  float* ss_sh = reinterpret_cast<float*>(x_sh + 64 * ld);

  const int64_t b = blockIdx.y;
  const int lane = lane_id(), warp = static_cast<int>(threadIdx.x) >> 5;
  const int nst = (S + kMmaCols - 1) / kMmaCols;
  const Elem<E>* xb = x + b * xsb;
  const float* qsb_ = qs + b * qsb;
  const Elem<E>* slb = sl + b * ssb;

  // a = the warp's 16 pixels x slot tile st's 64 slots over all channels; the pixels' squared
  // norms into ss_sh too. Ends before a barrier: the caller's makes ss_sh complete.
  const auto stream_logits = [&](FragC(&a)[kMmaNB], int64_t l0, int nl, int st) {
    const int s0 = st * kMmaCols, ns = min(kMmaCols, S - s0);
#pragma unroll
    for (int j = 0; j < kMmaNB; ++j) zero(a[j]);
    for (int c0 = 0; c0 < C; c0 += W) {
      const int nc = min(W, C - c0);
      __syncthreads();  // the previous block's readers are done
      load_rows(x_sh, ld, W, xb + c0 * xsc, xsr, xsc, l0, nl, nc);
      load_rows_split<E>(qh_sh, ql_sh, ld, W, qsb_ + c0 * qsc, qsr, qsc, s0, ns, nc);
      __syncthreads();
      tile_sumsq<E>(x_sh, ld, W, ss_sh, c0 == 0);
      logits_add<E, W, false, true>(a, x_sh + 16 * warp * ld, nullptr, qh_sh, ql_sh, ld);
    }
  };

  const int64_t t_begin = static_cast<int64_t>(blockIdx.x) * tiles_per_block;
  for (int64_t t = t_begin; t < t_begin + tiles_per_block && t * 64 < L; ++t) {
    const int64_t l0 = t * 64;
    const int nl = static_cast<int>(min(static_cast<int64_t>(64), L - l0));
    RowSoftmax sm;
    FragC a[kMmaNB];  // the warp's 16 pixels x 64 slots; block j: slots 8 j .. 8 j + 7
    // 1 / ||x|| of the warp's pixels, set at the first slot tile
    float rn[2] = {0.f, 0.f}, alpha[2] = {1.f, 1.f};
    for (int cv = 0; cv < C; cv += W) {  // output channel blocks
      const int nv = min(W, C - cv);
      const bool fresh = nst > 1 || cv == 0;  // else: the first block's probabilities, in a
      if (fresh) sm = RowSoftmax{};
      FragC acc[W / 8];
#pragma unroll
      for (int j = 0; j < W / 8; ++j) zero(acc[j]);
      for (int st = 0; st < nst; ++st) {
        if (fresh) stream_logits(a, l0, nl, st);
        __syncthreads();  // the previous readers of sl_sh are done; ss_sh complete
        load_rows(sl_sh, ld, W, slb + cv * ssc, ssr, ssc, st * kMmaCols, min(kMmaCols, S - st * kMmaCols), nv);
        __syncthreads();
        if (fresh) {
          if (cv == 0 && st == 0)
#pragma unroll
            for (int h = 0; h < 2; ++h) rn[h] = rnorm_of(ss_sh[16 * warp + (lane >> 2) + 8 * h]);
#pragma unroll
          for (int j = 0; j < kMmaNB; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i)
              a[j].r[i] = st * kMmaCols + 8 * j + c_rc(lane, i).col < S ? a[j].r[i] * rn[i >> 1] : -INFINITY;
          sm.step(a, alpha);
        }
        value_product<E, W>(acc, a, alpha, sl_sh, ld);
      }
#pragma unroll
      for (int j = 0; j < W / 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const RC rc = c_rc(lane, i);
          const int l = 16 * warp + rc.row, c = 8 * j + rc.col;
          if (l < nl && c < nv) out[(b * L + l0 + l) * C + cv + c] = elem_of<E>(acc[j].r[i] / sm.l[i >> 1]);
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int l = 16 * warp + (lane >> 2) + 8 * h;
      if ((lane & 3) == 0 && l < nl) lse[b * L + l0 + l] = sm.m[h] + logf(sm.l[h]);
    }
  }
#else
  __trap();  // never launched below sm_80
#endif
}

// ---------------------------------------------------------------------------------------------
// Backward on tensor cores, for 16-bit x with C <= kMmaBwdMaxChannels and fp32 x (3xTF32) with
// C <= kMmaTf32BwdMaxChannels. Two kernels, each recomputing the logits of its tiles (cheap on
// tensor cores), rather than one holding the pixel side's and the slot side's accumulators at once:
//   pixel_bwd_mma  grid (pixel-tile blocks, B); warp w: pixels 16 w .. of a tile of 64, all S slots
//                  in tiles of 64. dx: clustering P^T G + the K path dA^T qs through the
//                  normalisation, dispatch the K path; the dispatch also writes delta' per pixel
//                  (B, L) for slot_bwd_mma.
//   slot_bwd_mma   grid (slot tiles x channel chunks, chunks of L, B); warp w: slots 16 w .. of a
//                  tile of 64, the chunk's pixels in tiles of 64. The chunk's partial dqs = dA K
//                  (dispatch: also dslots = D grad) into fp32 workspaces, for sum_chunks.
// Wide C: the logits take all CP channels from shared memory, the products' accumulators only a
// chunk of bwd_chunk() channels (at most two chunk-wide sets per warp: registers do not grow
// with C).
// pixel_bwd_mma walks the chunks keeping the logits in registers when one slot tile holds all S
// (else recomputing them per chunk); slot_bwd_mma gives each chunk its own block, which recomputes
// the logits of its tiles. <K, dK> of the normalisation's gradient: from dK itself in a single
// chunk (so the projection cancels to rounding: at C = 1 dx is ~0), from the logits when chunked
// (sum_s dA z, z = <K, qs>), so dx's chunks need no other chunk's dK.
// Precision as on the CUDA cores: logits from qs as hi + lo, softmax statistics, P and dA in fp32
// registers; dA enters its products as hi + lo, and dK = dA^T qs takes qs as hi + lo; P (and D) is
// rounded to the 16-bit type, as in the forward's value product. dqs takes dA / ||x|| as its
// operand against x (fp16: dA f against x 2^k, dq_rn, which keeps both in fp16's range); zero
// pixels contribute exactly zero to the product, and their dA still to centre_dqs's sum.
constexpr int kMmaBwdMaxChannels = 256;
constexpr int kMmaTf32BwdMaxChannels = 128;

// Output channels per pass: 64 (16-bit), 32 (fp32: 3xTF32 fragments take more registers); twice
// that for a kernel with one accumulator set (kOneSet: the clustering's slot_bwd_mma, the
// dispatch's pixel_bwd_mma). Unchunked, pixel_bwd_mma spilled at 16-bit CP = 128.
constexpr int kMmaBwdChunk = 64;
constexpr int kMmaTf32BwdChunk = 32;
__host__ __device__ constexpr int bwd_chunk_of(int CP, bool tf32, bool one_set) {
  const int w = (tf32 ? kMmaTf32BwdChunk : kMmaBwdChunk) * (one_set ? 2 : 1);
  return CP < w ? CP : w;
}
template <class E, int CP, bool kOneSet>
__host__ __device__ constexpr int bwd_chunk() {
  return bwd_chunk_of(CP, kIsTf32<E>, kOneSet);
}
// The wide backwards' channel blocks (below): one chunk of a kernel with one accumulator set, 128
// 16-bit or 64 fp32 channels.
constexpr int wide_bwd_block(bool tf32) { return bwd_chunk_of(kMmaMaxChannels, tf32, true); }
template <class E>
constexpr int kWideBwd = wide_bwd_block(kIsTf32<E>);
// Channel chunks for C channels: slot_bwd_mma's (slot_bwd_wide_mma's when wide) blocks per slot tile.
inline int bwd_channel_chunks(int C, bool tf32, bool one_set, bool wide) {
  if (wide) {
    const int cw = bwd_chunk_of(wide_bwd_block(tf32), tf32, one_set);
    return (C + cw - 1) / cw;
  }
  const int cp = padded_channels(C);
  return cp / bwd_chunk_of(cp, tf32, one_set);
}

// Dynamic shared memory of both: four 64-row tiles (the dispatch five) and four 64-float rows.
template <class E>
inline size_t bwd_mma_smem(int CP, bool dispatch) {
  return static_cast<size_t>((dispatch ? 5 : 4) * 64) * (CP + Store<E>::kPad) * sizeof(Elem<E>) + 4 * 64 * 4;
}
// The wide backwards': the same at kWideBwd channels, 69 KB (the dispatch 86 KB) at 16-bit and fp32.
template <class E>
inline size_t bwd_wide_mma_smem(bool dispatch) {
  return bwd_mma_smem<E>(kWideBwd<E>, dispatch);
}

// A (B, rows, C) tensor with its strides, as the backward kernels take their operands.
template <class T>
struct Rows {
  const T* p;
  int64_t sb, sr, sc;
};

template <class E>
struct BwdSmem {
  Elem<E>*qh, *ql;               // qs hi and lo (a slot tile; tf32: qs whole in qh)
  Elem<E>* y;                    // the other (S, C) operand: clustering G, dispatch slots (the same slot tile)
  Elem<E>*x, *h;                 // x's pixel tile; the dispatch's grad pixel tile (clustering: none)
  float *rn, *live, *st0, *st1;  // per pixel 1 / ||x|| and liveness; two statistics per row
};
template <class E, int CP, bool kDispatch>
__device__ __forceinline__ BwdSmem<E> carve_bwd(float* smem) {
  constexpr int tile = 64 * tile_ld<E, CP>();
  BwdSmem<E> s;
  s.qh = reinterpret_cast<Elem<E>*>(smem);
  s.ql = s.qh + tile;
  s.y = s.ql + tile;
  s.x = s.y + tile;
  s.h = kDispatch ? s.x + tile : nullptr;
  s.rn = reinterpret_cast<float*>(s.x + (kDispatch ? 2 : 1) * tile);
  s.live = s.rn + 64;
  s.st0 = s.live + 64;
  s.st1 = s.st0 + 64;
  return s;
}

// Batch b of a (B, rows, C) operand from channel c0.
template <class T>
__device__ __forceinline__ const T* at_channel(const Rows<T>& t, int64_t b, int c0) {
  return t.p + b * t.sb + c0 * t.sc;
}

// st0[i], st1[i] = stat0[base + i], stat1[base + i] for the n columns of a tile (zeros up to 64):
// the statistics per column (pixel side: the clustering's lse, delta per slot; slot side: the
// dispatch's lse, delta' per pixel). No barrier.
__device__ __forceinline__ void load_stats(float* st0, float* st1, const float* stat0, const float* stat1, int64_t base,
                                           int n) {
  for (int i = threadIdx.x; i < 64; i += blockDim.x) {
    st0[i] = i < n ? stat0[base + i] : 0.f;
    st1[i] = i < n ? stat1[base + i] : 0.f;
  }
}

// v[h] = stat[base + row] for a warp's two rows r0 + g, r0 + g + 8 below n, else 0.
__device__ __forceinline__ void row_stats(const float* stat, int64_t base, int r0, int n, float (&v)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = r0 + (lane_id() >> 2) + 8 * h;
    v[h] = r < n ? stat[base + r] : 0.f;
  }
}

// The clustering's lse and delta of a warp's slots (rows r0 .. of a slot tile of ns from base);
// zeros for the dispatch, whose statistics are per pixel.
template <bool kDispatch>
__device__ __forceinline__ void slot_row_stats(const float* stat0, const float* stat1, int64_t base, int r0, int ns,
                                               float (&lse)[2], float (&dl)[2]) {
  lse[0] = lse[1] = dl[0] = dl[1] = 0.f;
  if (!kDispatch) {
    row_stats(stat0, base, r0, ns, lse);
    row_stats(stat1, base, r0, ns, dl);
  }
}

template <int N>
__device__ __forceinline__ void zero_all(FragC (&f)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) zero(f[j]);
}

// out[r] = v[h] for a warp's two rows r0 + g, r0 + g + 8 below n (the dispatch's delta' per pixel).
__device__ __forceinline__ void store_row_stats(const float (&v)[2], float* out, int r0, int n) {
  const int lane = lane_id();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = r0 + (lane >> 2) + 8 * h;
    if ((lane & 3) == 0 && r < n) out[r] = v[h];
  }
}

// <K, dK> of a warp's rows from the logits' parts z (pixel_probs), 0 where not live.
template <bool kDispatch>
__device__ __forceinline__ void dot_of(const float (&z)[4], const float (&dl)[2], const float (&live)[2],
                                       float (&dot)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
    dot[h] = (kDispatch ? row_sum(z[h]) - dl[h] * row_sum(z[2 + h]) : row_sum(z[h])) * live[h];
}

// A slot-side block's place in its grid (slot tiles x ncc channel chunks of CW, chunks of L, B):
// slot tile st (slots s0 .., ns of them), channels c0 .., pixels l_begin .. l_end of batch b.
struct SlotBlock {
  int st, c0, chunk, s0, ns;
  int64_t b, l_begin, l_end;
};
__device__ __forceinline__ SlotBlock slot_block(int ncc, int CW, int S, int L, int64_t chunk_len) {
  SlotBlock k;
  k.st = static_cast<int>(blockIdx.x) / ncc;
  k.c0 = static_cast<int>(blockIdx.x) % ncc * CW;
  k.chunk = blockIdx.y;
  k.b = blockIdx.z;
  k.s0 = k.st * kMmaRows;
  k.ns = min(kMmaRows, S - k.s0);
  k.l_begin = k.chunk * chunk_len;
  k.l_end = min(static_cast<int64_t>(L), k.l_begin + chunk_len);
  return k;
}

// The pixel side's probabilities from the logits of a warp's 16 pixels x the 64 slots of tile st
// (a = x qs^T, e = x G^T or grad slots^T, unscaled): a = P (clustering) or D (dispatch), e = dA
// (clustering) or dD (dispatch); zero at slots >= S. st0 / st1: the clustering's lse and delta per
// slot of the tile. Adds to z the parts of <K, dK> per row, when kChunked: z[h] the sum of dA z
// (clustering) or D dD z (dispatch), z[2 + h] the dispatch's sum of D z (its dA = D (dD - delta'),
// with delta' not yet known).
template <bool kDispatch, bool kChunked>
__device__ __forceinline__ void pixel_probs(FragC (&a)[kMmaNB], FragC (&e)[kMmaNB], int st, int S, const float (&rn)[2],
                                            const float (&lse)[2], const float* st0, const float* st1, float (&z)[4]) {
  const int lane = lane_id();
#pragma unroll
  for (int j = 0; j < kMmaNB; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int s = 8 * j + c_rc(lane, i).col, h = i >> 1;
      const bool ok = st * kMmaCols + s < S;
      const float zl = ok ? a[j].r[i] * rn[h] : 0.f;
      const float p = ok ? expf(zl - (kDispatch ? lse[h] : st0[s])) : 0.f;
      a[j].r[i] = p;
      e[j].r[i] = ok ? (kDispatch ? e[j].r[i] : p * (e[j].r[i] - st1[s])) : 0.f;
      if (kChunked) z[h] = fmaf(kDispatch ? p * e[j].r[i] : e[j].r[i], zl, z[h]);
      if (kChunked && kDispatch) z[2 + h] = fmaf(p, zl, z[2 + h]);
    }
}

// The dispatch's delta' per row, in parts: num += sum_s D dD, den += sum_s D.
__device__ __forceinline__ void delta_rows(const FragC (&a)[kMmaNB], const FragC (&e)[kMmaNB], float (&num)[2],
                                           float (&den)[2]) {
#pragma unroll
  for (int j = 0; j < kMmaNB; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      num[i >> 1] = fmaf(a[j].r[i], e[j].r[i], num[i >> 1]);
      den[i >> 1] += a[j].r[i];
    }
}
// dl = delta' of a warp's rows from one slot tile's D, dD (S <= 64).
__device__ __forceinline__ void delta_of(const FragC (&a)[kMmaNB], const FragC (&e)[kMmaNB], float (&dl)[2]) {
  float num[2] = {0.f, 0.f}, den[2] = {0.f, 0.f};
  delta_rows(a, e, num, den);
#pragma unroll
  for (int h = 0; h < 2; ++h) dl[h] = row_sum(num[h]) / row_sum(den[h]);
}
// A pixel tile of the backward between barriers (the previous tile's readers done first, the tile
// complete after): x (and the dispatch's grad) into shared memory, 1 / ||x|| and liveness per pixel.
template <class E, int CP, bool kDispatch>
__device__ __forceinline__ void load_pixel_tile(const BwdSmem<E>& sh, const Rows<Elem<E>>& x, const Rows<Elem<E>>& g,
                                                int64_t b, int64_t l0, int nl, int C) {
  constexpr int ld = tile_ld<E, CP>();
  __syncthreads();  // the previous tile's readers are done
  load_rows(sh.x, ld, CP, x.p + b * x.sb, x.sr, x.sc, l0, nl, C);
  if (kDispatch) load_rows(sh.h, ld, CP, g.p + b * g.sb, g.sr, g.sc, l0, nl, C);
  __syncthreads();
  tile_rnorms<E>(sh.x, ld, CP, sh.rn, sh.live);
  __syncthreads();
}

// The dispatch's dA = D (dD - delta') into e.
__device__ __forceinline__ void dispatch_da(const FragC (&a)[kMmaNB], FragC (&e)[kMmaNB], const float (&dl)[2]) {
#pragma unroll
  for (int j = 0; j < kMmaNB; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) e[j].r[i] = a[j].r[i] * (e[j].r[i] - dl[i >> 1]);
}

// fp16's dqs operands, as the Triton backend's: 1 / ||x|| = f 2^k with f in [1, 2), dA f against x
// 2^k (a norm in (1/2, 1]; exact but where a component far below the norm turns subnormal, an
// error below 2^-24 of the norm), where dA / ||x|| against x would leave fp16's range (its lo part
// underflows at large norms, as with an offset on x; it overflows at tiny ones). dq_rn(1 / ||x||)
// is the factor of dA; scale_rows_pow2 scales the tile's rows of x (between the caller's barriers).
__device__ __forceinline__ float pow2_below(float v) {
  int k;
  frexpf(v, &k);
  return ldexpf(1.f, k - 1);
}
template <class E>
__device__ __forceinline__ float dq_rn(float rn) {
  return std::is_same<E, F16>::value ? rn / pow2_below(rn) : rn;
}
template <class E>
__device__ inline void scale_rows_pow2(Elem<E>* x_sh, int ld, int ncols, const float* rn) {
  if constexpr (std::is_same<E, F16>::value)
    for (int i = threadIdx.x; i < 64 * ncols; i += blockDim.x) {
      const int r = i / ncols, at = r * ld + i % ncols;
      x_sh[at] = elem_of<E>(value_of<E>(x_sh[at]) * pow2_below(rn[r]));
    }
}

// The slot side's probabilities from the logits of a warp's 16 slots x a tile of nl pixels
// (a = qs x^T, e = G x^T or slots grad^T, unscaled): a = P or D, e = dA / ||x|| (the dqs operand
// against x; fp16: dA f, dq_rn); zero at pixels >= nl. Per pixel from shared memory: rn, live and the dispatch's
// lse, delta' (st0, st1); lse, dl: the clustering's per slot. da_sum: the clustering's sum of dA
// over the pixels, zero ones included (the lane's part of its two rows; see centre_dqs).
template <class E, bool kDispatch>
__device__ __forceinline__ void slot_probs(FragC (&a)[kMmaNB], FragC (&e)[kMmaNB], int nl, const BwdSmem<E>& sh,
                                           const float (&lse)[2], const float (&dl)[2], float (&da_sum)[2]) {
  const int lane = lane_id();
#pragma unroll
  for (int j = 0; j < kMmaNB; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int l = 8 * j + c_rc(lane, i).col, h = i >> 1;
      const float rn = sh.rn[l];
      // Not live in fp16: a zero row of x, no contribution to dqs (and dA / eps could overflow).
      const bool dq_ok = l < nl && (sh.live[l] != 0.f || !std::is_same<E, F16>::value);
      const float p = l < nl ? expf(a[j].r[i] * rn - (kDispatch ? sh.st0[l] : lse[h])) : 0.f;
      const float da = p * (e[j].r[i] - (kDispatch ? sh.st1[l] : dl[h]));
      if (!kDispatch) da_sum[h] += da;
      a[j].r[i] = p;
      e[j].r[i] = dq_ok ? da * dq_rn<E>(rn) : 0.f;
    }
}

// The clustering's dqs = sum_l dA (K_l - m) over all of L: the dA K of the products less
// (sum_l dA) m, per chunk. Equal in exact arithmetic (sum_l dA = 0), but delta, from the
// forward's rounded slots, leaves sum_l dA off zero, and that error then reaches dqs times
// K - m instead of times the direction the keys share (math.md#centred-dqs). m: key_mean's
// channels of the warp's chunk, nc of them; sum: the sums of the warp's rows g, g + 8 (every
// lane of a row the same).
template <int CW>
__device__ __forceinline__ void centre_dqs(FragC (&dq)[CW / 8], const float (&sum)[2], const float* m, int nc) {
  const int lane = lane_id();
#pragma unroll
  for (int j = 0; j < CW / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int c = 8 * j + c_rc(lane, i).col;
      if (c < nc) dq[j].r[i] -= sum[i >> 1] * m[c];
    }
}

// dx of a warp's 16 pixels at channels c0 .. c0 + CW: value + (dK - K <K, dK>) / max(||x||, eps),
// K = x / max(||x||, eps); dot = <K, dK>, 0 where not live (the projection only where live). Rows
// r0 .. of the tile, written for rows < nl and channels < C; x_sh: the tile from channel c0.
template <class E, int CW, bool kValue>
__device__ __forceinline__ void dx_rows(const FragC (&dk)[CW / 8], const FragC (&value)[CW / 8], const Elem<E>* x_sh,
                                        int ld, int r0, int c0, const float (&rn)[2], const float (&dot)[2], int nl,
                                        int C, Elem<E>* dxb) {
  const int lane = lane_id();
#pragma unroll
  for (int j = 0; j < CW / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const RC rc = c_rc(lane, i);
      const int l = r0 + rc.row, c = 8 * j + rc.col, h = i >> 1;
      if (l < nl && c0 + c < C) {
        const float k = value_of<E>(x_sh[l * ld + c]) * rn[h];
        float v = (dk[j].r[i] - k * dot[h]) * rn[h];
        if (kValue) v += value[j].r[i];
        dxb[static_cast<int64_t>(l) * C + c0 + c] = elem_of<E>(v);
      }
    }
}

// <K, dK> of a warp's 16 pixels from dK's registers (all CP channels in them), 0 where not live.
template <class E, int CP>
__device__ __forceinline__ void dot_k(const FragC (&dk)[CP / 8], const Elem<E>* x_sh, int ld, int r0,
                                      const float (&rn)[2], const float (&live)[2], float (&dot)[2]) {
  const int lane = lane_id();
  float d[2] = {0.f, 0.f};  // <x, dK> per row; the padded channels of x are zeros
#pragma unroll
  for (int j = 0; j < CP / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const RC rc = c_rc(lane, i);
      d[i >> 1] += value_of<E>(x_sh[(r0 + rc.row) * ld + 8 * j + rc.col]) * dk[j].r[i];
    }
#pragma unroll
  for (int h = 0; h < 2; ++h) dot[h] = row_sum(d[h]) * rn[h] * live[h];
}

// The pixel side's products of a chunk of CW channels (from c0 of the tiles in sh) against one
// slot tile: dv += P G (clustering), dk += dA qs (qs as hi + lo).
template <class E, int CW, bool kDispatch>
__device__ __forceinline__ void pixel_products(FragC (&dk)[CW / 8], FragC (&dv)[CW / 8], const FragC (&a)[kMmaNB],
                                               const FragC (&e)[kMmaNB], const BwdSmem<E>& sh, int c0, int ld) {
  if (!kDispatch) rows_product<E, CW, false, false>(dv, a, sh.y + c0, nullptr, ld);  // P^T G
  rows_product<E, CW, true, true>(dk, e, sh.qh + c0, sh.ql + c0, ld);                // dA^T qs
}

// A pixel tile's channel chunks, for pixel_bwd_mma and pixel_bwd_wide_mma. Dispatch: delta'[l] =
// sum_s D dD / sum_s D (dividing keeps sum_s dA = 0 although the recomputed D sums to 1 only up to
// lse's rounding), in a first pass when S spans slot tiles. Then per chunk of CW of the CE
// channels: the logits of every slot tile once (nst == 1: kept in a, e for all chunks) or per
// chunk, the products, and dx; <K, dK> from the logits' first pass (kChunked) or by write_dx.
//   probabilities(st, z)           a, e of slot tile st (pixel_probs), adding to z
//   products(c0, st, dk, dv)       the chunk's products against slot tile st
//   write_dx(c0, dk, dv, dot)      dx of the chunk
template <bool kDispatch, int CW, bool kChunked, class Probabilities, class Products, class WriteDx>
__device__ __forceinline__ void pixel_chunks(int nst, int CE, FragC (&a)[kMmaNB], FragC (&e)[kMmaNB], float (&dl)[2],
                                             const float (&live)[2], Probabilities&& probabilities, Products&& products,
                                             WriteDx&& write_dx) {
  float z[4] = {0.f, 0.f, 0.f, 0.f}, dot[2] = {0.f, 0.f};
  if (kDispatch && nst > 1) {
    float num[2] = {0.f, 0.f}, den[2] = {0.f, 0.f};
    for (int st = 0; st < nst; ++st) {
      probabilities(st, z);
      delta_rows(a, e, num, den);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) dl[h] = row_sum(num[h]) / row_sum(den[h]);
  }
  // Only the first chunk's pass over the slot tiles counts in z; later passes add to it unread
  // (cheaper than a branch).
#pragma unroll
  for (int i = 0; i < 4; ++i) z[i] = 0.f;
  for (int c0 = 0; c0 < CE; c0 += CW) {
    FragC dk[CW / 8], dv[CW / 8];
    zero_all(dk);
    zero_all(dv);
    for (int st = 0; st < nst; ++st) {
      if (nst > 1 || c0 == 0) {
        probabilities(st, z);
        if (kDispatch) {
          if (nst == 1) delta_of(a, e, dl);
          dispatch_da(a, e, dl);
        }
      }
      products(c0, st, dk, dv);
    }
    if (kChunked && c0 == 0) dot_of<kDispatch>(z, dl, live, dot);
    write_dx(c0, dk, dv, dot);
  }
}

// grid (ceil(pixel tiles / tiles_per_block), B), kMmaThreads threads. Clustering (!kDispatch):
// g = G (B, S, C), stat0 / stat1 = lse / delta (B, S), sl unused. Dispatch: g = grad (B, L, C),
// sl = slots (B, S, C), stat0 = lse (B, L), writes delta' (B, L) to dl_out. dx (B, L, C) contiguous.
template <class E, int CP, bool kDispatch>
__global__ void __launch_bounds__(kMmaThreads, 1)
    pixel_bwd_mma(Rows<Elem<E>> g, Rows<Elem<E>> x, Rows<float> qs, Rows<Elem<E>> sl, const float* __restrict__ stat0,
                  const float* __restrict__ stat1, int64_t L, int S, int C, int tiles_per_block,
                  Elem<E>* __restrict__ dx, float* __restrict__ dl_out) {
#if GLMIX_MMA_ARCH_OK
  constexpr int ld = tile_ld<E, CP>(), CW = bwd_chunk<E, CP, kDispatch>();
  constexpr bool kChunked = CW < CP;  // <K, dK> from the logits
  GLMIX_DYNAMIC_SMEM(float, smem);
  const BwdSmem<E> sh = carve_bwd<E, CP, kDispatch>(smem);
  const int64_t b = blockIdx.y;
  const int lane = lane_id(), r0 = 16 * (static_cast<int>(threadIdx.x) >> 5);
  const int nst = (S + kMmaCols - 1) / kMmaCols;
  const Rows<Elem<E>> y = kDispatch ? sl : g;

  // Slot tile st of qs (hi, lo) and y, with the clustering's per-slot lse and delta; no barrier.
  const auto load_slots = [&](int st) {
    const int s0 = st * kMmaCols, ns = min(kMmaCols, S - s0);
    load_rows_split<E>(sh.qh, sh.ql, ld, CP, qs.p + b * qs.sb, qs.sr, qs.sc, s0, ns, C);
    load_rows(sh.y, ld, CP, y.p + b * y.sb, y.sr, y.sc, s0, ns, C);
    if (!kDispatch) load_stats(sh.st0, sh.st1, stat0, stat1, b * S + s0, ns);
  };
  if (nst == 1) load_slots(0);  // read after the first tile's barriers
  const int64_t t_begin = static_cast<int64_t>(blockIdx.x) * tiles_per_block;
  for (int64_t t = t_begin; t < t_begin + tiles_per_block && t * 64 < L; ++t) {
    const int64_t l0 = t * 64;
    const int nl = static_cast<int>(min(static_cast<int64_t>(64), L - l0));
    load_pixel_tile<E, CP, kDispatch>(sh, x, g, b, l0, nl, C);
    float rn[2], live[2], lse[2] = {0.f, 0.f};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int l = r0 + (lane >> 2) + 8 * h;
      rn[h] = sh.rn[l];
      live[h] = sh.live[l];
      if (kDispatch && l < nl) lse[h] = stat0[b * L + l0 + l];
    }
    FragC a[kMmaNB], e[kMmaNB];
    float dl[2] = {0.f, 0.f};
    // The warp's 16 pixels x 64 slots of tile st (pixel_probs), loaded when S spans tiles.
    const auto probabilities = [&](int st, float (&z)[4]) {
      if (nst > 1) {
        __syncthreads();
        load_slots(st);
        __syncthreads();
      }
      logits<E, CP, false, true, true>(a, sh.x + r0 * ld, nullptr, sh.qh, sh.ql, ld);
      logits<E, CP, false, false, true>(e, (kDispatch ? sh.h : sh.x) + r0 * ld, nullptr, sh.y, nullptr, ld);
      pixel_probs<kDispatch, kChunked>(a, e, st, S, rn, lse, sh.st0, sh.st1, z);
    };
    const auto products = [&](int c0, int, FragC(&dk)[CW / 8], FragC(&dv)[CW / 8]) {
      pixel_products<E, CW, kDispatch>(dk, dv, a, e, sh, c0, ld);
    };
    const auto write_dx = [&](int c0, const FragC(&dk)[CW / 8], const FragC(&dv)[CW / 8], float (&dot)[2]) {
      if constexpr (!kChunked) dot_k<E, CW>(dk, sh.x, ld, r0, rn, live, dot);
      dx_rows<E, CW, !kDispatch>(dk, dv, sh.x + c0, ld, r0, c0, rn, dot, nl, C, dx + (b * L + l0) * C);
    };
    pixel_chunks<kDispatch, CW, kChunked>(nst, CP, a, e, dl, live, probabilities, products, write_dx);
    if (kDispatch) store_row_stats(dl, dl_out + b * L + l0, r0, nl);
  }
#else
  __trap();  // never launched below sm_80
#endif
}

// grid (slot tiles x CP / bwd_chunk, chunks of L, B), kMmaThreads threads; blockIdx.x = slot tile
// x chunks + channel chunk. Clustering (!kDispatch): g = G (B, S, C), stat0 / stat1 = lse / delta
// (B, S), sl unused. Dispatch: g = grad (B, L, C), sl = slots, stat0 / stat1 = lse / delta' (B, L).
// Writes the chunk's partial dqs to ws_dq (B, nchunks, S, C) and, for the dispatch, dslots to ws_dv.
template <class E, int CP, bool kDispatch>
__global__ void __launch_bounds__(kMmaThreads, 1)
    slot_bwd_mma(Rows<Elem<E>> g, Rows<Elem<E>> x, Rows<float> qs, Rows<Elem<E>> sl, const float* __restrict__ stat0,
                 const float* __restrict__ stat1, int L, int S, int C, int64_t chunk_len, int nchunks,
                 const float* __restrict__ kmean, float* __restrict__ ws_dq, float* __restrict__ ws_dv) {
#if GLMIX_MMA_ARCH_OK
  constexpr int ld = tile_ld<E, CP>(), CW = bwd_chunk<E, CP, !kDispatch>();
  GLMIX_DYNAMIC_SMEM(float, smem);
  const BwdSmem<E> sh = carve_bwd<E, CP, kDispatch>(smem);
  const SlotBlock blk = slot_block(CP / CW, CW, S, L, chunk_len);
  const int c0 = blk.c0, chunk = blk.chunk, s0 = blk.s0, ns = blk.ns;
  const int64_t b = blk.b, l_begin = blk.l_begin, l_end = blk.l_end;
  const int r0 = 16 * (static_cast<int>(threadIdx.x) >> 5);
  const Rows<Elem<E>> y = kDispatch ? sl : g;

  load_rows_split<E>(sh.qh, sh.ql, ld, CP, qs.p + b * qs.sb, qs.sr, qs.sc, s0, ns, C);
  load_rows(sh.y, ld, CP, y.p + b * y.sb, y.sr, y.sc, s0, ns, C);
  float lse[2], dl[2];
  slot_row_stats<kDispatch>(stat0, stat1, b * S + s0, r0, ns, lse, dl);
  FragC dq[CW / 8], dv[CW / 8];
  zero_all(dq);
  zero_all(dv);
  float da_sum[2] = {0.f, 0.f};

  for (int64_t l0 = l_begin; l0 < l_end; l0 += kMmaCols) {
    const int nl = static_cast<int>(min(static_cast<int64_t>(kMmaCols), l_end - l0));
    __syncthreads();  // the previous tile's readers are done
    load_rows(sh.x, ld, CP, x.p + b * x.sb, x.sr, x.sc, l0, nl, C);
    if (kDispatch) {
      load_rows(sh.h, ld, CP, g.p + b * g.sb, g.sr, g.sc, l0, nl, C);
      load_stats(sh.st0, sh.st1, stat0, stat1, b * L + l0, nl);
    }
    __syncthreads();
    tile_rnorms<E>(sh.x, ld, CP, sh.rn, sh.live);
    __syncthreads();

    // The warp's 16 slots x 64 pixels: a = P or D, e = dA / ||x|| (the dqs operand against x).
    FragC a[kMmaNB], e[kMmaNB];
    logits<E, CP, true, false, true>(a, sh.qh + r0 * ld, sh.ql + r0 * ld, sh.x, nullptr, ld);
    logits<E, CP, false, false, true>(e, sh.y + r0 * ld, nullptr, kDispatch ? sh.h : sh.x, nullptr, ld);
    slot_probs<E, kDispatch>(a, e, nl, sh, lse, dl, da_sum);
    if constexpr (std::is_same<E, F16>::value) {
      __syncthreads();  // the logits' readers of x are done
      scale_rows_pow2<E>(sh.x + c0, ld, CW, sh.rn);
      __syncthreads();
    }
    rows_product<E, CW, true, false>(dq, e, sh.x + c0, nullptr, ld);                  // dA K
    if (kDispatch) rows_product<E, CW, false, false>(dv, a, sh.h + c0, nullptr, ld);  // D grad
  }

  const int64_t row0 = (b * nchunks + chunk) * S + s0 + r0;  // workspace row of the warp's slot 0
  if (!kDispatch) {
    const float sum[2] = {row_sum(da_sum[0]), row_sum(da_sum[1])};
    centre_dqs<CW>(dq, sum, kmean + b * C + c0, C - c0);
  }
  store_rows<CW>(dq, ws_dq + c0, row0, ns - r0, C, C - c0);
  if (kDispatch) store_rows<CW>(dv, ws_dv + c0, row0, ns - r0, C, C - c0);
#else
  __trap();  // never launched below sm_80
#endif
}

// ---------------------------------------------------------------------------------------------
// The wide backwards: C above what pixel_bwd_mma and slot_bwd_mma hold in shared memory (16-bit
// C > 256, fp32 C > 128, and narrower C where a device refuses their tiles), up to the backend's
// 1024. As in the wide forwards, the logits accumulate over channel blocks of kWideBwd streamed
// through shared memory (x, qs hi + lo, the other (S, C) operand and the dispatch's grad, a block
// at a time, the squared norms of x beside them); then each chunk of bwd_chunk() output channels
// loads its products' operands into the same buffers. Products, precision and <K, dK> (from the
// logits: always chunked here) as above. One instantiation per operand type serves every C.

// a, e = the unscaled logits of a warp's 16 rows over all C channels, in blocks: the pixel side
// (kPixelRows: pixels l0 .. as rows, slots s0 .. as columns) a = x qs^T, e = x G^T (clustering) or
// grad slots^T (dispatch); the slot side their transposes. The pixels' 1 / ||x|| and liveness into
// sh.rn, sh.live, and the statistics per column (load_stats) into sh.st0, sh.st1, complete after
// the caller's next barrier.
template <class E, bool kDispatch, bool kPixelRows>
__device__ inline void stream_bwd_logits(FragC (&a)[kMmaNB], FragC (&e)[kMmaNB], const BwdSmem<E>& sh, Rows<Elem<E>> g,
                                         Rows<Elem<E>> x, Rows<float> qs, Rows<Elem<E>> y, const float* stat0,
                                         const float* stat1, int64_t b, int s0, int ns, int64_t l0, int nl, int S,
                                         int64_t L, int C) {
  constexpr int W = kWideBwd<E>, ld = tile_ld<E, W>();
  const int r0 = 16 * (static_cast<int>(threadIdx.x) >> 5);
  const Elem<E>* h = kDispatch ? sh.h : sh.x;  // the pixel-side operand of e
#pragma unroll
  for (int j = 0; j < kMmaNB; ++j) {
    zero(a[j]);
    zero(e[j]);
  }
  for (int c0 = 0; c0 < C; c0 += W) {
    const int nc = min(W, C - c0);
    __syncthreads();  // the previous block's (and the caller's) readers are done
    load_rows_split<E>(sh.qh, sh.ql, ld, W, at_channel(qs, b, c0), qs.sr, qs.sc, s0, ns, nc);
    load_rows(sh.y, ld, W, at_channel(y, b, c0), y.sr, y.sc, s0, ns, nc);
    load_rows(sh.x, ld, W, at_channel(x, b, c0), x.sr, x.sc, l0, nl, nc);
    if (kDispatch) load_rows(sh.h, ld, W, at_channel(g, b, c0), g.sr, g.sc, l0, nl, nc);
    if (c0 == 0 && kPixelRows != kDispatch)
      load_stats(sh.st0, sh.st1, stat0, stat1, kPixelRows ? b * S + s0 : b * L + l0, kPixelRows ? ns : nl);
    __syncthreads();
    tile_sumsq<E>(sh.x, ld, W, sh.rn, c0 == 0, c0 + W >= C, sh.live);
    if constexpr (kPixelRows) {
      logits_add<E, W, false, true, true>(a, sh.x + r0 * ld, nullptr, sh.qh, sh.ql, ld);
      logits_add<E, W, false, false, true>(e, h + r0 * ld, nullptr, sh.y, nullptr, ld);
    } else {
      logits_add<E, W, true, false, true>(a, sh.qh + r0 * ld, sh.ql + r0 * ld, sh.x, nullptr, ld);
      logits_add<E, W, false, false, true>(e, sh.y + r0 * ld, nullptr, h, nullptr, ld);
    }
  }
}

// grid (ceil(pixel tiles / tiles_per_block), B), kMmaThreads threads; arguments and outputs as
// pixel_bwd_mma's. The logits of every slot tile once when one slot tile holds all S (kept in
// registers for every output chunk), else per chunk (and the dispatch's first pass for delta').
template <class E, bool kDispatch>
__global__ void __launch_bounds__(kMmaThreads, 1)
    pixel_bwd_wide_mma(Rows<Elem<E>> g, Rows<Elem<E>> x, Rows<float> qs, Rows<Elem<E>> sl,
                       const float* __restrict__ stat0, const float* __restrict__ stat1, int64_t L, int S, int C,
                       int tiles_per_block, Elem<E>* __restrict__ dx, float* __restrict__ dl_out) {
#if GLMIX_MMA_ARCH_OK
  constexpr int W = kWideBwd<E>, ld = tile_ld<E, W>(), CW = bwd_chunk<E, W, kDispatch>();
  GLMIX_DYNAMIC_SMEM(float, smem);
  const BwdSmem<E> sh = carve_bwd<E, W, kDispatch>(smem);
  const int64_t b = blockIdx.y;
  const int lane = lane_id(), r0 = 16 * (static_cast<int>(threadIdx.x) >> 5);
  const int nst = (S + kMmaCols - 1) / kMmaCols;
  const Rows<Elem<E>> y = kDispatch ? sl : g;

  const int64_t t_begin = static_cast<int64_t>(blockIdx.x) * tiles_per_block;
  for (int64_t t = t_begin; t < t_begin + tiles_per_block && t * 64 < L; ++t) {
    const int64_t l0 = t * 64;
    const int nl = static_cast<int>(min(static_cast<int64_t>(64), L - l0));
    float rn[2] = {0.f, 0.f}, live[2] = {0.f, 0.f}, lse[2] = {0.f, 0.f};
    if (kDispatch) row_stats(stat0, b * L + l0, r0, nl, lse);
    FragC a[kMmaNB], e[kMmaNB];
    float dl[2] = {0.f, 0.f};
    // The warp's 16 pixels x 64 slots of tile st (pixel_probs), with the pixels' norms.
    const auto probabilities = [&](int st, float (&z)[4]) {
      const int s0 = st * kMmaCols;
      stream_bwd_logits<E, kDispatch, true>(a, e, sh, g, x, qs, y, stat0, stat1, b, s0, min(kMmaCols, S - s0), l0, nl,
                                            S, L, C);
      __syncthreads();  // norms and statistics complete
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        rn[h] = sh.rn[r0 + (lane >> 2) + 8 * h];
        live[h] = sh.live[r0 + (lane >> 2) + 8 * h];
      }
      pixel_probs<kDispatch, true>(a, e, st, S, rn, lse, sh.st0, sh.st1, z);
    };
    // The chunk's qs (hi, lo) and G of slot tile st, and x for dx_rows, into the blocks' buffers.
    const auto products = [&](int c0, int st, FragC(&dk)[CW / 8], FragC(&dv)[CW / 8]) {
      const int s0 = st * kMmaCols, ns = min(kMmaCols, S - s0), nc = min(CW, C - c0);
      __syncthreads();  // the logits' (or the previous chunk's) readers are done
      load_rows_split<E>(sh.qh, sh.ql, ld, CW, at_channel(qs, b, c0), qs.sr, qs.sc, s0, ns, nc);
      if (!kDispatch) load_rows(sh.y, ld, CW, at_channel(y, b, c0), y.sr, y.sc, s0, ns, nc);
      if (st == nst - 1) load_rows(sh.x, ld, CW, at_channel(x, b, c0), x.sr, x.sc, l0, nl, nc);
      __syncthreads();
      pixel_products<E, CW, kDispatch>(dk, dv, a, e, sh, 0, ld);
    };
    const auto write_dx = [&](int c0, const FragC(&dk)[CW / 8], const FragC(&dv)[CW / 8], float (&dot)[2]) {
      dx_rows<E, CW, !kDispatch>(dk, dv, sh.x, ld, r0, c0, rn, dot, nl, C, dx + (b * L + l0) * C);
    };
    pixel_chunks<kDispatch, CW, true>(nst, C, a, e, dl, live, probabilities, products, write_dx);
    if (kDispatch) store_row_stats(dl, dl_out + b * L + l0, r0, nl);
  }
#else
  __trap();  // never launched below sm_80
#endif
}

// grid (slot tiles x ceil(C / bwd_chunk), chunks of L, B), kMmaThreads threads; blockIdx.x = slot
// tile x chunks + channel chunk; arguments and outputs as slot_bwd_mma's. Per pixel tile: the
// logits over all channel blocks, then the chunk's x (and grad) for the products.
template <class E, bool kDispatch>
__global__ void __launch_bounds__(kMmaThreads, 1)
    slot_bwd_wide_mma(Rows<Elem<E>> g, Rows<Elem<E>> x, Rows<float> qs, Rows<Elem<E>> sl,
                      const float* __restrict__ stat0, const float* __restrict__ stat1, int L, int S, int C,
                      int64_t chunk_len, int nchunks, const float* __restrict__ kmean, float* __restrict__ ws_dq,
                      float* __restrict__ ws_dv) {
#if GLMIX_MMA_ARCH_OK
  constexpr int W = kWideBwd<E>, ld = tile_ld<E, W>(), CW = bwd_chunk<E, W, !kDispatch>();
  GLMIX_DYNAMIC_SMEM(float, smem);
  const BwdSmem<E> sh = carve_bwd<E, W, kDispatch>(smem);
  const SlotBlock blk = slot_block((C + CW - 1) / CW, CW, S, L, chunk_len);
  const int c0 = blk.c0, chunk = blk.chunk, s0 = blk.s0, ns = blk.ns, nc = min(CW, C - c0);
  const int64_t b = blk.b;
  const int r0 = 16 * (static_cast<int>(threadIdx.x) >> 5);
  const Rows<Elem<E>> y = kDispatch ? sl : g;

  float lse[2], dl[2];
  slot_row_stats<kDispatch>(stat0, stat1, b * S + s0, r0, ns, lse, dl);
  FragC dq[CW / 8], dv[CW / 8];
  zero_all(dq);
  zero_all(dv);
  float da_sum[2] = {0.f, 0.f};

  for (int64_t l0 = blk.l_begin; l0 < blk.l_end; l0 += kMmaCols) {
    const int nl = static_cast<int>(min(static_cast<int64_t>(kMmaCols), blk.l_end - l0));
    FragC a[kMmaNB], e[kMmaNB];  // the warp's 16 slots x 64 pixels
    stream_bwd_logits<E, kDispatch, false>(a, e, sh, g, x, qs, y, stat0, stat1, b, s0, ns, l0, nl, S, L, C);
    __syncthreads();  // the blocks' readers are done; norms and statistics complete
    load_rows(sh.x, ld, CW, at_channel(x, b, c0), x.sr, x.sc, l0, nl, nc);
    if (kDispatch) load_rows(sh.h, ld, CW, at_channel(g, b, c0), g.sr, g.sc, l0, nl, nc);
    __syncthreads();
    if constexpr (std::is_same<E, F16>::value) {
      scale_rows_pow2<E>(sh.x, ld, CW, sh.rn);
      __syncthreads();
    }
    slot_probs<E, kDispatch>(a, e, nl, sh, lse, dl, da_sum);
    rows_product<E, CW, true, false>(dq, e, sh.x, nullptr, ld);                  // dA K
    if (kDispatch) rows_product<E, CW, false, false>(dv, a, sh.h, nullptr, ld);  // D grad
  }

  const int64_t row0 = (b * nchunks + chunk) * S + s0 + r0;  // workspace row of the warp's slot 0
  if (!kDispatch) {
    const float sum[2] = {row_sum(da_sum[0]), row_sum(da_sum[1])};
    centre_dqs<CW>(dq, sum, kmean + b * C + c0, nc);
  }
  store_rows<CW>(dq, ws_dq + c0, row0, ns - r0, C, nc);
  if (kDispatch) store_rows<CW>(dv, ws_dv + c0, row0, ns - r0, C, nc);
#else
  __trap();  // never launched below sm_80
#endif
}

// ---------------------------------------------------------------------------------------------
// The fused backward: one kernel per op holding the pixel side and the slot side, where one slot
// tile holds all S (S <= kMmaCols), C <= kMmaFusedMaxChannels and the plan gives one chunk per
// batch element (fused_bwd_applies). A block per batch element walks all of L in pixel tiles of
// 64; per tile it computes the logits and dA once (warp w: pixels 16 w .., all slots, as
// pixel_bwd_mma), writes dx for the tile, and adds the tile's part of the slot-side sums (dqs,
// the dispatch's dslots) into accumulators that warp w holds for slots 16 w .. and all channels:
// dA / ||x|| (hi + lo; fp32 whole) and D pass from the pixel side's registers to the slot side's
// through shared memory. So the logits and G x^T (dD) are computed once, x is read once, and the
// outputs are written directly: no workspace, no delta' round trip, no sum_chunks. 9 products per
// tile against the two kernels' 12. Same precision as the two kernels.
constexpr int kMmaFusedMaxChannels = 64;
constexpr int kMmaExLd = kMmaCols + 8;  // exchange rows: ld % 16 == 8 for ldmatrix and the fp32 loads

// Dynamic shared memory: bwd_mma_smem's tiles and rows, and the exchange: dA / ||x|| as hi and lo
// tiles (fp32: one tile, whole) and the dispatch's D, 64 pixels x 64 slots each; the clustering's
// sums of dA per warp and slot instead of D (centre_dqs).
template <class E>
inline size_t fused_bwd_mma_smem(int CP, bool dispatch) {
  const int tiles = (kIsTf32<E> ? 1 : 2) + (dispatch ? 1 : 0);
  const size_t da_sums = dispatch ? 0 : kMmaThreads / 32 * 64 * sizeof(float);
  return bwd_mma_smem<E>(CP, dispatch) + static_cast<size_t>(tiles * 64) * kMmaExLd * sizeof(Elem<E>) + da_sums;
}

// part[s] = sum of e over the warp's 16 rows (those below nl) at column s, for the 64 columns.
__device__ __forceinline__ void column_sums(const FragC (&e)[kMmaNB], const bool (&in)[2], float* part) {
  const int lane = lane_id();
#pragma unroll
  for (int j = 0; j < kMmaNB; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      float v = (in[0] ? e[j].r[c] : 0.f) + (in[1] ? e[j].r[2 + c] : 0.f);
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      if (lane < 4) part[8 * j + c_rc(lane, c).col] = v;
    }
}

// tile[row * ld + col] = a warp's 16 x 64 values v (rows r0 ..) in the 16-bit type as hi (+ lo =
// the rounding error of hi, when kSplit); fp32 whole into hi.
template <class E, bool kSplit>
__device__ __forceinline__ void store_tile(const FragC (&v)[kMmaNB], Elem<E>* hi, Elem<E>* lo, int ld, int r0) {
  const int lane = lane_id();
#pragma unroll
  for (int j = 0; j < kMmaNB; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const RC rc = c_rc(lane, i);
      const int at = (r0 + rc.row) * ld + 8 * j + rc.col;
      hi[at] = elem_of<E>(v[j].r[i]);
      if (kSplit && !kIsTf32<E>) lo[at] = elem_of<E>(v[j].r[i] - value_of<E>(hi[at]));
    }
}

// acc += W^T V over a tile's 64 pixels: W 64 pixels x 16 slots (the exchange, pixel-major, from
// the warp's first slot; as hi + lo when kSplit), V 64 pixels x CP channels (channel-minor).
template <class E, int CP, bool kSplit>
__device__ __forceinline__ void pixels_product(FragC (&acc)[CP / 8], const Elem<E>* w_hi, const Elem<E>* w_lo,
                                               const Elem<E>* v, int ld) {
  if constexpr (kIsTf32<E>) {  // 3xTF32 on the fp32 exchange
#pragma unroll 1
    for (int k0 = 0; k0 < kMmaCols; k0 += 8) {
      FragA3 wf;
      load_a_t(wf, w_hi + k0 * kMmaExLd, kMmaExLd);
#pragma unroll
      for (int j = 0; j < CP / 8; ++j) {
        FragB3 vf;
        load_b_t(vf, v + k0 * ld + 8 * j, ld);
        mma::mma(acc[j], wf, vf);
      }
    }
  } else {
#pragma unroll
    for (int k0 = 0; k0 < kMmaCols; k0 += 16) {
      FragA<E> wh, wl;
      load_a_t(wh, w_hi + k0 * kMmaExLd, kMmaExLd);
      if (kSplit) load_a_t(wl, w_lo + k0 * kMmaExLd, kMmaExLd);
#pragma unroll
      for (int j = 0; j < CP / 8; ++j) {
        FragB<E> vf;
        load_b_t(vf, v + k0 * ld + 8 * j, ld);
        if (kSplit) mma::mma(acc[j], wl, vf);
        mma::mma(acc[j], wh, vf);
      }
    }
  }
}

// grid (B), kMmaThreads threads; S <= 64, C <= kMmaFusedMaxChannels. Clustering (!kDispatch):
// g = G (B, S, C), stat0 / stat1 = lse / delta (B, S), sl unused, dv unused. Dispatch: g = grad
// (B, L, C), sl = slots, stat0 = lse (B, L), stat1 unused, dslots into dv. dx (B, L, C), dqs and
// dslots (B, S, C) contiguous.
template <class E, int CP, bool kDispatch>
__global__ void __launch_bounds__(kMmaThreads, 1)
    fused_bwd_mma(Rows<Elem<E>> g, Rows<Elem<E>> x, Rows<float> qs, Rows<Elem<E>> sl, const float* __restrict__ stat0,
                  const float* __restrict__ stat1, int64_t L, int S, int C, const float* __restrict__ kmean,
                  Elem<E>* __restrict__ dx, float* __restrict__ dqs, Elem<E>* __restrict__ dv) {
#if GLMIX_MMA_ARCH_OK
  // The pixel side's channel chunk: two accumulator sets' width for both ops (registers also hold
  // the slot side's sums); <K, dK> from the logits when chunked, as in pixel_bwd_mma.
  constexpr int ld = tile_ld<E, CP>(), CW = bwd_chunk<E, CP, false>();
  constexpr bool kChunked = CW < CP;
  GLMIX_DYNAMIC_SMEM(float, smem);
  const BwdSmem<E> sh = carve_bwd<E, CP, kDispatch>(smem);
  Elem<E>* ex_hi = reinterpret_cast<Elem<E>*>(sh.st1 + 64);     // dA / ||x|| (fp16: dq_rn), pixel-major
  Elem<E>* ex_lo = kIsTf32<E> ? ex_hi : ex_hi + 64 * kMmaExLd;  // (fp32: unused)
  Elem<E>* ex_d = ex_lo + 64 * kMmaExLd;                        // the dispatch's D
  float* da_part = reinterpret_cast<float*>(ex_d);              // the clustering's: 64 per warp
  const int64_t b = blockIdx.x;
  const int lane = lane_id(), r0 = 16 * (static_cast<int>(threadIdx.x) >> 5);
  const Rows<Elem<E>> y = kDispatch ? sl : g;

  load_rows_split<E>(sh.qh, sh.ql, ld, CP, qs.p + b * qs.sb, qs.sr, qs.sc, 0, S, C);
  load_rows(sh.y, ld, CP, y.p + b * y.sb, y.sr, y.sc, 0, S, C);
  if (!kDispatch) load_stats(sh.st0, sh.st1, stat0, stat1, b * S, S);
  FragC dq[CP / 8], dsl[CP / 8];  // the slot side: slots r0 .. r0 + 15, all channels
  float da_sum[2] = {0.f, 0.f};   // the clustering's sum of dA over L, slots r0 + g, r0 + g + 8
#pragma unroll
  for (int j = 0; j < CP / 8; ++j) {
    zero(dq[j]);
    zero(dsl[j]);
  }

  for (int64_t l0 = 0; l0 < L; l0 += kMmaCols) {
    const int nl = static_cast<int>(min(static_cast<int64_t>(kMmaCols), L - l0));
    load_pixel_tile<E, CP, kDispatch>(sh, x, g, b, l0, nl, C);  // (also after the exchange's readers)
    float rn[2], live[2], lse[2] = {0.f, 0.f};
    bool in[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int l = r0 + (lane >> 2) + 8 * h;
      rn[h] = sh.rn[l];
      live[h] = sh.live[l];
      in[h] = l < nl;
      if (kDispatch && in[h]) lse[h] = stat0[b * L + l0 + l];
    }

    // The warp's 16 pixels x 64 slots: a = P or D, e = dA; zero at slots >= S. z: the parts of
    // <K, dK> (as pixel_bwd_mma's).
    FragC a[kMmaNB], e[kMmaNB];
    logits<E, CP, false, true, true>(a, sh.x + r0 * ld, nullptr, sh.qh, sh.ql, ld);
    logits<E, CP, false, false, true>(e, (kDispatch ? sh.h : sh.x) + r0 * ld, nullptr, sh.y, nullptr, ld);
    float z[4] = {0.f, 0.f, 0.f, 0.f}, dl[2] = {0.f, 0.f}, dot[2];
    pixel_probs<kDispatch, true>(a, e, 0, S, rn, lse, sh.st0, sh.st1, z);
    if (kDispatch) {
      delta_of(a, e, dl);
      dispatch_da(a, e, dl);
    }
    dot_of<kDispatch>(z, dl, live, dot);

    if (!kDispatch) column_sums(e, in, da_part + 64 * (r0 / 16));

    // The exchange: the slot side's operands, zero at pixels >= nl (and, in fp16, at zero pixels,
    // whose dA / eps could overflow; they add nothing to dqs).
    {
      FragC w[kMmaNB];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool ok = in[h] && (live[h] != 0.f || !std::is_same<E, F16>::value);
#pragma unroll
        for (int j = 0; j < kMmaNB; ++j) {
          w[j].r[2 * h] = ok ? e[j].r[2 * h] * dq_rn<E>(rn[h]) : 0.f;
          w[j].r[2 * h + 1] = ok ? e[j].r[2 * h + 1] * dq_rn<E>(rn[h]) : 0.f;
        }
      }
      store_tile<E, true>(w, ex_hi, ex_lo, kMmaExLd, r0);
      if (kDispatch) {
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int j = 0; j < kMmaNB; ++j) {
            w[j].r[2 * h] = in[h] ? a[j].r[2 * h] : 0.f;
            w[j].r[2 * h + 1] = in[h] ? a[j].r[2 * h + 1] : 0.f;
          }
        store_tile<E, false>(w, ex_d, nullptr, kMmaExLd, r0);
      }
    }

    // The pixel side: dx in channel chunks (value P^T G for the clustering, the K path dA^T qs).
    for (int c0 = 0; c0 < CP; c0 += CW) {
      FragC dk[CW / 8], val[CW / 8];
#pragma unroll
      for (int j = 0; j < CW / 8; ++j) {
        zero(dk[j]);
        zero(val[j]);
      }
      if (!kDispatch) rows_product<E, CW, false, false>(val, a, sh.y + c0, nullptr, ld);  // P^T G
      rows_product<E, CW, true, true>(dk, e, sh.qh + c0, sh.ql + c0, ld);                 // dA^T qs
      if constexpr (!kChunked) dot_k<E, CW>(dk, sh.x, ld, r0, rn, live, dot);
      dx_rows<E, CW, !kDispatch>(dk, val, sh.x + c0, ld, r0, c0, rn, dot, nl, C, dx + (b * L + l0) * C);
    }

    __syncthreads();  // the exchange is complete
    if (!kDispatch)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int w = 0; w < kMmaThreads / 32; ++w) da_sum[h] += da_part[64 * w + r0 + (lane >> 2) + 8 * h];
    if constexpr (std::is_same<E, F16>::value) {
      scale_rows_pow2<E>(sh.x, ld, CP, sh.rn);  // dx's readers of x are past the exchange's barrier
      __syncthreads();
    }
    pixels_product<E, CP, true>(dq, ex_hi + r0, ex_lo + r0, sh.x, ld);               // dA K
    if (kDispatch) pixels_product<E, CP, false>(dsl, ex_d + r0, nullptr, sh.h, ld);  // D grad
  }

  if (!kDispatch) centre_dqs<CP>(dq, da_sum, kmean + b * C, C);
  store_rows<CP>(dq, dqs, b * S + r0, S - r0, C, C);
  if (kDispatch) {
#pragma unroll
    for (int j = 0; j < CP / 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const RC rc = c_rc(lane, i);
        const int s = r0 + rc.row, c = 8 * j + rc.col;
        if (s < S && c < C) dv[(b * S + s) * C + c] = elem_of<E>(dsl[j].r[i]);
      }
  }
#else
  __trap();  // never launched below sm_80
#endif
}

}  // namespace tc
}  // namespace GLMIX_CUDA_NS
}  // namespace glmix
