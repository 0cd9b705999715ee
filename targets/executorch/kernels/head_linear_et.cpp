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

#include "et_linear.h"

namespace liftedge {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace {

// _Float16 (GCC >= 12, Clang): hardware conversion (F16C / AVX-512, NEON) where available.
inline float dot_f16(const float* x, const _Float16* w, int64_t n) {
  float acc[16] = {};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int j = 0; j < 16; ++j) acc[j] += x[k + j] * static_cast<float>(w[k + j]);
  float s = 0.f;
  for (; k < n; ++k) s += x[k] * static_cast<float>(w[k]);
  for (int j = 0; j < 16; ++j) s += acc[j];
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

// Σ_g scale_g · (Σ_{k in g} x_k code_k − zero_g Σ_{k in g} x_k): the row's dot product without
// materialising (code - zero) * scale. `xsum` holds the group sums Σ_{k in g} x_k, which do not
// depend on the row and are computed once per token.
inline float dot_int(const float* x, const float* xsum, const uint8_t* codes, const _Float16* scale,
                     const uint8_t* zero, int64_t n, int bits, int64_t group) {
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
