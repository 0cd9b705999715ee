// liftedge lift-project linear, table-lookup form: portable C++ core. See lq_lut.h for the
// math, the table quantization and the sign layout.
#include "lq_lut.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(LQ_LUT_FORCE_SCALAR)
#define LQ_LUT_SCALAR 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define LQ_LUT_AVX2 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define LQ_LUT_NEON 1
#else
#define LQ_LUT_SCALAR 1
#endif

namespace {

constexpr int ROWS = LQ_LUT_TILE_ROWS;
// Largest |q|: two planes keep hi = (q + 128) >> 8 within int8's [-127, 127].
constexpr float QMAX_TWO_PLANE = 127.0f * 256.0f;
constexpr float QMAX_INT8 = 127.0f;
// Lookups summed in 16-bit lanes before widening to int32: each lane takes at most one byte
// (<= 255) per group (NEON) or per two groups (AVX2); 128 of them stay below 2^15.
constexpr int64_t CHUNK_LOOKUPS = 128;

inline int planes(int mode) { return mode == LQ_LUT_INT8 ? 1 : 2; }

bool valid(const lq_layer* L) {
  return L && L->in_features > 0 && L->out_features > 0 && L->d > 0 && L->D > 0 && L->n1 > 0 && L->n2 > 0 &&
         L->n1 * L->n2 == L->in_features && L->signs && L->scale && L->in_scale && L->mix1 && L->mix2 &&
         L->block_scale && L->codebook;
}

// Table bytes hold v + 128 (v the signed plane value), so lookups are summed as unsigned bytes
// and the bias (128 per group) is taken off once per tile: acc[p][row] = Σ_g v.
constexpr int BIAS = 128;

// Accumulated biased lookups of one tile of 32 rows for one token: acc[p][row], plane p.
template <int P>
void tile_scalar(const uint8_t* w, const uint8_t* tb, int64_t G, int32_t (*acc)[ROWS]) {
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = w + 16 * g;
    for (int p = 0; p < P; ++p) {
      const uint8_t* t = tb + (p * G + g) * 16;
      for (int i = 0; i < 16; ++i) {
        acc[p][i] += t[wg[i] & 15];
        acc[p][16 + i] += t[wg[i] >> 4];
      }
    }
  }
}

#if LQ_LUT_AVX2
// raw: Σ of the 16-bit lanes (byte 2k + 256 byte 2k+1, mod 2^16); odd: Σ byte 2k+1 (exact).
// Then Σ byte 2k = raw - 256 odd (mod 2^16), exact while each sum < 2^16. Both 128-bit halves
// hold the same 16 rows (two groups), added here: rows base + 2k (even) and base + 2k + 1 (odd).
inline void widen_add(int32_t* acc, __m256i raw, __m256i odd, int base) {
  const __m256i even = _mm256_sub_epi16(raw, _mm256_slli_epi16(odd, 8));
  const auto halves = [](__m256i v) {  // unsigned 16-bit sums < 2^15: zero = sign extension
    return _mm256_add_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)),
                            _mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)));
  };
  alignas(32) int32_t e[8], o[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(e), halves(even));
  _mm256_store_si256(reinterpret_cast<__m256i*>(o), halves(odd));
  for (int k = 0; k < 8; ++k) acc[base + 2 * k] += e[k], acc[base + 2 * k + 1] += o[k];
}

// One 32-byte load = groups g (low half) and g + 1 (high half) of the tile's 32 rows; the
// tables of the same two groups are the matching 32 bytes, so one vpshufb looks up 32. The
// looked-up bytes are summed as 16-bit lanes plus their high bytes (1 shift + 2 adds per 32
// lookups; see widen_add).
template <int P>
void tile_simd(const uint8_t* w, const uint8_t* tb, int64_t G, int32_t (*acc)[ROWS]) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t g0 = 0; g0 < G; g0 += 2 * CHUNK_LOOKUPS) {
    const int64_t g1 = std::min(G, g0 + 2 * CHUNK_LOOKUPS);
    __m256i ar[P], ao[P], br[P], bo[P];
    for (int p = 0; p < P; ++p) ar[p] = ao[p] = br[p] = bo[p] = _mm256_setzero_si256();
    for (int64_t g = g0; g < g1; g += 2) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * g));
      const __m256i il = _mm256_and_si256(v, low4);
      const __m256i ih = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      for (int p = 0; p < P; ++p) {
        const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb + (p * G + g) * 16));
        const __m256i a = _mm256_shuffle_epi8(t, il);  // rows 0..15
        const __m256i b = _mm256_shuffle_epi8(t, ih);  // rows 16..31
        ar[p] = _mm256_add_epi16(ar[p], a);
        ao[p] = _mm256_add_epi16(ao[p], _mm256_srli_epi16(a, 8));
        br[p] = _mm256_add_epi16(br[p], b);
        bo[p] = _mm256_add_epi16(bo[p], _mm256_srli_epi16(b, 8));
      }
    }
    for (int p = 0; p < P; ++p) {
      widen_add(acc[p], ar[p], ao[p], 0);
      widen_add(acc[p], br[p], bo[p], 16);
    }
  }
}
#elif LQ_LUT_NEON
inline void widen_add(int32_t* acc, uint16x8_t v) {  // sums < 2^15: reinterpretation is exact
  const int16x8_t s = vreinterpretq_s16_u16(v);
  vst1q_s32(acc, vaddw_s16(vld1q_s32(acc), vget_low_s16(s)));
  vst1q_s32(acc + 4, vaddw_high_s16(vld1q_s32(acc + 4), s));
}

