// liftedge lift-project linear: portable C++ core. See lq_linear.h for the math and layout.
#include "lq_linear.h"

#include <algorithm>
#include <cstring>

namespace {

// SIGN_PATTERN[b][j] = +1 if bit j of b is set else -1 (bit 1 = +1, LSB first).
struct SignPattern {
  float v[256][8];
  SignPattern() {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) v[b][j] = ((b >> j) & 1) ? 1.0f : -1.0f;
  }
};
const SignPattern SIGN_PATTERN;

inline int64_t n_blocks(const lq_layer* L) { return (L->in_features + L->d - 1) / L->d; }
inline int64_t lifted_width(const lq_layer* L) { return lq_row_nbytes(L) * 8; }

// 8 floats as one vector (GCC/Clang vector extension: one AVX register on x86, two NEON
// registers on arm64); `aligned(4)`: loads and stores at any float offset.
typedef float v8u __attribute__((vector_size(32), aligned(4)));

// out [rows, cols] = A [rows, inner] · B [inner, cols], all row-major. Register-blocked: R rows
// x 8 C columns of sums stay in vector registers while k runs (independent multiply-add chains
// hide their latency; each B chunk is loaded once per R rows; nothing is stored until a sum is
// done). Columns go in chunks of 16, then 8, then one at a time; rows in fours, then singly.
// Every sum runs over k in increasing order, as a plain loop would.
template <int R, int C>
void matmul_block(const float* a, const float* B, float* out, int64_t inner, int64_t cols, int64_t j) {
  v8u s[R][C] = {};
  for (int64_t k = 0; k < inner; ++k) {
    v8u b[C];
    for (int c = 0; c < C; ++c) b[c] = *reinterpret_cast<const v8u*>(B + k * cols + j + 8 * c);
    for (int r = 0; r < R; ++r) {
      const float x = a[r * inner + k];
      for (int c = 0; c < C; ++c) s[r][c] += x * b[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) *reinterpret_cast<v8u*>(out + r * cols + j + 8 * c) = s[r][c];
}

template <int R>
void matmul_row_block(const float* a, const float* B, float* out, int64_t inner, int64_t cols) {
  int64_t j = 0;
  for (; j + 16 <= cols; j += 16) matmul_block<R, 2>(a, B, out, inner, cols, j);
  for (; j + 8 <= cols; j += 8) matmul_block<R, 1>(a, B, out, inner, cols, j);
  for (; j < cols; ++j)
    for (int r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int64_t k = 0; k < inner; ++k) acc += a[r * inner + k] * B[k * cols + j];
      out[r * cols + j] = acc;
    }
}

void matmul_rows(const float* A, const float* B, float* out, int64_t rows, int64_t inner, int64_t cols) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) matmul_row_block<4>(A + i * inner, B, out + i * cols, inner, cols);
  for (; i < rows; ++i) matmul_row_block<1>(A + i * inner, B, out + i * cols, inner, cols);
}

// Rows [i0, i1) of v = block_scale ⊙ vec(mix1 · A · mix2^T) over the [n1, n2] grid, A = the
// token's in_scale ⊙ x in `a`, t [n1, n2] the intermediate mix1 · A; mix2t = mix2^T [n2, n2] (both
// products are then `matmul_rows` over row-major operands). Rows are independent: any split of
// [0, n1) over threads computes the same v.
void transform_rows(const lq_layer* L, const float* mix2t, const float* a, float* t, float* v, int64_t i0,
                    int64_t i1) {
  const int64_t n1 = L->n1, n2 = L->n2, d = L->d;
  matmul_rows(L->mix1 + i0 * n1, a, t + i0 * n2, i1 - i0, n1, n2);  // t = mix1 · A
  matmul_rows(t + i0 * n2, mix2t, v + i0 * n2, i1 - i0, n2, n2);    // v = t · mix2^T
  for (int64_t e = i0 * n2, e1 = i1 * n2; e < e1;) {  // block by block: one division per block
    const int64_t b = e / d, end = std::min(e1, (b + 1) * d);
    const float bs = L->block_scale[b];
    for (; e < end; ++e) v[e] *= bs;
  }
}

