// The elementwise passes over a tile, for T = float and double, defined in passes.cpp and
// compiled per ISA. Tiles are row-major: x and dx (n, C), logits and their gradients (n, S) with
// row stride ld (two (n, S) blocks may share the rows of one (n, 2S) buffer).
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace glmix::cpu {

// The softmax axis of a tile of logits: over pixels (clustering: statistics per slot, i.e. per
// column) or over slots (dispatch: statistics per pixel, i.e. per row).
enum class Over { Pixels, Slots };

// dst (n, C) with row stride ldd = the transpose of src (C, n) with row stride ld: a tile of the
// NCHW view of x, or a transposed operand.
void transpose(const float* src, int64_t ld, int64_t n, int64_t C, float* dst, int64_t ldd);

#define GLMIX_DECLARE_TILE_KERNELS(T)                                                                            \
  /* rinv[l] = 1 / max(||x_l||, eps) and the normalisation's backward coefficient proj[l] */                     \
  void inverse_norms(const T* x, int64_t n, int64_t C, T* rinv, T* proj);                                        \
  /* dx_l -= proj[l] <x_l, dx_l> x_l */                                                                          \
  void project_out(T* dx, const T* x, int64_t n, int64_t C, const T* proj);                                      \
  /* clustering, per tile: m[s] = max_l a[l, s] rinv[l]; then a[l, s] = exp(a[l, s] rinv[l] -                    \
     shift[s]) and sum[s] = its sum over the tile's pixels */                                                    \
  void column_max(const T* a, int64_t n, int64_t S, int64_t ld, const T* rinv, T* m);                            \
  void exp_columns(T* a, int64_t n, int64_t S, int64_t ld, const T* rinv, const T* shift, T* sum);               \
  /* dispatch: each row of a a[l, :] rinv[l] replaced by its softmax; lse[l] its log-sum-exp */                  \
  void softmax_rows(T* a, int64_t n, int64_t S, int64_t ld, const T* rinv, T* lse);                              \
  /* Both backwards, from raw logits a (before the norms) and dP in d: a becomes                                 \
     P = exp(a rinv - lse) and d becomes dA / r = P (dP - delta) rinv. Over::Pixels: lse and delta               \
     per slot (delta given); Over::Slots: per pixel, delta = sum_s P dP / sum_s P computed here. */              \
  void softmax_backward(T* a, int64_t lda, T* d, int64_t ldd, int64_t n, int64_t S, const T* rinv, const T* lse, \
                        const T* delta, Over over);                                                              \
  /* a[s, c] *= w[s] */                                                                                          \
  void scale_rows(T* a, int64_t S, int64_t C, const T* w);                                                       \
  /* sum[s] += sum_l d[l, s] / rinv[l]: dA's sums over the tile's pixels, from dA / r */                         \
  void column_sums(const T* d, int64_t n, int64_t S, int64_t ld, const T* rinv, T* sum);                         \
  /* a[s, c] -= u[s] v[c] */                                                                                     \
  void subtract_outer(T* a, int64_t S, int64_t C, const T* u, const T* v);                                       \
  /* out[r] = <a row r, b row r> for rows (rows, C) of both */                                                   \
  void row_dots(const T* a, const T* b, int64_t rows, int64_t C, T* out);                                        \
  /* out[c] = (sum_j w[j] a[j * stride + c]) * k, summed in j order: rows of chunk partials merged */            \
  void weighted_sum(const T* a, int64_t J, int64_t stride, int64_t C, const T* w, T k, T* out);

GLMIX_DECLARE_TILE_KERNELS(float)
GLMIX_DECLARE_TILE_KERNELS(double)
#undef GLMIX_DECLARE_TILE_KERNELS

// The scaled queries qs = scale * normalize(init_slots) and their backward (csrc/queries.cpp), on
// one batch element of init_slots, src (S, C) with strides (ss, sc) where sc == 1 (rows) or ss == 1
// (channels-major: pooled slots, (C, S) in memory). Norms, projection and batch sum in fp64; q is
// rounded to A before the product with the scale.
#define GLMIX_DECLARE_QUERY_PASSES(T, A)                                                                               \
  /* qs in src's layout: (S, C) rows for sc == 1, else (C, S) for ss == 1; row stride ldq */                           \
  void scaled_queries(const T* src, int64_t S, int64_t C, int64_t ss, int64_t sc, double scale, A* qs, int64_t ldq);   \
  /* d_init (S, C) contiguous from dqs (S, C) contiguous summed over nb batch elements batch_stride apart;             \
     adds sum(dqs * (q - q_mean)) to dscale (q_mean: null for none) */                                                 \
  void scaled_queries_backward(const A* dqs, int64_t nb, int64_t batch_stride, const T* src, int64_t S, int64_t C,     \
                               int64_t ss, int64_t sc, double scale, const double* q_mean, T* d_init, double* dscale); \
  /* q_mean (C) = the mean of the S queries q = normalize(src), in fp64 */                                             \
  void query_mean(const T* src, int64_t S, int64_t C, int64_t ss, int64_t sc, double* q_mean);

GLMIX_DECLARE_QUERY_PASSES(c10::Half, float)
GLMIX_DECLARE_QUERY_PASSES(c10::BFloat16, float)
GLMIX_DECLARE_QUERY_PASSES(float, float)
GLMIX_DECLARE_QUERY_PASSES(double, double)
#undef GLMIX_DECLARE_QUERY_PASSES

}  // namespace glmix::cpu
