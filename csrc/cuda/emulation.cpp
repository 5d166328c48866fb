// The scheduler of the CUDA emulation (emulation.h): fibers, barriers, warp exchanges, shared
// memory, and the detectors' errors. One launch runs at a time in the process (a mutex), on the
// calling thread.
#include "emulation.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <c10/util/Exception.h>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace glmix::emu {

Builtins g_builtins;

namespace {

// ---------------------------------------------------------------------------------------------
// Context switches. On x86-64 a few instructions that save the callee-saved registers (glibc's
// swapcontext also makes a signal-mask system call per switch, about ten times slower); elsewhere
// ucontext.

#if defined(__x86_64__)
extern "C" void glmix_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl glmix_emu_switch
.hidden glmix_emu_switch
.type glmix_emu_switch,@function
glmix_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size glmix_emu_switch,.-glmix_emu_switch
)");

struct Context {
  void* sp = nullptr;
};

void fiber_main();

// A fresh stack whose first switch "returns" into fiber_main with the ABI's alignment.
void make_context(Context& c, char* stack, size_t size) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                               // fiber_main's return address: never used
  *--sp = reinterpret_cast<void*>(&fiber_main);  // popped by ret
  for (int i = 0; i < 6; ++i) *--sp = nullptr;   // rbp, rbx, r12-r15
  c.sp = sp;
}

void switch_context(Context& from, Context& to) { glmix_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void fiber_main();

void make_context(Context& c, char* stack, size_t size) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, &fiber_main, 0);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---------------------------------------------------------------------------------------------
// State of the launch in progress.

enum class Wait { Ready, Barrier, Warp, Exited, Failed };

struct Fiber {
  Context ctx;
  Wait wait = Wait::Ready;
  const char* file = "";
  int line = 0;
  unsigned shuffles = 0;  // shuffles done: selects the exchange buffer (double buffering)
};

struct Warp {
  uint64_t slot[2][32];
  int arrived = 0;
  const char* file = "";
  int line = 0;
};

constexpr size_t kStack = 128 * 1024;

struct Launch {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<float> smem;
  Context main;
  int current = 0;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  std::string error;
  std::string skip_site;  // a barrier to leave out (the mutation check), "file:line" suffix
  FILE* skip_log = nullptr;
  bool skipped = false;
};

Launch g_launch;
std::mutex g_mutex;
Order g_order = Order::Forward;
uint64_t g_seed = 0;
uint64_t g_launches = 0;

// Stacks with a guard page below each, mapped once and reused.
struct Stacks {
  char* base = nullptr;
  size_t count = 0;
  size_t page = 0;

  char* get(size_t i) { return base + i * (kStack + page) + page; }

  void reserve(size_t n) {
    if (n <= count) return;
    if (base != nullptr) munmap(base, count * (kStack + page));
    page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = n * (kStack + page);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "CUDA emulation: cannot map ", n, " fiber stacks");
    base = static_cast<char*>(p);
    count = n;
    for (size_t i = 0; i < n; ++i) mprotect(base + i * (kStack + page), page, PROT_NONE);
  }
};
Stacks g_stacks;

std::string site(const char* file, int line) {
  std::string f(file);
  const auto slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(line);
}

Fiber& me() { return g_launch.fibers[g_launch.current]; }

// From a fiber: back to the scheduler until it resumes this fiber.
void yield() { switch_context(me().ctx, g_launch.main); }

void fail(std::string msg) {
  g_launch.error = std::move(msg);
  me().wait = Wait::Failed;
  yield();
  std::abort();  // a failed fiber is never resumed
}

void fiber_main() {
  g_launch.body(g_launch.arg);
  me().wait = Wait::Exited;
  yield();
  std::abort();
}

void set_builtins_thread(int t) {
  const dim3 bd = g_builtins.block_dim;
  g_builtins.thread_idx = {t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y)};
}

void resume(int t) {
  g_launch.current = t;
  set_builtins_thread(t);
  switch_context(g_launch.main, g_launch.fibers[t].ctx);
}

