// Standalone test driver of the table-lookup kernel core (targets/executorch/kernels/lq_lut.h),
// built natively (AVX2 and forced-scalar) and cross-compiled for arm64 (run under qemu-aarch64)
// by tests/test_lut_kernel.py, which compares what the builds print:
//   isa <avx2|neon|scalar>
//   exact <case> <mode> <fnv1a-64 of y's bytes>    kernel on given lifted vectors: integer
//                                                   lookups, identical bits on every path
//   threads <case> <mode> <same|diff>               tiles split over 3 std::threads vs 1 call
//   split <case> <mode> <same|diff>                 every token's prepare split over 3 threads
//                                                   (lq_lut_prepare_split) vs lq_lut_prepare
//   pipe <case> <mode> <ratio> <y ...>              from x (transform + lift in fp32); ratio =
//                                                   max |y - y_double| / bound, bound = |scale_r|
//                                                   * groups * s / 2 (the table rounding) + slack
// Inputs come from a fixed integer generator, so every build sees the same bits.
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <thread>
#include <vector>

#include "lq_lut.h"

namespace {

struct Rng {
  uint64_t s;
  uint64_t next() {  // splitmix64
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform(float lo, float hi) { return lo + (hi - lo) * static_cast<float>(next() >> 40) / 16777216.0f; }
};

struct Case {
  int64_t out, n, D, d, m;
};

// Ragged shapes: rows not a multiple of 32, widths not a multiple of d or 8, and a width
// (2048 at 24/10: 1230 groups) past the int16 flush interval.
const Case CASES[] = {{5, 7, 24, 10, 1}, {33, 100, 12, 4, 3}, {70, 45, 16, 6, 2},
                      {96, 576, 32, 20, 1}, {40, 130, 10, 3, 2}, {64, 2048, 24, 10, 2}};

struct Layer {
  std::vector<uint8_t> signs;
  std::vector<float> scale, in_scale, mix1, mix2, block_scale, codebook;
  lq_layer L{};
};

void fill(std::vector<float>& v, int64_t count, Rng& r, float lo, float hi) {
  v.resize(count);
  for (auto& e : v) e = r.uniform(lo, hi);
}

void make_layer(const Case& c, Rng& r, Layer& y) {
  int64_t n1 = 1;
  for (int64_t k = 1; k * k <= c.n; ++k)
    if (c.n % k == 0) n1 = k;
  const int64_t n2 = c.n / n1, nb = (c.n + c.d - 1) / c.d;
  lq_layer& L = y.L;
  L = {c.n, c.out, n1, n2, c.d, c.D, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  fill(y.scale, c.out, r, 0.5f, 1.5f);
  fill(y.in_scale, c.n, r, 0.5f, 1.5f);
  fill(y.mix1, n1 * n1, r, -1.0f / n1, 1.0f / n1);
  fill(y.mix2, n2 * n2, r, -1.0f / n2, 1.0f / n2);
  fill(y.block_scale, nb, r, 0.5f, 1.5f);
  fill(y.codebook, c.d * c.D, r, -1.0f, 1.0f);
  y.signs.resize(lq_lut_tiles(&L) * lq_lut_groups(&L) * 16);
  for (auto& b : y.signs) b = static_cast<uint8_t>(r.next() >> 56);
  L.signs = y.signs.data();
  L.scale = y.scale.data();
  L.in_scale = y.in_scale.data();
  L.mix1 = y.mix1.data();
  L.mix2 = y.mix2.data();
  L.block_scale = y.block_scale.data();
  L.codebook = y.codebook.data();
}

int sign_at(const lq_layer& L, int64_t row, int64_t pos) {
  const uint8_t b = L.signs[((row / 32) * lq_lut_groups(&L) + pos / 4) * 16 + row % 16];
  const int nib = row % 32 < 16 ? b & 15 : b >> 4;
  return (nib >> (pos % 4)) & 1 ? 1 : -1;
}

// The lifted vector of x in double precision (lq_linear.h's math).
std::vector<double> lift_double(const lq_layer& L, const float* x) {
  const int64_t n = L.in_features, n1 = L.n1, n2 = L.n2, d = L.d, D = L.D;
  std::vector<double> a(n), t(n, 0.0), v(n, 0.0), u(4 * lq_lut_groups(&L), 0.0);
  for (int64_t i = 0; i < n; ++i) a[i] = static_cast<double>(x[i]) * L.in_scale[i];
  for (int64_t i = 0; i < n1; ++i)
    for (int64_t k = 0; k < n1; ++k)
      for (int64_t j = 0; j < n2; ++j) t[i * n2 + j] += L.mix1[i * n1 + k] * a[k * n2 + j];
  for (int64_t i = 0; i < n1; ++i)
    for (int64_t j = 0; j < n2; ++j)
      for (int64_t k = 0; k < n2; ++k) v[i * n2 + j] += t[i * n2 + k] * L.mix2[j * n2 + k];
  for (int64_t i = 0; i < n; ++i) v[i] *= L.block_scale[i / d];
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < D; ++j) u[(i / d) * D + j] += v[i] * L.codebook[(i % d) * D + j];
  return u;
}

uint64_t fnv1a(const void* p, size_t nbytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < nbytes; ++i) h = (h ^ static_cast<const uint8_t*>(p)[i]) * 0x100000001b3ull;
  return h;
}

int run_case(int id, const Case& c, int mode) {
  Rng r{0x1234u + static_cast<uint64_t>(id)};
  Layer layer;
  make_layer(c, r, layer);
  const lq_layer& L = layer.L;
  const int64_t G = lq_lut_groups(&L), out = c.out, m = c.m;
  std::vector<uint8_t> scratch(lq_lut_scratch_bytes(&L, m, mode));
  std::vector<float> y(m * out), y3(m * out);

  std::vector<float> u;
  fill(u, m * 4 * G, r, -1.0f, 1.0f);
  if (lq_lut_prepare_lifted(&L, u.data(), m, mode, scratch.data()) != 0) return 1;
  lq_lut_rows(&L, scratch.data(), m, mode, y.data(), 0, lq_lut_tiles(&L));
  std::printf("exact %d %d %016" PRIx64 "\n", id, mode, fnv1a(y.data(), y.size() * sizeof(float)));

  const int64_t tiles = lq_lut_tiles(&L);
  std::vector<std::thread> pool;
  for (int k = 0; k < 3; ++k)
    pool.emplace_back([&, k] { lq_lut_rows(&L, scratch.data(), m, mode, y3.data(), tiles * k / 3, tiles * (k + 1) / 3); });
  for (auto& th : pool) th.join();
  std::printf("threads %d %d %s\n", id, mode, std::memcmp(y.data(), y3.data(), y.size() * sizeof(float)) ? "diff" : "same");

  std::vector<float> x;
  fill(x, m * c.n, r, -2.0f, 2.0f);
  if (lq_lut_linear_f32(&L, x.data(), m, y.data(), scratch.data(), mode) != 0) return 1;
  const double qmax = mode == LQ_LUT_INT8 ? 127.0 : 63.0 * 128.0;
  double ratio = 0.0;
  for (int64_t t = 0; t < m; ++t) {
    const std::vector<double> ud = lift_double(L, x.data() + t * c.n);
    double maxabs = 0.0, ymax = 0.0;
    for (int64_t g = 0; g < G; ++g)
      maxabs = std::fmax(maxabs, std::fabs(ud[4 * g]) + std::fabs(ud[4 * g + 1]) + std::fabs(ud[4 * g + 2]) +
                                     std::fabs(ud[4 * g + 3]));
    std::vector<double> yd(out, 0.0);
    for (int64_t row = 0; row < out; ++row) {
      for (int64_t p = 0; p < 4 * G; ++p) yd[row] += sign_at(L, row, p) * ud[p];
      yd[row] *= L.scale[row];
      ymax = std::fmax(ymax, std::fabs(yd[row]));
    }
    for (int64_t row = 0; row < out; ++row) {
      // 1.01 and 1e-5: the fp32 transform and lift ahead of the tables (a few ulps each).
      const double bound = 1.01 * std::fabs(L.scale[row]) * G * (maxabs / qmax) / 2 + 1e-5 * ymax;
      ratio = std::fmax(ratio, std::fabs(y[t * out + row] - yd[row]) / bound);
    }
  }
  std::printf("pipe %d %d %.4f", id, mode, ratio);
  for (float v : y) std::printf(" %.9g", v);
  std::printf("\n");

  // The prepare of every token split over 3 threads (chunks dealt out unevenly, in reverse) vs on one.
  std::vector<uint8_t> one(scratch.size(), 0), split(scratch.size(), 0);
  if (lq_lut_prepare(&L, x.data(), m, mode, one.data()) != 0) return 1;
  const lq_parallel_fn three = [](void*, int64_t n, int64_t grain, lq_range_fn fn, void* ctx) {
    std::vector<std::thread> ts;
    for (int k = 0; k < 3; ++k)
      ts.emplace_back([=] {
        for (int64_t b = (n - 1) / grain * grain - k * grain; b >= 0; b -= 3 * grain) fn(ctx, b, std::min(n, b + grain));
      });
    for (auto& t : ts) t.join();
  };
  if (lq_lut_prepare_split(&L, x.data(), m, mode, split.data(), three, nullptr) != 0) return 1;
  std::printf("split %d %d %s\n", id, mode, one == split ? "same" : "diff");
  return 0;
}

}  // namespace

int main() {
  std::printf("isa %s\n", lq_lut_isa());
  int id = 0;
  for (const Case& c : CASES) {
    for (int mode : {LQ_LUT_TWO_PLANE, LQ_LUT_INT8})
      if (run_case(id, c, mode) != 0) {
        std::printf("error case %d mode %d\n", id, mode);
        return 1;
      }
    ++id;
  }
  return 0;
}
