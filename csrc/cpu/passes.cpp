// The elementwise passes over a tile (declared in tile.h), written as plain loops that the
// compiler vectorises. The extension is compiled for the baseline ISA so that it loads anywhere;
// with GCC on x86-64 Linux each pass is also compiled for AVX2+FMA and AVX-512 and the loader
// picks the best clone for the CPU (function multiversioning). That matters most for the exp,
// about 5x faster with AVX-512 than with SSE2; ATen's own vectorised exp is not callable per
// element, and its tensor exp_ (MKL's high-accuracy VML) costs more than the tile's products.
#include "tile.h"

#include <cstring>
#include <vector>

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
  const float r = (xc - kf * 0.693359375f) - kf * -2.12194440e-4f;         // x - k ln 2, two parts
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
C10_ALWAYS_INLINE double exp_approx(double x) { return std::exp(x); }

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

C10_ALWAYS_INLINE void transpose_impl(const float* src, int64_t ld, int64_t n, int64_t C, float* dst, int64_t ldd) {
  const int64_t nb = kTransposeBlock ? n / kTransposeBlock * kTransposeBlock : 0;
  const int64_t Cb = kTransposeBlock ? C / kTransposeBlock * kTransposeBlock : 0;
  for (int64_t l = 0; l < n; ++l)  // what the blocks leave: the last rows, the last columns
    for (int64_t c = l < nb ? Cb : 0; c < C; ++c) dst[l * ldd + c] = src[c * ld + l];
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  for (int64_t l = 0; l < nb; l += 8)
    for (int64_t c = 0; c < Cb; c += 8) transpose8x8(src + c * ld + l, ld, dst + l * ldd + c, ldd);
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

template <typename T>
C10_ALWAYS_INLINE void column_max_impl(const T* a, int64_t n, int64_t S, int64_t ld, const T* rinv, T* m) {
  std::fill(m, m + S, -std::numeric_limits<T>::infinity());
  for (int64_t l = 0; l < n; ++l) {
    const T* row = a + l * ld;
    const T r = rinv[l];
    // A select on values, not std::max's reference: this form vectorises.
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) {
      const T v = row[s] * r;
      m[s] = m[s] < v ? v : m[s];
    }
  }
}

template <typename T>
C10_ALWAYS_INLINE void exp_columns_impl(T* a, int64_t n, int64_t S, int64_t ld, const T* rinv, const T* shift, T* sum) {
  std::fill(sum, sum + S, T(0));
  for (int64_t l = 0; l < n; ++l) {
    T* row = a + l * ld;
    const T r = rinv[l];
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) {
      row[s] = exp_approx(row[s] * r - shift[s]);
      sum[s] += row[s];
    }
  }
}

template <typename T>
C10_ALWAYS_INLINE void softmax_rows_impl(T* a, int64_t n, int64_t S, int64_t ld, const T* rinv, T* lse) {
  for (int64_t l = 0; l < n; ++l) {
    T* row = a + l * ld;
    const T r = rinv[l];
    T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t s = 0; s < S; ++s) m = std::max(m, row[s] * r);
    T z = 0;
#pragma omp simd reduction(+ : z)
    for (int64_t s = 0; s < S; ++s) {
      row[s] = exp_approx(row[s] * r - m);
      z += row[s];
    }
    const T zinv = T(1) / z;
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) row[s] *= zinv;
    lse[l] = m + std::log(z);
  }
}

// Over::Slots divides by sum_s P, which makes sum_s dA = 0 (the softmax's shift invariance)
// however far P = exp(A - lse) is from summing to 1: with large temperatures lse carries an
// absolute error of |A| eps, and without the division that error would reach dA as (1 - sum_s P) dD.
template <typename T>
C10_ALWAYS_INLINE void softmax_backward_impl(T* a, int64_t lda, T* d, int64_t ldd, int64_t n, int64_t S, const T* rinv,
                                             const T* lse, const T* delta, Over over) {
  for (int64_t l = 0; l < n; ++l) {
    T* p = a + l * lda;
    T* dr = d + l * ldd;
    const T r = rinv[l];
    if (over == Over::Pixels) {
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) {
        p[s] = exp_approx(p[s] * r - lse[s]);
        dr[s] = p[s] * (dr[s] - delta[s]) * r;
      }
    } else {
      T pd = 0, psum = 0;
#pragma omp simd reduction(+ : pd, psum)
      for (int64_t s = 0; s < S; ++s) {
        p[s] = exp_approx(p[s] * r - lse[l]);
        pd += p[s] * dr[s];
        psum += p[s];
      }
      const T dl = pd / psum;
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) dr[s] = p[s] * (dr[s] - dl) * r;
    }
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

