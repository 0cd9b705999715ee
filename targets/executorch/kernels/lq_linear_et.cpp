// ExecuTorch registration of liftedge::lq_linear.out and its fused forms (schemas in
// targets/executorch/ops.py):
//   lq_linear.out(Tensor x, Tensor signs, Tensor scale, Tensor in_scale, Tensor mix1,
//                 Tensor mix2, Tensor block_scale, Tensor codebook, *, Tensor(a!) out) -> Tensor(a!)
//   lq_rms_linear.out(x, <the seven fields>, float eps, *, out): RMSNorm of x (its weight folded
//                 into in_scale by the export), then the layer
//   lq_glu.out(x, <gate's seven>, <up's seven>, float eps, int act, *, out): act(gate) * up of a
//                 gated MLP, with the RMSNorm before it when eps >= 0
//   lq_rms_linear3.out(x, <three layers' seven fields>, float eps, *, out0, out1, out2): the
//                 three lq_rms_linear of one input (q, k, v) in one call
//   rope.out(x, cos, sin, *, out): rotary position embedding (rotate-half form) of x [B, S, H, D],
//                 cos and sin [B or 1, S, D], in the layout ExecuTorch's attention ops read
//   lq_linear_add.out(x, <the seven fields>, Tensor residual, *, out): residual + the layer (a
//                 decoder block's residual add after o_proj / down_proj)
// x float32 [..., n]; float factors fp16 (as packed) or fp32. signs uint8 [tiles, groups, 16]
// (the table-lookup layout, lq_lut.h, which liftedge writes) runs the table-lookup kernel;
// uint8 [out, row_nbytes] (row-major, .pte files written before it) the fp32 MASK kernel.
// Shapes give n, n1, n2, d, D, so the op carries no integer arguments. Output rows (MASK) or
// row tiles (lookup) are split over ExecuTorch's threadpool, and so is a decode token's prepare
// (transform, lift, tables) by table segments, token by token. The fused forms exist to take
// operators off the graph: a decoder block's two RMSNorms, its SiLU, its multiply and its two
// residual adds each cost an XNNPACK or portable call per token, more than the arithmetic they
// do at decode.
//
// Also C entries for tests and benchmarks (kernel.py): liftedge_set_threads (resizes the
// threadpool) and lq_lut_linear_threaded / lq_mask_linear_threaded (the kernels over it).
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <tuple>
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

// Each token's prepare is split over the threadpool by table segments (lq_lut.h: each a task of
// its transform rows, lift and tables; one hand-off per token). Before the segments, a 576-wide
// layer's prepare ran on the calling thread (~4 us while the other thread waited) and wider
// ones in three hand-offs per token.
int lut_prepare(const lq_layer* L, const float* x, int64_t m, int mode, void* scratch) {
  return lq_lut_prepare_split(L, x, m, mode, scratch, et_parallel, nullptr);
}

// The two-plane prepare of `count` layers of one input x (a fused op's layers), each into its
// thread-local scratch (resized here): every layer's segments in one hand-off.
template <int N>
int prepare_layers(const lq_layer (&L)[N], const float* x, int64_t m, std::vector<uint8_t> (&scratch)[N]) {
  const lq_layer* layers[N];
  void* sp[N];
  for (int i = 0; i < N; ++i) {
    scratch[i].resize(lq_lut_scratch_bytes(&L[i], m, LQ_LUT_TWO_PLANE));
    layers[i] = &L[i];
    sp[i] = scratch[i].data();
  }
  return lq_lut_prepare_layers(N, layers, x, m, LQ_LUT_TWO_PLANE, sp, et_parallel, nullptr);
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

// The lift-project layer of seven stored tensors (signs, scale, in_scale, mix1, mix2,
// block_scale, codebook) with its float32 factors; false (ctx's error set) when they do not fit.
bool make_layer(KernelRuntimeContext& ctx, const char* name, const Tensor* const* t, lq_layer& L, bool& lut) {
  const Tensor &signs = *t[0], &scale = *t[1], &in_scale = *t[2], &mix1 = *t[3], &mix2 = *t[4],
               &block_scale = *t[5], &codebook = *t[6];
  lut = signs.dim() == 3;
  ET_KERNEL_CHECK_MSG(ctx, signs.scalar_type() == ScalarType::Byte && (signs.dim() == 2 || (lut && signs.size(2) == 16)),
                      InvalidArgument, false, "%s: signs must be uint8 [out, row_nbytes] or [tiles, groups, 16]", name);
  ET_KERNEL_CHECK_MSG(ctx, codebook.dim() == 2 && mix1.dim() == 2 && mix2.dim() == 2 && mix2.size(0) == mix2.size(1),
                      InvalidArgument, false, "%s: codebook, mix1, mix2 must be 2-D (mix2 square)", name);
  const Factors* f = layer_factors(signs.const_data_ptr(), {&scale, &in_scale, &mix1, &mix2, &block_scale, &codebook});
  ET_KERNEL_CHECK_MSG(ctx, f != nullptr, InvalidArgument, false, "%s: factors must be float16 or float32", name);
  L = lq_layer{};
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
                      InvalidArgument, false, "%s: inconsistent factor shapes", name);
  return true;
}

