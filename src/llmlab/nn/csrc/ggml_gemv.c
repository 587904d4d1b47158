/* y (M, N) = x (M, K) @ W^T with W stored as GGML blocks of 32 weights (Q8_0, Q4_0, Q4_1), x in float32.
 *
 * Decoding reads every weight once per token, so it is memory-bound: running the packed blocks directly
 * reads 4.3x (Q8_0: 34 B / 32 weights) to 6.4x (Q4_0: 18 B) fewer bytes than float32. Each block is
 * expanded to floats in registers (AVX2 + FMA + F16C) and never written back.
 *
 *   Q8_0: d * sum(q_i x_i)                         (q int8)
 *   Q4_0: d * sum(q_i x_i) - 8 d * sum(x_i)         (q 0..15)
 *   Q4_1: d * sum(q_i x_i) + m * sum(x_i)           (q 0..15)
 *
 * Low nibbles hold weights 0..15 of a block, high nibbles 16..31 (llama.cpp's layout).
 * Rows are split across threads (pool.h). With several rows of x (batched decode, speculative
 * verification), each block is expanded to 32 floats once and multiplied with every row of x.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"

static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

/* sum_j q[j] * x[j] for 8 unsigned bytes q (as the low 8 bytes of v) */
static inline __m256 fma_u8(__m128i v, const float *x, __m256 acc) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), _mm256_loadu_ps(x), acc);
}

static inline __m256 fma_i8(__m128i v, const float *x, __m256 acc) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), _mm256_loadu_ps(x), acc);
}

/* The 32 weights of one block as floats in 4 registers. */
static inline void expand(int kind, const uint8_t *blk, __m256 w[4]) {
    const __m256 d = _mm256_set1_ps(f16(blk));
    if (kind == 8) {
        const uint8_t *q = blk + 2;
        for (int j = 0; j < 4; j++)
            w[j] = _mm256_mul_ps(
                d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * j)))));
        return;
    }
    const __m256 c = _mm256_set1_ps(kind == 3 ? f16(blk + 2) : -8.0f * f16(blk));
    const __m128i packed = _mm_loadu_si128((const __m128i *)(blk + (kind == 3 ? 4 : 2)));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(packed, low4);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low4);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int j = 0; j < 4; j++)
        w[j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j])), c);
}

#define MAX_ROWS 64

/* kind: 8 = Q8_0, 2 = Q4_0, 3 = Q4_1 (ggml type ids) */
/* ggml_gemv's arguments, and the output columns [n0, n1) of it that one thread does */
typedef struct {
    int kind;
    const float *x, *xsum;
    const uint8_t *w;
    float *y;
    int64_t M, N, K, nb, bbytes;
} Gemv;

/* several rows of x: each block expanded to floats once, then used for every row */
static void gemv_rows_expanded(void *arg, int64_t n0, int64_t n1, int tid) {
    const Gemv *g = (const Gemv *)arg;
    const int kind = g->kind;
    const float *x = g->x;
    const uint8_t *w = g->w;
    float *y = g->y;
    const int64_t M = g->M, N = g->N, K = g->K, nb = g->nb, bbytes = g->bbytes;
    (void)tid;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * nb * bbytes;
        __m256 acc[MAX_ROWS];
        for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            __m256 wf[4];
            expand(kind, row + b * bbytes, wf);
            for (int64_t m = 0; m < M; m++) {
                const float *xb = x + m * K + b * 32;
                __m256 a = acc[m];
                a = _mm256_fmadd_ps(wf[0], _mm256_loadu_ps(xb), a);
                a = _mm256_fmadd_ps(wf[1], _mm256_loadu_ps(xb + 8), a);
                a = _mm256_fmadd_ps(wf[2], _mm256_loadu_ps(xb + 16), a);
                a = _mm256_fmadd_ps(wf[3], _mm256_loadu_ps(xb + 24), a);
                acc[m] = a;
            }
        }
        for (int64_t m = 0; m < M; m++) y[m * N + n] = hsum(acc[m]);
    }
}

/* one row of x (or few): integer bytes times float activations, block by block */
static void gemv_rows_blocks(void *arg, int64_t n0, int64_t n1, int tid) {
    const Gemv *g = (const Gemv *)arg;
    const int kind = g->kind;
    const float *x = g->x, *xsum = g->xsum;
    const uint8_t *w = g->w;
    float *y = g->y;
    const int64_t M = g->M, N = g->N, K = g->K, nb = g->nb, bbytes = g->bbytes;
    const __m128i low4 = _mm_set1_epi8(0x0F);
    (void)tid;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * nb * bbytes;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * K;
            __m256 total = _mm256_setzero_ps();
            float offset = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = row + b * bbytes;
                const float *xb = xm + b * 32;
                __m256 acc = _mm256_setzero_ps();
                const float d = f16(blk);
                if (kind == 8) {
                    const uint8_t *q = blk + 2;
                    acc = fma_i8(_mm_loadl_epi64((const __m128i *)(q)), xb, acc);
                    acc = fma_i8(_mm_loadl_epi64((const __m128i *)(q + 8)), xb + 8, acc);
                    acc = fma_i8(_mm_loadl_epi64((const __m128i *)(q + 16)), xb + 16, acc);
                    acc = fma_i8(_mm_loadl_epi64((const __m128i *)(q + 24)), xb + 24, acc);
                } else {
                    const uint8_t *q = blk + (kind == 3 ? 4 : 2);
                    const __m128i packed = _mm_loadu_si128((const __m128i *)q);
                    const __m128i lo = _mm_and_si128(packed, low4);                    /* weights 0..15 */
                    const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low4); /* weights 16..31 */
                    acc = fma_u8(lo, xb, acc);
                    acc = fma_u8(_mm_srli_si128(lo, 8), xb + 8, acc);
                    acc = fma_u8(hi, xb + 16, acc);
                    acc = fma_u8(_mm_srli_si128(hi, 8), xb + 24, acc);
                    offset += (kind == 3 ? f16(blk + 2) : -8.0f * d) * xsum[m * nb + b];
                }
                total = _mm256_fmadd_ps(_mm256_set1_ps(d), acc, total);
            }
            y[m * N + n] = hsum(total) + offset;
        }
    }
}

int ggml_gemv(int kind, const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K,
              int nthreads) {
    if (K % 32) return -1;
    const int64_t nb = K / 32;
    const int64_t bbytes = kind == 8 ? 34 : kind == 2 ? 18 : kind == 3 ? 20 : 0;
    if (!bbytes) return -2;
    if (M > 1) {
        if (M > MAX_ROWS) return -4;
        Gemv a = {kind, x, NULL, w, y, M, N, K, nb, bbytes};
        pool_for(N, nthreads, gemv_rows_expanded, &a);
        return 0;
    }
    float *xsum = NULL; /* per (row of x, block) sums for the Q4 offset terms */
    if (kind != 8) {
        xsum = (float *)malloc(sizeof(float) * M * nb);
        if (!xsum) return -3;
        for (int64_t m = 0; m < M; m++)
            for (int64_t b = 0; b < nb; b++) {
                const float *xb = x + m * K + b * 32;
                __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)),
                                         _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24)));
                xsum[m * nb + b] = hsum(s);
            }
    }
    Gemv a = {kind, x, xsum, w, y, M, N, K, nb, bbytes};
    pool_for(N, nthreads, gemv_rows_blocks, &a);
    free(xsum);
    return 0;
}