std::vector<int> order_of(int n, uint64_t salt) {
  std::vector<int> o(n);
  std::iota(o.begin(), o.end(), 0);
  if (g_order == Order::Reverse) std::reverse(o.begin(), o.end());
  if (g_order == Order::Random) {
    std::mt19937_64 rng(g_seed * 0x9E3779B97F4A7C15ull + salt);
    std::shuffle(o.begin(), o.end(), rng);
  }
  return o;
}

std::string where(const Fiber& f) {
  switch (f.wait) {
    case Wait::Barrier:
      return "at __syncthreads " + site(f.file, f.line);
    case Wait::Warp:
      return "at a warp shuffle " + site(f.file, f.line);
    case Wait::Exited:
      return "exited";
    default:
      return "running";
  }
}

// All fibers are blocked or done: the barrier's verdict, or an error message.
std::string check_barrier(const std::vector<Fiber>& fs, bool& done, bool& release) {
  int at_barrier = 0, exited = 0;
  const Fiber* first = nullptr;
  for (size_t t = 0; t < fs.size(); ++t) {
    const Fiber& f = fs[t];
    if (f.wait == Wait::Warp) {
      const size_t w0 = t / 32 * 32;
      size_t other = w0;
      while (other < fs.size() && other < w0 + 32 && fs[other].wait == Wait::Warp) ++other;
      return "divergent warp: thread " + std::to_string(t) + " waits " + where(f) + " but thread " +
             std::to_string(other) + " of its warp is " + (other < fs.size() ? where(fs[other]) : "missing");
    }
    if (f.wait == Wait::Exited) ++exited;
    if (f.wait == Wait::Barrier) {
      ++at_barrier;
      if (first == nullptr) first = &f;
      if (f.file != first->file || f.line != first->line)
        return "threads wait at different barriers: " + where(*first) + " and thread " + std::to_string(t) + " " +
               where(f) + " (a deadlock or undefined behaviour on a GPU)";
    }
  }
  done = at_barrier == 0;
  release = at_barrier > 0 && exited == 0;
  if (at_barrier > 0 && exited > 0)
    return "__syncthreads " + site(first->file, first->line) + " is reached by " + std::to_string(at_barrier) + " of " +
           std::to_string(fs.size()) + " threads; the other " + std::to_string(exited) +
           " have exited (a deadlock on a GPU)";
  return "";
}

void fill_nan(std::vector<float>& v) { std::fill(v.begin(), v.end(), std::numeric_limits<float>::quiet_NaN()); }