template <typename T>
C10_ALWAYS_INLINE void column_sums_impl(const T* d, int64_t n, int64_t S, int64_t ld, const T* rinv, T* sum) {
  for (int64_t l = 0; l < n; ++l) {
    const T* row = d + l * ld;
    const T r = T(1) / rinv[l];
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) sum[s] += row[s] * r;
  }
}

template <typename T>
C10_ALWAYS_INLINE void subtract_outer_impl(T* a, int64_t S, int64_t C, const T* u, const T* v) {
  for (int64_t s = 0; s < S; ++s) {
    T* row = a + s * C;
    const T us = u[s];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) row[c] -= us * v[c];
  }
}

// ---------------------------------------------------------------------------------------------
// The scaled queries and their backward: S x C work per call, but at small L as long as a kernel's
// tile loop when it ran as scalar fp64 code, so here with the vector clones too.

constexpr double kNormEps = 1e-12;  // F.normalize's: a zero slot gives a zero query

// The calling thread's buffer of n elements of T, reused from call to call; kRole keeps apart
// buffers that are live at once (for T = double they would otherwise be one vector).
template <typename T, int kRole = 0>
T* thread_buffer(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

C10_ALWAYS_INLINE double inverse_norm(double norm) { return 1.0 / std::max(norm, kNormEps); }

template <typename T>
C10_ALWAYS_INLINE double row_norm(const T* row, int64_t C) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < C; ++c) sum += static_cast<double>(row[c]) * static_cast<double>(row[c]);
  return std::sqrt(sum);
}

// norms[s] of channels-major src (C, S), row stride ld: summed in channel order, the slots in
// the vector lanes, so every read is along a row; blocks of kLanes slots keep their sums in
// registers across all C rows.
template <typename T>
C10_ALWAYS_INLINE void column_norms(const T* src, int64_t S, int64_t C, int64_t ld, double* norms) {
  constexpr int64_t kLanes = 16;
  int64_t s0 = 0;
  for (; s0 + kLanes <= S; s0 += kLanes) {
    double sum[kLanes] = {};
    for (int64_t c = 0; c < C; ++c) {
      const T* row = src + c * ld + s0;
#pragma omp simd
      for (int64_t k = 0; k < kLanes; ++k) sum[k] += static_cast<double>(row[k]) * static_cast<double>(row[k]);
    }
    for (int64_t k = 0; k < kLanes; ++k) norms[s0 + k] = std::sqrt(sum[k]);
  }
  if (s0 == S) return;
  std::fill(norms + s0, norms + S, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    const T* row = src + c * ld;
    for (int64_t s = s0; s < S; ++s) norms[s] += static_cast<double>(row[s]) * static_cast<double>(row[s]);
  }
  for (int64_t s = s0; s < S; ++s) norms[s] = std::sqrt(norms[s]);
}

// dst (n, C) contiguous = the transpose of src (C, n), row stride ld.
template <typename T>
C10_ALWAYS_INLINE void transpose_rows(const T* src, int64_t ld, int64_t n, int64_t C, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    transpose_impl(src, ld, n, C, dst, C);
  } else {
    constexpr int64_t kBlock = 8;  // 8 source lines in flight, 8 destination rows filled in L1
    for (int64_t l0 = 0; l0 < n; l0 += kBlock)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t l = l0; l < std::min(n, l0 + kBlock); ++l) dst[l * C + c] = src[c * ld + l];
  }
}

template <typename T, typename A>
C10_ALWAYS_INLINE void scaled_queries_impl(const T* src, int64_t S, int64_t C, int64_t ss, int64_t sc, double scale,
                                           A* qs, int64_t ldq) {
  const A scale_a = static_cast<A>(scale);
  if (sc == 1) {
    for (int64_t s = 0; s < S; ++s) {
      const T* row = src + s * ss;
      // A product with 1 / r, not a division per element: within an fp64 ulp, and cheaper.
      const double rinv = inverse_norm(row_norm(row, C));
      A* q = qs + s * ldq;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) q[c] = static_cast<A>(static_cast<double>(row[c]) * rinv) * scale_a;
    }
    return;
  }
  double* rinv = thread_buffer<double>(S);
  column_norms(src, S, C, sc, rinv);
  for (int64_t s = 0; s < S; ++s) rinv[s] = inverse_norm(rinv[s]);
  for (int64_t c = 0; c < C; ++c) {
    const T* row = src + c * sc;
    A* q = qs + c * ldq;
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) q[s] = static_cast<A>(static_cast<double>(row[s]) * rinv[s]) * scale_a;
  }
}

