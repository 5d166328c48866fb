// What the CPU clustering and dispatch kernels share on tiles: reading tiles of rows from strided
// tensors, one tile of pixels with its norms and the backward pass through the normalisation, and
// the fixed-order sum of per-chunk partial results. Beside it: plan.h (the partition of L into
// tiles and chunks), gemm.h (the products on tiles), passes.h (the elementwise passes),
// ../checks.h (the input checks).
//
// Logits tiles are pixel-major, (n, S): then every product whose result is per pixel (logits,
// dispatch's output, dx) reads both operands row-major as they lie, and runs as a oneDNN brgemm
// micro-kernel (through ATen) that multiplies in place. MKL's sgemm packs both operands of every
// call first, and at these sizes (K = C or S, about 64) the packing and its zeroing of the output
// cost about a quarter of the multiply-adds. The sums over pixels (slots, dqs, dslots) read a
// logits tile transposed: it is transposed once in L2, then multiplied the same way. float64 (the
// gradcheck dtype) goes through ATen's mm. The elementwise passes over a tile are the functions
// of passes.h, defined in passes.cpp and compiled per ISA. Everything is computed in acc_t =
// float for float16/bfloat16/float32 inputs and double for float64.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/irange.h>

#include "../checks.h"
#include "gemm.h"
#include "passes.h"
#include "plan.h"

namespace glmix::cpu {

using at::Tensor;

using checks::acc_dtype;

// x (B, L, C) and qs (B, S, C) on the CPU as every kernel of this backend takes them; returns S.
inline int64_t check_inputs(const Tensor& x, const Tensor& qs, const char* op) {
  return checks::check_x_qs(x, qs, op, at::kCPU, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble});
}

// ---------------------------------------------------------------------------------------------
// Scratch memory, reused from call to call. Tile buffers, partial results and operand copies of a
// few hundred KB, allocated per call, went back to the system at every free and came back as
// fresh pages: at small L a call spent more time in those page faults than in its arithmetic.
// One grow-only buffer per thread and role; a role's buffer is used by one task at a time (the
// Call* roles by the calling thread, outside and across the parallel region; the others inside
// a task), and never outlives the op call that fills it.
enum class Scratch {
  Pixels,
  Stats,
  Logits,
  Logits2,
  Grad,
  Result,  // per task
  CallMax,
  CallSum,
  CallPartial,
  CallPartial2,
  CallOperand,
  CallOperand2,
  CallOperand3,
  CallOperand4,  // per call
  Count
};

// A flat (numel) tensor of dtype opts.dtype() over the calling thread's buffer for role,
// 64-byte aligned; its contents are whatever the last user left.
inline Tensor scratch(Scratch role, int64_t numel, const at::TensorOptions& opts) {
  thread_local std::array<std::vector<std::byte>, static_cast<size_t>(Scratch::Count)> buffers;
  constexpr uintptr_t kAlign = 64;
  std::vector<std::byte>& buf = buffers[static_cast<size_t>(role)];
  const size_t bytes = static_cast<size_t>(numel) * opts.dtype().itemsize() + kAlign;
  if (buf.size() < bytes) buf.resize(bytes);
  const uintptr_t p = (reinterpret_cast<uintptr_t>(buf.data()) + kAlign - 1) & ~(kAlign - 1);
  return at::from_blob(reinterpret_cast<void*>(p), {numel}, opts);
}

// (rows, cols) contiguous view of a flat scratch buffer sized for a full tile. (BLAS results may
// depend on the alignment of the operands: scratch buffers are 64-byte aligned, and the views
// into inputs and outputs sit at offsets fixed by the shapes, so results stay a function of the
// inputs.)
inline Tensor rows_view(const Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

// ---------------------------------------------------------------------------------------------
// Reading (B, L, C) tensors of any strides and dtype a tile of rows at a time.

template <typename scalar_t>
struct Rows {
  Tensor t;
  const scalar_t* data;
  int64_t sb, sl, sc, C;

  explicit Rows(const Tensor& t_)
      : t(t_),
        data(t_.const_data_ptr<scalar_t>()),
        sb(t_.stride(0)),
        sl(t_.stride(1)),
        sc(t_.stride(2)),
        C(t_.size(2)) {}

  // Rows l0 .. l0 + n of batch element b as an (n, C) contiguous acc_t matrix: the tensor's own
  // memory when it already holds such rows (float32 x in the channels-last layout GLNet passes,
  // float64 in gradcheck), so the tile costs no copy; else gathered into buf.
  template <typename acc_t>
  Tensor read(int64_t b, int64_t l0, int64_t n, const Tensor& buf) const {
    if (std::is_same_v<scalar_t, acc_t> && sc == 1 && sl == C) return t.select(0, b).narrow(0, l0, n);
    Tensor rows = rows_view(buf, n, C);
    gather(b, l0, n, rows.template data_ptr<acc_t>());
    return rows;
  }

  // dst (n, C) contiguous = rows l0 .. l0 + n of batch element b. Rows with contiguous channels
  // copy as they are; the float32 NCHW view (strides (C*L, 1, L)) goes through transpose(); any
  // other layout is transposed in blocks of 16 pixels, so each source cache line is read once
  // and the 16 destination rows being filled stay in L1.
  template <typename acc_t>
  void gather(int64_t b, int64_t l0, int64_t n, acc_t* dst) const {
    const scalar_t* src = data + b * sb + l0 * sl;
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      if (sl == 1) return transpose(src, sc, n, C, dst, C);
    }
    if (sc == 1) {
      for (const auto l : c10::irange(n)) {
        const scalar_t* row = src + l * sl;
        acc_t* out = dst + l * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(row[c]);
      }
      return;
    }
    constexpr int64_t kBlock = 16;
    for (int64_t lb = 0; lb < n; lb += kBlock) {
      const int64_t le = std::min(n, lb + kBlock);
      for (const auto c : c10::irange(C))
        for (int64_t l = lb; l < le; ++l) dst[l * C + c] = static_cast<acc_t>(src[l * sl + c * sc]);
    }
  }
};

