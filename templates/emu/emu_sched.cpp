// The scheduler: blocks spread over a pool of worker threads; a block's CUDA threads are fibers on its
// worker, run one at a time until each blocks (barrier, warp collective) or exits. Barriers release when all
// live threads of the block arrive, warp collectives when all lanes in the mask arrive; when nothing can run
// but threads are still alive the kernel is wrong, and the process aborts with every thread's state.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>

#include "emu_internal.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define QLEMU_ASAN 1
#else
#define QLEMU_ASAN 0
#endif
extern "C" void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));

__thread qlemu::ThreadState* qlemu_current = nullptr;

namespace qlemu {

int api_record_error(int code);  // emu_api.cpp

namespace {

uint64_t splitmix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

size_t env_size(const char* name, size_t fallback) {
  const char* v = getenv(name);
  if (!v || !*v) return fallback;
  char* end;
  unsigned long long x = strtoull(v, &end, 0);
  return *end ? fallback : (size_t)x;
}

}  // namespace

struct Worker;

struct Block {
  Worker* worker;
  const LaunchDesc* launch;
  uint3 idx;
  int threads;
  Fiber* fibers;
  int live;
  int at_barrier;
  std::vector<int> ready;
  size_t head;
  uint64_t rng;  // 0: run in thread order
  void* smem;
  // Per warp: lanes waiting at a warp collective, and lanes that have exited.
  unsigned warp_waiting[32];
  unsigned warp_exited[32];
};

// One per OS thread that executes blocks (pool helpers and the launching thread).
struct Worker {
  void* sched_sp = nullptr;
  void* sched_fake_stack = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  std::vector<Fiber> fibers;
  std::vector<Stack> stacks;
};

static thread_local Worker tl_worker;

Fiber* current_fiber() { return qlemu_current ? static_cast<Fiber*>(qlemu_current->fiber) : nullptr; }

// ---- Reports ------------------------------------------------------------------------------------------------

static std::mutex report_mutex;

static std::string describe(const Fiber& f) {
  char buf[512];
  switch (f.state) {
    case State::ready: return "ready";
    case State::running: return "running";
    case State::exited: return "exited";
    case State::barrier:
      snprintf(buf, sizeof buf, "waiting at %s (%s:%d)", f.what, f.site.file, f.site.line);
      return buf;
    case State::warp:
      snprintf(buf, sizeof buf, "waiting at %s with mask 0x%08x (%s:%d)", f.what, f.call.mask, f.site.file,
               f.site.line);
      return buf;
  }
  return "?";
}

static void print_states(const Block& b) {
  const dim3 bd = b.launch->block;
  auto coords = [&](int i, char* out, size_t n) {
    snprintf(out, n, "(%d,%d,%d)", (int)(i % bd.x), (int)(i / bd.x % bd.y), (int)(i / (bd.x * bd.y)));
  };
  fprintf(stderr, "  thread states (%d threads, consecutive threads in the same state grouped):\n", b.threads);
  for (int i = 0; i < b.threads;) {
    const std::string s = describe(b.fibers[i]);
    int j = i + 1;
    while (j < b.threads && describe(b.fibers[j]) == s) j++;
    char c0[48], c1[48];
    coords(i, c0, sizeof c0);
    coords(j - 1, c1, sizeof c1);
    if (j - 1 == i)
      fprintf(stderr, "    thread %d %s [warp %d lane %d]: %s\n", i, c0, i / 32, i % 32, s.c_str());
    else
      fprintf(stderr, "    threads %d-%d %s-%s [warps %d-%d]: %s\n", i, j - 1, c0, c1, i / 32, (j - 1) / 32, s.c_str());
    i = j;
  }
}

[[noreturn]] static void abort_block(const Block& b, const char* message) {
  std::lock_guard<std::mutex> lock(report_mutex);
  const LaunchDesc& d = *b.launch;
  fprintf(stderr, "qalora emu: %s\n", message);
  fprintf(stderr, "  kernel %s launched at %s:%d, grid (%u,%u,%u), block (%u,%u,%u), in block (%u,%u,%u)\n", d.name,
          d.at.file, d.at.line, d.grid.x, d.grid.y, d.grid.z, d.block.x, d.block.y, d.block.z, b.idx.x, b.idx.y,
          b.idx.z);
  print_states(b);
  fflush(stderr);
  abort();
}

void fatal_in_kernel(Site at, const char* fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  Fiber* f = current_fiber();
  char full[1400];
  if (f) {
    const uint3 t = f->ts.threadIdx;
    snprintf(full, sizeof full, "%s (at %s:%d, thread %d (%u,%u,%u))", msg, at.file, at.line, f->linear, t.x, t.y, t.z);
    abort_block(*f->block, full);
  }
  fprintf(stderr, "qalora emu: %s (at %s:%d)\n", msg, at.file, at.line);
  abort();
}

// A sanitizer's fatal report (UBSan's misaligned vector load, ASan's out-of-bounds access) names the source line
// but not the CUDA thread; this adds the kernel, block and thread it happened in.
static void name_thread_on_death() {
  Fiber* f = current_fiber();
  if (!f) return;
  const LaunchDesc& d = *f->block->launch;
  const uint3 b = f->block->idx, t = f->ts.threadIdx;
  fprintf(stderr, "qalora emu: in kernel %s launched at %s:%d, block (%u,%u,%u), thread %d (%u,%u,%u)\n", d.name,
          d.at.file, d.at.line, b.x, b.y, b.z, f->linear, t.x, t.y, t.z);
}

static void hook_sanitizer_death() {
  // Weak: a build without any sanitizer runtime has no such function, and then nothing reports.
  if (__sanitizer_set_death_callback) __sanitizer_set_death_callback(name_thread_on_death);
}

// ---- Switching ----------------------------------------------------------------------------------------------

static void make_ready(Block& b, int i) {
  b.fibers[i].state = State::ready;
  b.ready.push_back(i);
}

static int next_ready(Block& b) {
  if (b.head == b.ready.size()) {
    b.ready.clear();
    b.head = 0;
    return -1;
  }
  if (b.rng) {  // seeded: any ready fiber may go next
    b.rng = splitmix(b.rng);
    const size_t j = b.head + b.rng % (b.ready.size() - b.head);
    std::swap(b.ready[b.head], b.ready[j]);
  }
  return b.ready[b.head++];
}

// The running fiber gives up the CPU: straight to the next ready fiber of the block (one switch, not two),
// or back to the scheduler when none is ready. `final` for a fiber that will never run again (ASan then
// drops its fake stack).
static void yield(Fiber& f, bool final = false) {
  Block& b = *f.block;
  Worker& w = *b.worker;
  const int next = next_ready(b);
  if (next == f.linear) {  // its own turn again: nothing to switch
    f.state = State::running;
    return;
  }
  void* target;
  const void* bottom;
  size_t size;
  if (next >= 0) {
    Fiber& n = b.fibers[next];
    n.state = State::running;
    qlemu_current = &n.ts;
    target = n.sp, bottom = n.stack.base, size = n.stack.size;
  } else {
    qlemu_current = nullptr;
    target = w.sched_sp, bottom = w.sched_stack_bottom, size = w.sched_stack_size;
  }
#if QLEMU_ASAN
  __sanitizer_start_switch_fiber(final ? nullptr : &f.asan_fake_stack, bottom, size);
#else
  (void)final, (void)bottom, (void)size;
#endif
  qlemu_switch(&f.sp, target);
#if QLEMU_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, nullptr, nullptr);
#endif
}

static void release_barrier(Block& b) {
  const Fiber* first = nullptr;
  for (int i = 0; i < b.threads; i++) {
    const Fiber& f = b.fibers[i];
    if (f.state != State::barrier) continue;
    if (!first) {
      first = &f;
    } else if (f.site.line != first->site.line || strcmp(f.site.file, first->site.file) != 0) {
      abort_block(b, "divergent barrier: the live threads of the block wait at different __syncthreads");
    }
  }
  // __syncthreads_count/_and/_or: fold the predicates, then hand every waiter the result.
  int count = 0, all = 1, any = 0;
  for (int i = 0; i < b.threads; i++) {
    const Fiber& f = b.fibers[i];
    if (f.state != State::barrier) continue;
    count += f.pred != 0;
    all &= f.pred != 0;
    any |= f.pred != 0;
  }
  b.at_barrier = 0;
  for (int i = 0; i < b.threads; i++) {
    Fiber& f = b.fibers[i];
    if (f.state != State::barrier) continue;
    f.pred = f.call.a == 0 ? count : f.call.a == 1 ? all : any;
    make_ready(b, i);
  }
}

static void fiber_exit(Fiber& f) {
  Block& b = *f.block;
  f.state = State::exited;
  b.live--;
  const int base = f.linear - (int)f.ts.lane;
  b.warp_exited[f.linear / 32] |= 1u << f.ts.lane;
  for (unsigned waiting = b.warp_waiting[f.linear / 32]; waiting; waiting &= waiting - 1) {
    const int l = __builtin_ctz(waiting);
    const Fiber& g = b.fibers[base + l];
    if (g.call.mask >> f.ts.lane & 1u) {
      char msg[256];
      snprintf(msg, sizeof msg, "thread %d (lane %u) exited while lane %d waits for it at %s with mask 0x%08x", f.linear,
               f.ts.lane, l, g.what, g.call.mask);
      abort_block(b, msg);
    }
  }
  if (b.at_barrier > 0 && b.at_barrier == b.live) release_barrier(b);
}

static void fiber_entry(void* arg) {
  Fiber& f = *static_cast<Fiber*>(arg);
#if QLEMU_ASAN
  // The first fiber a worker ever runs is entered from the scheduler: remember that stack to switch back to.
  Worker& w = *f.block->worker;
  if (!w.sched_stack_bottom)
    __sanitizer_finish_switch_fiber(nullptr, &w.sched_stack_bottom, &w.sched_stack_size);
  else
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  f.block->launch->thunk(f.block->launch->ctx);
  fiber_exit(f);
  yield(f, true);
  __builtin_trap();  // an exited fiber is never resumed
}

// Scheduler -> the block's first ready fiber; control comes back only when no fiber of the block is ready.
static void run_fibers(Block& b) {
  Worker& w = *b.worker;
  const int i = next_ready(b);
  if (i < 0) return;
  Fiber& f = b.fibers[i];
  f.state = State::running;
  qlemu_current = &f.ts;
#if QLEMU_ASAN
  __sanitizer_start_switch_fiber(&w.sched_fake_stack, f.stack.base, f.stack.size);
#endif
  qlemu_switch(&w.sched_sp, f.sp);
#if QLEMU_ASAN
  __sanitizer_finish_switch_fiber(w.sched_fake_stack, nullptr, nullptr);
#endif
  qlemu_current = nullptr;
}

static size_t stack_bytes() {
  static const size_t bytes = env_size("QALORA_EMU_STACK_KB", QLEMU_ASAN ? 512 : 256) * 1024;
  return bytes;
}

static void run_block(const LaunchDesc& d, uint64_t linear_block, uint64_t seed) {
  Worker& w = tl_worker;
  const int n = (int)(d.block.x * d.block.y * d.block.z);
  Block b;
  b.worker = &w;
  b.launch = &d;
  b.idx = uint3{(unsigned)(linear_block % d.grid.x), (unsigned)(linear_block / d.grid.x % d.grid.y),
                (unsigned)(linear_block / ((uint64_t)d.grid.x * d.grid.y))};
  b.threads = n;
  b.live = n;
  b.at_barrier = 0;
  b.head = 0;
  b.rng = seed ? splitmix(seed ^ splitmix(linear_block + 1)) | 1 : 0;
  memset(b.warp_waiting, 0, sizeof b.warp_waiting);
  memset(b.warp_exited, 0, sizeof b.warp_exited);
  // Dynamic shared memory: malloc'd per block so AddressSanitizer bounds it, filled with 0xff so a read
  // of a slot nobody wrote is a NaN / -1, not a plausible value left by the previous block.
  b.smem = malloc(d.smem ? d.smem : 1);
  memset(b.smem, 0xff, d.smem);
  while ((int)w.stacks.size() < n) w.stacks.push_back(stack_alloc(stack_bytes()));
  if ((int)w.fibers.size() < n) w.fibers.resize(n);
  b.fibers = w.fibers.data();
  b.ready.reserve(n);
  for (int i = 0; i < n; i++) {
    Fiber& f = b.fibers[i];
    f.ts.threadIdx = uint3{(unsigned)(i % d.block.x), (unsigned)(i / d.block.x % d.block.y),
                           (unsigned)(i / (d.block.x * d.block.y))};
    f.ts.blockIdx = b.idx;
    f.ts.blockDim = d.block;
    f.ts.gridDim = d.grid;
    f.ts.lane = (unsigned)(i % 32);
    f.ts.fiber = &f;
    f.block = &b;
    f.linear = i;
    f.site = Site{"", 0};
    f.what = "";
    f.pred = 0;
    f.stack = w.stacks[i];
    f.asan_fake_stack = nullptr;
    f.copies.clear();
    f.open_group = 0;
    f.sp = fiber_prepare(f.stack, fiber_entry, &f);
    make_ready(b, i);
  }
  run_fibers(b);
  if (b.live > 0) abort_block(b, "deadlock: no thread of the block can proceed");
  free(b.smem);
}

void* dynamic_smem() {
  Fiber* f = current_fiber();
  if (!f) fatal_in_kernel(Site{__FILE__, __LINE__}, "dynamic shared memory used outside a kernel");
  return f->block->smem;
}

// ---- Barriers and warp collectives ----------------------------------------------------------------------------

static Fiber& kernel_fiber(Site at, const char* what) {
  Fiber* f = current_fiber();
  if (!f) fatal_in_kernel(at, "%s called outside a kernel", what);
  return *f;
}

int syncthreads_reduce(Site at, int pred, int how) {
  static const char* names[] = {"__syncthreads_count", "__syncthreads_and", "__syncthreads_or", "__syncthreads"};
  Fiber& f = kernel_fiber(at, names[how]);
  Block& b = *f.block;
  f.state = State::barrier;
  f.site = at;
  f.what = names[how];
  f.pred = pred;
  f.call.a = how;
  if (++b.at_barrier == b.live) release_barrier(b);
  yield(f);
  return f.pred;
}

void syncthreads(Site at) { syncthreads_reduce(at, 1, 3); }

void execute_warp_op(Fiber* lanes[32], unsigned mask, Site at);  // emu_warp.cpp

void warp_collective(Site at, const WarpCall& call) {
  Fiber& f = kernel_fiber(at, call.what);
  Block& b = *f.block;
  const unsigned lane = f.ts.lane;
  const int warp = f.linear / 32, base = f.linear - (int)lane;
  const int in_warp = std::min(32, b.threads - base);
  const unsigned exists = in_warp == 32 ? 0xffffffffu : (1u << in_warp) - 1;
  if (!(call.mask >> lane & 1u))
    fatal_in_kernel(at, "%s: the calling lane %u is not in its mask 0x%08x", call.what, lane, call.mask);
  if (call.mask & ~exists)
    fatal_in_kernel(at, "%s: mask 0x%08x names lanes this warp does not have (the block has %d threads)", call.what,
                    call.mask, b.threads);
  if (call.mask & b.warp_exited[warp])
    fatal_in_kernel(at, "%s: lane %d named in mask 0x%08x has already exited", call.what,
                    __builtin_ctz(call.mask & b.warp_exited[warp]), call.mask);
  f.call = call;
  f.state = State::warp;
  f.site = at;
  f.what = call.what;
  b.warp_waiting[warp] |= 1u << lane;
  // Complete once every lane of the mask waits with this same mask (lanes may wait in other, nested groups).
  bool complete = (b.warp_waiting[warp] & call.mask) == call.mask;
  Fiber* lanes[32] = {};
  for (unsigned m = complete ? call.mask : 0; m; m &= m - 1) {
    const int l = __builtin_ctz(m);
    lanes[l] = &b.fibers[base + l];
    if (lanes[l]->call.mask != call.mask) complete = false;
  }
  if (complete) {
    for (int l = 0; l < 32; l++) {
      if (!lanes[l]) continue;
      const WarpCall& c = lanes[l]->call;
      const bool shfl = call.op == WarpOp::shfl_idx || call.op == WarpOp::shfl_up || call.op == WarpOp::shfl_down ||
                        call.op == WarpOp::shfl_bfly;
      bool same = c.op == call.op && c.size == call.size;
      if (shfl) same = same && c.b == call.b;                       // width
      if (call.op == WarpOp::ldmatrix) same = same && c.a == call.a;  // .trans
      if (!same) {
        char msg[512];
        snprintf(msg, sizeof msg, "mismatched warp collectives: lane %u calls %s, lane %d calls %s (mask 0x%08x)", lane,
                 call.what, l, c.what, call.mask);
        abort_block(b, msg);
      }
    }
    execute_warp_op(lanes, call.mask, at);
    b.warp_waiting[warp] &= ~call.mask;
    for (int l = 0; l < 32; l++)
      if (lanes[l]) make_ready(b, base + l);
  }
  yield(f);
}

// ---- Launch ---------------------------------------------------------------------------------------------------

namespace {

struct Job {
  const LaunchDesc* d;
  uint64_t blocks;
  uint64_t seed;
  std::atomic<uint64_t> next{0};
};

void drain(Job& job) {
  for (uint64_t i; (i = job.next.fetch_add(1)) < job.blocks;) run_block(*job.d, i, job.seed);
}

// Helper threads wait for a job, take blocks until none is left, and report back. The launching thread
// takes blocks too, so a one-block grid never pays for a wake-up.
class Pool {
 public:
  explicit Pool(int helpers) {
    for (int i = 0; i < helpers; i++) std::thread([this] { serve(); }).detach();
    helpers_ = helpers;
  }
  void run(Job& job) {
    const int helpers = (int)std::min<uint64_t>((uint64_t)helpers_, job.blocks - 1);
    {
      std::lock_guard<std::mutex> lock(m_);
      job_ = &job;
      wanted_ = helpers;
      busy_ = helpers;
      generation_++;
    }
    if (helpers > 0) wake_.notify_all();
    drain(job);
    std::unique_lock<std::mutex> lock(m_);
    done_.wait(lock, [&] { return busy_ == 0; });
    job_ = nullptr;
  }