// Blocks [b0, b1) of u = V [n_blocks, d] · M [d, D] (v zero-padded to n_blocks * d).
void lift_blocks(const lq_layer* L, const float* v, float* u, int64_t b0, int64_t b1) {
  matmul_rows(v + b0 * L->d, L->codebook, u + b0 * L->D, b1 - b0, L->d, L->D);
}

// LUT8: table[g][b] = Σ_j (bit j of b ? +u : -u)[8g + j], built with one add per entry.
void build_tables(const float* u, int64_t nbytes, float* table) {
  for (int64_t g = 0; g < nbytes; ++g) {
    const float* ug = u + 8 * g;
    float* tg = table + 256 * g;
    tg[0] = -(ug[0] + ug[1] + ug[2] + ug[3] + ug[4] + ug[5] + ug[6] + ug[7]);
    for (int b = 1; b < 256; ++b) tg[b] = tg[b & (b - 1)] + 2.0f * ug[__builtin_ctz(b)];
  }
}

void signs_lut8(const lq_layer* L, const float* table, float* y) {
  const int64_t nbytes = lq_row_nbytes(L);
  for (int64_t r = 0; r < L->out_features; ++r) {
    const uint8_t* row = L->signs + r * nbytes;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    int64_t g = 0;
    for (; g + 4 <= nbytes; g += 4) {
      s0 += table[256 * g + row[g]];
      s1 += table[256 * (g + 1) + row[g + 1]];
      s2 += table[256 * (g + 2) + row[g + 2]];
      s3 += table[256 * (g + 3) + row[g + 3]];
    }
    for (; g < nbytes; ++g) s0 += table[256 * g + row[g]];
    y[r] = L->scale[r] * ((s0 + s1) + (s2 + s3));
  }
}

// MASK: 8 lifted values per packed byte as one 8-float vector (GCC/Clang vector extension:
// one AVX op on x86, two NEON ops on ARM), times the byte's ±1 pattern.
typedef float v8f __attribute__((vector_size(32), aligned(4)));
typedef float v8f_aligned __attribute__((vector_size(32)));

struct VecPattern {
  v8f_aligned v[256];
  VecPattern() {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) v[b][j] = SIGN_PATTERN.v[b][j];
  }
};
const VecPattern VEC_PATTERN;

inline float hsum(v8f_aligned a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

constexpr int TILE = 4;

// T tokens per pass, so each packed byte is read once per tile (prefill).
template <int T>
void signs_mask_tile(const lq_layer* L, const float* u, int64_t width, float* y, int64_t ystride,
                     int64_t r0, int64_t r1) {
  const int64_t nbytes = lq_row_nbytes(L);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = L->signs + r * nbytes;
    v8f_aligned acc[T] = {};
    for (int64_t g = 0; g < nbytes; ++g) {
      const v8f_aligned s = VEC_PATTERN.v[row[g]];
      for (int t = 0; t < T; ++t) acc[t] += *reinterpret_cast<const v8f*>(u + t * width + 8 * g) * s;
    }
    for (int t = 0; t < T; ++t) y[t * ystride + r] = L->scale[r] * hsum(acc[t]);
  }
}

// One token: four independent accumulators (bytes g..g+3) hide the multiply-add latency.
void signs_mask_one(const lq_layer* L, const float* u, float* y, int64_t r0, int64_t r1) {
  const int64_t nbytes = lq_row_nbytes(L);
  const v8f* uv = reinterpret_cast<const v8f*>(u);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = L->signs + r * nbytes;
    v8f_aligned a0 = {}, a1 = {}, a2 = {}, a3 = {};
    int64_t g = 0;
    for (; g + 4 <= nbytes; g += 4) {
      a0 += uv[g] * VEC_PATTERN.v[row[g]];
      a1 += uv[g + 1] * VEC_PATTERN.v[row[g + 1]];
      a2 += uv[g + 2] * VEC_PATTERN.v[row[g + 2]];
      a3 += uv[g + 3] * VEC_PATTERN.v[row[g + 3]];
    }
    for (; g < nbytes; ++g) a0 += uv[g] * VEC_PATTERN.v[row[g]];
    y[r] = L->scale[r] * hsum((a0 + a1) + (a2 + a3));
  }
}

