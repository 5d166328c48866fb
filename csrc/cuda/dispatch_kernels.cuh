// Device code of the dispatch (dispatch.cu launches it): out = softmax_S(A)^T @ slots with
// A = qs @ normalize(x)^T, and its backward.
//
// Forward: dispatch_fwd, grid (chunks, B). A block owns a chunk of a few tiles of TL pixels (all
//   C channels in shared memory) and all S slots: it loops over slot tiles of TS slots (qs and
//   slots in shared memory, loaded once per block when one tile holds all S), computes the TS x TL
//   logits, runs an online softmax over the slots per pixel and accumulates D^T @ slots in
//   registers. Writes out and lse = logsumexp_S(A) per pixel.
// Backward: dispatch_bwd_chunk, grid (chunks, B); pixel_bwd and slot_bwd in one kernel. Per pixel
//   tile it recomputes D = exp(A - lse) and dD = slots @ grad^T per slot tile; delta'[l] =
//   sum_s D dD / sum_s D in fp32 (in the same pass when all slots fit one tile, else in a first
//   pass over the slot tiles), dA = D (dD - delta'). Not <grad, out>: that is equal only in exact
//   arithmetic, and a half-precision out, rounded after the softmax, would bias it. dx (K path
//   through the normalisation) is local to the block; dslots = D @ grad and dqs = dA @ K are
//   chunk partials in fp32 workspaces, summed in a fixed chunk order by sum_chunks (bitwise
//   deterministic).
#pragma once

#include "device.cuh"