// RMSNorm without its weight (the export folds the weight into in_scale): each token of
// x [m, n] times 1 / sqrt(mean(x^2) + eps), into dst (the squares summed in double: a residual
// stream's outlier channels would otherwise cost float bits over thousands of terms), in 8
// interleaved partial sums: one chain of dependent double adds took ~0.8 us per 576-wide token,
// about a fifth of a layer's whole prepare, and the three q/k/v calls each normalize.
const float* rms_normalize(const float* x, int64_t m, int64_t n, double eps, std::vector<float>& dst) {
  constexpr int LANES = 8;
  dst.resize(m * n);
  for (int64_t t = 0; t < m; ++t) {
    const float* xt = x + t * n;
    double part[LANES] = {};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
      for (int k = 0; k < LANES; ++k) part[k] += static_cast<double>(xt[i + k]) * xt[i + k];
    for (; i < n; ++i) part[0] += static_cast<double>(xt[i]) * xt[i];
    double ss = 0.0;
    for (double p : part) ss += p;
    const float r = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
    for (int64_t i = 0; i < n; ++i) dst[t * n + i] = xt[i] * r;
  }
  return dst.data();
}

// One layer over x [m, n] into y: the table-lookup kernel (prepare, then row tiles over the
// threadpool) or the fp32 MASK kernel of the row-major layout.
int run_layer(const lq_layer* L, bool lut, const float* x, int64_t m, float* y) {
  thread_local Scratch scratch;
  if (lut) {
    scratch.bytes.resize(lq_lut_scratch_bytes(L, m, LQ_LUT_TWO_PLANE));
    const int rc = lut_prepare(L, x, m, LQ_LUT_TWO_PLANE, scratch.bytes.data());
    if (rc == 0) lut_threaded(L, scratch.bytes.data(), m, LQ_LUT_TWO_PLANE, y);
    return rc;
  }
  scratch.floats.resize(lq_scratch_floats(L, m, LQ_METHOD_MASK));
  const int rc = lq_mask_prepare(L, x, m, scratch.floats.data());
  if (rc == 0) mask_threaded(L, scratch.floats.data(), m, y);
  return rc;
}

// The layer of x (RMSNorm first when eps >= 0) into out, plus `residual` when given.
Tensor& linear_out(KernelRuntimeContext& ctx, const char* name, const Tensor& x, const Tensor* const* fields,
                   double eps, Tensor& out, const Tensor* residual = nullptr) {
  lq_layer L;
  bool lut;
  if (!make_layer(ctx, name, fields, L, lut) ||
      !prepare_linear_out(ctx, name, x, L.in_features, L.out_features, out))
    return out;
  const int64_t m = x.numel() / L.in_features;
  thread_local std::vector<float> normed;
  const float* xp = x.const_data_ptr<float>();
  if (eps >= 0) xp = rms_normalize(xp, m, L.in_features, eps, normed);
  if (residual) {
    ET_KERNEL_CHECK_MSG(ctx, residual->scalar_type() == ScalarType::Float && residual->numel() == out.numel(),
                        InvalidArgument, out, "%s: residual must be float32 with the output's shape", name);
  }
  float* y = out.mutable_data_ptr<float>();
  const int rc = run_layer(&L, lut, xp, m, y);
  ET_KERNEL_CHECK_MSG(ctx, rc == 0, InvalidArgument, out, "%s: kernel rejected its arguments", name);
  if (residual) {
    const float* r = residual->const_data_ptr<float>();
    for (ssize_t i = 0, n = out.numel(); i < n; ++i) y[i] += r[i];
  }
  return out;
}

