// ExecuTorch registration of the output-head kernels (schemas in targets/executorch/ops.py):
//   fp16_linear.out(Tensor x, Tensor weight, *, Tensor(a!) out) -> Tensor(a!)
//   int_linear.out(Tensor x, Tensor codes, Tensor scale, Tensor zero, int bits, int group_size,
//                  *, Tensor(a!) out) -> Tensor(a!)
// y = x · W^T with x and y float32 and W read in place as packed, so a table tied to the
// embedding is stored once (the embedding gathers from the same constant) and the activation
// is not rounded: W fp16 [out, in], or W "int" (targets/reference/integer.py): codes uint8
// [out, ceil(in * bits / 8)] (4 or 8 bits, LSB first), scale fp16 [out, n_groups], zero uint8
// [out, ceil(n_groups * bits / 8)] packed the same way; w = (code - zero) * scale per group.
// Products and sums in float32. The parallel loop over output rows is shared (`linear_rows`,
// after et_linear.h's checks and resize); each format supplies only its row dot product.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#include "et_linear.h"

namespace liftedge {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace {

// Σ_k x_k w_k over an fp16 row. The conversion is explicit SIMD (F16C on x86, fcvtl on arm64):
// GCC's auto-vectorised `static_cast<float>(_Float16)` loop ran at 2.7 GB/s of weights on one
// Zen core against 9 GB/s for the F16C loop below (the read bandwidth of one core is ~10 GB/s);
// the 77 fp16 linears of a 1B-shape android-4GB plan went from 245 to 61 ms per token.
inline float dot_f16(const float* x, const _Float16* w, int64_t n) {
  int64_t k = 0;
  float s = 0.f;
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    const __m128i h0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k));
    const __m128i h1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 8));
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_cvtph_ps(h0), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), _mm256_cvtph_ps(h1), a1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(a0, a1));
  for (float v : lanes) s += v;
#elif defined(__aarch64__) && defined(__ARM_NEON)
  float32x4_t a0 = vdupq_n_f32(0.f), a1 = a0, a2 = a0, a3 = a0;
  for (; k + 16 <= n; k += 16) {
    const float16x8_t h0 = vld1q_f16(reinterpret_cast<const float16_t*>(w + k));
    const float16x8_t h1 = vld1q_f16(reinterpret_cast<const float16_t*>(w + k + 8));
    a0 = vfmaq_f32(a0, vld1q_f32(x + k), vcvt_f32_f16(vget_low_f16(h0)));
    a1 = vfmaq_f32(a1, vld1q_f32(x + k + 4), vcvt_high_f32_f16(h0));
    a2 = vfmaq_f32(a2, vld1q_f32(x + k + 8), vcvt_f32_f16(vget_low_f16(h1)));
    a3 = vfmaq_f32(a3, vld1q_f32(x + k + 12), vcvt_high_f32_f16(h1));
  }
  s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
#else
  float acc[16] = {};
  for (; k + 16 <= n; k += 16)
    for (int j = 0; j < 16; ++j) acc[j] += x[k + j] * static_cast<float>(w[k + j]);
  for (float v : acc) s += v;
#endif
  for (; k < n; ++k) s += x[k] * static_cast<float>(w[k]);
  return s;
}

// Code i of a packed row (4 or 8 bits; liftedge.bitpack layout).
inline int code_at(const uint8_t* row, int64_t i, int bits) {
  return bits == 8 ? row[i] : ((i & 1) ? row[i >> 1] >> 4 : row[i >> 1] & 15);
}

// Σ_k x_k · code_k over codes [c0, c1) of a packed row. The 16 independent lanes let the
// compiler vectorize the float32 products (a single running sum would be a serial chain);
// 4-bit codes are read a byte (two codes) at a time from an even start.
inline float codes_dot(const float* x, const uint8_t* row, int64_t c0, int64_t c1, int bits) {
  float acc[16] = {};
  int64_t k = c0;
  if (bits == 8) {
    for (; k + 16 <= c1; k += 16)
      for (int j = 0; j < 16; ++j) acc[j] += x[k + j] * static_cast<float>(row[k + j]);
  } else if ((c0 & 1) == 0) {
    for (; k + 32 <= c1; k += 32) {
      const uint8_t* b = row + (k >> 1);
      for (int j = 0; j < 16; ++j)
        acc[j] += x[k + 2 * j] * static_cast<float>(b[j] & 15) + x[k + 2 * j + 1] * static_cast<float>(b[j] >> 4);
    }
  }
  float s = 0.f;
  for (; k < c1; ++k) s += x[k] * static_cast<float>(code_at(row, k, bits));
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

#if defined(__AVX2__) && defined(__FMA__)
// 16 codes (in order, one per byte of c) times x[0..16) added into a0 (first 8) and a1.
inline void fma16(const float* x, __m128i c, __m256& a0, __m256& a1) {
  a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)), a0);
  a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8))), a1);
}

