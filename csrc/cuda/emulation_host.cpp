// The host half of the CUDA emulation: outputs inside sentinel margins (out-of-bounds writes),
// and the glmix_emulated::set_thread_order op that picks the fibers' order.
#include <cstdint>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "emulation.h"

namespace glmix::emu {
namespace {

constexpr int64_t kMargin = 64;            // elements of sentinel before and after each buffer
constexpr unsigned char kSentinel = 0xA5;  // a finite value in every float format

struct Guarded {
  at::Tensor base;
  int64_t bytes_before, bytes_body, bytes_after;
};
std::vector<Guarded> g_guarded;

bool margin_intact(const unsigned char* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (p[i] != kSentinel) return false;
  return true;
}

}  // namespace

at::Tensor guarded_empty(at::IntArrayRef sizes, const at::TensorOptions& options, bool leading_margin) {
  const int64_t numel = c10::multiply_integers(sizes);
  const int64_t before = leading_margin ? kMargin : 0;
  at::Tensor base = at::empty({before + numel + kMargin}, options);
  const int64_t item = base.element_size();
  std::memset(base.data_ptr(), kSentinel, static_cast<size_t>(base.numel() * item));
  at::Tensor body = base.narrow(0, before, numel);
  if (at::isFloatingType(base.scalar_type())) body.fill_(std::numeric_limits<double>::quiet_NaN());
  g_guarded.push_back({base, before * item, numel * item, kMargin * item});
  return body.view(sizes);
}

void check_margins() {
  for (const auto& g : g_guarded) {
    const auto* p = static_cast<const unsigned char*>(g.base.data_ptr());
    TORCH_CHECK(margin_intact(p, g.bytes_before) && margin_intact(p + g.bytes_before + g.bytes_body, g.bytes_after),
                "CUDA emulation: a kernel wrote outside a buffer of shape ", g.base.sizes(),
                " (its sentinel margins changed): an out-of-bounds write");
  }
}

void end_op() { g_guarded.clear(); }

}  // namespace glmix::emu

TORCH_LIBRARY_FRAGMENT(glmix_emulated, m) {
  m.def("set_thread_order(str order, int seed=0) -> ()", [](c10::string_view order, int64_t seed) {
    using glmix::emu::Order;
    const Order o = order == "forward" ? Order::Forward : order == "reverse" ? Order::Reverse : Order::Random;
    TORCH_CHECK(order == "forward" || order == "reverse" || order == "random",
                "set_thread_order: order must be 'forward', 'reverse' or 'random', got '", std::string(order), "'");
    glmix::emu::set_order(o, static_cast<uint64_t>(seed));
  });
}