// One 16-byte load = one group of the tile's 32 rows; vqtbl1q_u8 looks up 16 rows at a time.
template <int P>
void tile_simd(const uint8_t* w, const uint8_t* tb, int64_t G, int32_t (*acc)[ROWS]) {
  const uint8x16_t low4 = vdupq_n_u8(0x0F);
  for (int64_t g0 = 0; g0 < G; g0 += CHUNK_LOOKUPS) {
    const int64_t g1 = std::min(G, g0 + CHUNK_LOOKUPS);
    uint16x8_t a0[P], a1[P], b0[P], b1[P];
    for (int p = 0; p < P; ++p) a0[p] = a1[p] = b0[p] = b1[p] = vdupq_n_u16(0);
    for (int64_t g = g0; g < g1; ++g) {
      const uint8x16_t v = vld1q_u8(w + 16 * g);
      const uint8x16_t il = vandq_u8(v, low4);
      const uint8x16_t ih = vshrq_n_u8(v, 4);
      for (int p = 0; p < P; ++p) {
        const uint8x16_t t = vld1q_u8(tb + (p * G + g) * 16);
        const uint8x16_t a = vqtbl1q_u8(t, il);  // rows 0..15
        const uint8x16_t b = vqtbl1q_u8(t, ih);  // rows 16..31
        a0[p] = vaddw_u8(a0[p], vget_low_u8(a));
        a1[p] = vaddw_high_u8(a1[p], a);
        b0[p] = vaddw_u8(b0[p], vget_low_u8(b));
        b1[p] = vaddw_high_u8(b1[p], b);
      }
    }
    for (int p = 0; p < P; ++p) {
      widen_add(acc[p], a0[p]);
      widen_add(acc[p] + 8, a1[p]);
      widen_add(acc[p] + 16, b0[p]);
      widen_add(acc[p] + 24, b1[p]);
    }
  }
}
#else
template <int P>
void tile_simd(const uint8_t* w, const uint8_t* tb, int64_t G, int32_t (*acc)[ROWS]) {
  tile_scalar<P>(w, tb, G, acc);
}
#endif

struct Scratch {  // views into the caller's scratch bytes (lq_lut_scratch_bytes)
  float* lift;
  float* scales;  // [m]
  uint8_t* tables;  // [m][planes][groups][16], biased bytes
};

Scratch views(const lq_layer* L, void* scratch, int64_t m) {
  float* lift = static_cast<float*>(scratch);
  float* scales = lift + lq_lift_scratch_floats(L);
  return {lift, scales, reinterpret_cast<uint8_t*>(scales + m)};
}

template <int P>
void rows_for(const lq_layer* L, const Scratch& s, int64_t m, float* y, int64_t t0, int64_t t1) {
  const int64_t G = lq_lut_groups(L), out = L->out_features;
  for (int64_t tile = t0; tile < t1; ++tile) {
    const uint8_t* w = L->signs + tile * G * 16;
    const int64_t r0 = tile * ROWS, nrows = std::min<int64_t>(ROWS, out - r0);
    for (int64_t t = 0; t < m; ++t) {  // the tile's bytes stay in cache across a prefill's tokens
      int32_t acc[P][ROWS] = {};
      tile_simd<P>(w, s.tables + t * P * G * 16, G, acc);
      const float st = s.scales[t];
      float* yt = y + t * out + r0;
      const int64_t bias = static_cast<int64_t>(BIAS) * G;
      for (int64_t i = 0; i < nrows; ++i) {
        const int64_t q0 = acc[0][i] - bias;
        const int64_t q = P == 2 ? 256 * q0 + (acc[P - 1][i] - bias) : q0;
        yt[i] = L->scale[r0 + i] * (st * static_cast<float>(q));
      }
    }
  }
}

}  // namespace

extern "C" const char* lq_lut_isa(void) {
#if LQ_LUT_AVX2
  return "avx2";
#elif LQ_LUT_NEON
  return "neon";
#else
  return "scalar";
#endif
}