// The rows of src (S, C) with row stride *ld (src itself, or for channels-major src a transposed
// copy in the calling thread's buffer) and their norms, as the forward sums them.
template <typename T>
C10_ALWAYS_INLINE const T* query_rows(const T* src, int64_t S, int64_t C, int64_t ss, int64_t sc, double* norms,
                                      int64_t* ld) {
  *ld = ss;
  if (sc == 1) {
    for (int64_t s = 0; s < S; ++s) norms[s] = row_norm(src + s * ss, C);
    return src;
  }
  column_norms(src, S, C, sc, norms);
  T* buf = thread_buffer<T, 1>(S * C);
  transpose_rows(src, sc, S, C, buf);
  *ld = C;
  return buf;
}

template <typename T>
C10_ALWAYS_INLINE void query_mean_impl(const T* src, int64_t S, int64_t C, int64_t ss, int64_t sc, double* q_mean) {
  double* norms = thread_buffer<double>(S);
  int64_t ld = 0;
  const T* rows = query_rows(src, S, C, ss, sc, norms, &ld);
  std::fill(q_mean, q_mean + C, 0.0);
  for (int64_t s = 0; s < S; ++s) {
    const T* row = rows + s * ld;
    const double w = inverse_norm(norms[s]) / static_cast<double>(S);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) q_mean[c] += static_cast<double>(row[c]) * w;
  }
}

template <typename T, typename A>
C10_ALWAYS_INLINE void scaled_queries_backward_impl(const A* dqs, int64_t nb, int64_t batch_stride, const T* src,
                                                    int64_t S, int64_t C, int64_t ss, int64_t sc, double scale,
                                                    const double* q_mean, T* d_init, double* dscale) {
  double* norms = thread_buffer<double>(S + C);
  double* dq = norms + S;
  int64_t ld = 0;
  const T* rows = query_rows(src, S, C, ss, sc, norms, &ld);
  for (int64_t s = 0; s < S; ++s) {
    const T* row = rows + s * ld;
    const double norm = norms[s], rinv = inverse_norm(norm);
    // A (1, S, C) init_slots was broadcast over the batch: its gradient is the batch sum.
    const A* g = dqs + s * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) dq[c] = static_cast<double>(g[c]);
    for (int64_t b = 1; b < nb; ++b) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dq[c] += static_cast<double>(g[b * batch_stride + c]);
    }
    double dot = 0;  // <q, dqs>
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < C; ++c) dot += static_cast<double>(row[c]) * rinv * dq[c];
    if (q_mean == nullptr) {
      *dscale += dot;
    } else {  // <q - q_mean, dqs>: the same sum over the slots where dqs sums to zero over them
      double centred = 0;
#pragma omp simd reduction(+ : centred)
      for (int64_t c = 0; c < C; ++c) centred += (static_cast<double>(row[c]) * rinv - q_mean[c]) * dq[c];
      *dscale += centred;
    }
    // (dq - q <q, dq>) / r with dq = scale * dqs; below eps the clamp passes no norm gradient.
    const double proj = norm >= kNormEps ? scale * dot : 0.0;
    T* d = d_init + s * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c)
      d[c] = static_cast<T>((scale * dq[c] - static_cast<double>(row[c]) * rinv * proj) * rinv);
  }
}

template <typename T>
C10_ALWAYS_INLINE void row_dots_impl(const T* a, const T* b, int64_t rows, int64_t C, T* out) {
  for (int64_t r = 0; r < rows; ++r) out[r] = dot(a + r * C, b + r * C, C);
}

template <typename T>
C10_ALWAYS_INLINE void weighted_sum_impl(const T* a, int64_t J, int64_t stride, int64_t C, const T* w, T k, T* out) {
  const T w0 = w[0];
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) out[c] = w0 * a[c];
  for (int64_t j = 1; j < J; ++j) {
    const T* aj = a + j * stride;
    const T wj = w[j];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] += wj * aj[c];
  }
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) out[c] *= k;
}

}  // namespace

// One multiversioned entry point per pass and dtype; the templates above inline into each clone.
GLMIX_CLONES void transpose(const float* src, int64_t ld, int64_t n, int64_t C, float* dst, int64_t ldd) {
  transpose_impl(src, ld, n, C, dst, ldd);
}

