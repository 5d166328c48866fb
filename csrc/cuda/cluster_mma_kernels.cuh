// Clustering forward on tensor cores (csrc/cuda/mma.cuh), for 16-bit x: cluster_fwd_chunk_mma
// computes the same per-chunk partials as the CUDA-core cluster_fwd_chunk (running max m, sum l
// and acc = sum_l exp(A - m) x per slot; cluster_fwd_combine merges the chunks).
//
// A block of kMmaWarps warps owns a slot tile of 16 kMmaWarps slots (warp w: slots 16 w .. 16 w +
// 15) and streams its chunk in pixel tiles of kMmaTL pixels:
//   - x's tile goes to shared memory as 16-bit values (channels padded with zeros to CP, a
//     multiple of 16), with 1 / ||x|| per pixel beside it;
//   - logits: each warp multiplies its 16 slots of qs by the tile, qs split as qs_hi + qs_lo in
//     the 16-bit type (two products; the split keeps qs's fp32 accuracy, as the other backends do),
//     then scales each pixel's column by 1 / ||x|| once;
//   - an online softmax over the pixels on the accumulator registers (a row's 8 columns of a
//     block sit in 4 lanes: two shuffles per reduction);
//   - acc += P x with P rounded to the 16-bit type straight from the logits' registers.
// Shared rows have ld = CP + 8 elements (ld % 16 == 8: conflict-free ldmatrix). No ATen here.
#pragma once

#include <cmath>
#include <cstdint>

#include "mma.cuh"

