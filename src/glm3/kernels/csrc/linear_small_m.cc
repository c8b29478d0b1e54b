// glm3 CPU kernel: y = x W^T for a few rows of x (decoding), float32, streaming W once.
//
// MindSpore's CPU MatMul reads a [65024, 1024] weight at about half the machine's memory bandwidth when x
// has one row; decoding is bound by exactly that read, so this kernel exists. Built on first use by
// glm3/kernels/linear.py with the host compiler and called as a MindSpore AOT custom operator
// (inputs x [m, k], w [n, k]; output y [m, n]).
//
// Work is split over the cores by a small pool of our own: OpenMP's default busy-waiting after each
// call starves MindSpore's own CPU threads between kernels (measured: spinning workers halve the
// decode speed). Workers sleep on a condition variable between calls.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32), aligned(4)));
inline v8 ld(const float *p) { return *reinterpret_cast<const v8 *>(p); }
inline float hsum(v8 v) {
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += v[l];
  return s;
}
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

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
      {
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

Pool &pool() {
  static Pool p;
  return p;
}

// Rows [j0, j1) of w (j0, j1 multiples of 4 except at the very end), M rows of x.
template <int M>
void rows_kernel(const float *x, const float *w, float *y, int64_t k, int64_t n, int64_t j0, int64_t j1) {
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) {
    const float *w0 = w + j * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
    v8 a0[M], a1[M], a2[M], a3[M];
    for (int i = 0; i < M; ++i) a0[i] = a1[i] = a2[i] = a3[i] = v8{};
    int64_t t = 0;
    for (; t + 8 <= k; t += 8) {
      const v8 b0 = ld(w0 + t), b1 = ld(w1 + t), b2 = ld(w2 + t), b3 = ld(w3 + t);
      for (int i = 0; i < M; ++i) {
        const v8 xv = ld(x + i * k + t);
        a0[i] += xv * b0;
        a1[i] += xv * b1;
        a2[i] += xv * b2;
        a3[i] += xv * b3;
      }
    }
    for (int i = 0; i < M; ++i) {
      float s0 = hsum(a0[i]), s1 = hsum(a1[i]), s2 = hsum(a2[i]), s3 = hsum(a3[i]);
      for (int64_t r = t; r < k; ++r) {
        const float xv = x[i * k + r];
        s0 += xv * w0[r];
        s1 += xv * w1[r];
        s2 += xv * w2[r];
        s3 += xv * w3[r];
      }
      float *yr = y + i * n + j;
      yr[0] = s0;
      yr[1] = s1;
      yr[2] = s2;
      yr[3] = s3;
    }
  }
  for (; j < j1; ++j) {
    for (int i = 0; i < M; ++i) {
      float s = 0.f;
      for (int64_t r = 0; r < k; ++r) s += x[i * k + r] * w[j * k + r];
      y[i * n + j] = s;
    }
  }
}

template <int M>
void run_rows(const float *x, const float *w, float *y, int64_t k, int64_t n) {
  Pool &p = pool();
  const int64_t parts = p.size();
  const int64_t chunk = ((n + parts - 1) / parts + 3) / 4 * 4;
  p.run([&](unsigned part) {
    const int64_t j0 = std::min<int64_t>(n, part * chunk), j1 = std::min<int64_t>(n, j0 + chunk);
    if (j0 < j1) rows_kernel<M>(x, w, y, k, n, j0, j1);
  });
}

}  // namespace

extern "C" int glm3_linear_small_m(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 2 || shapes[0][1] != shapes[1][1]) return 1;
  for (int i = 0; i < 3; ++i)
    if (dtypes[i][0] != 'f' || dtypes[i][5] != '3') return 2;  // "float32" only
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t m = shapes[0][0], k = shapes[0][1], n = shapes[1][0];
  for (int64_t i0 = 0; i0 < m; i0 += 4) {
    const int64_t rows = m - i0 < 4 ? m - i0 : 4;
    const float *xb = x + i0 * k;
    float *yb = y + i0 * n;
    switch (rows) {
      case 1: run_rows<1>(xb, w, yb, k, n); break;
      case 2: run_rows<2>(xb, w, yb, k, n); break;
      case 3: run_rows<3>(xb, w, yb, k, n); break;
      default: run_rows<4>(xb, w, yb, k, n); break;
    }
  }
  return 0;
}
