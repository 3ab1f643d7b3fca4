// Helpers shared by the native XLA:CPU kernels: 16-float vectors (GCC/Clang vector extensions, compiled
// for the host with -march=native) and running a job's chunks on XLA's intra-op thread pool.

#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace w2s {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }
inline vf splat(float s) { return s - (vf){}; }

// Chunks [0, chunks) of a job, claimed one at a time by whichever thread is free.
struct Chunks {
  int64_t chunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Runs job->run_chunk(c) for every chunk c on `threads` threads: threads - 1 tasks of the pool and the
// calling thread, which claims chunks too, so the call finishes even when the pool's other threads are
// busy (no waiting on work that has not started). Returns when every chunk has run.
template <class Job>
void run_chunks(xla::ffi::ThreadPool& pool, const std::shared_ptr<Job>& job, int64_t threads) {
  auto work = [job] {
    for (int64_t c; (c = job->next.fetch_add(1, std::memory_order_relaxed)) < job->chunks;) {
      job->run_chunk(c);
      job->done.fetch_add(1, std::memory_order_acq_rel);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([work] { work(); });
  work();
  while (job->done.load(std::memory_order_acquire) < job->chunks) std::this_thread::yield();
}

}  // namespace w2s