namespace glmix {
namespace cuda_mma {

using namespace cuda_detail::mma;

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kMmaTS = 16 * kMmaWarps;  // slots per block
constexpr int kMmaTL = 64;              // pixels per tile
constexpr float kMmaNormEps = 1e-12f;

// Channels padded for the products: CP in {16, 32, 64, 128}, the smallest holding C.
inline int padded_channels(int C) {
  int cp = 16;
  while (cp < C) cp <<= 1;
  return cp;
}
// Dynamic shared memory of cluster_fwd_chunk_mma: qs hi and lo, the x tile (16-bit), 1/||x||.
inline size_t cluster_fwd_mma_smem(int CP) {
  return static_cast<size_t>(2 * kMmaTS + kMmaTL) * (CP + 8) * 2 + kMmaTL * 4;
}

__device__ __forceinline__ float warp_sum32(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// qs rows s0 .. s0 + kMmaTS of a batch element (fp32, strides sr, sc) as hi and lo 16-bit tiles.
template <class E>
__device__ inline void load_qs_split(uint16_t* hi, uint16_t* lo, int ld, int CP, const float* qs, int64_t sr,
                                     int64_t sc, int ns, int C) {
  for (int i = threadIdx.x; i < kMmaTS * CP; i += blockDim.x) {
    const int s = i / CP, c = i - s * CP;
    const float v = (s < ns && c < C) ? qs[s * sr + c * sc] : 0.f;
    const uint16_t h = to_bits(v, E{});
    hi[s * ld + c] = h;
    lo[s * ld + c] = to_bits(v - from_bits(h, E{}), E{});
  }
}

// x rows l0 .. l0 + nl of a batch element (16-bit, strides sr, sc) into a kMmaTL x CP tile, zeros
// beyond; consecutive threads walk x's contiguous dimension so the loads coalesce either way.
__device__ inline void load_x16(uint16_t* dst, int ld, int CP, const uint16_t* x, int64_t sr, int64_t sc,
                                int64_t l0, int nl, int C) {
  const bool pixel_major = sr == 1 && sc != 1;  // the NCHW view
  for (int i = threadIdx.x; i < kMmaTL * CP; i += blockDim.x) {
    int r, c;
    if (pixel_major) {
      c = i / kMmaTL;
      r = i - c * kMmaTL;
    } else {
      r = i / CP;
      c = i - r * CP;
    }
    dst[r * ld + c] = (r < nl && c < C) ? x[(l0 + r) * sr + c * sc] : uint16_t{0};
  }
}

// grid (slot tiles, chunks, B), kMmaThreads threads. x: 16-bit storage of type E; qs fp32.
// Writes ws_m, ws_l (B, nchunks, S) and ws_acc (B, nchunks, S, C) as cluster_fwd_chunk does.
template <class E, int CP>
__global__ void __launch_bounds__(kMmaThreads)
    cluster_fwd_chunk_mma(const uint16_t* __restrict__ x, int64_t xsb, int64_t xsr, int64_t xsc,
                          const float* __restrict__ qs, int64_t qsb, int64_t qsr, int64_t qsc, int L, int S, int C,
                          int64_t chunk_len, int nchunks, float* __restrict__ ws_m, float* __restrict__ ws_l,
                          float* __restrict__ ws_acc) {
  constexpr int ld = CP + 8, NB = kMmaTL / 8, CB = CP / 8;
  GLMIX_DYNAMIC_SMEM(float, smem);
  uint16_t* qh_sh = reinterpret_cast<uint16_t*>(smem);
  uint16_t* ql_sh = qh_sh + kMmaTS * ld;
  uint16_t* x_sh = ql_sh + kMmaTS * ld;
  float* rn_sh = reinterpret_cast<float*>(x_sh + kMmaTL * ld);

  const int st = blockIdx.x, chunk = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int s0 = st * kMmaTS, ns = min(kMmaTS, S - s0);
  const int64_t l_begin = chunk * chunk_len;
  const int64_t l_end = min(static_cast<int64_t>(L), l_begin + chunk_len);
  const int lane = lane_id(), warp = static_cast<int>(threadIdx.x) >> 5;
  const uint16_t* xb = x + b * xsb;

  load_qs_split<E>(qh_sh, ql_sh, ld, CP, qs + b * qsb + s0 * qsr, qsr, qsc, ns, C);
  const uint16_t* qh_w = qh_sh + 16 * warp * ld;  // this warp's 16 slots
  const uint16_t* ql_w = ql_sh + 16 * warp * ld;

  // Per accumulator row (g and g + 8 of the warp's 16 slots): running max and sum, kept alike in
  // the 4 lanes that share the row.
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  FragC acc[CB];
  for (int j = 0; j < CB; ++j) zero(acc[j]);

  for (int64_t l0 = l_begin; l0 < l_end; l0 += kMmaTL) {
    const int nl = static_cast<int>(min(static_cast<int64_t>(kMmaTL), l_end - l0));
    __syncthreads();  // the previous tile's readers of x_sh / rn_sh are done
    load_x16(x_sh, ld, CP, xb, xsr, xsc, l0, nl, C);
    __syncthreads();
    for (int r = warp; r < kMmaTL; r += kMmaWarps) {  // 1 / max(||x||, eps) per pixel, a warp per row
      float s = 0.f;
      for (int c = lane; c < CP; c += 32) {
        const float v = from_bits(x_sh[r * ld + c], E{});
        s += v * v;
      }
      s = warp_sum32(s);
      if (lane == 0) rn_sh[r] = 1.f / fmaxf(sqrtf(s), kMmaNormEps);
    }
    __syncthreads();

    // Logits of the warp's 16 slots x kMmaTL pixels: block j holds pixels 8 j .. 8 j + 7.
    FragC a[NB];
    for (int j = 0; j < NB; ++j) zero(a[j]);
    for (int k0 = 0; k0 < CP; k0 += 16) {
      FragA<E> qh, ql;
      load_a(qh, qh_w + k0, ld);
      load_a(ql, ql_w + k0, ld);
      for (int j = 0; j < NB; ++j) {
        FragB<E> xf;
        load_b(xf, x_sh + 8 * j * ld + k0, ld);  // B[c][l] = x[l][c]: stored n-major
        mma(a[j], ql, xf);
        mma(a[j], qh, xf);
      }
    }

    // Online softmax over the tile's pixels; columns past nl are -inf.
    float m_tile[2] = {-INFINITY, -INFINITY};
    for (int j = 0; j < NB; ++j)
      for (int i = 0; i < 4; ++i) {
        const int l = 8 * j + c_rc(lane, i).col;
        a[j].r[i] = l < nl ? a[j].r[i] * rn_sh[l] : -INFINITY;
        m_tile[i >> 1] = fmaxf(m_tile[i >> 1], a[j].r[i]);
      }
    float alpha[2], sum[2] = {0.f, 0.f};
    for (int h = 0; h < 2; ++h) {
      const float m_new = fmaxf(m_run[h], row_max(m_tile[h]));
      alpha[h] = m_run[h] == -INFINITY ? 0.f : expf(m_run[h] - m_new);
      m_run[h] = m_new;
    }
    for (int j = 0; j < NB; ++j)
      for (int i = 0; i < 4; ++i) {
        const float p = expf(a[j].r[i] - m_run[i >> 1]);  // exp(-inf) = 0 past nl
        a[j].r[i] = p;
        sum[i >> 1] += p;
      }
    for (int h = 0; h < 2; ++h) l_run[h] = l_run[h] * alpha[h] + row_sum(sum[h]);
    for (int j = 0; j < CB; ++j)
      for (int i = 0; i < 4; ++i) acc[j].r[i] *= alpha[i >> 1];

    // acc += P x: P's accumulator blocks (2 kk, 2 kk + 1) are the A operand of pixels 16 kk ..
    for (int kk = 0; kk < NB / 2; ++kk) {
      const FragA<E> p = a_from_c<E>(a[2 * kk], a[2 * kk + 1]);
      for (int j = 0; j < CB; ++j) {
        FragB<E> xf;
        load_b_t(xf, x_sh + 16 * kk * ld + 8 * j, ld);  // B[l][c] = x[l][c]: stored k-major
        mma(acc[j], p, xf);
      }
    }
  }

  // The chunk's partials: lanes with t == 0 hold the row statistics of rows g and g + 8.
  const int64_t row0 = (b * nchunks + chunk) * S + s0 + 16 * warp;  // workspace row of the warp's slot 0
  for (int h = 0; h < 2; ++h) {
    const int s = (lane >> 2) + 8 * h;
    if ((lane & 3) == 0 && 16 * warp + s < ns) {
      ws_m[row0 + s] = m_run[h];
      ws_l[row0 + s] = l_run[h];
    }
  }
  for (int j = 0; j < CB; ++j)
    for (int i = 0; i < 4; ++i) {
      const RC rc = c_rc(lane, i);
      const int c = 8 * j + rc.col;
      if (16 * warp + rc.row < ns && c < C) ws_acc[(row0 + rc.row) * C + c] = acc[j].r[i];
    }
}

}  // namespace cuda_mma
}  // namespace glmix
