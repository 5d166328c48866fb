// The elementwise passes over a tile (declared in tile.h), written as plain loops that the
// compiler vectorises. The extension is compiled for the baseline ISA so that it loads anywhere;
// with GCC on x86-64 Linux each pass is also compiled for AVX2+FMA and AVX-512 and the loader
// picks the best clone for the CPU (function multiversioning). That matters most for the exp,
// about 5x faster with AVX-512 than with SSE2; ATen's own vectorised exp is not callable per
// element, and its tensor exp_ (MKL's high-accuracy VML) costs more than the tile's products.
#include "tile.h"

#include <cstring>

#include <c10/macros/Macros.h>

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define GLMIX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GLMIX_CLONES
#endif

namespace glmix::cpu {
namespace {

// Cephes' expf, branch-free so that it vectorises: exp(x) = 2^k exp(r), k = round(x / ln 2),
// |r| <= ln 2 / 2, degree-6 polynomial; within 2 ulp of expf. 0 below -87.3 (where expf goes
// denormal); NaN stays NaN.
C10_ALWAYS_INLINE float exp_approx(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.0f);
  const float kf = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = (xc - kf * 0.693359375f) - kf * -2.12194440e-4f;          // x - k ln 2, two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;  // 2^k
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.3f ? 0.f : y * scale;
}

// float64 is the gradcheck dtype: exact beats fast.
C10_ALWAYS_INLINE double exp_approx(double x) {
  return std::exp(x);
}

template <typename T>
C10_ALWAYS_INLINE T dot(const T* a, const T* b, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
// 8 x 8 blocks through registers: three rounds of shuffles, which the compiler maps onto the
// clone's ISA; about 6x faster than an element-by-element copy.
typedef float Float8 __attribute__((vector_size(32)));

C10_ALWAYS_INLINE void transpose8x8(const float* src, int64_t ld, float* dst, int64_t ldd) {
  Float8 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&r[i], src + i * ld, sizeof(Float8));
  for (int i = 0; i < 8; i += 2) {  // interleave row pairs
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {  // then pairs of pairs: columns (k, k + 4) of four rows
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int k = 0; k < 4; ++k) {  // then the halves of rows 0-3 and 4-7
    const Float8 lo = __builtin_shufflevector(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    const Float8 hi = __builtin_shufflevector(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    std::memcpy(dst + k * ldd, &lo, sizeof(Float8));
    std::memcpy(dst + (k + 4) * ldd, &hi, sizeof(Float8));
  }
}
constexpr int64_t kTransposeBlock = 8;
#else
constexpr int64_t kTransposeBlock = 0;  // element by element
#endif

C10_ALWAYS_INLINE void transpose_impl(const float* src, int64_t ld, int64_t n, int64_t C, float* dst) {
  const int64_t nb = kTransposeBlock ? n / kTransposeBlock * kTransposeBlock : 0;
  const int64_t Cb = kTransposeBlock ? C / kTransposeBlock * kTransposeBlock : 0;
  for (int64_t l = 0; l < n; ++l)  // what the blocks leave: the last rows, the last columns
    for (int64_t c = l < nb ? Cb : 0; c < C; ++c) dst[l * C + c] = src[c * ld + l];
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  for (int64_t l = 0; l < nb; l += 8)
    for (int64_t c = 0; c < Cb; c += 8) transpose8x8(src + c * ld + l, ld, dst + l * C + c, C);
#endif
}

template <typename T>
C10_ALWAYS_INLINE void inverse_norms_impl(const T* x, int64_t n, int64_t C, T* rinv, T* proj) {
  constexpr T eps = 1e-12;  // torch.nn.functional.normalize's
  for (int64_t l = 0; l < n; ++l) {
    const T norm = std::sqrt(dot(x + l * C, x + l * C, C));
    rinv[l] = T(1) / std::max(norm, eps);
    // Below eps the norm is clamped to a constant and only the division carries a gradient.
    proj[l] = norm > eps ? rinv[l] * rinv[l] : T(0);
  }
}

template <typename T>
C10_ALWAYS_INLINE void project_out_impl(T* dx, const T* x, int64_t n, int64_t C, const T* proj) {
  for (int64_t l = 0; l < n; ++l) {
    T* d = dx + l * C;
    const T* xr = x + l * C;
    const T k = proj[l] * dot(xr, d, C);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) d[c] -= k * xr[c];
  }
}

// Dividing by sum_s p makes sum_s dA = 0 (the softmax's shift invariance) however far
// p = exp(A - lse) is from summing to 1: with large temperatures lse carries an absolute error
// of |A| * eps, and without the division that error would reach dA as (1 - sum_s p) dD.
template <typename T>
C10_ALWAYS_INLINE void slot_delta_impl(const T* p, const T* d, int64_t S, int64_t n, T* delta) {
  constexpr int64_t kChunk = 64;  // the column sums stay in registers / L1
  T pd[kChunk], psum[kChunk];
  for (int64_t l0 = 0; l0 < n; l0 += kChunk) {
    const int64_t m = std::min(kChunk, n - l0);
    std::fill(pd, pd + m, T(0));
    std::fill(psum, psum + m, T(0));
    for (int64_t s = 0; s < S; ++s) {
      const T* pr = p + s * n + l0;
      const T* dr = d + s * n + l0;
#pragma omp simd
      for (int64_t l = 0; l < m; ++l) {
        pd[l] += pr[l] * dr[l];
        psum[l] += pr[l];
      }
    }
    for (int64_t l = 0; l < m; ++l) delta[l0 + l] = pd[l] / psum[l];
  }
}

template <typename T>
C10_ALWAYS_INLINE void softmax_max_impl(const T* a, int64_t S, int64_t n, const T* rinv, Over over, T* m) {
  if (over == Over::Slots) std::fill(m, m + n, -std::numeric_limits<T>::infinity());
  for (int64_t s = 0; s < S; ++s) {
    const T* row = a + s * n;
    if (over == Over::Pixels) {
      T rmax = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : rmax)
      for (int64_t l = 0; l < n; ++l) rmax = std::max(rmax, row[l] * rinv[l]);
      m[s] = rmax;
    } else {
      // A select on values, not std::max's reference: this form vectorises.
#pragma omp simd
      for (int64_t l = 0; l < n; ++l) {
        const T v = row[l] * rinv[l];
        m[l] = m[l] < v ? v : m[l];
      }
    }
  }
}

template <typename T>
C10_ALWAYS_INLINE void softmax_exp_impl(T* a, int64_t S, int64_t n, const T* rinv, const T* shift, Over over,
                                        T* sum) {
  if (sum != nullptr && over == Over::Slots) std::fill(sum, sum + n, T(0));
  for (int64_t s = 0; s < S; ++s) {
    T* row = a + s * n;
    if (over == Over::Pixels) {
      const T m = shift[s];
      T rsum = 0;
#pragma omp simd reduction(+ : rsum)
      for (int64_t l = 0; l < n; ++l) {
        row[l] = exp_approx(row[l] * rinv[l] - m);
        rsum += row[l];
      }
      if (sum != nullptr) sum[s] = rsum;
    } else {
#pragma omp simd
      for (int64_t l = 0; l < n; ++l) row[l] = exp_approx(row[l] * rinv[l] - shift[l]);
      if (sum != nullptr) {
#pragma omp simd
        for (int64_t l = 0; l < n; ++l) sum[l] += row[l];
      }
    }
  }
}

template <typename T>
C10_ALWAYS_INLINE void softmax_backward_impl(const T* p, T* d, int64_t S, int64_t n, const T* delta, Over over,
                                             const T* rinv) {
  for (int64_t s = 0; s < S; ++s) {
    const T* prow = p + s * n;
    T* drow = d + s * n;
    if (over == Over::Pixels) {
      const T ds = delta[s];
#pragma omp simd
      for (int64_t l = 0; l < n; ++l) drow[l] = prow[l] * (drow[l] - ds) * rinv[l];
    } else {
#pragma omp simd
      for (int64_t l = 0; l < n; ++l) drow[l] = prow[l] * (drow[l] - delta[l]) * rinv[l];
    }
  }
}

template <typename T>
C10_ALWAYS_INLINE void scale_columns_impl(T* a, int64_t S, int64_t n, const T* w) {
  for (int64_t s = 0; s < S; ++s) {
    T* row = a + s * n;
#pragma omp simd
    for (int64_t l = 0; l < n; ++l) row[l] *= w[l];
  }
}

template <typename T>
C10_ALWAYS_INLINE void scale_rows_impl(T* a, int64_t S, int64_t C, const T* w) {
  for (int64_t s = 0; s < S; ++s) {
    T* row = a + s * C;
    const T ws = w[s];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) row[c] *= ws;
  }
}

}  // namespace