// The codes [k, k + CodeStep<Bits>) of a packed row times x, added into a0 and a1: 16 bytes of
// 8-bit codes, or 16 bytes of 4-bit codes (32, low nibble first, as liftedge.bitpack packs them).
template <int Bits>
inline void fma_codes(const float* x, const uint8_t* codes, int64_t k, __m256& a0, __m256& a1) {
  if constexpr (Bits == 8) {
    fma16(x + k, _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k)), a0, a1);
  } else {
    const __m128i low = _mm_set1_epi8(15);
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + (k >> 1)));
    const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
    fma16(x + k, _mm_unpacklo_epi8(lo, hi), a0, a1);
    fma16(x + k + 16, _mm_unpackhi_epi8(lo, hi), a0, a1);
  }
}
#elif defined(__aarch64__) && defined(__ARM_NEON)
// 16 codes (in order, one per byte of c) times x[0..16) added into a0 and a1.
inline void fma16(const float* x, uint8x16_t c, float32x4_t& a0, float32x4_t& a1) {
  const uint16x8_t lo = vmovl_u8(vget_low_u8(c)), hi = vmovl_high_u8(c);
  a0 = vfmaq_f32(a0, vld1q_f32(x), vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo))));
  a1 = vfmaq_f32(a1, vld1q_f32(x + 4), vcvtq_f32_u32(vmovl_high_u16(lo)));
  a0 = vfmaq_f32(a0, vld1q_f32(x + 8), vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi))));
  a1 = vfmaq_f32(a1, vld1q_f32(x + 12), vcvtq_f32_u32(vmovl_high_u16(hi)));
}

// As the AVX2 version: one step of 8-bit or 4-bit codes.
template <int Bits>
inline void fma_codes(const float* x, const uint8_t* codes, int64_t k, float32x4_t& a0, float32x4_t& a1) {
  if constexpr (Bits == 8) {
    fma16(x + k, vld1q_u8(codes + k), a0, a1);
  } else {
    const uint8x16_t b = vld1q_u8(codes + (k >> 1));
    const uint8x16_t lo = vandq_u8(b, vdupq_n_u8(15)), hi = vshrq_n_u8(b, 4);
    fma16(x + k, vzip1q_u8(lo, hi), a0, a1);
    fma16(x + k + 16, vzip2q_u8(lo, hi), a0, a1);
  }
}
#endif

#if (defined(__AVX2__) && defined(__FMA__)) || (defined(__aarch64__) && defined(__ARM_NEON))
#if defined(__AVX2__)
using Acc = __m256;
inline Acc acc_zero() { return _mm256_setzero_ps(); }
inline Acc acc_scaled_add(Acc y, Acc a, float s) { return _mm256_fmadd_ps(_mm256_set1_ps(s), a, y); }
inline float acc_sum(Acc a) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, a);
  float s = 0.f;
  for (float v : lanes) s += v;
  return s;
}
inline Acc acc_add(Acc a, Acc b) { return _mm256_add_ps(a, b); }
#else
using Acc = float32x4_t;
inline Acc acc_zero() { return vdupq_n_f32(0.f); }
inline Acc acc_scaled_add(Acc y, Acc a, float s) { return vfmaq_n_f32(y, a, s); }
inline float acc_sum(Acc a) { return vaddvq_f32(a); }
inline Acc acc_add(Acc a, Acc b) { return vaddq_f32(a, b); }
#endif

// dot_int for 8-bit codes in groups of a multiple of 16, or 4-bit codes in groups of a multiple
// of 32: the group's products stay in vector lanes and are scaled into a vector accumulator
// (one horizontal sum per row, not per group); the zero-point terms are summed apart. The
// per-group reduction and calls of the generic loop cost more than the products: the int8-g64
// head of a 1B-shape plan (128256 x 2048) 54 -> 31 ms per token on 2 Zen cores, the int4-g32
// head of a 3B-shape plan (128256 x 3072) 280 -> 81 ms (`liftedge profile`).
template <int Bits>
inline float dot_int_simd(const float* x, const float* xsum, const uint8_t* codes, const _Float16* scale,
                          const uint8_t* zero, int64_t n, int64_t group) {
  constexpr int64_t step = Bits == 8 ? 16 : 32;
  Acc y0 = acc_zero(), y1 = acc_zero();
  float rest = 0.f;  // tail products and zero-point terms, scaled
  for (int64_t c0 = 0, g = 0; c0 < n; c0 += group, ++g) {
    const int64_t c1 = std::min(n, c0 + group);
    Acc a0 = acc_zero(), a1 = acc_zero();
    int64_t k = c0;
    for (; k + step <= c1; k += step) fma_codes<Bits>(x, codes, k, a0, a1);
    float tail = 0.f;
    for (; k < c1; ++k) tail += x[k] * static_cast<float>(code_at(codes, k, Bits));
    const float sc = static_cast<float>(scale[g]);
    y0 = acc_scaled_add(y0, a0, sc);
    y1 = acc_scaled_add(y1, a1, sc);
    rest += sc * (tail - static_cast<float>(code_at(zero, g, Bits)) * xsum[g]);
  }
  return rest + acc_sum(acc_add(y0, y1));
}
#endif

