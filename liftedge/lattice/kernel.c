/* CPU kernels of the LiftQuant nearest-codeword searches (built and loaded by kernel.py).
 *
 * Both kernels receive what torch computed per block (p = w M, or the lifted base u), so the
 * sign decisions of the candidate searches are bit-identical to the torch path; only the
 * summation order of the error sums differs (float32 either way).
 *
 * lq_exhaustive: best of the half codebook by |w.c| - ||c||^2/2 with w.c = b.p split "meet in
 *   the middle": b.p = A[lo] + B[hi] (lo = low L sign bits, hi = the others), so each codeword
 *   costs one add instead of a d-term dot product. Index order and first-index tie-breaking are
 *   those of search.half_signs / torch.argmax.
 * lq_candidates: for every candidate k, x = u + zx[:, k] (ns coordinates), s = sign(x) (0 at 0,
 *   like torch.sign), t = A s; tail: err = ||t + zr[:, k] - w||^2, lifted: err = (t - 2w).t;
 *   first argmin over k. Vectorized over LANES candidates at a time (GCC/clang vector extensions).
 * Blocks are spread over threads with OpenMP when compiled with it.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Candidates per vector: one register's worth. lq_candidates keeps d sums of LANES candidates
 * in registers; 16-float vectors without AVX-512 are split in two by the compiler, and for
 * LQ-24/10 (d = 10) the 20 halves outgrow AVX2's 16 registers: the hot loop spilled (2141
 * instructions per 16 candidates, 554 of them stack traffic, against 212 per 8 with 8 lanes),
 * and a LiftQuant block of SmolLM2 took ~2x as long on a Zen 3 host. Same codes either way
 * (the candidate order and the first-index tie-break do not depend on the width). */
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
#define MAX_L 8
#define MAX_D 64

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef float vfu __attribute__((vector_size(4 * LANES), aligned(4)));

int lq_abi_version(void) { return 2; }
int lq_lanes(void) { return LANES; } /* kernel.py pads K to a multiple of it */

/* t[0..2^nb) = sum_j (+-) v[j] over nb values, bit j of the index set -> +v[j]. */
static void signed_sums(const float *v, int nb, float base, float *t) {
    t[0] = base;
    for (int j = 0; j < nb; j++) {
        int64_t h = (int64_t)1 << j;
        for (int64_t i = 0; i < h; i++) {
            t[i + h] = t[i] + v[j];
            t[i] = t[i] - v[j];
        }
    }
}

static void exhaustive_one(const float *p, int D, const float *nhn, int32_t *best_out, int8_t *neg_out) {
    int L = D - 1 < MAX_L ? D - 1 : MAX_L;
    int64_t nlo = (int64_t)1 << L, nhi = (int64_t)1 << (D - 1 - L);
    float A[1 << MAX_L], bs[1 << MAX_L];
    int32_t bi[1 << MAX_L];
    float *B = (float *)__builtin_alloca(sizeof(float) * nhi);
    signed_sums(p, L, 0.0f, A);
    signed_sums(p + L, D - 1 - L, p[D - 1], B);
    for (int64_t lo = 0; lo < nlo; lo++) {
        bs[lo] = -INFINITY;
        bi[lo] = 0;
    }
    for (int64_t hi = 0; hi < nhi; hi++) {
        const float bh = B[hi];
        const float *nh = nhn + hi * nlo;
        for (int64_t lo = 0; lo < nlo; lo++) {
            float s = fabsf(A[lo] + bh) + nh[lo];
            int better = s > bs[lo];
            bs[lo] = better ? s : bs[lo];
            bi[lo] = better ? (int32_t)hi : bi[lo];
        }
    }
    int64_t best = -1;
    float top = -INFINITY;
    for (int64_t lo = 0; lo < nlo; lo++) {
        int64_t idx = (int64_t)bi[lo] * nlo + lo;
        if (bs[lo] > top || (bs[lo] == top && (best < 0 || idx < best))) {
            top = bs[lo];
            best = idx;
        }
    }
    if (best < 0) best = 0; /* all scores NaN: torch would pick a NaN; any code is as good */
    *best_out = (int32_t)best;
    *neg_out = (A[best % nlo] + B[best / nlo]) < 0.0f;
}