// One multiversioned entry point per pass and dtype; the templates above inline into each clone.
GLMIX_CLONES void transpose(const float* src, int64_t ld, int64_t n, int64_t C, float* dst) {
  transpose_impl(src, ld, n, C, dst);
}

#define GLMIX_DEFINE_TILE_KERNELS(T)                                                                      \
  GLMIX_CLONES void inverse_norms(const T* x, int64_t n, int64_t C, T* rinv, T* proj) {                  \
    inverse_norms_impl(x, n, C, rinv, proj);                                                             \
  }                                                                                                      \
  GLMIX_CLONES void project_out(T* dx, const T* x, int64_t n, int64_t C, const T* proj) {                \
    project_out_impl(dx, x, n, C, proj);                                                                 \
  }                                                                                                      \
  GLMIX_CLONES void slot_delta(const T* p, const T* d, int64_t S, int64_t n, T* delta) {                 \
    slot_delta_impl(p, d, S, n, delta);                                                                  \
  }                                                                                                      \
  GLMIX_CLONES void softmax_max(const T* a, int64_t S, int64_t n, const T* rinv, Over over, T* m) {      \
    softmax_max_impl(a, S, n, rinv, over, m);                                                            \
  }                                                                                                      \
  GLMIX_CLONES void softmax_exp(T* a, int64_t S, int64_t n, const T* rinv, const T* shift, Over over,    \
                                T* sum) {                                                                \
    softmax_exp_impl(a, S, n, rinv, shift, over, sum);                                                   \
  }                                                                                                      \
  GLMIX_CLONES void softmax_backward(const T* p, T* d, int64_t S, int64_t n, const T* delta, Over over, \
                                     const T* rinv) {                                                    \
    softmax_backward_impl(p, d, S, n, delta, over, rinv);                                                \
  }                                                                                                      \
  GLMIX_CLONES void scale_columns(T* a, int64_t S, int64_t n, const T* w) {                              \
    scale_columns_impl(a, S, n, w);                                                                      \
  }                                                                                                      \
  GLMIX_CLONES void scale_rows(T* a, int64_t S, int64_t C, const T* w) {                                 \
    scale_rows_impl(a, S, C, w);                                                                         \
  }

GLMIX_DEFINE_TILE_KERNELS(float)
GLMIX_DEFINE_TILE_KERNELS(double)

}  // namespace glmix::cpu