void signs_mask(const lq_layer* L, const float* u, int64_t m, float* y, int64_t r0, int64_t r1) {
  const int64_t width = lifted_width(L), out = L->out_features;
  int64_t t = 0;
  for (; t + TILE <= m; t += TILE) signs_mask_tile<TILE>(L, u + t * width, width, y + t * out, out, r0, r1);
  for (; t < m; ++t) signs_mask_one(L, u + t * width, y + t * out, r0, r1);
}

bool valid(const lq_layer* L) {
  return L && L->in_features > 0 && L->out_features > 0 && L->d > 0 && L->D > 0 &&
         L->n1 > 0 && L->n2 > 0 && L->n1 * L->n2 == L->in_features && L->signs && L->scale &&
         L->in_scale && L->mix1 && L->mix2 && L->block_scale && L->codebook;
}

// AUTO is MASK: it measured faster than LUT8 at every shape, decode and prefill
// (benchmarks/results/executorch_kernel_bench.md); LUT8 stays for comparison.
int resolve(int method, int64_t) { return method == LQ_METHOD_AUTO ? LQ_METHOD_MASK : method; }

// Scratch layout: [a, t: 2 n][v: n_blocks * d][mix2^T: n2 * n2][u: m * width (MASK) or width +
// tables (LUT8)].
int64_t v_offset(const lq_layer* L) { return 2 * L->in_features; }
int64_t mix2t_offset(const lq_layer* L) { return v_offset(L) + n_blocks(L) * L->d; }
int64_t u_offset(const lq_layer* L) { return mix2t_offset(L) + L->n2 * L->n2; }

const float* mix2t_of(const lq_layer* L, const float* scratch) {
  return L->mix2t ? L->mix2t : scratch + mix2t_offset(L);
}

// Per token: a = in_scale ⊙ x, and the paddings the ranges never write (v past n, u past
// n_blocks * D) zeroed; per call without a caller's mix2^T, the transposed copy in scratch.
void begin_token(const lq_layer* L, const float* x, float* scratch, float* u) {
  const int64_t n = L->in_features, nb = n_blocks(L);
  for (int64_t i = 0; i < n; ++i) scratch[i] = x[i] * L->in_scale[i];
  float* v = scratch + v_offset(L);
  for (int64_t i = n; i < nb * L->d; ++i) v[i] = 0.0f;
  for (int64_t w = nb * L->D; w < lifted_width(L); ++w) u[w] = 0.0f;
}

void transpose_mix2(const lq_layer* L, float* scratch) {
  if (L->mix2t) return;
  const int64_t n2 = L->n2;
  float* t = scratch + mix2t_offset(L);
  for (int64_t i = 0; i < n2; ++i)
    for (int64_t j = 0; j < n2; ++j) t[j * n2 + i] = L->mix2[i * n2 + j];
}

void prepare(const lq_layer* L, const float* x, int64_t m, float* scratch) {
  const int64_t n = L->in_features, width = lifted_width(L);
  transpose_mix2(L, scratch);
  float* v = scratch + v_offset(L);
  float* u = scratch + u_offset(L);
  for (int64_t t = 0; t < m; ++t) {
    begin_token(L, x + t * n, scratch, u + t * width);
    transform_rows(L, mix2t_of(L, scratch), scratch, scratch + n, v, 0, L->n1);
    lift_blocks(L, v, u + t * width, 0, n_blocks(L));
  }
}

}  // namespace