// A small (B, R, K) operand (queries, slots, their gradient, or their transposes) as
// contiguous acc_t rows, converted once up front; a batch broadcast (batch stride 0) stays a
// single copy.
class Operand {
 public:
  // A copy, when one is needed, goes to the calling thread's scratch for role.
  Operand(const Tensor& t, at::ScalarType acc, Scratch role) : t_(unbroadcast(t)) {
    if (t_.scalar_type() == acc && t_.is_contiguous()) return;
    Tensor copy = scratch(role, t_.numel(), t_.options().dtype(acc)).view(t_.sizes());
    copy_rows(t_, copy);
    t_ = copy;
  }
  template <typename T>
  const T* at(int64_t b) const {  // (R, K), row stride K
    return t_.const_data_ptr<T>() + (t_.size(0) == 1 ? 0 : b) * t_.size(1) * t_.size(2);
  }

 private:
  static Tensor unbroadcast(const Tensor& t) { return t.size(0) > 1 && t.stride(0) == 0 ? t.narrow(0, 0, 1) : t; }
  // dst = src for dst (B, R, K) with unit last stride. A float transposed view (unit middle
  // stride: qs^T, slots^T) goes through transpose() in 8 x 8 blocks; ATen's copy_ reads it
  // element by element, at small L a tenth of the op.
  static void copy_rows(const Tensor& src, Tensor dst) {
    const int64_t R = src.size(1), K = src.size(2);
    if (src.scalar_type() == at::kFloat && dst.scalar_type() == at::kFloat && src.stride(1) == 1 && R > 1) {
      for (const auto b : c10::irange(src.size(0)))
        transpose(src.const_data_ptr<float>() + b * src.stride(0), src.stride(2), R, K,
                  dst.data_ptr<float>() + b * dst.stride(0), dst.stride(1));
      return;
    }
    dst.copy_(src);
  }
  Tensor t_;
};

// dst[i] = src[i] converted to the output dtype.
template <typename acc_t, typename scalar_t>
void store(const acc_t* src, scalar_t* dst, int64_t n) {
  for (const auto i : c10::irange(n)) dst[i] = static_cast<scalar_t>(src[i]);
}

// Where a tile writes its (n, C) rows l0 .. l0 + n of batch element b of a contiguous (B, L, C)
// output: the output itself when it is in acc_t, else buf (from result_buffer, numel >= n * C),
// converted by flush_rows.
template <typename acc_t, typename scalar_t>
Tensor result_buffer(int64_t numel, const at::TensorOptions& acc_opts) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) return Tensor();
  return scratch(Scratch::Result, numel, acc_opts);
}

template <typename acc_t, typename scalar_t>
Tensor result_rows(const Tensor& out, int64_t b, int64_t l0, int64_t n, const Tensor& buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) return out.select(0, b).narrow(0, l0, n);
  return rows_view(buf, n, out.size(2));
}

template <typename acc_t, typename scalar_t>
void flush_rows(const Tensor& rows, Tensor& out, int64_t b, int64_t l0) {
  if constexpr (!std::is_same_v<acc_t, scalar_t>)
    store(rows.const_data_ptr<acc_t>(), out.data_ptr<scalar_t>() + (b * out.size(1) + l0) * out.size(2), rows.numel());
}

// ---------------------------------------------------------------------------------------------
// One tile of pixels: x itself (the values, and the keys up to their norms) in acc_t, and per
// pixel 1 / max(||x_l||, eps) and the normalisation's backward coefficient.

template <typename acc_t>
class PixelTile {
 public:
  PixelTile(int64_t T, int64_t C, const at::TensorOptions& acc_opts)
      : C_(C),
        x_buf_(scratch(Scratch::Pixels, T * C, acc_opts)),
        stats_(scratch(Scratch::Stats, 2 * T, acc_opts).view({2, T})) {}

  int64_t n() const { return n_; }
  const acc_t* x() const { return x_; }  // (n, C)
  const acc_t* rinv() const { return stats_.template const_data_ptr<acc_t>(); }
  const acc_t* proj() const { return rinv() + stats_.size(1); }

