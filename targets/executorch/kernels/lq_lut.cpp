// liftedge lift-project linear, table-lookup form: portable C++ core. See lq_lut.h for the
// math, the table quantization and the sign layout.
#include "lq_lut.h"

#include <algorithm>
#include <atomic>
#include <numeric>
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
// One plane: q in [-127, 127], stored biased by 128 (bytes 1..255).
constexpr float QMAX_INT8 = 127.0f;
constexpr int BIAS_INT8 = 128;
// Two planes: q = 128 hi + lo with hi = floor((q + 64) / 128) in [-63, 63] and lo in [-64, 63],
// each stored biased by 64 (bytes 0..127), so the lookups of two groups add in one byte (<= 254)
// before they are widened: |q| <= 63 * 128 = 8064, ~14-bit tables.
constexpr float QMAX_TWO_PLANE = 63.0f * 128.0f;
constexpr int BIAS_TWO_PLANE = 64;
constexpr int RADIX_TWO_PLANE = 128;
// Summed bytes added to a 16-bit lane before it is widened to int32: each add is at most 255
// (one lookup, one plane) or 254 (two lookups, two planes); 128 of them stay below 2^15.
constexpr int64_t CHUNK_ADDS = 128;
// Sign bytes ahead of the loads that each loop iteration asks the cache to fetch (into L2:
// L1 holds the tables). A tile walks its signs sequentially, but interleaved with the table
// loads the hardware prefetcher alone kept one core at 6.4-6.7 GB/s of signs once a layer is
// out of cache (AMD EPYC, 1B shapes; 20 GB/s when the same layer is cached). 10 KB ahead (about
// half a 2048-wide tile) gave 15-18 GB/s; 1-4 KB ahead 8-11, 16-32 KB ahead 12, an L1 hint at
// any distance at most 11 (benchmarks/results/kernel_bench.md). Prefetches never fault, so
// reading past a thread's last tile is harmless.
constexpr int64_t PREFETCH_BYTES = 10240;
inline void prefetch_signs(const uint8_t* p) { __builtin_prefetch(p + PREFETCH_BYTES, 0, 2); }

inline int planes(int mode) { return mode == LQ_LUT_INT8 ? 1 : 2; }
template <int P>
constexpr int bias() { return P == 1 ? BIAS_INT8 : BIAS_TWO_PLANE; }

bool valid(const lq_layer* L) {
  return L && L->in_features > 0 && L->out_features > 0 && L->d > 0 && L->D > 0 && L->n1 > 0 && L->n2 > 0 &&
         L->n1 * L->n2 == L->in_features && L->signs && L->scale && L->in_scale && L->mix1 && L->mix2 &&
         L->block_scale && L->codebook;
}