// exp(x) in plain float arithmetic that the compiler vectorizes (std::exp is a scalar call per
// element: the activation of a 1536-row MLP cost more than XNNPACK's whole SiLU operator):
// 2^t, t = x log2 e, as 2^n (exponent bits) * 2^f with n = round(t) (the 1.5 * 2^23 trick: no
// float-to-int conversion, which keeps GCC from vectorizing) and 2^f, |f| <= 0.5, by its Taylor
// series to degree 7 (< 1e-8); x clamped to [-87, 88], where exp stays a normal float. Relative
// error <= 2e-6 (the rounding of t), far below the table-lookup kernel's ~1e-3.
inline float exp_approx(float x) {
  x = std::min(88.0f, std::max(-87.0f, x));
  const float t = x * 1.4426950408889634f;
  const float r = t + 12582912.0f;  // round(t) in the low mantissa bits of r
  const float n = r - 12582912.0f, f = t - n;
  float p = 1.5252733804059840e-5f;  // (ln 2)^7 / 7!, then Horner down to 1
  p = p * f + 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  int32_t rounded;
  std::memcpy(&rounded, &r, sizeof rounded);
  const int32_t bits = (rounded - 0x4B400000 + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// y[i] = act(g[i]) * y[i] for the gated MLP's activations (lq_glu's `act`): 0 SiLU, 1 GELU
// (tanh approximation, tanh(z) = 1 - 2 / (exp(2 z) + 1)); one loop per activation, vectorized.
void gate_product(const float* g, float* y, int64_t n, int64_t act) {
  if (act == 0) {
    for (int64_t i = 0; i < n; ++i) y[i] *= g[i] / (1.0f + exp_approx(-g[i]));
    return;
  }
  constexpr float k = 0.7978845608028654f;  // sqrt(2 / pi)
  for (int64_t i = 0; i < n; ++i) {
    const float z = k * (g[i] + 0.044715f * g[i] * g[i] * g[i]);
    y[i] *= 0.5f * g[i] * (2.0f - 2.0f / (exp_approx(2.0f * z) + 1.0f));
  }
}

}  // namespace

Tensor& lq_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& signs, const Tensor& scale,
                      const Tensor& in_scale, const Tensor& mix1, const Tensor& mix2,
                      const Tensor& block_scale, const Tensor& codebook, Tensor& out) {
  const Tensor* fields[] = {&signs, &scale, &in_scale, &mix1, &mix2, &block_scale, &codebook};
  return linear_out(ctx, "liftedge::lq_linear", x, fields, -1.0, out);
}

// lq_rms_linear: RMSNorm (weight folded into in_scale), then the lift-project layer.
Tensor& lq_rms_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& signs, const Tensor& scale,
                          const Tensor& in_scale, const Tensor& mix1, const Tensor& mix2,
                          const Tensor& block_scale, const Tensor& codebook, double eps, Tensor& out) {
  const Tensor* fields[] = {&signs, &scale, &in_scale, &mix1, &mix2, &block_scale, &codebook};
  ET_KERNEL_CHECK_MSG(ctx, eps >= 0, InvalidArgument, out, "liftedge::lq_rms_linear: eps must be >= 0");
  return linear_out(ctx, "liftedge::lq_rms_linear", x, fields, eps, out);
}

