// ExecuTorch registration of liftedge::lq_linear.out (schema in targets/executorch/ops.py):
//   lq_linear.out(Tensor x, Tensor signs, Tensor scale, Tensor in_scale, Tensor mix1,
//                 Tensor mix2, Tensor block_scale, Tensor codebook, *, Tensor(a!) out) -> Tensor(a!)
// x float32 [..., n]; float factors fp16 (as packed) or fp32. signs uint8 [tiles, groups, 16]
// (the table-lookup layout, lq_lut.h, which liftedge writes) runs the table-lookup kernel;
// uint8 [out, row_nbytes] (row-major, .pte files written before it) the fp32 MASK kernel.
// Shapes give n, n1, n2, d, D, so the op carries no integer arguments. Output rows (MASK) or
// row tiles (lookup) are split over ExecuTorch's threadpool, and so is a decode token's prepare
// (transform, lift, tables) on wide layers, token by token.
//
// Also C entries for tests and benchmarks (kernel.py): liftedge_set_threads (resizes the
// threadpool) and lq_lut_linear_threaded / lq_mask_linear_threaded (the kernels over it).
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <cstring>
#include <initializer_list>
#include <unordered_map>
#include <vector>

#include "et_linear.h"
#include "lq_linear.h"
#include "lq_lut.h"

#if __has_include(<executorch/extension/threadpool/threadpool.h>)
#include <executorch/extension/threadpool/threadpool.h>
#else
// The executorch wheel ships libexecutorch_threadpool.so but not this header; these two
// declarations match its exported symbols.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  size_t get_thread_count() const;
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool
#endif

namespace liftedge {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace {

// A layer's stored factors as float32 (and mix2 transposed), made on the layer's first call and
// kept per signs pointer: widening fp16 element by element is slower than the layer's whole
// table-lookup pass, so it is not repeated per token. Each call checks the stored bytes are still
// the ones the copies came from (memcmp, far cheaper than converting), so a program loaded later
// at the same address cannot read a stale copy.
struct Factors {
  std::vector<uint8_t> source;  // the stored bytes of the six tensors, concatenated
  std::vector<float> scale, in_scale, mix1, mix2, mix2t, block_scale, codebook;
};

bool to_float(const Tensor& t, std::vector<float>& dst) {
  const auto numel = t.numel();
  dst.resize(numel);
  if (t.scalar_type() == ScalarType::Float) {
    const float* p = t.const_data_ptr<float>();
    for (ssize_t i = 0; i < numel; ++i) dst[i] = p[i];
    return true;
  }
  if (t.scalar_type() == ScalarType::Half) {
    const auto* p = t.const_data_ptr<executorch::aten::Half>();
    for (ssize_t i = 0; i < numel; ++i) dst[i] = static_cast<float>(p[i]);
    return true;
  }
  return false;
}

bool same_source(const std::vector<uint8_t>& source, std::initializer_list<const Tensor*> ts) {
  size_t off = 0;
  for (const Tensor* t : ts) {
    const size_t n = t->nbytes();
    if (off + n > source.size() || std::memcmp(source.data() + off, t->const_data_ptr(), n) != 0) return false;
    off += n;
  }
  return off == source.size();
}

// The float32 factors of the layer whose signs are at `key`; nullptr if a factor is neither
// float16 nor float32.
const Factors* layer_factors(const void* key, std::initializer_list<const Tensor*> ts) {
  constexpr size_t MAX_LAYERS = 8192;  // bounded: programs loaded one after another do not grow it forever
  thread_local std::unordered_map<const void*, Factors> cache;
  auto it = cache.find(key);
  if (it != cache.end() && same_source(it->second.source, ts)) return &it->second;
  if (cache.size() >= MAX_LAYERS) cache.clear();
  Factors& f = cache[key];
  f.source.clear();
  for (const Tensor* t : ts) {
    const auto* p = static_cast<const uint8_t*>(t->const_data_ptr());
    f.source.insert(f.source.end(), p, p + t->nbytes());
  }
  const Tensor* const* v = ts.begin();
  const bool ok = to_float(*v[0], f.scale) && to_float(*v[1], f.in_scale) && to_float(*v[2], f.mix1) &&
                  to_float(*v[3], f.mix2) && to_float(*v[4], f.block_scale) && to_float(*v[5], f.codebook);
  if (!ok) {
    cache.erase(key);
    return nullptr;
  }
  const int64_t n2 = v[3]->size(0);
  f.mix2t.resize(f.mix2.size());
  for (int64_t i = 0; i < n2; ++i)
    for (int64_t j = 0; j < n2; ++j) f.mix2t[j * n2 + i] = f.mix2[i * n2 + j];
  return &f;
}

struct Scratch {
  std::vector<float> floats;
  std::vector<uint8_t> bytes;
};

void et_parallel(void*, int64_t n, int64_t grain, lq_range_fn fn, void* ctx) {
  executorch::extension::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { fn(ctx, b, e); });
}

// Each token's prepare (transform, lift, tables) is split over the threadpool from this
// input width up. Below it the serial prepare costs a few microseconds, about what the three
// extra thread hand-offs cost, and the hand-offs' price depends on the host: on one host of
// this 2-core VM the split made SmolLM2's 576-wide layers faster (decode ~100 -> ~110 tok/s),
// on another (2026-12-04 afternoon, same .pte) slower (split at 512: 86 tok/s decode, 148
// prefill; at 1024: 93 and 183). 1024 keeps it where the prepare is long enough to pay on both
// (Llama-3.2-1B's 2048-wide layers: 20.3 -> 22.1 tok/s; SmolLM2's 1536-wide down projection).
constexpr int64_t SPLIT_MIN_IN_FEATURES = 1024;

int lut_prepare(const lq_layer* L, const float* x, int64_t m, int mode, void* scratch) {
  return L->in_features >= SPLIT_MIN_IN_FEATURES ? lq_lut_prepare_split(L, x, m, mode, scratch, et_parallel, nullptr)
                                                 : lq_lut_prepare(L, x, m, mode, scratch);
}

// Row tiles per parallel chunk: 4 tiles = 128 rows, several KB of signs each.
constexpr int64_t LUT_GRAIN = 4;
constexpr int64_t MASK_GRAIN = 64;

void lut_threaded(const lq_layer* L, const void* scratch, int64_t m, int mode, float* y) {
  executorch::extension::parallel_for(0, lq_lut_tiles(L), LUT_GRAIN, [&](int64_t t0, int64_t t1) {
    lq_lut_rows(L, scratch, m, mode, y, t0, t1);
  });
}

void mask_threaded(const lq_layer* L, const float* scratch, int64_t m, float* y) {
  executorch::extension::parallel_for(0, L->out_features, MASK_GRAIN, [&](int64_t r0, int64_t r1) {
    lq_mask_rows(L, scratch, m, y, r0, r1);
  });
}

}  // namespace