// Table bytes hold v + bias (v the signed plane value), so lookups are summed as unsigned
// bytes and the bias (per group) is taken off once per tile: acc[p][row] = Σ_g v + bias.

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
// lookups; see widen_add). Two planes: the lookups of two loads (groups g..g+3) are first added
// as bytes (biased values <= 127 each), halving the widening work.
template <int P>
void tile_simd(const uint8_t* w, const uint8_t* tb, int64_t G, int32_t (*acc)[ROWS]) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const auto load = [](const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  constexpr int64_t STEP = P == 2 ? 4 : 2;  // groups per loop iteration
  for (int64_t g0 = 0; g0 < G; g0 += STEP * CHUNK_ADDS) {
    const int64_t g1 = std::min(G, g0 + STEP * CHUNK_ADDS);
    __m256i ar[P], ao[P], br[P], bo[P];
    for (int p = 0; p < P; ++p) ar[p] = ao[p] = br[p] = bo[p] = _mm256_setzero_si256();
    const auto add = [&](int p, __m256i a, __m256i b) {
      ar[p] = _mm256_add_epi16(ar[p], a);
      ao[p] = _mm256_add_epi16(ao[p], _mm256_srli_epi16(a, 8));
      br[p] = _mm256_add_epi16(br[p], b);
      bo[p] = _mm256_add_epi16(bo[p], _mm256_srli_epi16(b, 8));
    };
    int64_t g = g0;
    if (P == 2) {
      for (; g + 4 <= g1; g += 4) {
        prefetch_signs(w + 16 * g);
        const __m256i v0 = load(w + 16 * g), v1 = load(w + 16 * (g + 2));
        const __m256i il0 = _mm256_and_si256(v0, low4), ih0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low4);
        const __m256i il1 = _mm256_and_si256(v1, low4), ih1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low4);
        for (int p = 0; p < P; ++p) {
          const __m256i t0 = load(tb + (p * G + g) * 16), t1 = load(tb + (p * G + g + 2) * 16);
          add(p, _mm256_add_epi8(_mm256_shuffle_epi8(t0, il0), _mm256_shuffle_epi8(t1, il1)),   // rows 0..15
              _mm256_add_epi8(_mm256_shuffle_epi8(t0, ih0), _mm256_shuffle_epi8(t1, ih1)));  // rows 16..31
        }
      }
    }
    for (; g < g1; g += 2) {  // one plane; or the last two groups of two planes
      prefetch_signs(w + 16 * g);
      const __m256i v = load(w + 16 * g);
      const __m256i il = _mm256_and_si256(v, low4), ih = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      for (int p = 0; p < P; ++p) {
        const __m256i t = load(tb + (p * G + g) * 16);
        add(p, _mm256_shuffle_epi8(t, il), _mm256_shuffle_epi8(t, ih));
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
// Two planes: the lookups of two groups are first added as bytes (biased values <= 127 each).
template <int P>
void tile_simd(const uint8_t* w, const uint8_t* tb, int64_t G, int32_t (*acc)[ROWS]) {
  const uint8x16_t low4 = vdupq_n_u8(0x0F);
  constexpr int64_t STEP = P == 2 ? 2 : 1;  // groups per loop iteration
  for (int64_t g0 = 0; g0 < G; g0 += STEP * CHUNK_ADDS) {
    const int64_t g1 = std::min(G, g0 + STEP * CHUNK_ADDS);
    uint16x8_t a0[P], a1[P], b0[P], b1[P];
    for (int p = 0; p < P; ++p) a0[p] = a1[p] = b0[p] = b1[p] = vdupq_n_u16(0);
    const auto add = [&](int p, uint8x16_t a, uint8x16_t b) {
      a0[p] = vaddw_u8(a0[p], vget_low_u8(a));
      a1[p] = vaddw_high_u8(a1[p], a);
      b0[p] = vaddw_u8(b0[p], vget_low_u8(b));
      b1[p] = vaddw_high_u8(b1[p], b);
    };
    int64_t g = g0;
    if (P == 2) {
      for (; g + 2 <= g1; g += 2) {
        prefetch_signs(w + 16 * g);
        const uint8x16_t v0 = vld1q_u8(w + 16 * g), v1 = vld1q_u8(w + 16 * (g + 1));
        const uint8x16_t il0 = vandq_u8(v0, low4), ih0 = vshrq_n_u8(v0, 4);
        const uint8x16_t il1 = vandq_u8(v1, low4), ih1 = vshrq_n_u8(v1, 4);
        for (int p = 0; p < P; ++p) {
          const uint8x16_t t0 = vld1q_u8(tb + (p * G + g) * 16), t1 = vld1q_u8(tb + (p * G + g + 1) * 16);
          add(p, vaddq_u8(vqtbl1q_u8(t0, il0), vqtbl1q_u8(t1, il1)),   // rows 0..15
              vaddq_u8(vqtbl1q_u8(t0, ih0), vqtbl1q_u8(t1, ih1)));  // rows 16..31
        }
      }
    }
    for (; g < g1; ++g) {  // one plane (two planes: G is even, so never)
      prefetch_signs(w + 16 * g);
      const uint8x16_t v = vld1q_u8(w + 16 * g);
      const uint8x16_t il = vandq_u8(v, low4), ih = vshrq_n_u8(v, 4);
      for (int p = 0; p < P; ++p) {
        const uint8x16_t t = vld1q_u8(tb + (p * G + g) * 16);
        add(p, vqtbl1q_u8(t, il), vqtbl1q_u8(t, ih));
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
      const int64_t b = static_cast<int64_t>(bias<P>()) * G;
      for (int64_t i = 0; i < nrows; ++i) {
        const int64_t q0 = acc[0][i] - b;
        const int64_t q = P == 2 ? RADIX_TWO_PLANE * q0 + (acc[P - 1][i] - b) : q0;
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

namespace {

// One group's 16 table entries as int16, the quantized ±u0±u1±u2±u3 of lq_lut.h: entry i < 8
// (bit 3 clear: -u3) is (((±u0) + (±u1)) + (±u2)) - u3 rounded by nearbyint (ties to even; no
// add a compiler could fuse into an FMA, so every path rounds identically), clamped to
// [-qlim, qlim]; entry 15 - i is its negation (the mirror).
inline void group_entries_scalar(const float* ug, float inv, int qlim, int16_t* q) {
  for (int i = 0; i < 8; ++i) {
    const float t = (((i & 1 ? ug[0] : -ug[0]) + (i & 2 ? ug[1] : -ug[1])) + (i & 4 ? ug[2] : -ug[2])) - ug[3];
    q[i] = static_cast<int16_t>(std::min(qlim, std::max(-qlim, static_cast<int>(std::nearbyint(t * inv)))));
  }
  for (int i = 0; i < 8; ++i) q[15 - i] = static_cast<int16_t>(-q[i]);
}

#if LQ_LUT_AVX2
// The same 8 entries in one vector: sign flips are exact (xor of the sign bit), the adds run in
// the scalar order, and cvtps rounds to nearest even like nearbyint in the default mode. Returns
// all 16 entries as int16 (entries 0..7 in the low half, their mirrors 8..15 in the high half),
// kept in registers: a 32-byte reload of two 16-byte stores would stall on store forwarding.
inline __m256i group_entries(const float* ug, __m256 inv, __m256i qlim) {
  // Sign bit in the lanes (entry index i = lane) where bit j of i is clear: u_j enters negated.
  const __m256 m0 = _mm256_setr_ps(-0.f, 0.f, -0.f, 0.f, -0.f, 0.f, -0.f, 0.f);
  const __m256 m1 = _mm256_setr_ps(-0.f, -0.f, 0.f, 0.f, -0.f, -0.f, 0.f, 0.f);
  const __m256 m2 = _mm256_setr_ps(-0.f, -0.f, -0.f, -0.f, 0.f, 0.f, 0.f, 0.f);
  const __m256 a = _mm256_xor_ps(_mm256_broadcast_ss(ug), m0);
  const __m256 b = _mm256_xor_ps(_mm256_broadcast_ss(ug + 1), m1);
  const __m256 c = _mm256_xor_ps(_mm256_broadcast_ss(ug + 2), m2);
  const __m256 t = _mm256_sub_ps(_mm256_add_ps(_mm256_add_ps(a, b), c), _mm256_broadcast_ss(ug + 3));
  __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(t, inv));
  r = _mm256_max_epi32(_mm256_min_epi32(r, qlim), _mm256_sub_epi32(_mm256_setzero_si256(), qlim));
  const __m128i lo = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));  // 0..7
  const __m128i rev = _mm_setr_epi8(14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4, 5, 2, 3, 0, 1);
  const __m128i hi = _mm_sub_epi16(_mm_setzero_si128(), _mm_shuffle_epi8(lo, rev));  // 8..15
  return _mm256_set_m128i(hi, lo);
}

// The 16 entries of a group into its table bytes, as store_group (below) does in portable code.
inline void store_group_avx2(__m256i v, int mode, uint8_t* one, uint8_t* hi, uint8_t* lo) {
  const int order = 0xD8;  // qwords 0, 2, 1, 3: each 128-bit lane's packed bytes side by side
  if (mode == LQ_LUT_INT8) {
    const __m256i b = _mm256_add_epi16(v, _mm256_set1_epi16(BIAS_INT8));  // 1..255
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi16(b, b), order);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(one), _mm256_castsi256_si128(p));
    return;
  }
  const __m256i h = _mm256_srai_epi16(_mm256_add_epi16(v, _mm256_set1_epi16(RADIX_TWO_PLANE / 2)), 7);  // floor
  const __m256i l = _mm256_sub_epi16(v, _mm256_slli_epi16(h, 7));
  const __m256i bias = _mm256_set1_epi16(BIAS_TWO_PLANE);
  const __m256i p = _mm256_permute4x64_epi64(
      _mm256_packus_epi16(_mm256_add_epi16(h, bias), _mm256_add_epi16(l, bias)), order);  // [hi 0..15 | lo 0..15]
  _mm_storeu_si128(reinterpret_cast<__m128i*>(hi), _mm256_castsi256_si128(p));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), _mm256_extracti128_si256(p, 1));
}
#elif LQ_LUT_NEON
inline void group_entries(const float* ug, float32x4_t inv, int32x4_t qlim, int16_t* q) {
  // Entries 0..3 and 4..7: bit 2 (u2) is clear in the first four, set in the second.
  static const float S0[4] = {-1.f, 1.f, -1.f, 1.f}, S1[4] = {-1.f, -1.f, 1.f, 1.f};
  const float32x4_t a = vmulq_n_f32(vld1q_f32(S0), ug[0]);  // exact: times ±1
  const float32x4_t b = vmulq_n_f32(vld1q_f32(S1), ug[1]);
  const float32x4_t ab = vaddq_f32(a, b);
  const float32x4_t u3 = vdupq_n_f32(ug[3]);
  const float32x4_t t0 = vsubq_f32(vaddq_f32(ab, vdupq_n_f32(-ug[2])), u3);
  const float32x4_t t1 = vsubq_f32(vaddq_f32(ab, vdupq_n_f32(ug[2])), u3);
  const int32x4_t nq = vnegq_s32(qlim);
  const int32x4_t r0 = vmaxq_s32(vminq_s32(vcvtnq_s32_f32(vmulq_f32(t0, inv)), qlim), nq);
  const int32x4_t r1 = vmaxq_s32(vminq_s32(vcvtnq_s32_f32(vmulq_f32(t1, inv)), qlim), nq);
  const int16x8_t lo = vcombine_s16(vmovn_s32(r0), vmovn_s32(r1));  // |q| < 2^15: exact
  int16x8_t hi = vnegq_s16(vrev64q_s16(lo));                       // reverse within halves
  hi = vcombine_s16(vget_high_s16(hi), vget_low_s16(hi));           // then swap the halves
  vst1q_s16(q, lo);
  vst1q_s16(q + 8, hi);
}
#endif

// The 16 entries of a group into its table bytes: one plane (biased by 128), or hi/lo planes
// q = 128 hi + lo (hi = floor((q + 64) / 128), lo in [-64, 63]; both biased by 64). Written with
// the GCC/Clang vector extension: 16 lanes at once on every instruction set, same integers.
typedef int16_t i16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint8_t u8x16 __attribute__((vector_size(16), aligned(1)));

inline void store_group(const int16_t* q, int mode, uint8_t* one, uint8_t* hi, uint8_t* lo) {
  const i16x16 v = *reinterpret_cast<const i16x16*>(q);
  if (mode == LQ_LUT_INT8) {
    *reinterpret_cast<u8x16*>(one) = __builtin_convertvector(v + BIAS_INT8, u8x16);
    return;
  }
  const i16x16 h = (v + RADIX_TWO_PLANE / 2) >> 7;  // arithmetic shift: floor
  *reinterpret_cast<u8x16*>(hi) = __builtin_convertvector(h + BIAS_TWO_PLANE, u8x16);
  *reinterpret_cast<u8x16*>(lo) = __builtin_convertvector(v - RADIX_TWO_PLANE * h + BIAS_TWO_PLANE, u8x16);
}

}  // namespace

