// The thread pool of glm3's CPU kernels, one for all the sources of this directory (they are built into one
// library, and pool() is an inline function: one instance across them).
//
// A small pool of our own: OpenMP's default busy-waiting after each call starves MindSpore's own CPU threads
// between kernels (measured: spinning workers halve the decode speed). Workers spin briefly after a call
// (kSpinMicros: a decoding step calls the kernels every few tens of microseconds, and waking a sleeping
// thread costs 50-100 us on a virtual machine, 2.5 ms a bench-shape step), then sleep on a condition variable.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace glm3 {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

constexpr int64_t kSpinMicros = 1000;

class Pool {
 public:
  Pool() : size_(std::max(1u, std::thread::hardware_concurrency())) {
    for (unsigned i = 1; i < size_; ++i) workers_.emplace_back([this, i] { loop(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto &t : workers_) t.join();
  }
  unsigned size() const { return size_; }
  // Run task(part) for part in [0, size) and return when all parts are done.
  void run(const std::function<void(unsigned)> &task) {
    std::lock_guard<std::mutex> serial(run_mu_);
    task_ = &task;
    remaining_.store(size_ - 1);
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_.fetch_add(1);
    }
    cv_.notify_all();
    task(0);
    while (remaining_.load(std::memory_order_acquire) > 0) cpu_relax();
  }

 private:
  void loop(unsigned part) {
    uint64_t seen = 0;  // the generation at construction: a run() may start before this thread does
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
      while (generation_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
        cpu_relax();
      if (generation_.load() == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load() != seen; });
      }
      seen = generation_.load();
      if (stop_) return;
      (*task_)(part);
      remaining_.fetch_sub(1, std::memory_order_release);
    }
  }
  unsigned size_;
  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> remaining_{0};
  const std::function<void(unsigned)> *task_ = nullptr;
  bool stop_ = false;
};

inline Pool &pool() {
  static Pool p;
  return p;
}

// Split [0, n) into one range per pool part, in multiples of `align`, and run body(begin, end) on each.
inline void parallel_ranges(int64_t n, int64_t align, const std::function<void(int64_t, int64_t)> &body) {
  Pool &p = pool();
  const int64_t parts = p.size();
  const int64_t chunk = ((n + parts - 1) / parts + align - 1) / align * align;
  p.run([&](unsigned part) {
    const int64_t b = std::min<int64_t>(n, part * chunk), e = std::min<int64_t>(n, b + chunk);
    if (b < e) body(b, e);
  });
}

}  // namespace glm3