 private:
  void serve() {
    uint64_t seen = 0;
    for (;;) {
      Job* job;
      {
        std::unique_lock<std::mutex> lock(m_);
        wake_.wait(lock, [&] { return generation_ != seen && wanted_ > 0; });
        seen = generation_;
        wanted_--;
        job = job_;
      }
      drain(*job);
      std::lock_guard<std::mutex> lock(m_);
      if (--busy_ == 0) done_.notify_all();
    }
  }
  std::mutex m_;
  std::condition_variable wake_, done_;
  Job* job_ = nullptr;
  uint64_t generation_ = 0;
  int wanted_ = 0, busy_ = 0, helpers_ = 0;
};

Pool& pool() {
  static Pool* p = [] {
    size_t n = env_size("QALORA_EMU_THREADS", std::max(1u, std::thread::hardware_concurrency()));
    return new Pool((int)std::max<size_t>(n, 1) - 1);  // never destroyed: helpers may outlive static teardown
  }();
  return *p;
}

std::mutex launch_mutex;
std::mutex attr_mutex;
std::vector<std::pair<const void*, int>> max_dyn_smem;

}  // namespace

void set_max_dynamic_smem(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(attr_mutex);
  for (auto& e : max_dyn_smem)
    if (e.first == kernel) {
      e.second = bytes;
      return;
    }
  max_dyn_smem.emplace_back(kernel, bytes);
}

static size_t dyn_smem_limit(const void* kernel) {
  std::lock_guard<std::mutex> lock(attr_mutex);
  for (auto& e : max_dyn_smem)
    if (e.first == kernel) return std::max(kDefaultDynSmem, (size_t)e.second);
  return kDefaultDynSmem;
}

static int launch_error(const LaunchDesc& d, int code, const char* why) {
  fprintf(stderr, "qalora emu: launch of %s at %s:%d failed: %s\n", d.name, d.at.file, d.at.line, why);
  return api_record_error(code);
}

int launch(const LaunchDesc& d) {
  if (current_fiber())
    fatal_in_kernel(d.at, "launch of %s from device code: dynamic parallelism is not supported", d.name);
  char why[256];
  const dim3 g = d.grid, t = d.block;
  const uint64_t threads = (uint64_t)t.x * t.y * t.z;
  if (!t.x || !t.y || !t.z || t.x > 1024 || t.y > 1024 || t.z > 64 || threads > 1024) {
    snprintf(why, sizeof why, "block (%u,%u,%u) is not a valid block (at most 1024 threads, 1024x1024x64)", t.x, t.y, t.z);
    return launch_error(d, 9 /*cudaErrorInvalidConfiguration*/, why);
  }
  if (!g.x || !g.y || !g.z || g.x > 2147483647u || g.y > 65535 || g.z > 65535) {
    snprintf(why, sizeof why, "grid (%u,%u,%u) is not a valid grid", g.x, g.y, g.z);
    return launch_error(d, 9, why);
  }
  const size_t limit = dyn_smem_limit(d.kernel);
  if (d.smem > limit) {
    snprintf(why, sizeof why, "%zu bytes of dynamic shared memory exceed the kernel's limit of %zu%s", d.smem, limit,
             limit == kDefaultDynSmem ? " (raise it with cudaFuncAttributeMaxDynamicSharedMemorySize)" : "");
    return launch_error(d, 1 /*cudaErrorInvalidValue*/, why);
  }
  static const bool hooked = (hook_sanitizer_death(), true);
  (void)hooked;
  count_launch();
  std::lock_guard<std::mutex> lock(launch_mutex);
  Job job;
  job.d = &d;
  job.blocks = (uint64_t)g.x * g.y * g.z;
  job.seed = env_size("QALORA_EMU_SEED", 0);
  pool().run(job);
  return 0;
}

}  // namespace qlemu