namespace {

// Largest group sum of |u| over groups [g0, g1): the token's table scale is this over qmax.
float group_maxabs(const float* u, int64_t g0, int64_t g1) {
  float maxabs = 0.0f;
  for (int64_t g = g0; g < g1; ++g) {
    const float* ug = u + 4 * g;
    maxabs = std::max(maxabs, ((std::fabs(ug[0]) + std::fabs(ug[1])) + std::fabs(ug[2])) + std::fabs(ug[3]));
  }
  return maxabs;
}

float qmax_of(int mode) { return mode == LQ_LUT_INT8 ? QMAX_INT8 : QMAX_TWO_PLANE; }

// Table bytes of groups [g0, g1) (of `groups`), given the token's largest group sum.
void tables_range(const float* u, int64_t groups, int mode, float maxabs, uint8_t* tables, int64_t g0, int64_t g1) {
  const float qmax = qmax_of(mode);
  const float inv = maxabs > 0.0f ? qmax / maxabs : 0.0f;
  const int qlim = static_cast<int>(qmax);
#if LQ_LUT_AVX2
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i vlim = _mm256_set1_epi32(qlim);
#elif LQ_LUT_NEON
  const float32x4_t vinv = vdupq_n_f32(inv);
  const int32x4_t vlim = vdupq_n_s32(qlim);
#endif
#if LQ_LUT_AVX2
  for (int64_t g = g0; g < g1; ++g)
    store_group_avx2(group_entries(u + 4 * g, vinv, vlim), mode, tables + g * 16, tables + g * 16,
                     tables + (groups + g) * 16);
#else
  alignas(16) int16_t q[16];
  for (int64_t g = g0; g < g1; ++g) {
#if LQ_LUT_NEON
    group_entries(u + 4 * g, vinv, vlim, q);
#else
    group_entries_scalar(u + 4 * g, inv, qlim, q);
#endif
    store_group(q, mode, tables + g * 16, tables + g * 16, tables + (groups + g) * 16);
  }
#endif
}

}  // namespace