// lq_rms_linear3: three layers of RMSNorm(x) (each norm weight folded into its in_scale): one
// norm, every layer's table segments in one hand-off, then one pass over the row tiles of all
// three (q's, then k's, then v's): two hand-offs for the three layers instead of six.
std::tuple<Tensor&, Tensor&, Tensor&> lq_rms_linear3_out(
    KernelRuntimeContext& ctx, const Tensor& x, const Tensor& a_signs, const Tensor& a_scale,
    const Tensor& a_in_scale, const Tensor& a_mix1, const Tensor& a_mix2, const Tensor& a_block_scale,
    const Tensor& a_codebook, const Tensor& b_signs, const Tensor& b_scale, const Tensor& b_in_scale,
    const Tensor& b_mix1, const Tensor& b_mix2, const Tensor& b_block_scale, const Tensor& b_codebook,
    const Tensor& c_signs, const Tensor& c_scale, const Tensor& c_in_scale, const Tensor& c_mix1, const Tensor& c_mix2,
    const Tensor& c_block_scale, const Tensor& c_codebook, double eps, Tensor& out0, Tensor& out1, Tensor& out2) {
  constexpr const char* name = "liftedge::lq_rms_linear3";
  const Tensor* f[3][7] = {{&a_signs, &a_scale, &a_in_scale, &a_mix1, &a_mix2, &a_block_scale, &a_codebook},
                           {&b_signs, &b_scale, &b_in_scale, &b_mix1, &b_mix2, &b_block_scale, &b_codebook},
                           {&c_signs, &c_scale, &c_in_scale, &c_mix1, &c_mix2, &c_block_scale, &c_codebook}};
  Tensor* outs[3] = {&out0, &out1, &out2};
  const std::tuple<Tensor&, Tensor&, Tensor&> ret{out0, out1, out2};
  lq_layer L[3];
  bool lut[3];
  for (int i = 0; i < 3; ++i)
    if (!make_layer(ctx, name, f[i], L[i], lut[i])) return ret;
  // Again if a later layer's factors cleared the cache (layer_factors' bound) under an earlier one.
  for (int i = 0; i < 2; ++i)
    if (!make_layer(ctx, name, f[i], L[i], lut[i])) return ret;
  ET_KERNEL_CHECK_MSG(ctx, lut[0] && lut[1] && lut[2] && eps >= 0, InvalidArgument, ret,
                      "%s: signs must be in the table-lookup layout and eps >= 0", name);
  for (int i = 0; i < 3; ++i) {
    ET_KERNEL_CHECK_MSG(ctx, L[i].in_features == L[0].in_features, InvalidArgument, ret,
                        "%s: the three layers must have the same input width", name);
    if (!prepare_linear_out(ctx, name, x, L[i].in_features, L[i].out_features, *outs[i])) return ret;
  }
  const int64_t m = x.numel() / L[0].in_features;
  thread_local std::vector<float> normed;
  thread_local std::vector<uint8_t> scratch[3];
  const float* xp = rms_normalize(x.const_data_ptr<float>(), m, L[0].in_features, eps, normed);
  const int rc = prepare_layers(L, xp, m, scratch);
  // Pointers, not the thread_local vectors: the row tasks below run on other threads.
  const uint8_t* sp[3] = {scratch[0].data(), scratch[1].data(), scratch[2].data()};
  ET_KERNEL_CHECK_MSG(ctx, rc == 0, InvalidArgument, ret, "%s: kernel rejected its arguments", name);
  const int64_t t1 = lq_lut_tiles(&L[0]), t2 = t1 + lq_lut_tiles(&L[1]), t3 = t2 + lq_lut_tiles(&L[2]);
  const int64_t first[4] = {0, t1, t2, t3};
  float* y[3] = {out0.mutable_data_ptr<float>(), out1.mutable_data_ptr<float>(), out2.mutable_data_ptr<float>()};
  executorch::extension::parallel_for(0, t3, LUT_GRAIN, [&](int64_t b, int64_t e) {
    for (int i = 0; i < 3; ++i) {  // the part of [b, e) in layer i's tiles
      const int64_t lo = std::max(b, first[i]), hi = std::min(e, first[i + 1]);
      if (lo < hi) lq_lut_rows(&L[i], sp[i], m, LQ_LUT_TWO_PLANE, y[i], lo - first[i], hi - first[i]);
    }
  });
  return ret;
}