extern "C" int64_t lq_row_nbytes(const lq_layer* L) { return (n_blocks(L) * L->D + 7) / 8; }

extern "C" int64_t lq_scratch_floats(const lq_layer* L, int64_t m, int method) {
  if (resolve(method, m) == LQ_METHOD_LUT8) return u_offset(L) + lifted_width(L) + 256 * lq_row_nbytes(L);
  return u_offset(L) + m * lifted_width(L);
}

extern "C" int lq_mask_prepare(const lq_layer* L, const float* x, int64_t m, float* scratch) {
  if (!valid(L) || m < 0 || (m > 0 && (!x || !scratch))) return 1;
  prepare(L, x, m, scratch);
  return 0;
}

extern "C" void lq_mask_rows(const lq_layer* L, const float* scratch, int64_t m, float* y, int64_t r0, int64_t r1) {
  signs_mask(L, scratch + u_offset(L), m, y, r0, r1);
}

extern "C" int lq_linear_f32(const lq_layer* L, const float* x, int64_t m, float* y, float* scratch, int method) {
  if (!valid(L) || m < 0 || (m > 0 && (!x || !y || !scratch))) return 1;
  method = resolve(method, m);
  if (method != LQ_METHOD_LUT8 && method != LQ_METHOD_MASK) return 2;
  if (method == LQ_METHOD_MASK) {
    prepare(L, x, m, scratch);
    signs_mask(L, scratch + u_offset(L), m, y, 0, L->out_features);
    return 0;
  }
  const int64_t n = L->in_features;
  float* u = scratch + u_offset(L);
  float* table = u + lifted_width(L);
  for (int64_t t = 0; t < m; ++t) {  // LUT8: one token at a time through its tables
    prepare(L, x + t * n, 1, scratch);
    build_tables(u, lq_row_nbytes(L), table);
    signs_lut8(L, table, y + t * L->out_features);
  }
  return 0;
}

namespace {

// The transform rows [r0, r1) that blocks [b0, b1) read (the last row clipped to n1).
void segment_rows(const lq_layer* L, int64_t b0, int64_t b1, int64_t& r0, int64_t& r1) {
  r0 = b0 * L->d / L->n2;
  r1 = std::min(L->n1, (b1 * L->d + L->n2 - 1) / L->n2);
}

}  // namespace

extern "C" int64_t lq_lift_segment_floats(const lq_layer* L, int64_t b0, int64_t b1) {
  int64_t r0, r1;
  segment_rows(L, b0, b1, r0, r1);
  return 2 * (r1 - r0) * L->n2 + L->d;  // t and v rows, v padded by one block
}

extern "C" void lq_lift_segment(const lq_layer* L, const float* mix2t, const float* a, int64_t b0, int64_t b1,
                                float* work, float* u) {
  const int64_t n = L->in_features, n1 = L->n1, n2 = L->n2, d = L->d;
  int64_t r0, r1;
  segment_rows(L, b0, b1, r0, r1);
  const int64_t rows = r1 - r0, e0 = r0 * n2, e1 = r1 * n2;
  float* t = work;
  float* v = work + rows * n2;  // v elements [e0, e1) of the token, then zero padding
  matmul_rows(L->mix1 + r0 * n1, a, t, rows, n1, n2);  // t = mix1 · A, rows r0..r1
  matmul_rows(t, mix2t, v, rows, n2, n2);              // v = t · mix2^T
  for (int64_t e = e0; e < e1;) {
    const int64_t b = e / d, end = std::min(e1, (b + 1) * d);
    const float bs = L->block_scale[b];
    for (; e < end; ++e) v[e - e0] *= bs;
  }
  if (r1 == n1)  // the last block may read past n: zeros (e1 == n here)
    for (int64_t e = n; e < n + d; ++e) v[e - e0] = 0.0f;
  matmul_rows(v + (b0 * d - e0), L->codebook, u, b1 - b0, d, L->D);
}
