// Minimal prefill + greedy decode over a liftedge model.pte with ExecuTorch's Module API.
// Link: executorch, extension_module, extension_tensor, xnnpack_backend,
//       optimized_native_cpu_ops_lib, liftedge_kernels (whole-archive; see README.md).
// Untested on device (see README.md); mirrors what liftedge verifies from Python.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

using executorch::extension::Module;
using executorch::extension::from_blob;

// Feeds ids at positions start..start+n-1; returns the argmax of the last position's logits.
static int64_t step(Module& module, std::vector<int64_t>& ids, int64_t start) {
  const auto n = static_cast<executorch::aten::SizesType>(ids.size());
  std::vector<int64_t> pos(ids.size());
  for (size_t i = 0; i < pos.size(); ++i) pos[i] = start + static_cast<int64_t>(i);
  auto tokens = from_blob(ids.data(), {1, n}, executorch::aten::ScalarType::Long);
  auto positions = from_blob(pos.data(), {n}, executorch::aten::ScalarType::Long);
  auto result = module.forward({tokens, positions});
  if (!result.ok()) return -1;
  const auto logits = result->at(0).toTensor();  // [1, n, vocab]
  const int64_t vocab = logits.size(2);
  const float* last = logits.const_data_ptr<float>() + (n - 1) * vocab;
  return std::max_element(last, last + vocab) - last;
}

std::vector<int64_t> generate(const char* pte_path, std::vector<int64_t> prompt, int new_tokens) {
  Module module(pte_path);  // max_prefill of the build bounds one call: chunk longer prompts
  std::vector<int64_t> out;
  int64_t token = step(module, prompt, 0);
  int64_t position = static_cast<int64_t>(prompt.size());
  for (int i = 0; i < new_tokens && token >= 0; ++i) {
    out.push_back(token);
    std::vector<int64_t> one{token};
    token = step(module, one, position++);
  }
  return out;
}