// rope: out = x * cos + rotate_half(x) * sin per head, rotate_half(x) = (-x[h:], x[:h]) of
// each head's D values (h = D / 2), as transformers' apply_rotary_pos_emb; one call for all
// heads of q (or k) where the graph had two transposes, slices, a negation, a concatenation
// and four elementwise operators (two XNNPACK delegate calls and four copies per block).
Tensor& rope_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& out) {
  constexpr const char* name = "liftedge::rope";
  ET_KERNEL_CHECK_MSG(ctx, x.dim() == 4 && cos.dim() == 3 && sin.dim() == 3 && x.scalar_type() == ScalarType::Float &&
                      cos.scalar_type() == ScalarType::Float && sin.scalar_type() == ScalarType::Float &&
                      out.scalar_type() == ScalarType::Float, InvalidArgument, out,
                      "%s: x must be float32 [B, S, H, D], cos and sin float32 [B, S, D]", name);
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3), h = D / 2;
  const int64_t cb = cos.size(0);
  ET_KERNEL_CHECK_MSG(ctx, D % 2 == 0 && (cb == B || cb == 1) && cos.size(1) == S && cos.size(2) == D &&
                      sin.size(0) == cb && sin.size(1) == S && sin.size(2) == D, InvalidArgument, out,
                      "%s: cos and sin must be [B or 1, S, D] for x [B, S, H, D] with D even", name);
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::resize_tensor(out, x.sizes()) == executorch::runtime::Error::Ok,
                      InvalidArgument, out, "%s: cannot resize out", name);
  const float* xp = x.const_data_ptr<float>();
  const float* cp = cos.const_data_ptr<float>();
  const float* sp = sin.const_data_ptr<float>();
  float* y = out.mutable_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < S; ++t) {
      const float* c = cp + ((cb == 1 ? 0 : b) * S + t) * D;
      const float* s = sp + ((cb == 1 ? 0 : b) * S + t) * D;
      for (int64_t k = 0; k < H; ++k) {
        const int64_t o = ((b * S + t) * H + k) * D;
        for (int64_t i = 0; i < h; ++i) y[o + i] = xp[o + i] * c[i] + (-xp[o + h + i]) * s[i];
        for (int64_t i = h; i < D; ++i) y[o + i] = xp[o + i] * c[i] + xp[o + i - h] * s[i];
      }
    }
  return out;
}

// lq_linear_add: residual + the lift-project layer of x.
Tensor& lq_linear_add_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& signs, const Tensor& scale,
                          const Tensor& in_scale, const Tensor& mix1, const Tensor& mix2,
                          const Tensor& block_scale, const Tensor& codebook, const Tensor& residual, Tensor& out) {
  const Tensor* fields[] = {&signs, &scale, &in_scale, &mix1, &mix2, &block_scale, &codebook};
  return linear_out(ctx, "liftedge::lq_linear_add", x, fields, -1.0, out, &residual);
}