extern "C" int64_t lq_lut_groups(const lq_layer* L) { return 2 * lq_row_nbytes(L); }

extern "C" int64_t lq_lut_tiles(const lq_layer* L) { return (L->out_features + ROWS - 1) / ROWS; }

extern "C" int64_t lq_lut_scratch_bytes(const lq_layer* L, int64_t m, int mode) {
  return static_cast<int64_t>(sizeof(float)) * (lq_lift_scratch_floats(L) + m) + m * planes(mode) * lq_lut_groups(L) * 16;
}

extern "C" void lq_lut_tables(const float* u, int64_t groups, int mode, uint8_t* tables, float* s_out) {
  float maxabs = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    const float* ug = u + 4 * g;
    maxabs = std::max(maxabs, ((std::fabs(ug[0]) + std::fabs(ug[1])) + std::fabs(ug[2])) + std::fabs(ug[3]));
  }
  const float qmax = mode == LQ_LUT_INT8 ? QMAX_INT8 : QMAX_TWO_PLANE;
  const float inv = maxabs > 0.0f ? qmax / maxabs : 0.0f;
  *s_out = maxabs / qmax;
  const int qlim = static_cast<int>(qmax);
  for (int64_t g = 0; g < groups; ++g) {
    const float* ug = u + 4 * g;
    int q[16];
    for (int i = 0; i < 8; ++i) {  // bit 3 clear: -u3; the other 8 entries are the mirror
      const float t = (((i & 1 ? ug[0] : -ug[0]) + (i & 2 ? ug[1] : -ug[1])) + (i & 4 ? ug[2] : -ug[2])) - ug[3];
      // nearbyint (ties to even), not floor(t * inv + 0.5): no add a compiler could fuse into
      // an FMA, so x86 and arm64 builds round identically.
      q[i] = std::min(qlim, std::max(-qlim, static_cast<int>(std::nearbyint(t * inv))));
    }
    for (int i = 0; i < 8; ++i) q[15 - i] = -q[i];
    if (mode == LQ_LUT_INT8) {
      for (int i = 0; i < 16; ++i) tables[g * 16 + i] = static_cast<uint8_t>(q[i] + BIAS);
    } else {
      uint8_t* hi = tables + g * 16;
      uint8_t* lo = tables + (groups + g) * 16;
      for (int i = 0; i < 16; ++i) {
        const int h = (q[i] + 128) >> 8;  // floor: lo = q - 256 h in [-128, 127]
        hi[i] = static_cast<uint8_t>(h + BIAS);
        lo[i] = static_cast<uint8_t>(q[i] - 256 * h + BIAS);
      }
    }
  }
}

extern "C" int lq_lut_prepare(const lq_layer* L, const float* x, int64_t m, int mode, void* scratch) {
  if (!valid(L) || m < 0 || (m > 0 && (!x || !scratch)) || (mode != LQ_LUT_TWO_PLANE && mode != LQ_LUT_INT8))
    return 1;
  const Scratch s = views(L, scratch, m);
  const int64_t G = lq_lut_groups(L), P = planes(mode);
  for (int64_t t = 0; t < m; ++t) {
    const float* u = lq_lift_token(L, x + t * L->in_features, s.lift);
    lq_lut_tables(u, G, mode, s.tables + t * P * G * 16, s.scales + t);
  }
  return 0;
}

extern "C" int lq_lut_prepare_lifted(const lq_layer* L, const float* u, int64_t m, int mode, void* scratch) {
  if (!valid(L) || m < 0 || (m > 0 && (!u || !scratch)) || (mode != LQ_LUT_TWO_PLANE && mode != LQ_LUT_INT8))
    return 1;
  const Scratch s = views(L, scratch, m);
  const int64_t G = lq_lut_groups(L), P = planes(mode);
  for (int64_t t = 0; t < m; ++t) lq_lut_tables(u + t * 4 * G, G, mode, s.tables + t * P * G * 16, s.scales + t);
  return 0;
}

extern "C" void lq_lut_rows(const lq_layer* L, const void* scratch, int64_t m, int mode, float* y, int64_t t0,
                            int64_t t1) {
  const Scratch s = views(L, const_cast<void*>(scratch), m);
  if (planes(mode) == 2)
    rows_for<2>(L, s, m, y, t0, t1);
  else
    rows_for<1>(L, s, m, y, t0, t1);
}

extern "C" int lq_lut_linear_f32(const lq_layer* L, const float* x, int64_t m, float* y, void* scratch, int mode) {
  if (m > 0 && !y) return 1;
  const int rc = lq_lut_prepare(L, x, m, mode, scratch);
  if (rc == 0) lq_lut_rows(L, scratch, m, mode, y, 0, lq_lut_tiles(L));
  return rc;
}