Tensor& lq_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& signs, const Tensor& scale,
                      const Tensor& in_scale, const Tensor& mix1, const Tensor& mix2,
                      const Tensor& block_scale, const Tensor& codebook, Tensor& out) {
  thread_local Scratch scratch;
  const bool lut = signs.dim() == 3;
  ET_KERNEL_CHECK_MSG(ctx, signs.scalar_type() == ScalarType::Byte && (signs.dim() == 2 || (lut && signs.size(2) == 16)),
                      InvalidArgument, out,
                      "liftedge::lq_linear: signs must be uint8 [out, row_nbytes] or [tiles, groups, 16]");
  ET_KERNEL_CHECK_MSG(ctx, codebook.dim() == 2 && mix1.dim() == 2 && mix2.dim() == 2 && mix2.size(0) == mix2.size(1),
                      InvalidArgument, out, "liftedge::lq_linear: codebook, mix1, mix2 must be 2-D (mix2 square)");
  if (!prepare_linear_out(ctx, "liftedge::lq_linear", x, in_scale.numel(), scale.numel(), out)) return out;
  const Factors* f = layer_factors(signs.const_data_ptr(), {&scale, &in_scale, &mix1, &mix2, &block_scale, &codebook});
  ET_KERNEL_CHECK_MSG(ctx, f != nullptr, InvalidArgument, out, "liftedge::lq_linear: factors must be float16 or float32");

  lq_layer L{};
  L.in_features = in_scale.numel();
  L.out_features = scale.numel();
  L.n1 = mix1.size(0);
  L.n2 = mix2.size(0);
  L.d = codebook.size(0);
  L.D = codebook.size(1);
  L.signs = signs.const_data_ptr<uint8_t>();
  L.scale = f->scale.data();
  L.in_scale = f->in_scale.data();
  L.mix1 = f->mix1.data();
  L.mix2 = f->mix2.data();
  L.mix2t = f->mix2t.data();
  L.block_scale = f->block_scale.data();
  L.codebook = f->codebook.data();
  const bool signs_fit = lut ? signs.size(0) == lq_lut_tiles(&L) && signs.size(1) == lq_lut_groups(&L)
                             : signs.size(0) == L.out_features && signs.size(1) == lq_row_nbytes(&L);
  ET_KERNEL_CHECK_MSG(ctx, signs_fit && L.n1 * L.n2 == L.in_features &&
                      block_scale.numel() == (L.in_features + L.d - 1) / L.d,
                      InvalidArgument, out, "liftedge::lq_linear: inconsistent factor shapes");

  const int64_t m = x.numel() / L.in_features;
  const float* xp = x.const_data_ptr<float>();
  float* y = out.mutable_data_ptr<float>();
  int rc;
  if (lut) {
    scratch.bytes.resize(lq_lut_scratch_bytes(&L, m, LQ_LUT_TWO_PLANE));
    rc = lut_prepare(&L, xp, m, LQ_LUT_TWO_PLANE, scratch.bytes.data());
    if (rc == 0) lut_threaded(&L, scratch.bytes.data(), m, LQ_LUT_TWO_PLANE, y);
  } else {
    scratch.floats.resize(lq_scratch_floats(&L, m, LQ_METHOD_MASK));
    rc = lq_mask_prepare(&L, xp, m, scratch.floats.data());
    if (rc == 0) mask_threaded(&L, scratch.floats.data(), m, y);
  }
  ET_KERNEL_CHECK_MSG(ctx, rc == 0, InvalidArgument, out, "liftedge::lq_linear: kernel rejected its arguments");
  return out;
}

}  // namespace liftedge

extern "C" int liftedge_set_threads(int n) {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  return pool && n > 0 && pool->_unsafe_reset_threadpool(static_cast<uint32_t>(n)) ? 0 : 1;
}

extern "C" int lq_lut_linear_threaded(const lq_layer* L, const float* x, int64_t m, float* y, void* scratch, int mode) {
  const int rc = liftedge::lut_prepare(L, x, m, mode, scratch);
  if (rc == 0) liftedge::lut_threaded(L, scratch, m, mode, y);
  return rc;
}

extern "C" int lq_mask_linear_threaded(const lq_layer* L, const float* x, int64_t m, float* y, float* scratch) {
  const int rc = lq_mask_prepare(L, x, m, scratch);
  if (rc == 0) liftedge::mask_threaded(L, scratch, m, y);
  return rc;
}

EXECUTORCH_LIBRARY(liftedge, "lq_linear.out", liftedge::lq_linear_out);