// Σ_g scale_g · (Σ_{k in g} x_k code_k − zero_g Σ_{k in g} x_k): the row's dot product without
// materialising (code - zero) * scale. `xsum` holds the group sums Σ_{k in g} x_k, which do not
// depend on the row and are computed once per token.
inline float dot_int(const float* x, const float* xsum, const uint8_t* codes, const _Float16* scale,
                     const uint8_t* zero, int64_t n, int bits, int64_t group) {
#if (defined(__AVX2__) && defined(__FMA__)) || (defined(__aarch64__) && defined(__ARM_NEON))
  if (bits == 8 && group % 16 == 0) return dot_int_simd<8>(x, xsum, codes, scale, zero, n, group);
  if (bits == 4 && group % 32 == 0) return dot_int_simd<4>(x, xsum, codes, scale, zero, n, group);
#endif
  float y = 0.f;
  for (int64_t c0 = 0, g = 0; c0 < n; c0 += group, ++g) {
    const float acc = codes_dot(x, codes, c0, std::min(n, c0 + group), bits);
    y += static_cast<float>(scale[g]) * (acc - static_cast<float>(code_at(zero, g, bits)) * xsum[g]);
  }
  return y;
}

// Shared by every head kernel: x float32 [..., n] -> out float32 [..., rows], out[t, r] = dot(r, x_t).
template <typename Dot>
Tensor& linear_rows(KernelRuntimeContext& ctx, const char* name, const Tensor& x, int64_t n, int64_t rows,
                    Tensor& out, Dot dot) {
  if (!prepare_linear_out(ctx, name, x, n, rows, out)) return out;
  const int64_t m = x.numel() / n;
  const float* xp = x.const_data_ptr<float>();
  float* yp = out.mutable_data_ptr<float>();
  executorch::extension::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t t = 0; t < m; ++t) yp[t * rows + r] = dot(r, xp + t * n);
  });
  return out;
}

}  // namespace

Tensor& fp16_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, weight.scalar_type() == ScalarType::Half && weight.dim() == 2, InvalidArgument, out,
                      "liftedge::fp16_linear: weight must be float16 [out, in]");
  const int64_t n = weight.size(1);
  const _Float16* wp = reinterpret_cast<const _Float16*>(weight.const_data_ptr<executorch::aten::Half>());
  return linear_rows(ctx, "liftedge::fp16_linear", x, n, weight.size(0), out,
                     [&](int64_t r, const float* xr) { return dot_f16(xr, wp + r * n, n); });
}

Tensor& int_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& codes, const Tensor& scale,
                       const Tensor& zero, int64_t bits, int64_t group_size, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, bits == 4 || bits == 8, InvalidArgument, out, "liftedge::int_linear: bits must be 4 or 8");
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float, InvalidArgument, out,
                      "liftedge::int_linear: x must be float32");
  ET_KERNEL_CHECK_MSG(ctx, codes.scalar_type() == ScalarType::Byte && zero.scalar_type() == ScalarType::Byte &&
                      scale.scalar_type() == ScalarType::Half && codes.dim() == 2 && scale.dim() == 2 &&
                      zero.dim() == 2, InvalidArgument, out,
                      "liftedge::int_linear: codes uint8 [out, bytes], scale fp16 [out, groups], zero uint8 [out, bytes]");
  const int64_t rows = codes.size(0), n = x.size(x.dim() - 1), groups = scale.size(1);
  ET_KERNEL_CHECK_MSG(ctx, group_size > 0 && (n + group_size - 1) / group_size == groups &&
                      codes.size(1) == (n * bits + 7) / 8 && zero.size(1) == (groups * bits + 7) / 8 &&
                      scale.size(0) == rows && zero.size(0) == rows, InvalidArgument, out,
                      "liftedge::int_linear: field shapes do not match in_features and group_size");
  const uint8_t* cp = codes.const_data_ptr<uint8_t>();
  const uint8_t* zp = zero.const_data_ptr<uint8_t>();
  const _Float16* sp = reinterpret_cast<const _Float16*>(scale.const_data_ptr<executorch::aten::Half>());
  const int64_t cb = codes.size(1), zb = zero.size(1);
  const int b = static_cast<int>(bits);
  const float* xp = x.const_data_ptr<float>();
  const int64_t m = n > 0 ? x.numel() / n : 0;
  std::vector<float> xsum(static_cast<size_t>(m * groups), 0.f);
  for (int64_t t = 0; t < m; ++t)
    for (int64_t k = 0; k < n; ++k) xsum[t * groups + k / group_size] += xp[t * n + k];
  return linear_rows(ctx, "liftedge::int_linear", x, n, rows, out, [&](int64_t r, const float* xr) {
    const float* xs = xsum.data() + ((xr - xp) / n) * groups;
    return dot_int(xr, xs, cp + r * cb, sp + r * groups, zp + r * zb, n, b, group_size);
  });
}

}  // namespace liftedge

EXECUTORCH_LIBRARY(liftedge, "fp16_linear.out", liftedge::fp16_linear_out);
EXECUTORCH_LIBRARY(liftedge, "int_linear.out", liftedge::int_linear_out);
