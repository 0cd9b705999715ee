// ExecuTorch registration of liftedge::lq_linear.out (schema in targets/executorch/ops.py):
//   lq_linear.out(Tensor x, Tensor signs, Tensor scale, Tensor in_scale, Tensor mix1,
//                 Tensor mix2, Tensor block_scale, Tensor codebook, *, Tensor(a!) out) -> Tensor(a!)
// x float32 [..., n]; signs uint8 [out, row_nbytes]; float factors fp16 (as packed) or fp32.
// Shapes give n, n1, n2, d, D, so the op carries no integer arguments.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <vector>

#include "et_linear.h"
#include "lq_linear.h"

namespace liftedge {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace {

// Stored factors as float32; fp16 fields are widened once per call (they are small).
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

struct Factors {
  std::vector<float> scale, in_scale, mix1, mix2, block_scale, codebook, scratch;
};

}  // namespace

Tensor& lq_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& signs, const Tensor& scale,
                      const Tensor& in_scale, const Tensor& mix1, const Tensor& mix2,
                      const Tensor& block_scale, const Tensor& codebook, Tensor& out) {
  thread_local Factors f;
  ET_KERNEL_CHECK_MSG(ctx, signs.scalar_type() == ScalarType::Byte && signs.dim() == 2, InvalidArgument, out,
                      "liftedge::lq_linear: signs must be uint8 [out, row_nbytes]");
  ET_KERNEL_CHECK_MSG(ctx, codebook.dim() == 2 && mix1.dim() == 2 && mix2.dim() == 2, InvalidArgument, out,
                      "liftedge::lq_linear: codebook, mix1, mix2 must be 2-D");
  if (!prepare_linear_out(ctx, "liftedge::lq_linear", x, in_scale.numel(), signs.size(0), out)) return out;
  bool ok = to_float(scale, f.scale) && to_float(in_scale, f.in_scale) && to_float(mix1, f.mix1) &&
            to_float(mix2, f.mix2) && to_float(block_scale, f.block_scale) && to_float(codebook, f.codebook);
  ET_KERNEL_CHECK_MSG(ctx, ok, InvalidArgument, out, "liftedge::lq_linear: factors must be float16 or float32");

  lq_layer L{};
  L.in_features = in_scale.numel();
  L.out_features = signs.size(0);
  L.n1 = mix1.size(0);
  L.n2 = mix2.size(0);
  L.d = codebook.size(0);
  L.D = codebook.size(1);
  L.signs = signs.const_data_ptr<uint8_t>();
  L.scale = f.scale.data();
  L.in_scale = f.in_scale.data();
  L.mix1 = f.mix1.data();
  L.mix2 = f.mix2.data();
  L.block_scale = f.block_scale.data();
  L.codebook = f.codebook.data();
  ET_KERNEL_CHECK_MSG(ctx, signs.size(1) == lq_row_nbytes(&L) && scale.numel() == L.out_features &&
                      L.n1 * L.n2 == L.in_features &&
                      block_scale.numel() == (L.in_features + L.d - 1) / L.d,
                      InvalidArgument, out, "liftedge::lq_linear: inconsistent factor shapes");

  const int64_t m = x.numel() / L.in_features;
  f.scratch.resize(lq_scratch_floats(&L, m, LQ_METHOD_MASK));
  const int rc = lq_mask_prepare(&L, x.const_data_ptr<float>(), m, f.scratch.data());
  ET_KERNEL_CHECK_MSG(ctx, rc == 0, InvalidArgument, out, "liftedge::lq_linear: kernel rejected its arguments");
  // Output rows split over ExecuTorch's threadpool when built with ET_USE_THREADPOOL
  // (a serial loop otherwise); each row reads its own packed bytes once.
  float* y = out.mutable_data_ptr<float>();
  const float* scratch = f.scratch.data();
  const lq_layer* layer = &L;
  const int64_t grain = 64;
  executorch::extension::parallel_for(0, L.out_features, grain, [&](int64_t r0, int64_t r1) {
    lq_mask_rows(layer, scratch, m, y, r0, r1);
  });
  return out;
}

}  // namespace liftedge

EXECUTORCH_LIBRARY(liftedge, "lq_linear.out", liftedge::lq_linear_out);