  template <typename scalar_t>
  void load(const Rows<scalar_t>& src, int64_t b, int64_t l0, int64_t n) {
    n_ = n;
    x_view_ = src.template read<acc_t>(b, l0, n, x_buf_);
    x_ = x_view_.template const_data_ptr<acc_t>();
    acc_t* stats = stats_.template data_ptr<acc_t>();
    inverse_norms(x_, n, C_, stats, stats + stats_.size(1));
  }

  // out (n, N), row stride ldo, = x @ w for w (C, N): the logits before the norms for w = qs^T
  // (the softmax steps apply the norms per row), and beside them any other product with x (dP,
  // for w = G^T).
  void times(const acc_t* w, int64_t N, acc_t* out, int64_t ldo) const {
    gemm_nn(n_, N, C_, x_, C_, w, N, out, ldo, false);
  }
  void times(const acc_t* w, int64_t N, acc_t* out) const { times(w, N, out, N); }

  // The key path of the backward pass, shared by clustering and dispatch. Takes
  // dA_r = dA / max(||x_l||, eps) (n, S) with row stride ld (softmax_backward); accumulates
  // dqs (S, C) += dA_r^T @ x = dA^T @ K and writes dx (n, C) = the gradient of x through
  // K = normalize(x):  u = dA_r @ qs = dK / r,  dx = (dK - K <K, dK>) / r = u - x <x, u> / r^2
  // (docs/math.md#normalisation), with <x, u> taken from the rounded u, so that what cancels (all of it
  // for C = 1) cancels to rounding.
  void key_backward(const acc_t* dA_r, int64_t ld, int64_t S, const acc_t* qs_b, acc_t* dqs, bool first,
                    acc_t* dx) const {
    gemm_tn(S, C_, n_, dA_r, ld, x_, C_, dqs, C_, !first);
    gemm_nn(n_, C_, S, dA_r, ld, qs_b, C_, dx, C_, false);
    project_out(dx, x_, n_, C_, proj());
  }

 private:
  int64_t C_, n_ = 0;
  Tensor x_buf_, stats_, x_view_;  // stats_: rinv, proj
  const acc_t* x_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// The mean key m of kKeySample pixels spread evenly over L (pixel l = j L / kKeySample for
// j < kKeySample, as the Triton kernels' _key_mean): about the direction the keys share, if they
// share one. Clustering's dqs is centred on it (docs/math.md#centred-dqs).
constexpr int64_t kKeySample = 32;

// m (B, C) in acc_t, one row per batch element.
template <typename acc_t, typename scalar_t>
std::vector<acc_t> sampled_key_means(const Rows<scalar_t>& xs, int64_t B, int64_t L) {
  const int64_t C = xs.C;
  std::vector<acc_t> keys(kKeySample * C), rinv(kKeySample), proj(kKeySample), m(B * C, acc_t(0));
  for (const auto b : c10::irange(B)) {
    for (const auto j : c10::irange(kKeySample)) xs.gather(b, j * L / kKeySample, 1, keys.data() + j * C);
    inverse_norms(keys.data(), kKeySample, C, rinv.data(), proj.data());
    acc_t* mb = m.data() + b * C;
    for (const auto j : c10::irange(kKeySample))
      for (const auto c : c10::irange(C)) mb[c] += keys[j * C + c] * rinv[j];
    for (const auto c : c10::irange(C)) mb[c] /= kKeySample;
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// Per-chunk partial sums over pixels, (B, chunks, S, C) in acc_t, for an output out (B, S, C):
// with a single chunk, out itself when it is in acc_t (nothing to sum, so no copy).
inline Tensor chunk_partials(const Tensor& out, int64_t chunks, at::ScalarType acc, Scratch role) {
  const int64_t B = out.size(0), S = out.size(1), C = out.size(2);
  if (chunks == 1 && out.scalar_type() == acc) return out.view({B, 1, S, C});
  return scratch(role, B * chunks * S * C, out.options().dtype(acc)).view({B, chunks, S, C});
}

// out (B, S, C) = sum over chunks of partial (B, chunks, S, C), chunk after chunk: the same
// order whatever the thread count.
template <typename acc_t, typename scalar_t>
void sum_chunks(const Tensor& partial, Tensor& out) {
  if (partial.is_alias_of(out)) return;  // chunk_partials' single chunk
  const int64_t B = partial.size(0), J = partial.size(1), SC = partial.size(2) * partial.size(3);
  const acc_t* p = partial.const_data_ptr<acc_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    acc_t* sum = scratch(Scratch::Result, SC, partial.options()).template data_ptr<acc_t>();
    for (const auto b : c10::irange(b0, b1)) {
      std::fill(sum, sum + SC, acc_t(0));
      for (const auto j : c10::irange(J)) {
        const acc_t* pj = p + (b * J + j) * SC;
        for (const auto e : c10::irange(SC)) sum[e] += pj[e];
      }
      store(sum, o + b * SC, SC);
    }
  });
}

}  // namespace glmix::cpu