namespace glmix {
namespace GLMIX_CUDA_NS {
namespace dispatch {

constexpr int kFwdAcc = 32;  // out accumulators per thread: TL * C <= 8192
constexpr int kBwdAcc = 16;  // three accumulators per thread: TL * C, TS * C <= 4096

// ---------------------------------------------------------------------------------------------
// Forward

inline plan::SmemCount fwd_smem(int TL, int TS, int ld) {
  plan::SmemCount s;
  s.take(TL * ld).take(TS * ld).take(TS * ld).take(TS * TL).take(4 * TL);
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dispatch_fwd(const T* __restrict__ x, View xv, const float* __restrict__ qs, View qv, const T* __restrict__ sl,
                 View sv, int64_t L, int S, int C, int TL, int TS, int ld, int nst, int64_t chunk_len,
                 T* __restrict__ out, float* __restrict__ lse) {
  GLMIX_DYNAMIC_SMEM(float, smem);
  SmemCarve carve{smem};
  float* x_sh = carve.take(TL * ld);
  float* q_sh = carve.take(TS * ld);
  float* v_sh = carve.take(TS * ld);  // slots
  float* p_sh = carve.take(TS * TL);  // logits, then exp, [s][l]
  float* rn_sh = carve.take(TL);
  float* m_sh = carve.take(TL);
  float* l_sh = carve.take(TL);
  float* alpha_sh = carve.take(TL);

  const int64_t b = blockIdx.y;
  const int64_t l_begin = blockIdx.x * chunk_len;
  const int64_t l_end = min(L, l_begin + chunk_len);
  const T* xb = x + b * xv.sb;
  const float* qb = qs + b * qv.sb;
  const T* sb = sl + b * sv.sb;
  int loaded = -1, ns = 0;

  for (int64_t l0 = l_begin; l0 < l_end; l0 += TL) {
    const int nl = static_cast<int>(min(static_cast<int64_t>(TL), l_end - l0));
    const int nx = nl * C;
    __syncthreads();  // readers of the previous tile are done
    load_tile(x_sh, ld, xb, xv.sr, xv.sc, l0, nl, C);
    for (int l = threadIdx.x; l < nl; l += blockDim.x) {
      m_sh[l] = -INFINITY;
      l_sh[l] = 0.f;
    }
    __syncthreads();
    row_rnorms(x_sh, ld, nl, C, rn_sh, nullptr);
    float acc[kFwdAcc];
#pragma unroll
    for (int i = 0; i < kFwdAcc; ++i) acc[i] = 0.f;

    for (int st = 0; st < nst; ++st) {
      load_slot_tile(st, TS, S, C, ld, loaded, ns, q_sh, qb, qv, v_sh, sb, sv);
      __syncthreads();
      pair_dots(q_sh, ld, ns, x_sh, ld, nl, C, p_sh, TL);
      __syncthreads();
      // Online softmax over the slots, one thread per pixel.
      for (int l = threadIdx.x; l < nl; l += blockDim.x) {
        const float r = rn_sh[l];
        float mt = -INFINITY;
        for (int s = 0; s < ns; ++s) {
          const float a = p_sh[s * TL + l] * r;
          p_sh[s * TL + l] = a;
          mt = fmaxf(mt, a);
        }
        const float m_old = m_sh[l], m_new = fmaxf(m_old, mt);
        float sum = 0.f;
        for (int s = 0; s < ns; ++s) {
          const float e = expf(p_sh[s * TL + l] - m_new);
          p_sh[s * TL + l] = e;
          sum += e;
        }
        alpha_sh[l] = online_softmax_step(m_old, m_new, sum, l_sh[l]);
        m_sh[l] = m_new;
      }
      __syncthreads();
      for_each_acc<kFwdAcc>(nx, C, [&](int i, int, int l, int c) {
        float a = acc[i] * alpha_sh[l];
        for (int s = 0; s < ns; ++s) a = fmaf(p_sh[s * TL + l], v_sh[s * ld + c], a);
        acc[i] = a;
      });
    }

    T* ob = out + (b * L + l0) * C;
    for_each_acc<kFwdAcc>(nx, C, [&](int i, int idx, int l, int) { ob[idx] = static_cast<T>(acc[i] / l_sh[l]); });
    for (int l = threadIdx.x; l < nl; l += blockDim.x) lse[b * L + l0 + l] = m_sh[l] + logf(l_sh[l]);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

inline plan::SmemCount bwd_smem(int TL, int TS, int ld) {
  plan::SmemCount s;
  s.take(TL * ld).take(TL * ld).take(TS * ld).take(TS * ld).take(TS * TL).take(TS * TL);
  s.take(6 * TL);
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dispatch_bwd_chunk(const T* __restrict__ g, View gv, const T* __restrict__ x, View xv, const float* __restrict__ qs,
                       View qv, const T* __restrict__ sl, View sv, const float* __restrict__ lse, int64_t L, int S,
                       int C, int TL, int TS, int ld, int nst, int64_t chunk_len, int nchunks, T* __restrict__ dx,
                       float* __restrict__ ws_dq, float* __restrict__ ws_dv) {
  GLMIX_DYNAMIC_SMEM(float, smem);
  SmemCarve carve{smem};
  float* x_sh = carve.take(TL * ld);
  float* h_sh = carve.take(TL * ld);  // grad tile; then dK for the per-pixel projection
  float* q_sh = carve.take(TS * ld);
  float* v_sh = carve.take(TS * ld);  // slots
  float* d_sh = carve.take(TS * TL);  // logits, then D, [s][l]
  float* e_sh = carve.take(TS * TL);  // dD, then dA, [s][l]
  float* rn_sh = carve.take(TL);
  float* live_sh = carve.take(TL);
  float* lse_sh = carve.take(TL);
  float* dl_sh = carve.take(TL);  // delta'
  float* ds_sh = carve.take(TL);  // sum_s D, to normalise delta' (several slot tiles)
  float* dot_sh = carve.take(TL);

  const int chunk = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t l_begin = chunk * chunk_len;
  const int64_t l_end = min(L, l_begin + chunk_len);
  const T* xb = x + b * xv.sb;
  const T* gb = g + b * gv.sb;
  const float* qb = qs + b * qv.sb;
  const T* sb = sl + b * sv.sb;
  const int64_t ws_off = (b * nchunks + chunk) * static_cast<int64_t>(S) * C;
  float* wq = ws_dq + ws_off;
  float* wv = ws_dv + ws_off;

  float dq[kBwdAcc], dv[kBwdAcc];
#pragma unroll
  for (int i = 0; i < kBwdAcc; ++i) dq[i] = dv[i] = 0.f;
  int loaded = -1, ns = 0;

  // Loads slot tile st (if not already there) and fills d_sh = D, e_sh = dD for the pixel tile.
  // Starts and ends on a barrier-separated state: callers need no extra sync around it.
  auto probabilities = [&](int st, int nl) {
    load_slot_tile(st, TS, S, C, ld, loaded, ns, q_sh, qb, qv, v_sh, sb, sv);
    __syncthreads();
    pair_dots(q_sh, ld, ns, x_sh, ld, nl, C, d_sh, TL);
    pair_dots(v_sh, ld, ns, h_sh, ld, nl, C, e_sh, TL);
    __syncthreads();
    for (int e = threadIdx.x; e < ns * nl; e += blockDim.x) {
      const int s = e / nl, l = e - s * nl, o = s * TL + l;
      d_sh[o] = expf(d_sh[o] * rn_sh[l] - lse_sh[l]);
    }
    __syncthreads();
  };

  for (int64_t l0 = l_begin; l0 < l_end; l0 += TL) {
    const bool first_tile = l0 == l_begin;
    const int nl = static_cast<int>(min(static_cast<int64_t>(TL), l_end - l0));
    const int nx = nl * C;
    __syncthreads();  // readers of the previous tile are done
    load_tile(x_sh, ld, xb, xv.sr, xv.sc, l0, nl, C);
    load_tile(h_sh, ld, gb, gv.sr, gv.sc, l0, nl, C);
    for (int l = threadIdx.x; l < nl; l += blockDim.x) {
      lse_sh[l] = lse[b * L + l0 + l];
      dl_sh[l] = 0.f;
      ds_sh[l] = 0.f;
    }
    __syncthreads();
    row_rnorms(x_sh, ld, nl, C, rn_sh, live_sh);

    // delta'[l] = sum_s D dD / sum_s D. The recomputed D sums to 1 only up to lse's rounding
    // (about |A| * 2^-24, visible at large temperatures); dividing keeps sum_s dA = 0 exactly.
    if (nst > 1) {
      for (int st = 0; st < nst; ++st) {
        probabilities(st, nl);
        for (int l = threadIdx.x; l < nl; l += blockDim.x) {
          float a = dl_sh[l], p = ds_sh[l];
          for (int s = 0; s < ns; ++s) {
            a = fmaf(d_sh[s * TL + l], e_sh[s * TL + l], a);
            p += d_sh[s * TL + l];
          }
          dl_sh[l] = a;
          ds_sh[l] = p;
        }
      }
      for (int l = threadIdx.x; l < nl; l += blockDim.x) dl_sh[l] /= ds_sh[l];  // same thread's l
    }

    float dk[kBwdAcc];
#pragma unroll
    for (int i = 0; i < kBwdAcc; ++i) dk[i] = 0.f;
    for (int st = 0; st < nst; ++st) {
      const int s0 = st * TS;
      probabilities(st, nl);
      if (nst == 1) {
        for (int l = threadIdx.x; l < nl; l += blockDim.x) {
          float a = 0.f, p = 0.f;
          for (int s = 0; s < ns; ++s) {
            a = fmaf(d_sh[s * TL + l], e_sh[s * TL + l], a);
            p += d_sh[s * TL + l];
          }
          dl_sh[l] = a / p;
        }
        __syncthreads();
      }
      for (int e = threadIdx.x; e < ns * nl; e += blockDim.x) {
        const int s = e / nl, l = e - s * nl, o = s * TL + l;
        e_sh[o] = d_sh[o] * (e_sh[o] - dl_sh[l]);
      }
      __syncthreads();
      // Per pixel: dK[l][c] += sum_s dA[s][l] qs[s][c].
      for_each_acc<kBwdAcc>(nx, C, [&](int i, int, int l, int c) {
        float k = dk[i];
        for (int s = 0; s < ns; ++s) k = fmaf(e_sh[s * TL + l], q_sh[s * ld + c], k);
        dk[i] = k;
      });
      // Per slot: dqs[s][c] += sum_l dA[s][l] K[l][c], dslots[s][c] += sum_l D[s][l] grad[l][c].
      const int nq = ns * C;
      for_each_acc<kBwdAcc>(nq, C, [&](int i, int, int s, int c) {
        const float* arow = e_sh + s * TL;
        const float* drow = d_sh + s * TL;
        float a = dq[i], v = dv[i];
        for (int l = 0; l < nl; ++l) {
          a = fmaf(arow[l] * rn_sh[l], x_sh[l * ld + c], a);
          v = fmaf(drow[l], h_sh[l * ld + c], v);
        }
        dq[i] = a;
        dv[i] = v;
      });
      if (nst > 1) {
        const int64_t o = static_cast<int64_t>(s0) * C;
        flush_acc(nq, first_tile, wq + o, dq, wv + o, dv);
      }
    }

    // dx = (dK - K <K, dK>) / max(||x||, eps): no value path.
    __syncthreads();  // every reader of h_sh (the grad tile) is done: reuse it for dK
    dx_epilogue(x_sh, h_sh, ld, rn_sh, live_sh, dot_sh, nl, C, dk, nullptr, dx + (b * L + l0) * C);
  }

  if (nst == 1) store_acc(ns * C, wq, dq, wv, dv);
}

}  // namespace dispatch
}  // namespace GLMIX_CUDA_NS
}  // namespace glmix
