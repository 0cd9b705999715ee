// What every liftedge ExecuTorch linear kernel checks and does before its own arithmetic:
// x and out are float32, x's last dimension is the layer's in_features, and out is resized
// to x's shape with that dimension replaced by the layer's output rows. Shared by
// lq_linear_et.cpp (lift-project layers) and head_linear_et.cpp (fp16 / int output heads).
#pragma once

#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#include <cstdint>

namespace liftedge {

// False (with the kernel context's error set and a log line naming `name`) when x or out
// does not fit; the caller then returns out unchanged.
inline bool prepare_linear_out(executorch::runtime::KernelRuntimeContext& ctx, const char* name,
                               const executorch::aten::Tensor& x, int64_t in_features, int64_t rows,
                               executorch::aten::Tensor& out) {
  using executorch::aten::ScalarType;
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float && out.scalar_type() == ScalarType::Float,
                      InvalidArgument, false, "%s: x and out must be float32", name);
  ET_KERNEL_CHECK_MSG(ctx, x.dim() >= 1 && x.size(x.dim() - 1) == in_features, InvalidArgument, false,
                      "%s: x's last dimension must equal in_features", name);
  executorch::aten::SizesType sizes[executorch::runtime::kTensorDimensionLimit];
  for (ssize_t i = 0; i + 1 < x.dim(); ++i) sizes[i] = x.size(i);
  sizes[x.dim() - 1] = static_cast<executorch::aten::SizesType>(rows);
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::resize_tensor(out, {sizes, static_cast<size_t>(x.dim())}) ==
                      executorch::runtime::Error::Ok, InvalidArgument, false, "%s: cannot resize out", name);
  return true;
}

}  // namespace liftedge
