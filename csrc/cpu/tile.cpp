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

template <typename T>
C10_ALWAYS_INLINE void row_dots_impl(const T* a, const T* b, int64_t n, int64_t C, T* out) {
  for (int64_t l = 0; l < n; ++l) out[l] = dot(a + l * C, b + l * C, C);
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
#pragma omp simd
      for (int64_t l = 0; l < n; ++l) m[l] = std::max(m[l], row[l] * rinv[l]);
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
#define GLMIX_DEFINE_TILE_KERNELS(T)                                                                      \
  GLMIX_CLONES void inverse_norms(const T* x, int64_t n, int64_t C, T* rinv, T* proj) {                  \
    inverse_norms_impl(x, n, C, rinv, proj);                                                             \
  }                                                                                                      \
  GLMIX_CLONES void project_out(T* dx, const T* x, int64_t n, int64_t C, const T* proj) {                \
    project_out_impl(dx, x, n, C, proj);                                                                 \
  }                                                                                                      \
  GLMIX_CLONES void row_dots(const T* a, const T* b, int64_t n, int64_t C, T* out) {                     \
    row_dots_impl(a, b, n, C, out);                                                                      \
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