void lq_exhaustive(const float *p, int64_t n, int D, const float *nhn, int32_t *best_out, int8_t *neg_out,
                   int nthreads) {
#pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
    for (int64_t i = 0; i < n; i++) exhaustive_one(p + i * D, D, nhn, best_out + i, neg_out + i);
}

static inline vf loadv(const float *x) { return *(const vfu *)x; }

static inline vf sign_v(vf x) {
    const vi sign_bit = (vi){0} + (int32_t)0x80000000, one_bits = (vi){0} + (int32_t)0x3f800000;
    vi nonzero = x != (vf){0};
    return (vf)((((vi)x & sign_bit) | one_bits) & nonzero);
}

/* One block over all K candidates (K a multiple of LANES). Always inlined, so that the
 * dispatch in lq_candidates can give it constant d, ns (unrolled loops, t[] in registers). */
static inline __attribute__((always_inline)) void candidates_one(const float *u, const float *w, int d, int ns, int64_t K, const float *zx,
                                  const float *zr, const float *A, int lifted, int32_t *best_out, int8_t *sign_out) {
    vf t[MAX_D];
    vf best_err = (vf){0} + INFINITY;
    vi best_k = (vi){0};
    vi lane;
    for (int l = 0; l < LANES; l++) lane[l] = l;
    for (int64_t k0 = 0; k0 < K; k0 += LANES) {
        /* t = A s, one sign coordinate at a time: the d sums stay in registers, s is never stored */
#pragma GCC unroll 64
        for (int j = 0; j < ns; j++) {
            vf sj = sign_v(u[j] + loadv(zx + j * K + k0));
#pragma GCC unroll 32
            for (int m = 0; m < d; m++) t[m] = j == 0 ? A[m * ns] * sj : t[m] + A[m * ns + j] * sj;
        }
        vf err = (vf){0};
#pragma GCC unroll 32
        for (int m = 0; m < d; m++) {
            if (lifted) {
                err += (t[m] - 2.0f * w[m]) * t[m];
            } else {
                vf r = (t[m] + loadv(zr + m * K + k0)) - w[m];
                err += r * r;
            }
        }
        vi lt = err < best_err;
        best_err = (vf)(((vi)err & lt) | ((vi)best_err & ~lt));
        best_k = ((lane + (int32_t)k0) & lt) | (best_k & ~lt);
    }
    float top = INFINITY;
    int32_t kb = -1;
    for (int l = 0; l < LANES; l++) {
        if (best_err[l] < top || (best_err[l] == top && (kb < 0 || best_k[l] < kb))) {
            top = best_err[l];
            kb = best_k[l];
        }
    }
    if (kb < 0) kb = 0;
    *best_out = kb;
    for (int j = 0; j < ns; j++) sign_out[j] = (u[j] + zx[j * K + kb]) >= 0.0f ? 1 : -1;
}

#define CAND_LOOP(D_, NS_, LIFT_)                                                                        \
    _Pragma("omp parallel for schedule(dynamic, 4) num_threads(nthreads)") for (int64_t i = 0; i < n; i++) \
        candidates_one(u + i * (NS_), w + i * (D_), D_, NS_, K, zx, zr, A, LIFT_, best_out + i, sign_out + i * (NS_));
#define CAND_SPEC(D_, NS_, LIFT_)                                        \
    if (d == (D_) && ns == (NS_) && lifted == (LIFT_)) {                 \
        CAND_LOOP(D_, NS_, LIFT_)                                        \
        return;                                                          \
    }

void lq_candidates(const float *u, const float *w, int64_t n, int d, int ns, int64_t K, const float *zx,
                   const float *zr, const float *A, int lifted, int32_t *best_out, int8_t *sign_out, int nthreads) {
    /* the shipped tail codes (d = ns = 5..10) and lifted codes (32/16, 30/14, 32/20) */
    CAND_SPEC(5, 5, 0) CAND_SPEC(6, 6, 0) CAND_SPEC(7, 7, 0) CAND_SPEC(8, 8, 0) CAND_SPEC(10, 10, 0)
    CAND_SPEC(16, 32, 1) CAND_SPEC(14, 30, 1) CAND_SPEC(20, 32, 1)
    CAND_LOOP(d, ns, lifted)
}
