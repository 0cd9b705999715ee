// liftedge lift-project linear: the portable C++ core (no ExecuTorch types).
//
// y = scale ⊙ (S · lift(T^-1 x)) for every row x of X [m, n], exactly the order of
// targets/reference/liftquant.py LiftLinear.forward:
//   v = block_scale ⊙ vec(mix1 · reshape(in_scale ⊙ x, [n1, n2]) · mix2^T)
//   u = per block of d values (v zero-padded to n_blocks * d) times M [d, D] -> D values
//   y = scale ⊙ (S · u), S the ±1 matrix stored 1 bit per sign (bit 1 = +1, LSB first,
//       each row byte-aligned; liftedge/bitpack.py pack_signs)
//
// Two ±1 matmul strategies (same result up to float summation order):
//   LQ_METHOD_LUT8 : per 8 lifted values precompute the 256 signed sums once per token;
//                    each output row is one table lookup per packed byte (decode, m small).
//   LQ_METHOD_MASK : per packed byte, 8 multiply-adds with a ±1 pattern from a 256 x 8
//                    sign table; tokens tiled so each weight byte is read once per tile.
//   LQ_METHOD_AUTO : MASK (measured faster at every shape; see lq_linear.cpp).
#pragma once

#include <cstdint>

#ifdef __cplusplus
extern "C" {
#endif

enum { LQ_METHOD_AUTO = 0, LQ_METHOD_LUT8 = 1, LQ_METHOD_MASK = 2 };

// Factors are float32 here; the ExecuTorch entry widens the stored fp16 fields once per layer
// (a per-layer cache, lq_linear_et.cpp) and passes mix2 transposed.
typedef struct {
  int64_t in_features, out_features, n1, n2, d, D;
  const uint8_t* signs;      // [out, row_nbytes]
  const float* scale;        // [out]
  const float* in_scale;     // [n]
  const float* mix1;         // [n1, n1]
  const float* mix2;         // [n2, n2]
  const float* block_scale;  // [n_blocks]
  const float* codebook;     // [d, D]
  const float* mix2t;        // mix2^T [n2, n2], or NULL: the kernel transposes mix2 per call
} lq_layer;

int64_t lq_row_nbytes(const lq_layer* L);
// Scratch floats lq_linear_f32 needs for m tokens (the caller allocates; no malloc inside).
int64_t lq_scratch_floats(const lq_layer* L, int64_t m, int method);
// x [m, n] -> y [m, out]. Returns 0 on success, nonzero on bad arguments.
int lq_linear_f32(const lq_layer* L, const float* x, int64_t m, float* y, float* scratch, int method);
// The MASK method in two phases, so output rows can be split across threads:
// prepare (transform + lift every token into scratch), then any row ranges [r0, r1).
int lq_mask_prepare(const lq_layer* L, const float* x, int64_t m, float* scratch);
void lq_mask_rows(const lq_layer* L, const float* scratch, int64_t m, float* y, int64_t r0, int64_t r1);
// Lifted blocks [b0, b1) of one token from a = in_scale ⊙ x [n] alone: only the transform rows
// those blocks read are computed (rows in fours from the first one, so the bits depend on
// [b0, b1), never on which thread runs it), in `work` (lq_lift_segment_floats(L, b0, b1)
// floats); u [(b1 - b0) * D] receives the blocks (values past n are zero padding). mix2t:
// mix2^T [n2, n2]. Disjoint block ranges may run on different threads.
int64_t lq_lift_segment_floats(const lq_layer* L, int64_t b0, int64_t b1);
void lq_lift_segment(const lq_layer* L, const float* mix2t, const float* a, int64_t b0, int64_t b1, float* work,
                     float* u);
void lq_lift_transform_rows(const lq_layer* L, float* scratch, int64_t i0, int64_t i1);
void lq_lift_blocks(const lq_layer* L, float* scratch, int64_t b0, int64_t b1);

#ifdef __cplusplus
}
#endif
