// liftedge lift-project linear, table-lookup form: portable C++ core. See lq_lut.h for the
// math, the table quantization and the sign layout.
#include "lq_lut.h"

#include <algorithm>
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
// A tile's integer sums in registers: int32 lanes, per plane p and half h (rows 16 h ..
// 16 h + 15), rows 16 h + 2k in e[p][h] lane k and rows 16 h + 2k + 1 in o[p][h] lane k.
struct TileSums {
  __m256i e[2][2], o[2][2];
};

// raw: Σ of the 16-bit lanes (byte 2k + 256 byte 2k+1, mod 2^16); odd: Σ byte 2k+1 (exact).
// Then Σ byte 2k = raw - 256 odd (mod 2^16), exact while each sum < 2^16. Both 128-bit halves
// hold the same 16 rows (two groups), added here into the even / odd rows' int32 lanes.
inline void widen_add(__m256i& e, __m256i& o, __m256i raw, __m256i odd) {
  const __m256i even = _mm256_sub_epi16(raw, _mm256_slli_epi16(odd, 8));
  const auto halves = [](__m256i v) {  // unsigned 16-bit sums < 2^15: zero = sign extension
    return _mm256_add_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)),
                            _mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)));
  };
  e = _mm256_add_epi32(e, halves(even));
  o = _mm256_add_epi32(o, halves(odd));
}

// One 32-byte load = groups g (low half) and g + 1 (high half) of the tile's 32 rows; the
// tables of the same two groups are the matching 32 bytes, so one vpshufb looks up 32. The
// looked-up bytes are summed as 16-bit lanes plus their high bytes (1 shift + 2 adds per 32
// lookups; see widen_add). Two planes: the lookups of two loads (groups g..g+3) are first added
// as bytes (biased values <= 127 each), halving the widening work.
template <int P>
void tile_simd(const uint8_t* w, const uint8_t* tb, int64_t G, TileSums& acc) {
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
      widen_add(acc.e[p][0], acc.o[p][0], ar[p], ao[p]);
      widen_add(acc.e[p][1], acc.o[p][1], br[p], bo[p]);
    }
  }
}

// One segment's sums into the tile's float row sums (same even/odd lanes):
// sum = fma(s_k, q, sum), q = 128 (hi - bias) + (lo - bias) for two planes, in int32.
template <int P>
void add_segment(const TileSums& acc, int32_t bias_total, float sk, __m256 (*sum)[2]) {
  const __m256i b = _mm256_set1_epi32(bias_total);
  const __m256 s = _mm256_set1_ps(sk);
  const auto q = [&](__m256i hi, __m256i lo) {
    const __m256i q0 = _mm256_sub_epi32(hi, b);
    return _mm256_cvtepi32_ps(P == 2 ? _mm256_add_epi32(_mm256_slli_epi32(q0, 7), _mm256_sub_epi32(lo, b)) : q0);
  };
  for (int h = 0; h < 2; ++h) {
    sum[0][h] = _mm256_fmadd_ps(s, q(acc.e[0][h], acc.e[P - 1][h]), sum[0][h]);
    sum[1][h] = _mm256_fmadd_ps(s, q(acc.o[0][h], acc.o[P - 1][h]), sum[1][h]);
  }
}

