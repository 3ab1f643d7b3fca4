// Skinny matrix product y[M, N] = x[M, K] @ w[K, N] (float32, row-major) for XLA:CPU, as an XLA FFI
// custom call (see w2s_jax/cpu_kernels.py, which compiles this file on first use).
//
// Decoding one token per row is a chain of matrix-VECTOR products whose speed is set by how fast the
// weights stream from memory. XLA:CPU's dot reaches about 26 GB/s on them on a 2-core EPYC; two
// threads reading contiguous rows reach about 45 GB/s. This kernel streams w row by row, eight rows at
// a time, so every thread reads long contiguous runs:
//   - N large (the output head, [D, V]): each thread takes a panel of columns and all of K;
//   - otherwise: each thread takes a range of K (rows of w) into a private partial y, and the
//     partials are summed at the end (M * N floats per thread: a few KB).
// Work is split into one chunk per intra-op thread (w2s::run_chunks). Written with GCC/Clang vector
// extensions (compiled for the host with -march=native), no intrinsics.

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "w2s_cpu.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using w2s::kLanes, w2s::vf, w2s::load, w2s::store, w2s::splat;
constexpr int64_t kBlock = 512;  // columns per pass over the rows of x: 8 x 512 floats of w stay in L1

// y[m, n0:n1] = sum_{k in [k0, k1)} x[m, k] * w[k, n0:n1] (y rows have stride ldy). Eight rows of w at a
// time: they are adjacent in memory, so the reads form one sequential stream, and y is loaded and
// stored once per eight rows (four rows per pass measured slower: 19 ms against 16.5 ms per token).
void rows_kernel(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t k0,
                 int64_t k1, int64_t n0, int64_t n1, int64_t ldy) {
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * ldy + n0, y + m * ldy + n1, 0.0f);
  const int64_t nv = n0 + (n1 - n0) / kLanes * kLanes;  // vector part [n0, nv)
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    const float* w0 = w + k * N;
    for (int64_t jb = n0; jb < n1; jb += kBlock) {
      const int64_t je = std::min(n1, jb + kBlock), jv = std::min(nv, je);
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K + k;
        const vf a0 = splat(xm[0]), a1 = splat(xm[1]), a2 = splat(xm[2]), a3 = splat(xm[3]);
        const vf a4 = splat(xm[4]), a5 = splat(xm[5]), a6 = splat(xm[6]), a7 = splat(xm[7]);
        float* ym = y + m * ldy;
        for (int64_t j = jb; j < jv; j += kLanes) {
          const float* p = w0 + j;
          const vf s0 = load(ym + j) + a0 * load(p) + a1 * load(p + N) + a2 * load(p + 2 * N) + a3 * load(p + 3 * N);
          const vf s1 = a4 * load(p + 4 * N) + a5 * load(p + 5 * N) + a6 * load(p + 6 * N) + a7 * load(p + 7 * N);
          store(ym + j, s0 + s1);
        }
        for (int64_t j = std::max(jb, nv); j < je; ++j) {
          float acc = ym[j];
          for (int r = 0; r < 8; ++r) acc += xm[r] * w0[r * N + j];
          ym[j] = acc;
        }
      }
    }
  }
  for (; k < k1; ++k) {  // the last K % 8 rows
    const float* w0 = w + k * N;
    for (int64_t m = 0; m < M; ++m) {
      const float a = x[m * K + k];
      float* ym = y + m * ldy;
      for (int64_t j = n0; j < n1; ++j) ym[j] += a * w0[j];
    }
  }
}

struct Job : w2s::Chunks {
  const float* x;
  const float* w;
  float* y;
  int64_t M, K, N;
  bool split_k;
  std::vector<float> partial;  // split_k: chunks x M x N

  void run_chunk(int64_t c) {
    if (split_k) {
      const int64_t k0 = K * c / chunks, k1 = K * (c + 1) / chunks;
      float* out = c == 0 ? y : partial.data() + (c - 1) * M * N;
      rows_kernel(x, w, out, M, K, N, k0, k1, 0, N, N);
    } else {
      // column panels on multiples of the vector width
      const int64_t blocks = (N + kLanes - 1) / kLanes;
      const int64_t n0 = std::min(N, blocks * c / chunks * kLanes), n1 = std::min(N, blocks * (c + 1) / chunks * kLanes);
      if (n1 > n0) rows_kernel(x, w, y, M, K, N, 0, K, n0, n1, N);
    }
  }
};

ffi::Error SkinnyMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (wd.size() != 2 || xd.size() < 1) return ffi::Error::InvalidArgument("skinny_matmul: w must be 2-D, x at least 1-D");
  const int64_t K = wd[0], N = wd[1];
  if (xd[xd.size() - 1] != K) return ffi::Error::InvalidArgument("skinny_matmul: x's last dimension must equal w's first");
  int64_t M = 1;
  for (size_t i = 0; i + 1 < xd.size(); ++i) M *= xd[i];
  if (static_cast<int64_t>(y->element_count()) != M * N)
    return ffi::Error::InvalidArgument("skinny_matmul: output must have M * N elements");

  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // below ~256 KB of weights the threads cost more than they save
  if (K * N < (int64_t{1} << 16)) threads = 1;
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->w = w.typed_data();
  job->y = y->typed_data();
  job->M = M;
  job->K = K;
  job->N = N;
  job->split_k = N < 4096 * threads && K >= 8 * threads;
  job->chunks = threads;
  if (job->split_k && threads > 1) job->partial.assign((threads - 1) * M * N, 0.0f);
  w2s::run_chunks(pool, job, threads);
  if (job->split_k) {
    float* out = job->y;
    for (int64_t c = 1; c < job->chunks; ++c) {
      const float* p = job->partial.data() + (c - 1) * M * N;
      for (int64_t i = 0; i < M * N; ++i) out[i] += p[i];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(W2sSkinnyMatmul, SkinnyMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
