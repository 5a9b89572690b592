#include "threadpool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace qalora::cpu_rt {
namespace {

thread_local bool inside_task = false;

/// How long a thread polls for the next job (a worker) or for the others to finish (the caller) before it
/// sleeps on a condition variable. A decoded token is a few hundred short jobs with a little JS between them;
/// waking a sleeping thread is a futex and, on a VM, an idle vCPU brought back — tens of µs a job, during
/// which the job runs on one core. QALORA_SPIN_US overrides it (0: always sleep).
std::chrono::nanoseconds spin_time() {
  static const std::chrono::nanoseconds t = [] {
    const char* env = std::getenv("QALORA_SPIN_US");
    return std::chrono::microseconds(env ? std::max(0, std::atoi(env)) : 200);
  }();
  return t;
}

/// Polls ready() until it holds (true) or the spin time has passed (false). Yields now and then, so a
/// poller gives its core to a runnable thread of another process instead of holding it.
template <class Ready>
bool spin_until(Ready ready) {
  const auto limit = spin_time();
  if (limit.count() == 0) return ready();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 1;; i++) {
    if (ready()) return true;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
    if (i % 64 == 0) {
      if (std::chrono::steady_clock::now() - start > limit) return ready();
      std::this_thread::yield();
    }
  }
}

class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; i++) workers_.emplace_back([this] { work(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return (int)workers_.size() + 1; }

  void run(int64_t tasks, const std::function<void(int64_t)>& body) {
    std::lock_guard<std::mutex> one_job_at_a_time(run_mu_);  // a second caller thread waits its turn
    {
      std::lock_guard<std::mutex> lock(mu_);
      body_ = &body;
      tasks_ = tasks;
      next_.store(0);
      active_.store((int)workers_.size());
      generation_.fetch_add(1, std::memory_order_release);  // publishes the job to polling workers
    }
    wake_.notify_all();
    drain();
    if (!spin_until([this] { return active_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lock(mu_);
      done_.wait(lock, [this] { return active_.load(std::memory_order_acquire) == 0; });
    }
    body_ = nullptr;
  }

 private:
  void drain() {
    inside_task = true;
    for (int64_t t; (t = next_.fetch_add(1)) < tasks_;) (*body_)(t);
    inside_task = false;
  }
  void work() {
    uint64_t seen = 0;
    for (;;) {
      const auto posted = [&] { return generation_.load(std::memory_order_acquire) != seen; };
      if (!spin_until(posted)) {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, posted);
      }
      seen = generation_.load(std::memory_order_acquire);
      if (stop_) return;
      drain();
      if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mu_);  // the caller checks active_ under it before it sleeps
        done_.notify_one();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* body_ = nullptr;
  int64_t tasks_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> active_{0};
  std::atomic<uint64_t> generation_{0};
  bool stop_ = false;
};

int configured_threads() {
  if (const char* env = std::getenv("QALORA_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

Pool& pool() {
  static Pool p(configured_threads());
  return p;
}

}  // namespace

int thread_count() { return pool().size(); }

void parallel_for(int64_t tasks, const std::function<void(int64_t)>& body) {
  if (tasks <= 0) return;
  if (tasks == 1 || inside_task || pool().size() == 1) {
    for (int64_t t = 0; t < tasks; t++) body(t);
    return;
  }
  pool().run(tasks, body);
}

void parallel_range(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(thread_count(), n / std::max<int64_t>(1, grain)));
  const int64_t step = (n + chunks - 1) / chunks;
  parallel_for(chunks, [&](int64_t c) {
    const int64_t b = c * step, e = std::min(n, b + step);
    if (b < e) body(b, e);
  });
}

void parallel_chunks(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(8 * thread_count(), n / std::max<int64_t>(1, grain)));
  const int64_t step = (n + chunks - 1) / chunks;
  parallel_for((n + step - 1) / step, [&](int64_t c) { body(c * step, std::min(n, (c + 1) * step)); });
}

}  // namespace qalora::cpu_rt
