// The CPU kernels against a naive loop over docs/math.md's formulas, in double, on small random
// inputs: odd L, one and several slots, several tiles and chunks per batch element, the NCHW
// view of x, slots broadcast over the batch; float32 and float64; forward and backward; called
// directly and through the dispatcher; bitwise identical with 1 and 2 threads.
// Exit status 0 when every check passes (run by ctest).
#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "glmix_kernels.h"
#include "queries.h"

namespace {

using at::Tensor;
using Vec = std::vector<double>;

int failures = 0;

struct Case {
  int64_t B, L, S, C;
  bool nchw, broadcast;
};

std::string name(const Case& c, at::ScalarType dtype) {
  return "B=" + std::to_string(c.B) + " L=" + std::to_string(c.L) + " S=" + std::to_string(c.S) +
         " C=" + std::to_string(c.C) + (c.nchw ? " nchw" : "") + (c.broadcast ? " broadcast" : "") + " " +
         std::string(c10::toString(dtype));
}

Vec values(const Tensor& t) {
  const Tensor d = t.to(at::kDouble).contiguous();
  return Vec(d.const_data_ptr<double>(), d.const_data_ptr<double>() + d.numel());
}

// What the kernels must return, from x (B, L, C), qs (B, S, C), the slots given to dispatch V,
// and the incoming gradients G (clustering, (B, S, C)) and H (dispatch, (B, L, C)).
struct Expected {
  Vec slots, lse_c, dx_c, dqs_c, out, lse_d, dx_d, dqs_d, dslots;
};

Expected naive(int64_t B, int64_t L, int64_t S, int64_t C, const Vec& x, const Vec& qs, const Vec& V, const Vec& G,
               const Vec& H) {
  Expected e{Vec(B * S * C), Vec(B * S),     Vec(B * L * C), Vec(B * S * C), Vec(B * L * C),
             Vec(B * L),     Vec(B * L * C), Vec(B * S * C), Vec(B * S * C)};
  for (int64_t b = 0; b < B; ++b) {
    auto X = [&](int64_t l, int64_t c) { return x[(b * L + l) * C + c]; };
    auto Q = [&](int64_t s, int64_t c) { return qs[(b * S + s) * C + c]; };
    Vec r(L), K(L * C), A(S * L), P(S * L), D(S * L);
    for (int64_t l = 0; l < L; ++l) {
      double ss = 0;
      for (int64_t c = 0; c < C; ++c) ss += X(l, c) * X(l, c);
      r[l] = std::max(std::sqrt(ss), 1e-12);
      for (int64_t c = 0; c < C; ++c) K[l * C + c] = X(l, c) / r[l];
    }
    for (int64_t s = 0; s < S; ++s)
      for (int64_t l = 0; l < L; ++l) {
        double a = 0;
        for (int64_t c = 0; c < C; ++c) a += Q(s, c) * K[l * C + c];
        A[s * L + l] = a;
      }
    for (int64_t s = 0; s < S; ++s) {  // softmax over pixels
      double m = -INFINITY, z = 0;
      for (int64_t l = 0; l < L; ++l) m = std::max(m, A[s * L + l]);
      for (int64_t l = 0; l < L; ++l) z += std::exp(A[s * L + l] - m);
      for (int64_t l = 0; l < L; ++l) P[s * L + l] = std::exp(A[s * L + l] - m) / z;
      e.lse_c[b * S + s] = m + std::log(z);
    }
    for (int64_t l = 0; l < L; ++l) {  // softmax over slots
      double m = -INFINITY, z = 0;
      for (int64_t s = 0; s < S; ++s) m = std::max(m, A[s * L + l]);
      for (int64_t s = 0; s < S; ++s) z += std::exp(A[s * L + l] - m);
      for (int64_t s = 0; s < S; ++s) D[s * L + l] = std::exp(A[s * L + l] - m) / z;
      e.lse_d[b * L + l] = m + std::log(z);
    }
    // Through K = normalize(x): dx += (dK - K <K, dK>) / r, dqs = dA @ K.
    auto key_path = [&](const Vec& dA, double* dx, double* dqs) {
      for (int64_t l = 0; l < L; ++l) {
        Vec dK(C, 0.0);
        double kd = 0;
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t s = 0; s < S; ++s) dK[c] += dA[s * L + l] * Q(s, c);
          kd += K[l * C + c] * dK[c];
        }
        for (int64_t c = 0; c < C; ++c) dx[l * C + c] += (dK[c] - K[l * C + c] * kd) / r[l];
      }
      for (int64_t s = 0; s < S; ++s)
        for (int64_t c = 0; c < C; ++c) {
          double acc = 0;
          for (int64_t l = 0; l < L; ++l) acc += dA[s * L + l] * K[l * C + c];
          dqs[s * C + c] = acc;
        }
    };
    {  // clustering
      Vec dA(S * L);
      double* dx = &e.dx_c[b * L * C];
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t c = 0; c < C; ++c) {
          double acc = 0;
          for (int64_t l = 0; l < L; ++l) acc += P[s * L + l] * X(l, c);
          e.slots[(b * S + s) * C + c] = acc;
        }
        double delta = 0;
        Vec dP(L);
        for (int64_t l = 0; l < L; ++l) {
          for (int64_t c = 0; c < C; ++c) dP[l] += G[(b * S + s) * C + c] * X(l, c);
          delta += dP[l] * P[s * L + l];
        }
        for (int64_t l = 0; l < L; ++l) dA[s * L + l] = P[s * L + l] * (dP[l] - delta);
      }
      for (int64_t l = 0; l < L; ++l)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t s = 0; s < S; ++s) dx[l * C + c] += P[s * L + l] * G[(b * S + s) * C + c];
      key_path(dA, dx, &e.dqs_c[b * S * C]);
    }
    {  // dispatch
      Vec dA(S * L);
      for (int64_t l = 0; l < L; ++l) {
        Vec dD(S, 0.0);
        double delta = 0;
        for (int64_t s = 0; s < S; ++s) {
          for (int64_t c = 0; c < C; ++c) dD[s] += V[(b * S + s) * C + c] * H[(b * L + l) * C + c];
          delta += dD[s] * D[s * L + l];
        }
        for (int64_t s = 0; s < S; ++s) dA[s * L + l] = D[s * L + l] * (dD[s] - delta);
        for (int64_t c = 0; c < C; ++c) {
          double acc = 0;
          for (int64_t s = 0; s < S; ++s) acc += D[s * L + l] * V[(b * S + s) * C + c];
          e.out[(b * L + l) * C + c] = acc;
        }
      }
      for (int64_t s = 0; s < S; ++s)
        for (int64_t c = 0; c < C; ++c) {
          double acc = 0;
          for (int64_t l = 0; l < L; ++l) acc += D[s * L + l] * H[(b * L + l) * C + c];
          e.dslots[(b * S + s) * C + c] = acc;
        }
      key_path(dA, &e.dx_d[b * L * C], &e.dqs_d[b * S * C]);
    }
  }
  return e;
}

