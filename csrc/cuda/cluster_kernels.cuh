// Device code of the clustering (cluster.cu launches it): slots = softmax_L(A) @ x with
// A = qs @ normalize(x)^T, and its backward.
//
// Forward (no (B, S, L) tensor):
//   cluster_fwd_chunk    grid (S-tiles, chunks, B). A block streams its chunk of pixels tile by
//                        tile (TL pixels x all C channels in shared memory), computes the TS x TL
//                        logits of its slot tile, runs an online softmax per slot and accumulates
//                        P @ x in registers; it writes the partial (max, sum, acc) of its chunk to
//                        fp32 workspaces.
//   cluster_fwd_combine  grid (S, B): merges the chunks by log-sum-exp in chunk order, writes
//                        slots (float32: the backward's delta needs them unrounded) and lse.
// Backward:
//   cluster_delta        delta[b, s] = <G[b, s], slots[b, s]>, from the forward's float32 slots.
//   cluster_bwd_chunk    grid (chunks, B); pixel_bwd and slot_bwd in one kernel. Per pixel tile,
//                        loops over slot tiles, recomputes P = exp(A - lse) and
//                        dA = P * (G x^T - delta), accumulates dx (value path P^T G and K path
//                        dA^T qs through the normalisation) in registers, and the chunk's partial
//                        dqs = dA @ (K - m), m the keys' mean (key_mean).
//   sum_chunks           sums the chunks' dqs partials in a fixed order (bitwise deterministic).
#pragma once

#include "device.cuh"