void run_block(int nthreads, uint64_t salt) {
  Launch& L = g_launch;
  for (int t = 0; t < nthreads; ++t) {
    L.fibers[t] = Fiber{};
    make_context(L.fibers[t].ctx, g_stacks.get(t), kStack);
  }
  for (auto& w : L.warps) w = Warp{};
  fill_nan(L.smem);
  for (uint64_t phase = 0;; ++phase) {
    const std::vector<int> order = order_of(nthreads, salt * 1000003ull + phase);
    for (bool ran = true; ran;) {  // sweeps until every fiber waits or has exited
      ran = false;
      for (int t : order) {
        if (L.fibers[t].wait != Wait::Ready) continue;
        resume(t);
        ran = true;
        TORCH_CHECK(L.fibers[t].wait != Wait::Failed, "CUDA emulation: ", L.error);
      }
    }
    bool done = false, release = false;
    const std::string err = check_barrier(L.fibers, done, release);
    TORCH_CHECK(err.empty(), "CUDA emulation: ", err);
    if (done) return;
    for (auto& f : L.fibers) f.wait = Wait::Ready;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Called from fibers.

void syncthreads(const char* file, int line) {
  Launch& L = g_launch;
  if (!L.skip_site.empty() && site(file, line) == L.skip_site) {
    if (!L.skipped && L.skip_log != nullptr) {
      std::fprintf(L.skip_log, "skipped __syncthreads %s\n", L.skip_site.c_str());
      std::fflush(L.skip_log);
    }
    L.skipped = true;
    return;
  }
  Fiber& f = me();
  f.wait = Wait::Barrier;
  f.file = file;
  f.line = line;
  yield();
}

uint64_t warp_exchange(uint64_t bits, unsigned mask, Shuffle kind, int arg, const char* file, int line) {
  Launch& L = g_launch;
  const int t = L.current, lane = t % 32;
  if (mask != 0xffffffffu)
    fail("warp shuffle " + site(file, line) + " with mask " + std::to_string(mask) +
         ": only full-warp shuffles are emulated");
  if (L.fibers.size() % 32 != 0)
    fail("warp shuffle " + site(file, line) + " in a block of " + std::to_string(L.fibers.size()) +
         " threads: the last warp is partial");
  Warp& w = L.warps[t / 32];
  Fiber& f = me();
  if (w.arrived == 0) {
    w.file = file;
    w.line = line;
  } else if (w.file != file || w.line != line) {
    fail("divergent warp: lanes of warp " + std::to_string(t / 32) + " shuffle at " + site(w.file, w.line) +
         " and at " + site(file, line));
  }
  const unsigned buf = f.shuffles++ & 1u;
  w.slot[buf][lane] = bits;
  f.file = file;
  f.line = line;
  if (++w.arrived == 32) {  // the last lane releases the warp
    w.arrived = 0;
    for (int i = 0; i < 32; ++i) {
      Fiber& g = L.fibers[(t / 32) * 32 + i];
      if (&g != &f) g.wait = Wait::Ready;
    }
  } else {
    f.wait = Wait::Warp;
    yield();
  }
  int src = lane;
  if (kind == Shuffle::Xor) src = lane ^ arg;
  if (kind == Shuffle::Index) src = arg;
  if (kind == Shuffle::Down) src = lane + arg < 32 ? lane + arg : lane;
  return w.slot[buf][src & 31];
}

void* dynamic_smem() { return g_launch.smem.data(); }

void set_order(Order order, uint64_t seed) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_order = order;
  g_seed = seed;
}

// ---------------------------------------------------------------------------------------------
// The launch.

void run(dim3 grid, dim3 block, size_t smem_bytes, void (*body)(void*), void* arg) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const uint64_t nthreads = uint64_t{block.x} * block.y * block.z;
  TORCH_CHECK(nthreads >= 1 && nthreads <= 1024 && block.z <= 64, "CUDA emulation: invalid block (", block.x, ", ",
              block.y, ", ", block.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.y <= 65535 && grid.z <= 65535 && grid.x <= 2147483647u,
              "CUDA emulation: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  Launch& L = g_launch;
  L.fibers.assign(nthreads, Fiber{});
  L.warps.assign((nthreads + 31) / 32, Warp{});
  L.smem.assign((smem_bytes + sizeof(float) - 1) / sizeof(float), 0.f);
  L.body = body;
  L.arg = arg;
  L.error.clear();
  const char* skip = std::getenv("GLMIX_EMU_SKIP_BARRIER");
  L.skip_site = skip != nullptr ? skip : "";
  const char* log = std::getenv("GLMIX_EMU_SKIP_LOG");
  L.skip_log = (!L.skip_site.empty() && log != nullptr) ? std::fopen(log, "a") : nullptr;
  L.skipped = false;
  g_stacks.reserve(nthreads);
  g_builtins.block_dim = block;
  g_builtins.grid_dim = grid;
  const uint64_t launch = g_launches++;
  const uint64_t nblocks64 = uint64_t{grid.x} * grid.y * grid.z;
  TORCH_CHECK(nblocks64 <= std::numeric_limits<int>::max(), "CUDA emulation: grid too large to emulate");
  const int nblocks = static_cast<int>(nblocks64);
  struct Close {
    FILE*& f;
    ~Close() {
      if (f != nullptr) std::fclose(f);
      f = nullptr;
    }
  } close{L.skip_log};
  for (int i : order_of(nblocks, launch)) {
    g_builtins.block_idx = {i % grid.x, (i / grid.x) % grid.y, i / (grid.x * grid.y)};
    run_block(static_cast<int>(nthreads), launch * 7919ull + static_cast<uint64_t>(i));
  }
}

}  // namespace glmix::emu
