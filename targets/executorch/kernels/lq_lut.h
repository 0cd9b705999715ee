// liftedge lift-project linear, table-lookup form (T-MAC style): the portable C++ core, no
// runtime types, so the ExecuTorch op (lq_linear_et.cpp), an ONNX Runtime custom op and the
// standalone test driver (tests/lut_driver.cpp) all link the same code.
//
// Math: y = scale ⊙ (S · u), u the token's lifted vector (lq_linear.h: transform, then lift),
// S the ±1 sign matrix. Per group of 4 lifted values the 16 sums ±u0±u1±u2±u3 form a table
// (mirror-symmetric, t[15 - i] = -t[i], so 8 are computed); a row's 4 signs of the group are a
// 4-bit index into it, and S · u is one lookup per (row, group).
//
// Tables are integers, scaled per token and segment: a segment is a run of whole lifted blocks
// (`lq_lut_segments`, fixed by the layer's shape: about 12 blocks or more each, at most 8),
// prepared on its own (its transform rows, lift and tables: one task) with its own scale
// s = (largest group sum of |u| in the segment) / qmax, q = round(t / s).
//   LQ_LUT_TWO_PLANE (default): |q| <= 8064 = 63 * 128, stored as two 7-bit planes
//     q = 128 * hi + lo (hi in [-63, 63], lo in [-64, 63]); ~14-bit tables. Small planes let the
//     lookups of two groups add in one byte before widening (fewer instructions per byte).
//   LQ_LUT_INT8: |q| <= 127, one int8 plane (half the lookups, ~7-bit tables).
// Each entry is off by at most s / 2 <= s_max / 2 (s_max: the scale of the token's whole lifted
// vector), so |y_r - exact| <= |scale_r| * groups * s_max / 2 (tests check this bound); a row's
// lookups are summed exactly in integers per segment (16-bit lanes widened to int32 before they
// can overflow), then the segments' s * sum in float in segment order, so every instruction-set
// path and every thread count gives the same bits.
//
// Sign layout (`liftedge.lutpack.interleave_signs` writes it at .pte-write time):
//   uint8 [tiles = ceil(out / 32), groups = 2 * row_nbytes, 16]; byte i of (tile, group g)
//   holds, in its low nibble, the signs of row 32 tile + i at lifted positions 4g..4g+3 (bit j
//   = position 4g + j, 1 = +1) and in its high nibble those of row 32 tile + 16 + i. Rows past
//   `out` and positions past the lifted width are 0 bits (their u is 0). Same bytes as the
//   row-major packing (lq_linear.h) up to the 32-row padding.
//
// Instruction set chosen at compile time: AVX2 (_mm256_shuffle_epi8, two groups per load),
// NEON on aarch64 (vqtbl1q_s8, one group per load), else scalar; -DLQ_LUT_FORCE_SCALAR picks
// the scalar path (the reference the others are compared with bit for bit).
#pragma once

#include <cstdint>

#include "lq_linear.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { LQ_LUT_TWO_PLANE = 0, LQ_LUT_INT8 = 1 };
enum { LQ_LUT_TILE_ROWS = 32 };

// "avx2", "neon" or "scalar": the path this build runs.
const char* lq_lut_isa(void);
int64_t lq_lut_groups(const lq_layer* L);  // 2 * row_nbytes (4 lifted positions each)
int64_t lq_lut_tiles(const lq_layer* L);   // ceil(out / 32)
int64_t lq_lut_segments(const lq_layer* L);  // table segments per token (see above)
// Scratch bytes for m tokens (the caller allocates; no malloc inside).
int64_t lq_lut_scratch_bytes(const lq_layer* L, int64_t m, int mode);
// Phase 1: lift every token of x [m, n] once and build its tables into scratch.
int lq_lut_prepare(const lq_layer* L, const float* x, int64_t m, int mode, void* scratch);
// Phase 1 with each token's segments split over threads by the caller's runner:
// run(runner, n, grain, fn, ctx) must call fn(ctx, b, e) over disjoint [b, e) covering [0, n)
// (in any order, on any threads) and return when all are done. Same bytes as lq_lut_prepare.
typedef void (*lq_range_fn)(void* ctx, int64_t begin, int64_t end);
typedef void (*lq_parallel_fn)(void* runner, int64_t n, int64_t grain, lq_range_fn fn, void* ctx);
int lq_lut_prepare_split(const lq_layer* L, const float* x, int64_t m, int mode, void* scratch, lq_parallel_fn run,
                         void* runner);
// The same for `count` (1..4) layers of one input x (e.g. a gated MLP's gate and up): every
// layer's segments of a token in one run, so one hand-off prepares them all.
int lq_lut_prepare_layers(int count, const lq_layer* const* layers, const float* x, int64_t m, int mode,
                          void* const* scratches, lq_parallel_fn run, void* runner);
// Phase 1 from lifted vectors u [m, 4 * groups] given by the caller (tests, other front ends).
int lq_lut_prepare_lifted(const lq_layer* L, const float* u, int64_t m, int mode, void* scratch);
// Phase 2: y [m, out] for row tiles [t0, t1) (rows 32 t0 .. min(32 t1, out)); disjoint tile
// ranges may run on different threads over the same prepared scratch.
void lq_lut_rows(const lq_layer* L, const void* scratch, int64_t m, int mode, float* y, int64_t t0, int64_t t1);
// Both phases on the calling thread. Returns 0, or nonzero on bad arguments.
int lq_lut_linear_f32(const lq_layer* L, const float* x, int64_t m, float* y, void* scratch, int mode);

#ifdef __cplusplus
}
#endif
