// A persistent pool of worker threads shared by every CPU kernel of the addon. Compiled once, without ISA
// flags (threadpool.cpp), so the AVX2 and portable kernels can both call it safely.
// QALORA_THREADS overrides the thread count (default: std::thread::hardware_concurrency()).
#pragma once
#include <cstdint>
#include <functional>

namespace qalora::cpu_rt {

/// Threads the pool runs work on, the calling thread included.
int thread_count();

/// Runs body(task) for task in [0, tasks) across the pool and returns when all are done. The calling thread
/// takes part; a call from inside a task runs its tasks serially (no nested parallelism, no deadlock).
void parallel_for(int64_t tasks, const std::function<void(int64_t task)>& body);

/// Runs body(begin, end) over [0, n) split into at most one chunk per thread, each at least `grain` long.
void parallel_range(int64_t n, int64_t grain, const std::function<void(int64_t begin, int64_t end)>& body);

/// The same over up to 8 chunks per thread, taken as threads come free: for bandwidth-bound loops (the GEMV),
/// where a thread that is descheduled or slower should not hold the others back with a fixed half.
void parallel_chunks(int64_t n, int64_t grain, const std::function<void(int64_t begin, int64_t end)>& body);

}  // namespace qalora::cpu_rt