extern "C" void lq_lut_tables(const float* u, int64_t groups, int mode, uint8_t* tables, float* s_out) {
  const float maxabs = group_maxabs(u, 0, groups);
  *s_out = maxabs / qmax_of(mode);
  tables_range(u, groups, mode, maxabs, tables, 0, groups);
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

namespace {

// Chunks per thread-split phase: a few per thread, so uneven chunks still balance.
constexpr int64_t SPLIT_CHUNKS = 8;

int64_t grain_of(int64_t n) { return std::max<int64_t>(1, (n + SPLIT_CHUNKS - 1) / SPLIT_CHUNKS); }

struct SplitToken {  // what the phases of one token's split prepare share
  const lq_layer* L;
  float* lift;
  const float* u;
  int mode;
  int64_t G, nb, unit;        // groups; blocks; blocks per lift chunk (a multiple of ALIGN; edges on group edges)
  std::atomic<uint32_t> max_bits{0};  // largest group sum of |u| so far (a non-negative float's bits)
  uint8_t* tables;
};

// Rows and blocks are dealt out in fours (ALIGN): the transform and the lift compute four rows
// at a time where they can (matmul_rows' register blocks), and a compiler may contract their
// multiply-adds into FMAs differently in the four-row and one-row code, so a split has the
// serial prepare's bits only if every chunk starts where a serial four-row block starts.
constexpr int64_t ALIGN = 4;

void rows_phase(void* c, int64_t k0, int64_t k1) {
  auto* s = static_cast<SplitToken*>(c);
  lq_lift_transform_rows(s->L, s->lift, k0 * ALIGN, std::min(s->L->n1, k1 * ALIGN));
}

void lift_phase(void* c, int64_t k0, int64_t k1) {
  auto* s = static_cast<SplitToken*>(c);
  const int64_t nb = s->nb, b0 = k0 * s->unit, b1 = std::min(nb, k1 * s->unit);
  lq_lift_blocks(s->L, s->lift, b0, b1);
  // Groups whose 4 lifted values lie in these blocks; the last chunk also takes the zero tail.
  const int64_t g0 = b0 * s->L->D / 4, g1 = b1 == nb ? s->G : b1 * s->L->D / 4;
  const float m = group_maxabs(s->u, g0, g1);
  uint32_t bits;
  std::memcpy(&bits, &m, sizeof bits);
  uint32_t seen = s->max_bits.load(std::memory_order_relaxed);  // non-negative floats order as their bits
  while (bits > seen && !s->max_bits.compare_exchange_weak(seen, bits, std::memory_order_relaxed)) {
  }
}

void tables_phase(void* c, int64_t g0, int64_t g1) {
  auto* s = static_cast<SplitToken*>(c);
  float maxabs;
  const uint32_t bits = s->max_bits.load(std::memory_order_relaxed);
  std::memcpy(&maxabs, &bits, sizeof maxabs);
  tables_range(s->u, s->G, s->mode, maxabs, s->tables, g0, g1);
}

}  // namespace

extern "C" int lq_lut_prepare_split(const lq_layer* L, const float* x, int64_t m, int mode, void* scratch,
                                    lq_parallel_fn run, void* runner) {
  if (!valid(L) || m < 0 || (m > 0 && (!x || !scratch)) || !run || (mode != LQ_LUT_TWO_PLANE && mode != LQ_LUT_INT8))
    return 1;
  const Scratch sc = views(L, scratch, m);
  const int64_t G = lq_lut_groups(L), unit = std::lcm<int64_t>(std::lcm<int64_t>(L->D, 4) / L->D, ALIGN);
  const int64_t nb = (L->in_features + L->d - 1) / L->d, chunks = (nb + unit - 1) / unit;
  for (int64_t t = 0; t < m; ++t) {  // token by token through the one lift area, each step split
    SplitToken s;
    s.L = L;
    s.lift = sc.lift;
    s.mode = mode;
    s.G = G;
    s.nb = nb;
    s.unit = unit;
    s.tables = sc.tables + t * planes(mode) * G * 16;
    s.u = lq_lift_begin(L, x + t * L->in_features, sc.lift);
    const int64_t row_units = (L->n1 + ALIGN - 1) / ALIGN;
    run(runner, row_units, grain_of(row_units), rows_phase, &s);
    run(runner, chunks, grain_of(chunks), lift_phase, &s);
    float maxabs;
    const uint32_t bits = s.max_bits.load();
    std::memcpy(&maxabs, &bits, sizeof maxabs);
    sc.scales[t] = maxabs / qmax_of(mode);
    run(runner, G, grain_of(G), tables_phase, &s);
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
