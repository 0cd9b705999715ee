// Micro-benchmark of the liftedge lift-project kernel core (targets/executorch/kernels):
// LUT8 (256-entry table per 8 lifted inputs) vs MASK (8-wide ±1 multiply-add per byte),
// SmolLM2-135M layer shapes at LQ-24/10, decode (m = 1) and prefill (m = 64), 1 thread.
//   g++ -O3 -march=native -std=c++17 -I targets/executorch/kernels \
//       benchmarks/executorch_kernel_bench.cpp targets/executorch/kernels/lq_linear.cpp -o /tmp/lqbench
// Prints one JSON object per line.
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "lq_linear.h"

struct Shape { const char* name; int64_t out, in, n1, n2; };

int main() {
  const Shape shapes[] = {{"q_proj/o_proj 576x576", 576, 576, 24, 24}, {"k_proj/v_proj 192x576", 192, 576, 24, 24},
                          {"gate/up 1536x576", 1536, 576, 24, 24}, {"down 576x1536", 576, 1536, 32, 48}};
  const int64_t D = 24, d = 10;
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> uni(0.5f, 1.5f);
  std::normal_distribution<float> gauss(0.f, 1.f);
  for (const Shape& s : shapes) {
    const int64_t nb = (s.in + d - 1) / d, nbytes = (nb * D + 7) / 8;
    std::vector<uint8_t> signs(s.out * nbytes);
    for (auto& b : signs) b = rng() & 0xff;
    std::vector<float> scale(s.out), in_scale(s.in), mix1(s.n1 * s.n1), mix2(s.n2 * s.n2), bs(nb), cb(d * D);
    for (auto* v : {&scale, &in_scale, &bs}) for (auto& x : *v) x = uni(rng);
    for (auto* v : {&mix1, &mix2, &cb}) for (auto& x : *v) x = gauss(rng);
    lq_layer L{s.in, s.out, s.n1, s.n2, d, D, signs.data(), scale.data(), in_scale.data(), mix1.data(),
               mix2.data(), bs.data(), cb.data()};
    for (int64_t m : {1, 64}) {
      std::vector<float> x(m * s.in), y(m * s.out);
      for (auto& v : x) v = gauss(rng);
      for (int method : {LQ_METHOD_LUT8, LQ_METHOD_MASK}) {
        std::vector<float> scratch(lq_scratch_floats(&L, m, method));
        lq_linear_f32(&L, x.data(), m, y.data(), scratch.data(), method);
        double best = 1e30;
        for (int rep = 0; rep < 7; ++rep) {
          const int iters = m == 1 ? 200 : 10;
          auto t0 = std::chrono::steady_clock::now();
          for (int i = 0; i < iters; ++i) lq_linear_f32(&L, x.data(), m, y.data(), scratch.data(), method);
          double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
          if (dt < best) best = dt;
        }
        std::printf("{\"shape\": \"%s\", \"tokens\": %lld, \"method\": \"%s\", \"us\": %.2f, "
                    "\"weight_gb_per_s\": %.3f, \"y0\": %.4f}\n", s.name, (long long)m,
                    method == LQ_METHOD_LUT8 ? "lut8" : "mask", best * 1e6,
                    signs.size() / best / 1e9, y[0]);
      }
    }
  }
  return 0;
}