// lq_glu: act(gate(x')) * up(x'), x' = RMSNorm(x) when eps >= 0 (weight folded into both
// in_scales), else x. Both layers' table segments are prepared in one hand-off, then one pass
// over the row tiles of both with the activation: a hand-off per phase, not two.
Tensor& lq_glu_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& g_signs, const Tensor& g_scale,
                   const Tensor& g_in_scale, const Tensor& g_mix1, const Tensor& g_mix2, const Tensor& g_block_scale,
                   const Tensor& g_codebook, const Tensor& u_signs, const Tensor& u_scale, const Tensor& u_in_scale,
                   const Tensor& u_mix1, const Tensor& u_mix2, const Tensor& u_block_scale, const Tensor& u_codebook,
                   double eps, int64_t act, Tensor& out) {
  constexpr const char* name = "liftedge::lq_glu";
  const Tensor* gf[] = {&g_signs, &g_scale, &g_in_scale, &g_mix1, &g_mix2, &g_block_scale, &g_codebook};
  const Tensor* uf[] = {&u_signs, &u_scale, &u_in_scale, &u_mix1, &u_mix2, &u_block_scale, &u_codebook};
  lq_layer L[2];
  bool lut[2];
  if (!make_layer(ctx, name, uf, L[1], lut[1]) || !make_layer(ctx, name, gf, L[0], lut[0])) return out;
  // The up layer's factors again if fetching the gate's cleared the cache (layer_factors' bound).
  if (!make_layer(ctx, name, uf, L[1], lut[1])) return out;
  ET_KERNEL_CHECK_MSG(ctx, lut[0] && lut[1] && act >= 0 && act <= 1, InvalidArgument, out,
                      "%s: signs must be in the table-lookup layout and act 0 (SiLU) or 1 (GELU tanh)", name);
  ET_KERNEL_CHECK_MSG(ctx, L[0].in_features == L[1].in_features && L[0].out_features == L[1].out_features,
                      InvalidArgument, out, "%s: gate and up must have the same shape", name);
  if (!prepare_linear_out(ctx, name, x, L[0].in_features, L[0].out_features, out)) return out;
  const int64_t m = x.numel() / L[0].in_features, rows = L[0].out_features;
  thread_local std::vector<float> normed;
  thread_local std::vector<uint8_t> scratch[2];
  thread_local std::vector<float> gate;
  const float* xp = x.const_data_ptr<float>();
  if (eps >= 0) xp = rms_normalize(xp, m, L[0].in_features, eps, normed);
  const int rc = prepare_layers(L, xp, m, scratch);
  uint8_t* sp[2] = {scratch[0].data(), scratch[1].data()};
  ET_KERNEL_CHECK_MSG(ctx, rc == 0, InvalidArgument, out, "%s: kernel rejected its arguments", name);
  gate.resize(m * rows);
  float* y = out.mutable_data_ptr<float>();
  float* g = gate.data();
  // Row tile t of the gate and of the up projection in the same task, then act(gate) * up of
  // its rows: the activation runs spread over the threads too, beside the lookups.
  executorch::extension::parallel_for(0, lq_lut_tiles(&L[0]), LUT_GRAIN, [&](int64_t t0, int64_t t1) {
    lq_lut_rows(&L[0], sp[0], m, LQ_LUT_TWO_PLANE, g, t0, t1);
    lq_lut_rows(&L[1], sp[1], m, LQ_LUT_TWO_PLANE, y, t0, t1);
    const int64_t r0 = t0 * LQ_LUT_TILE_ROWS, r1 = std::min(rows, t1 * LQ_LUT_TILE_ROWS);
    for (int64_t t = 0; t < m; ++t) gate_product(g + t * rows + r0, y + t * rows + r0, r1 - r0, act);
  });
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
EXECUTORCH_LIBRARY(liftedge, "lq_rms_linear.out", liftedge::lq_rms_linear_out);
EXECUTORCH_LIBRARY(liftedge, "lq_glu.out", liftedge::lq_glu_out);
EXECUTORCH_LIBRARY(liftedge, "lq_linear_add.out", liftedge::lq_linear_add_out);
EXECUTORCH_LIBRARY(liftedge, "rope.out", liftedge::rope_out);

namespace {

// lq_rms_linear3.out has three outputs, which EXECUTORCH_LIBRARY's boxing does not take: its
// arguments are read off the stack here, in schema order (x, 21 fields, eps, out0, out1, out2).
void lq_rms_linear3_boxed(executorch::runtime::KernelRuntimeContext& ctx,
                          executorch::runtime::Span<executorch::runtime::EValue*> stack) {
  constexpr size_t ARGS = 26;
  if (stack.size() < ARGS) {
    ET_LOG(Error, "liftedge::lq_rms_linear3: %zu arguments, expected %zu", stack.size(), ARGS);
    ctx.fail(executorch::runtime::Error::InvalidArgument);
    return;
  }
  const auto t = [&](size_t i) -> executorch::aten::Tensor& { return stack[i]->toTensor(); };
  liftedge::lq_rms_linear3_out(ctx, t(0), t(1), t(2), t(3), t(4), t(5), t(6), t(7), t(8), t(9), t(10), t(11), t(12),
                               t(13), t(14), t(15), t(16), t(17), t(18), t(19), t(20), t(21), stack[22]->toDouble(),
                               t(23), t(24), t(25));
}

const auto lq_rms_linear3_registered = executorch::runtime::register_kernel(
    executorch::runtime::Kernel("liftedge::lq_rms_linear3.out", lq_rms_linear3_boxed));

}  // namespace