void expect_close(const std::string& what, const Tensor& got, const Vec& want, double tol) {
  const Vec g = values(got);
  double scale = 1, err = 0;
  for (const double w : want) scale = std::max(scale, std::abs(w));
  bool finite = g.size() == want.size();
  for (size_t i = 0; finite && i < g.size(); ++i) {
    finite = std::isfinite(g[i]);
    err = std::max(err, std::abs(g[i] - want[i]));
  }
  if (!finite || err > tol * scale) {
    ++failures;
    std::printf("FAIL %s: max error %.3g (tolerance %.3g)%s\n", what.c_str(), err, tol * scale,
                finite ? "" : ", wrong size or not finite");
  }
}

void expect_identical(const std::string& what, const Tensor& a, const Tensor& b) {
  if (!at::equal(a, b)) {
    ++failures;
    std::printf("FAIL %s: not bitwise identical\n", what.c_str());
  }
}

std::vector<Tensor> all_outputs(const Tensor& x, const Tensor& qs, const Tensor& V, const Tensor& G, const Tensor& H) {
  const auto [slots, lse_c] = glmix::cluster_fwd_cpu(x, qs);
  const auto [dx_c, dqs_c] = glmix::cluster_bwd_cpu(G, x, qs, slots, lse_c);
  const auto [out, lse_d] = glmix::dispatch_fwd_cpu(x, qs, V);
  const auto [dx_d, dqs_d, dslots] = glmix::dispatch_bwd_cpu(H, x, qs, V, lse_d);
  return std::vector<Tensor>{slots, lse_c, dx_c, dqs_c, out, lse_d, dx_d, dqs_d, dslots};
}

