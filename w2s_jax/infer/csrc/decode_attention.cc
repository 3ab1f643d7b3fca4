// Decode attention over a KV cache for XLA:CPU, as an XLA FFI custom call (see w2s_jax/infer/kernels.py).
//
// One new query token per row attends to the slots [lo[b], hi[b]) of its row's cache. A decode cache is
// allocated for the longest prompt plus max_new_tokens, so most of it is empty most of the time; XLA's
// masked attention reads (and multiplies) every slot of it, at about 3 GB/s on the batched [G, Dh] x
// [Dh, S] products of grouped-query attention. This kernel reads only the live slots, once, and returns
// the un-normalised softmax partials, which the caller combines with the other key blocks (the token
// itself, a shared prefix):
//   m[b, k, g] = max_s q.k_s      l[b, k, g] = sum_s exp(q.k_s - m)      o[b, k, g, :] = sum_s exp(q.k_s - m) v_s
// (an empty range gives m = -1e30, l = 0, o = 0). q is already scaled by 1/sqrt(Dh).
//
// Shapes: q [B, K, G, D], k/v [B, K, S, D] (float32, row-major), lo/hi [B] (int32). Work is one chunk per
// (row, kv head), claimed by the intra-op threads and the calling thread (w2s::run_chunks). exp is a vectorised
// polynomial (Cephes' expf: relative error below 2e-7 on [-87, 0]; below that the terms are 0).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "w2s_cpu.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using w2s::kLanes, w2s::vf, w2s::load, w2s::store, w2s::splat;
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));
inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// exp(x) for x <= 0 (lanes below -87.3 give 0)
inline vf vexp(vf x) {
  const vf lo = splat(-87.3f);
  const vi under = x < lo;
  x = x < lo ? lo : x;
  const vf n = __builtin_convertvector(__builtin_convertvector(x * splat(1.44269504088896341f) +
                                                               (x < splat(0.0f) ? splat(-0.5f) : splat(0.5f)), vi),
                                       vf);  // round to nearest
  vf r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  vi bits;
  std::memcpy(&bits, &p, sizeof(vf));
  bits += __builtin_convertvector(n, vi) << 23;
  vf out;
  std::memcpy(&out, &bits, sizeof(vf));
  return under ? splat(0.0f) : out;
}

struct AttnJob : w2s::Chunks {
  const float *q, *k, *v;
  const int32_t *lo, *hi;
  float *o, *m, *l;
  int64_t K, G, S, D;

  // chunk t: row t / K, kv head t % K
  void run_chunk(int64_t t) {
    thread_local std::vector<float> sc;
    const int64_t b = t / K;
    const int64_t s0 = std::max<int64_t>(0, lo[b]), s1 = std::min<int64_t>(S, hi[b]);
    const float* qt = q + t * G * D;
    const float* kt = k + t * S * D;
    const float* vt = v + t * S * D;
    float* ot = o + t * G * D;
    float* mt = m + t * G;
    float* lt = l + t * G;
    std::fill(ot, ot + G * D, 0.0f);
    const int64_t n = s1 - s0;
    if (n <= 0) {
      for (int64_t g = 0; g < G; ++g) mt[g] = -1e30f, lt[g] = 0.0f;
      return;
    }
    const int64_t np = (n + kLanes - 1) / kLanes * kLanes;  // scores of head g at sc[g * np + i]
    sc.resize(G * np);
    const bool vec = D % kLanes == 0;
    for (int64_t i = 0; i < n; ++i) {
      const float* ks = kt + (s0 + i) * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qt + g * D;
        float dot;
        if (vec) {
          vf acc = {};
          for (int64_t d = 0; d < D; d += kLanes) acc += load(qg + d) * load(ks + d);
          dot = hsum(acc);
        } else {
          dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * ks[d];
        }
        sc[g * np + i] = dot;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float* sg = sc.data() + g * np;
      float mx = -1e30f;
      for (int64_t i = 0; i < n; ++i) mx = std::max(mx, sg[i]);
      for (int64_t i = n; i < np; ++i) sg[i] = -1e30f;  // padding lanes: exp gives 0
      vf sum = {};
      for (int64_t i = 0; i < np; i += kLanes) {
        const vf e = vexp(load(sg + i) - splat(mx));
        store(sg + i, e);
        sum += e;
      }
      mt[g] = mx;
      lt[g] = hsum(sum);
    }
    for (int64_t i = 0; i < n; ++i) {
      const float* vs = vt + (s0 + i) * D;
      for (int64_t g = 0; g < G; ++g) {
        const float e = sc[g * np + i];
        float* og = ot + g * D;
        if (vec) {
          const vf ev = splat(e);
          for (int64_t d = 0; d < D; d += kLanes) store(og + d, load(og + d) + ev * load(vs + d));
        } else {
          for (int64_t d = 0; d < D; ++d) og[d] += e * vs[d];
        }
      }
    }
  }
};

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi,
                               ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> m,
                               ffi::ResultBuffer<ffi::F32> l) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || v.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("decode_attention: q, k and v must be 4-D");
  const int64_t B = qd[0], K = qd[1], G = qd[2], D = qd[3], S = kd[2];
  if (kd[0] != B || kd[1] != K || kd[3] != D || v.element_count() != k.element_count())
    return ffi::Error::InvalidArgument("decode_attention: k/v must be [B, K, S, D] for q [B, K, G, D]");
  if (static_cast<int64_t>(lo.element_count()) != B || static_cast<int64_t>(hi.element_count()) != B)
    return ffi::Error::InvalidArgument("decode_attention: lo and hi must have B elements");
  auto job = std::make_shared<AttnJob>();
  job->q = q.typed_data();
  job->k = k.typed_data();
  job->v = v.typed_data();
  job->lo = lo.typed_data();
  job->hi = hi.typed_data();
  job->o = o->typed_data();
  job->m = m->typed_data();
  job->l = l->typed_data();
  job->K = K;
  job->G = G;
  job->S = S;
  job->D = D;
  job->chunks = B * K;
  w2s::run_chunks(pool, job, std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), job->chunks));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(W2sDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
