// The elementwise passes over a tile, for T = float and double, defined in passes.cpp and
// compiled per ISA. Tiles are row-major: x and dx (n, C), logits and their gradients (n, S) with
// row stride ld (two (n, S) blocks may share the rows of one (n, 2S) buffer).
#pragma once

#include <cstdint>

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
  void scale_rows(T* a, int64_t S, int64_t C, const T* w);

GLMIX_DECLARE_TILE_KERNELS(float)
GLMIX_DECLARE_TILE_KERNELS(double)
#undef GLMIX_DECLARE_TILE_KERNELS

}  // namespace glmix::cpu