void run(const Case& c, at::ScalarType dtype) {
  const std::string id = name(c, dtype);
  const auto opts = at::TensorOptions().dtype(dtype);
  const Tensor x = c.nchw ? at::randn({c.B, c.C, c.L}, opts).transpose(1, 2) : at::randn({c.B, c.L, c.C}, opts);
  // qs = scale * normalize(slots): norms around 5, so softmaxes are far from uniform.
  const Tensor q0 = 5 * at::randn({c.broadcast ? 1 : c.B, c.S, c.C}, opts) / std::sqrt(double(c.C));
  const Tensor qs = q0.expand({c.B, c.S, c.C});
  const Tensor V = at::randn({c.B, c.S, c.C}, opts);
  const Tensor G = at::randn({c.B, c.S, c.C}, opts);
  const Tensor H = at::randn({c.B, c.C, c.L}, opts).transpose(1, 2);  // a strided incoming gradient
  const Expected e = naive(c.B, c.L, c.S, c.C, values(x), values(qs), values(V), values(G), values(H));
  const double tol = dtype == at::kDouble ? 1e-10 : 2e-4;

  const std::vector<Tensor> got = all_outputs(x, qs, V, G, H);
  const char* names[] = {"slots",        "cluster lse", "cluster dx",   "cluster dqs", "out",
                         "dispatch lse", "dispatch dx", "dispatch dqs", "dslots"};
  const Vec* want[] = {&e.slots, &e.lse_c, &e.dx_c, &e.dqs_c, &e.out, &e.lse_d, &e.dx_d, &e.dqs_d, &e.dslots};
  for (size_t i = 0; i < got.size(); ++i) expect_close(id + " " + names[i], got[i], *want[i], tol);

  // The op through the dispatcher, as torch.ops.glmix_kernels calls it: the kernel on the scaled
  // queries of its prologue.
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("glmix_kernels::dispatch_fwd", "")
                      .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
  const Tensor scale = at::scalar_tensor(2.5, at::kFloat);
  expect_identical(id + " dispatcher out", std::get<0>(op.call(x, q0, scale, V)),
                   std::get<0>(glmix::dispatch_fwd_cpu(x, glmix::scaled_queries(x, q0, scale), V)));

  // Bitwise reproducible whatever the thread count.
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const std::vector<Tensor> serial = all_outputs(x, qs, V, G, H);
  at::set_num_threads(threads);
  for (size_t i = 0; i < got.size(); ++i) expect_identical(id + " 1 thread " + names[i], serial[i], got[i]);
}

}  // namespace

int main() {
  at::manual_seed(0);
  if (at::get_num_threads() < 2) at::set_num_threads(2);
  const Case cases[] = {
      {1, 1, 1, 3, false, false},       // one pixel, one slot
      {2, 37, 1, 5, true, false},       // one slot: dispatch is constant, its gradients vanish
      {2, 37, 3, 8, false, true},       // slots broadcast over the batch
      {3, 203, 5, 16, true, true},      // several batch elements, NCHW x
      {1, 1001, 7, 300, false, false},  // several tiles (128 pixels at C = 300) in 8 chunks
      {1, 2177, 2, 300, true, false},   // 18 tiles: two per chunk, the online softmax within a chunk
  };
  for (const auto dtype : {at::kFloat, at::kDouble})
    for (const auto& c : cases) run(c, dtype);
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