// The tile's rows in order, times the layer's row scales (scale32: 32 of them), into y[32].
inline void store_rows(__m256 (*sum)[2], const float* scale32, float* y) {
  for (int h = 0; h < 2; ++h) {
    const __m256 lo = _mm256_unpacklo_ps(sum[0][h], sum[1][h]), hi = _mm256_unpackhi_ps(sum[0][h], sum[1][h]);
    _mm256_storeu_ps(y + 16 * h, _mm256_mul_ps(_mm256_loadu_ps(scale32 + 16 * h), _mm256_permute2f128_ps(lo, hi, 0x20)));
    _mm256_storeu_ps(y + 16 * h + 8,
                     _mm256_mul_ps(_mm256_loadu_ps(scale32 + 16 * h + 8), _mm256_permute2f128_ps(lo, hi, 0x31)));
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

// A token's tables come in segments: runs of whole lifted blocks, each with its own table
// scale, so the segments of one token are prepared independently (transform rows, lift, tables:
// one task each, on any thread, one hand-off) and a row sums each segment's lookups in integers,
// then the segments' scaled sums in float, in segment order. The segmentation depends on the
// layer's shape only, so every thread count gives the same bits.
// Blocks per segment at least (a ~12-block segment is ~1 us of prepare on a 2020s core, several
// times the cost of handing it to another thread), and at most 8 segments.
constexpr int64_t SEGMENT_MIN_BLOCKS = 12;
constexpr int64_t MAX_SEGMENTS = 8;

int64_t n_blocks(const lq_layer* L) { return (L->in_features + L->d - 1) / L->d; }
// Segment edges fall on whole blocks whose first lifted position starts an even group (the
// SIMD loops take groups in pairs): multiples of lcm(D, 8) / D blocks.
int64_t unit_blocks(const lq_layer* L) { return std::lcm<int64_t>(L->D, 8) / L->D; }

int64_t segments_of(const lq_layer* L) {
  const int64_t unit = unit_blocks(L), units = (n_blocks(L) + unit - 1) / unit;
  return std::max<int64_t>(1, std::min({MAX_SEGMENTS, units, n_blocks(L) / SEGMENT_MIN_BLOCKS}));
}

// Blocks [b0, b1) and groups [g0, g1) of segment k of S (the last takes the zero tail groups).
struct Segment {
  int64_t b0, b1, g0, g1;
};

Segment segment(const lq_layer* L, int64_t k, int64_t S) {
  const int64_t unit = unit_blocks(L), nb = n_blocks(L), units = (nb + unit - 1) / unit;
  const int64_t b0 = unit * (k * units / S), b1 = k + 1 == S ? nb : unit * ((k + 1) * units / S);
  return {b0, b1, b0 * L->D / 4, k + 1 == S ? 2 * lq_row_nbytes(L) : b1 * L->D / 4};
}

// Floats of one segment's transform/lift work area (the largest segment's).
int64_t work_floats(const lq_layer* L) {
  const int64_t S = segments_of(L);
  int64_t w = 0;
  for (int64_t k = 0; k < S; ++k) {
    const Segment g = segment(L, k, S);
    w = std::max(w, lq_lift_segment_floats(L, g.b0, g.b1));
  }
  return (w + 15) / 16 * 16;  // 64-byte steps
}

struct Scratch {  // views into the caller's scratch bytes (lq_lut_scratch_bytes)
  float* mix2t;   // [n2, n2] (the layer's own when it has one)
  float* a;       // [n]: in_scale ⊙ x of the token being prepared
  float* u;       // [4 G]: its lifted vector (zero past n_blocks * D)
  float* work;    // [S][work_stride]
  int64_t work_stride;  // work_floats(L), derived once per call
  float* scales;  // [m][S]
  uint8_t* tables;  // [m][S segments: [planes][groups of the segment][16]], biased bytes
};

int64_t pad16(int64_t floats) { return (floats + 15) / 16 * 16; }  // 64-byte steps

struct Layout {  // offsets of the Scratch views, in floats; tables in bytes
  int64_t mix2t, a, u, work, scales, tables;
};

Layout layout(const lq_layer* L, int64_t m) {
  Layout o;
  o.mix2t = 0;
  o.a = o.mix2t + pad16(L->n2 * L->n2);
  o.u = o.a + pad16(L->in_features);
  o.work = o.u + pad16(8 * lq_row_nbytes(L));
  o.scales = o.work + segments_of(L) * work_floats(L);
  o.tables = static_cast<int64_t>(sizeof(float)) * (o.scales + pad16(m * segments_of(L)));
  return o;
}

Scratch views(const lq_layer* L, void* scratch, int64_t m) {
  const Layout o = layout(L, m);
  float* f = static_cast<float*>(scratch);
  return {f + o.mix2t, f + o.a, f + o.u, f + o.work, (o.scales - o.work) / segments_of(L), f + o.scales,
          static_cast<uint8_t*>(scratch) + o.tables};
}

template <int P>
void rows_for(const lq_layer* L, const Scratch& s, int64_t m, float* y, int64_t t0, int64_t t1) {
  const int64_t G = lq_lut_groups(L), out = L->out_features, S = segments_of(L);
  Segment seg[MAX_SEGMENTS];
  for (int64_t k = 0; k < S; ++k) seg[k] = segment(L, k, S);
  for (int64_t tile = t0; tile < t1; ++tile) {
    const uint8_t* w = L->signs + tile * G * 16;
    const int64_t r0 = tile * ROWS, nrows = std::min<int64_t>(ROWS, out - r0);
    float scale32[ROWS] = {}, y32[ROWS];  // the tile's row scales, zero past `out`
    std::memcpy(scale32, L->scale + r0, sizeof(float) * nrows);
    for (int64_t t = 0; t < m; ++t) {  // the tile's bytes stay in cache across a prefill's tokens
      const uint8_t* tb = s.tables + t * P * G * 16;
#if LQ_LUT_AVX2
      __m256 sum[2][2] = {};
#else
      float sum[ROWS] = {};
#endif
      for (int64_t k = 0; k < S; ++k) {
        const int64_t g0 = seg[k].g0, gk = seg[k].g1 - g0;
        // int32: |q| <= 8064 * groups + bias terms < 2^31 for any segment below 2^18 groups
        const int32_t b = bias<P>() * static_cast<int32_t>(gk);
        const float sk = s.scales[t * S + k];
#if LQ_LUT_AVX2
        TileSums acc;
        for (int p = 0; p < 2; ++p)
          for (int h = 0; h < 2; ++h) acc.e[p][h] = acc.o[p][h] = _mm256_setzero_si256();
        tile_simd<P>(w + 16 * g0, tb + P * g0 * 16, gk, acc);
        add_segment<P>(acc, b, sk, sum);
#else
        int32_t acc[P][ROWS] = {};
        tile_simd<P>(w + 16 * g0, tb + P * g0 * 16, gk, acc);
        for (int i = 0; i < ROWS; ++i) {
          const int32_t q0 = acc[0][i] - b;
          const int32_t q = P == 2 ? RADIX_TWO_PLANE * q0 + (acc[P - 1][i] - b) : q0;
          sum[i] = std::fma(sk, static_cast<float>(q), sum[i]);  // fused, as the AVX2 path's
        }
#endif
      }
#if LQ_LUT_AVX2
      store_rows(sum, scale32, y32);
#else
      for (int i = 0; i < ROWS; ++i) y32[i] = scale32[i] * sum[i];
#endif
      std::memcpy(y + t * out + r0, y32, sizeof(float) * nrows);
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

extern "C" int64_t lq_lut_segments(const lq_layer* L) { return segments_of(L); }

extern "C" int64_t lq_lut_scratch_bytes(const lq_layer* L, int64_t m, int mode) {
  return layout(L, m).tables + m * planes(mode) * lq_lut_groups(L) * 16;
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

namespace {

bool valid_call(const lq_layer* L, const void* in, int64_t m, int mode, const void* scratch) {
  return valid(L) && m >= 0 && (m == 0 || (in && scratch)) && (mode == LQ_LUT_TWO_PLANE || mode == LQ_LUT_INT8);
}

// Scale and tables of segment k of token t from the token's lifted values in s.u.
void segment_tables(const lq_layer* L, const Scratch& s, int64_t t, int64_t k, int mode) {
  const int64_t S = segments_of(L), P = planes(mode), G = lq_lut_groups(L);
  const Segment g = segment(L, k, S);
  const float* u = s.u + 4 * g.g0;
  const int64_t gk = g.g1 - g.g0;
  const float maxabs = group_maxabs(u, 0, gk);
  s.scales[t * S + k] = maxabs / qmax_of(mode);
  tables_range(u, gk, mode, maxabs, s.tables + t * P * G * 16 + P * g.g0 * 16, 0, gk);
}

// Per token, before its segments: a = in_scale ⊙ x, the lifted tail past n_blocks * D zeroed.
void token_begin(const lq_layer* L, const Scratch& s, const float* x) {
  const int64_t n = L->in_features, width = 8 * lq_row_nbytes(L);
  for (int64_t i = 0; i < n; ++i) s.a[i] = x[i] * L->in_scale[i];
  for (int64_t w = n_blocks(L) * L->D; w < width; ++w) s.u[w] = 0.0f;
}

// Per call: mix2^T (the layer's, or transposed into scratch).
const float* mix2t_of(const lq_layer* L, const Scratch& s) {
  if (L->mix2t) return L->mix2t;
  const int64_t n2 = L->n2;
  for (int64_t i = 0; i < n2; ++i)
    for (int64_t j = 0; j < n2; ++j) s.mix2t[j * n2 + i] = L->mix2[i * n2 + j];
  return s.mix2t;
}

constexpr int MAX_LAYERS = 4;

struct SegmentTask {  // the segments of one token, over the layers that share its input
  int count;
  const lq_layer* L[MAX_LAYERS];
  Scratch s[MAX_LAYERS];
  const float* mix2t[MAX_LAYERS];
  int64_t first[MAX_LAYERS + 1];  // task index of each layer's first segment
  int64_t t;
  int mode;
};

void segment_task(void* c, int64_t k0, int64_t k1) {
  auto* task = static_cast<SegmentTask*>(c);
  for (int64_t i = k0; i < k1; ++i) {
    int j = 0;
    while (i >= task->first[j + 1]) ++j;
    const lq_layer* L = task->L[j];
    const Scratch& s = task->s[j];
    const int64_t k = i - task->first[j];
    const Segment g = segment(L, k, segments_of(L));
    lq_lift_segment(L, task->mix2t[j], s.a, g.b0, g.b1, s.work + k * s.work_stride, s.u + g.b0 * L->D);
    segment_tables(L, s, task->t, k, task->mode);
  }
}

void serial_run(void*, int64_t n, int64_t, lq_range_fn fn, void* ctx) { fn(ctx, 0, n); }

}  // namespace

extern "C" int lq_lut_prepare_layers(int count, const lq_layer* const* Ls, const float* x, int64_t m, int mode,
                                     void* const* scratches, lq_parallel_fn run, void* runner) {
  if (count < 1 || count > MAX_LAYERS || !Ls || !scratches || !run) return 1;
  for (int j = 0; j < count; ++j)
    if (!valid_call(Ls[j], x, m, mode, scratches[j]) || Ls[j]->in_features != Ls[0]->in_features) return 1;
  if (m == 0) return 0;
  SegmentTask task;
  task.count = count;
  task.mode = mode;
  task.first[0] = 0;
  for (int j = 0; j < count; ++j) {
    const lq_layer* L = Ls[j];
    task.L[j] = L;
    task.s[j] = views(L, scratches[j], m);
    task.mix2t[j] = mix2t_of(L, task.s[j]);
    task.first[j + 1] = task.first[j] + segments_of(L);
  }
  for (int64_t t = 0; t < m; ++t) {  // token by token through each layer's one lift area
    for (int j = 0; j < count; ++j) token_begin(task.L[j], task.s[j], x + t * Ls[0]->in_features);
    task.t = t;
    run(runner, task.first[count], 1, segment_task, &task);
  }
  return 0;
}

extern "C" int lq_lut_prepare_split(const lq_layer* L, const float* x, int64_t m, int mode, void* scratch,
                                    lq_parallel_fn run, void* runner) {
  return lq_lut_prepare_layers(1, &L, x, m, mode, &scratch, run, runner);
}

extern "C" int lq_lut_prepare(const lq_layer* L, const float* x, int64_t m, int mode, void* scratch) {
  return lq_lut_prepare_split(L, x, m, mode, scratch, serial_run, nullptr);
}

extern "C" int lq_lut_prepare_lifted(const lq_layer* L, const float* u, int64_t m, int mode, void* scratch) {
  if (!valid_call(L, u, m, mode, scratch)) return 1;
  if (m == 0) return 0;
  const Scratch s = views(L, scratch, m);
  const int64_t G = lq_lut_groups(L);
  for (int64_t t = 0; t < m; ++t) {
    std::memcpy(s.u, u + t * 4 * G, sizeof(float) * 4 * G);
    for (int64_t k = 0; k < segments_of(L); ++k) segment_tables(L, s, t, k, mode);
  }
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
