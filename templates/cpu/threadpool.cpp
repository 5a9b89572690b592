#include "threadpool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace qalora::cpu_rt {
namespace {

thread_local bool inside_task = false;

class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; i++) workers_.emplace_back([this] { work(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
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
      active_ = (int)workers_.size();
      generation_++;
    }
    wake_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return active_ == 0; });
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
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      drain();
      std::lock_guard<std::mutex> lock(mu_);
      if (--active_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* body_ = nullptr;
  int64_t tasks_ = 0;
  std::atomic<int64_t> next_{0};
  int active_ = 0;
  uint64_t generation_ = 0;
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