namespace glmix {
namespace GLMIX_CUDA_NS {
namespace cluster {

constexpr int kFwdAcc = 32;  // P @ x accumulators per thread: TS * C <= 8192
constexpr int kBwdAcc = 16;  // three accumulators per thread: TL * C, TS * C <= 4096

// ---------------------------------------------------------------------------------------------
// Forward

inline plan::SmemCount fwd_smem(int TL, int TS, int ld) {
  plan::SmemCount s;
  s.take(TS * ld).take(TL * ld).take(TS * TL).take(TL).take(3 * TS);
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    cluster_fwd_chunk(const T* __restrict__ x, View xv, const float* __restrict__ qs, View qv, int L, int S, int C,
                      int TL, int TS, int ld, int64_t chunk_len, int nchunks, float* __restrict__ ws_m,
                      float* __restrict__ ws_l, float* __restrict__ ws_acc) {
  GLMIX_DYNAMIC_SMEM(float, smem);
  SmemCarve carve{smem};
  float* q_sh = carve.take(TS * ld);
  float* x_sh = carve.take(TL * ld);
  float* p_sh = carve.take(TS * TL);  // logits, then probabilities, [s][l]
  float* rn_sh = carve.take(TL);
  float* m_sh = carve.take(TS);
  float* l_sh = carve.take(TS);
  float* alpha_sh = carve.take(TS);

  const int st = blockIdx.x, chunk = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int s0 = st * TS, ns = min(TS, S - s0);
  const int64_t l_begin = chunk * chunk_len;
  const int64_t l_end = min(static_cast<int64_t>(L), l_begin + chunk_len);
  const T* xb = x + b * xv.sb;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;

  load_tile(q_sh, ld, qs + b * qv.sb, qv.sr, qv.sc, s0, ns, C);
  for (int s = threadIdx.x; s < ns; s += blockDim.x) {
    m_sh[s] = -INFINITY;
    l_sh[s] = 0.f;
  }
  const int nacc = ns * C;
  float acc[kFwdAcc];
#pragma unroll
  for (int i = 0; i < kFwdAcc; ++i) acc[i] = 0.f;

  for (int64_t l0 = l_begin; l0 < l_end; l0 += TL) {
    const int nl = static_cast<int>(min(static_cast<int64_t>(TL), l_end - l0));
    __syncthreads();  // the previous tile's readers of x_sh / p_sh are done
    load_tile(x_sh, ld, xb, xv.sr, xv.sc, l0, nl, C);
    __syncthreads();
    row_rnorms(x_sh, ld, nl, C, rn_sh, nullptr);
    pair_dots(q_sh, ld, ns, x_sh, ld, nl, C, p_sh, TL);
    __syncthreads();
    // Online softmax over the pixels, one warp per slot.
    for (int s = warp; s < ns; s += nw) {
      float* row = p_sh + s * TL;
      float mt = -INFINITY;
      for (int l = lane; l < nl; l += 32) {
        const float a = row[l] * rn_sh[l];
        row[l] = a;
        mt = fmaxf(mt, a);
      }
      mt = warp_max(mt);
      const float m_old = m_sh[s];
      const float m_new = fmaxf(m_old, mt);
      float sum = 0.f;
      for (int l = lane; l < nl; l += 32) {
        const float e = expf(row[l] - m_new);
        row[l] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        alpha_sh[s] = online_softmax_step(m_old, m_new, sum, l_sh[s]);
        m_sh[s] = m_new;
      }
    }
    __syncthreads();
    // acc[s][c] = alpha[s] * acc[s][c] + sum_l P[s][l] * x[l][c]
    for_each_acc<kFwdAcc>(nacc, C, [&](int i, int, int s, int c) {
      const float* prow = p_sh + s * TL;
      float a = acc[i] * alpha_sh[s];
      for (int l = 0; l < nl; ++l) a = fmaf(prow[l], x_sh[l * ld + c], a);
      acc[i] = a;
    });
  }

  const int64_t row0 = (b * nchunks + chunk) * S + s0;  // workspace row of slot s0
  for (int s = threadIdx.x; s < ns; s += blockDim.x) {
    ws_m[row0 + s] = m_sh[s];
    ws_l[row0 + s] = l_sh[s];
  }
  store_acc(nacc, ws_acc + row0 * C, acc);
}

inline plan::SmemCount combine_smem(int nchunks) {
  plan::SmemCount s;
  s.take(nchunks).take(2);
  return s;
}

// slots[b, s] = sum_k w_k acc_k / sum_k w_k l_k with w_k = exp(m_k - max_k m_k), chunk order fixed.
__global__ void __launch_bounds__(kThreads)
    cluster_fwd_combine(const float* __restrict__ ws_m, const float* __restrict__ ws_l,
                        const float* __restrict__ ws_acc, int S, int C, int nchunks, float* __restrict__ slots,
                        float* __restrict__ lse) {
  GLMIX_DYNAMIC_SMEM(float, smem);  // cluster_fwd_combine_smem(nchunks)
  float* w_sh = smem;
  float* stat_sh = smem + nchunks;
  const int s = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t base = b * nchunks * S + s;  // (b, k=0, s); chunk k adds k * S
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float m = -INFINITY;
    for (int k = lane; k < nchunks; k += 32) m = fmaxf(m, ws_m[base + static_cast<int64_t>(k) * S]);
    m = warp_max(m);
    float tot = 0.f;
    for (int k = lane; k < nchunks; k += 32) {
      const int64_t o = base + static_cast<int64_t>(k) * S;
      tot += ws_l[o] * expf(ws_m[o] - m);
    }
    tot = warp_sum(tot);
    if (lane == 0) {
      stat_sh[0] = m;
      stat_sh[1] = tot;
      lse[b * S + s] = m + logf(tot);
    }
  }
  __syncthreads();
  const float m = stat_sh[0], inv = 1.f / stat_sh[1];
  for (int k = threadIdx.x; k < nchunks; k += blockDim.x)
    w_sh[k] = expf(ws_m[base + static_cast<int64_t>(k) * S] - m) * inv;
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float a = 0.f;
    for (int k = 0; k < nchunks; ++k) a = fmaf(w_sh[k], ws_acc[(base + static_cast<int64_t>(k) * S) * C + c], a);
    slots[(b * S + s) * C + c] = a;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

// delta[b, s] = sum_c G[b, s, c] * slots[b, s, c]; one warp per (b, s).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    cluster_delta(const T* __restrict__ g, View gv, const float* __restrict__ sl, View sv, int64_t B, int S, int C,
                  float* __restrict__ delta) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= B * S) return;  // whole warps leave together
  const int64_t b = row / S, s = row - b * S;
  const T* gp = g + b * gv.sb + s * gv.sr;
  const float* sp = sl + b * sv.sb + s * sv.sr;
  float a = 0.f;
  for (int c = lane; c < C; c += 32) a = fmaf(to_f(gp[c * gv.sc]), sp[c * sv.sc], a);
  a = warp_sum(a);
  if (lane == 0) delta[row] = a;
}

inline plan::SmemCount bwd_smem(int TL, int TS, int ld) {
  plan::SmemCount s;
  s.take(TL * ld).take(TL * ld).take(TS * ld).take(TS * ld).take(TS * TL).take(TS * TL);
  s.take(TL).take(TL).take(TL).take(TS).take(TS);
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    cluster_bwd_chunk(const T* __restrict__ g, View gv, const T* __restrict__ x, View xv, const float* __restrict__ qs,
                      View qv, const float* __restrict__ lse, const float* __restrict__ delta, int L, int S, int C,
                      int TL, int TS, int ld, int nst, int64_t chunk_len, int nchunks, const float* __restrict__ kmean,
                      T* __restrict__ dx, float* __restrict__ ws_dq) {
  GLMIX_DYNAMIC_SMEM(float, smem);
  SmemCarve carve{smem};
  float* x_sh = carve.take(TL * ld);
  float* dk_sh = carve.take(TL * ld);  // dK of the tile, for the per-pixel projection
  float* q_sh = carve.take(TS * ld);
  float* g_sh = carve.take(TS * ld);
  float* p_sh = carve.take(TS * TL);   // logits, then P, [s][l]
  float* da_sh = carve.take(TS * TL);  // dP, then dA, [s][l]
  float* rn_sh = carve.take(TL);
  float* live_sh = carve.take(TL);
  float* dot_sh = carve.take(TL);
  float* lse_sh = carve.take(TS);
  float* dl_sh = carve.take(TS);

  const int chunk = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t l_begin = chunk * chunk_len;
  const int64_t l_end = min(static_cast<int64_t>(L), l_begin + chunk_len);
  const T* xb = x + b * xv.sb;
  const T* gb = g + b * gv.sb;
  const float* qb = qs + b * qv.sb;
  float* ws_b = ws_dq + (b * nchunks + chunk) * static_cast<int64_t>(S) * C;

  float dq[kBwdAcc];
#pragma unroll
  for (int i = 0; i < kBwdAcc; ++i) dq[i] = 0.f;
  int loaded = -1;
  int ns = 0;

  for (int64_t l0 = l_begin; l0 < l_end; l0 += TL) {
    const bool first_tile = l0 == l_begin;
    const int nl = static_cast<int>(min(static_cast<int64_t>(TL), l_end - l0));
    const int nx = nl * C;
    __syncthreads();  // readers of the previous tile are done
    load_tile(x_sh, ld, xb, xv.sr, xv.sc, l0, nl, C);
    __syncthreads();
    row_rnorms(x_sh, ld, nl, C, rn_sh, live_sh);
    float dxv[kBwdAcc], dk[kBwdAcc];
#pragma unroll
    for (int i = 0; i < kBwdAcc; ++i) dxv[i] = dk[i] = 0.f;

    for (int st = 0; st < nst; ++st) {
      const int s0 = st * TS;
      if (load_slot_tile(st, TS, S, C, ld, loaded, ns, q_sh, qb, qv, g_sh, gb, gv)) {
        for (int s = threadIdx.x; s < ns; s += blockDim.x) {
          lse_sh[s] = lse[b * S + s0 + s];
          dl_sh[s] = delta[b * S + s0 + s];
        }
      }
      __syncthreads();  // tiles loaded, rnorms written, previous p_sh/da_sh readers done
      pair_dots(q_sh, ld, ns, x_sh, ld, nl, C, p_sh, TL);
      pair_dots(g_sh, ld, ns, x_sh, ld, nl, C, da_sh, TL);
      __syncthreads();
      for (int e = threadIdx.x; e < ns * nl; e += blockDim.x) {
        const int s = e / nl, l = e - s * nl, o = s * TL + l;
        const float p = expf(p_sh[o] * rn_sh[l] - lse_sh[s]);
        p_sh[o] = p;
        da_sh[o] = p * (da_sh[o] - dl_sh[s]);
      }
      __syncthreads();
      // Per pixel: dx value path sum_s P[s][l] G[s][c], K path sum_s dA[s][l] qs[s][c].
      for_each_acc<kBwdAcc>(nx, C, [&](int i, int, int l, int c) {
        float v = dxv[i], k = dk[i];
        for (int s = 0; s < ns; ++s) {
          v = fmaf(p_sh[s * TL + l], g_sh[s * ld + c], v);
          k = fmaf(da_sh[s * TL + l], q_sh[s * ld + c], k);
        }
        dxv[i] = v;
        dk[i] = k;
      });
      // Per slot: dqs[s][c] += sum_l dA[s][l] (K[l][c] - m[c]), centred on the keys' mean m: equal
      // in exact arithmetic (sum_l dA = 0 over L), but the rounding of delta then reaches dqs times
      // K - m, not times the direction the keys share (math.md#centred-dqs).
      const int nq = ns * C;
      for_each_acc<kBwdAcc>(nq, C, [&](int i, int, int s, int c) {
        const float* arow = da_sh + s * TL;
        const float m = kmean[b * C + c];
        float a = dq[i];
        for (int l = 0; l < nl; ++l) a = fmaf(arow[l], x_sh[l * ld + c] * rn_sh[l] - m, a);
        dq[i] = a;
      });
      if (nst > 1) flush_acc(nq, first_tile, ws_b + static_cast<int64_t>(s0) * C, dq);
    }

    // dx = P^T G + (dK - K <K, dK>) / max(||x||, eps). dk_sh's readers are past the last barrier.
    dx_epilogue(x_sh, dk_sh, ld, rn_sh, live_sh, dot_sh, nl, C, dk, dxv, dx + (b * L + l0) * C);
  }

  if (nst == 1) store_acc(ns * C, ws_b, dq);
}

}  // namespace cluster
}  // namespace GLMIX_CUDA_NS
}  // namespace glmix
