// ExecuTorch registration of liftedge::fp16_linear.out (schema in targets/executorch/ops.py):
//   fp16_linear.out(Tensor x, Tensor weight, *, Tensor(a!) out) -> Tensor(a!)
// y = x · W^T with W fp16 [out, in] as packed (the tied embedding table), x and y float32,
// products and sums in float32. Used for the output head so the fp16 table is stored once
// (the embedding gathers from the same constant) and the activation is not rounded to fp16.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <cstring>

namespace liftedge {

using executorch::aten::ScalarType;
using executorch::aten::SizesType;
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

}  // namespace

Tensor& fp16_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float && out.scalar_type() == ScalarType::Float,
                      InvalidArgument, out, "liftedge::fp16_linear: x and out must be float32");
  ET_KERNEL_CHECK_MSG(ctx, weight.scalar_type() == ScalarType::Half && weight.dim() == 2, InvalidArgument, out,
                      "liftedge::fp16_linear: weight must be float16 [out, in]");
  const int64_t n = weight.size(1), rows = weight.size(0);
  ET_KERNEL_CHECK_MSG(ctx, x.dim() >= 1 && x.size(x.dim() - 1) == n, InvalidArgument, out,
                      "liftedge::fp16_linear: x's last dimension must equal in_features");
  SizesType sizes[executorch::runtime::kTensorDimensionLimit];
  for (ssize_t i = 0; i + 1 < x.dim(); ++i) sizes[i] = x.size(i);
  sizes[x.dim() - 1] = static_cast<SizesType>(rows);
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::resize_tensor(out, {sizes, static_cast<size_t>(x.dim())}) ==
                      executorch::runtime::Error::Ok, InvalidArgument, out, "liftedge::fp16_linear: cannot resize out");
  const int64_t m = x.numel() / n;
  const float* xp = x.const_data_ptr<float>();
  const _Float16* wp = reinterpret_cast<const _Float16*>(weight.const_data_ptr<executorch::aten::Half>());
  float* yp = out.mutable_data_ptr<float>();
  executorch::extension::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t t = 0; t < m; ++t) yp[t * rows + r] = dot_f16(xp + t * n, wp + r * n, n);
  });
  return out;
}

}  // namespace liftedge

EXECUTORCH_LIBRARY(liftedge, "fp16_linear.out", liftedge::fp16_linear_out);