#define GLMIX_DEFINE_TILE_KERNELS(T)                                                                             \
  GLMIX_CLONES void inverse_norms(const T* x, int64_t n, int64_t C, T* rinv, T* proj) {                          \
    inverse_norms_impl(x, n, C, rinv, proj);                                                                     \
  }                                                                                                              \
  GLMIX_CLONES void project_out(T* dx, const T* x, int64_t n, int64_t C, const T* proj) {                        \
    project_out_impl(dx, x, n, C, proj);                                                                         \
  }                                                                                                              \
  GLMIX_CLONES void column_max(const T* a, int64_t n, int64_t S, int64_t ld, const T* rinv, T* m) {              \
    column_max_impl(a, n, S, ld, rinv, m);                                                                       \
  }                                                                                                              \
  GLMIX_CLONES void exp_columns(T* a, int64_t n, int64_t S, int64_t ld, const T* rinv, const T* shift, T* sum) { \
    exp_columns_impl(a, n, S, ld, rinv, shift, sum);                                                             \
  }                                                                                                              \
  GLMIX_CLONES void softmax_rows(T* a, int64_t n, int64_t S, int64_t ld, const T* rinv, T* lse) {                \
    softmax_rows_impl(a, n, S, ld, rinv, lse);                                                                   \
  }                                                                                                              \
  GLMIX_CLONES void softmax_backward(T* a, int64_t lda, T* d, int64_t ldd, int64_t n, int64_t S, const T* rinv,  \
                                     const T* lse, const T* delta, Over over) {                                  \
    softmax_backward_impl(a, lda, d, ldd, n, S, rinv, lse, delta, over);                                         \
  }                                                                                                              \
  GLMIX_CLONES void scale_rows(T* a, int64_t S, int64_t C, const T* w) { scale_rows_impl(a, S, C, w); }          \
  GLMIX_CLONES void column_sums(const T* d, int64_t n, int64_t S, int64_t ld, const T* rinv, T* sum) {           \
    column_sums_impl(d, n, S, ld, rinv, sum);                                                                    \
  }                                                                                                              \
  GLMIX_CLONES void subtract_outer(T* a, int64_t S, int64_t C, const T* u, const T* v) {                         \
    subtract_outer_impl(a, S, C, u, v);                                                                          \
  }                                                                                                              \
  GLMIX_CLONES void row_dots(const T* a, const T* b, int64_t rows, int64_t C, T* out) {                          \
    row_dots_impl(a, b, rows, C, out);                                                                           \
  }                                                                                                              \
  GLMIX_CLONES void weighted_sum(const T* a, int64_t J, int64_t stride, int64_t C, const T* w, T k, T* out) {    \
    weighted_sum_impl(a, J, stride, C, w, k, out);                                                               \
  }

GLMIX_DEFINE_TILE_KERNELS(float)
GLMIX_DEFINE_TILE_KERNELS(double)

#define GLMIX_DEFINE_QUERY_PASSES(T, A)                                                                              \
  GLMIX_CLONES void scaled_queries(const T* src, int64_t S, int64_t C, int64_t ss, int64_t sc, double scale, A* qs,  \
                                   int64_t ldq) {                                                                    \
    scaled_queries_impl(src, S, C, ss, sc, scale, qs, ldq);                                                          \
  }                                                                                                                  \
  GLMIX_CLONES void scaled_queries_backward(const A* dqs, int64_t nb, int64_t batch_stride, const T* src, int64_t S, \
                                            int64_t C, int64_t ss, int64_t sc, double scale, const double* q_mean,   \
                                            T* d_init, double* dscale) {                                             \
    scaled_queries_backward_impl(dqs, nb, batch_stride, src, S, C, ss, sc, scale, q_mean, d_init, dscale);           \
  }                                                                                                                  \
  GLMIX_CLONES void query_mean(const T* src, int64_t S, int64_t C, int64_t ss, int64_t sc, double* q_mean) {         \
    query_mean_impl(src, S, C, ss, sc, q_mean);                                                                      \
  }

GLMIX_DEFINE_QUERY_PASSES(c10::Half, float)
GLMIX_DEFINE_QUERY_PASSES(c10::BFloat16, float)
GLMIX_DEFINE_QUERY_PASSES(float, float)
GLMIX_DEFINE_QUERY_PASSES(double, double)

}  // namespace glmix::cpu
