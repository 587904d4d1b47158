/* Integer-dot products of float activations with GGML-packed weights (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1).
 *
 * The activations of a call are quantized once to Q8 blocks (32 int8 values, one float scale d and the
 * block's scaled sum s = d * sum(q), as llama.cpp's Q8_1), and every weight block is multiplied with
 * them in integer arithmetic (llama.cpp's ggml_vec_dot_q4_1_q8_1 and friends):
 *
 *   Q8_0  w = dw * qw          (qw int8)     dot = dw * dx * sum(qw qx)
 *   Q4_0  w = dw * (qw - 8)    (qw 0..15)    dot = dw * dx * (sum(qw qx) - 8 sum(qx))
 *   Q4_1  w = dw * qw + mw     (qw 0..15)    dot = dw * dx * sum(qw qx) + mw sx
 *   Q5_0  w = dw * (qw - 16)   (qw 0..31)    dot = dw * dx * (sum(qw qx) - 16 sum(qx))
 *   Q5_1  w = dw * qw + mw     (qw 0..31)    dot = dw * dx * sum(qw qx) + mw sx
 *
 * so the unsigned 4/5-bit weights meet signed int8 activations directly (maddubs / dpbusd take u8 x s8);
 * signed Q8_0 weights use the sign trick on AVX2 (|w| times x with w's sign) and w + 128 on VNNI (minus
 * 128 sum(qx)). Low nibbles hold weights 0..15 of a block, high nibbles 16..31; Q5's fifth bits are a
 * little-endian u32, bit j for weight j.
 *
 * One source, several builds, chosen at run time from the CPU's features (nn/packed_linear.py):
 *   LLMLAB_AVX512VNNI  512-bit vpdpbusd on pairs of groups     LLMLAB_AVXVNNI  256-bit vpdpbusd (AVX-VNNI)
 *   LLMLAB_AVX2        vpmaddubsw + vpmaddwd                   (none)          portable C, any CPU
 * The weights are repacked once (qrepack, at load) so that 8 output rows' blocks are interleaved: one broadcast of 4
 * activation bytes feeds 8 output rows in one vpdpbusd / vpmaddubsw, each unpacked weight vector serves a tile of
 * up to RT rows of x (batched decode of many streams, speculative verification, chunked prefill), and the block's
 * float scaling is done for 8 outputs at once (16 in the AVX-512 build, which takes two groups at a time). Groups
 * of 8 output rows are split across threads (pool.h): one parallel loop per call, also for several matrices sharing
 * one input (Q, K and V; gate and up), whose outputs are written side by side.
 *
 * Shapes: x (M, K) float32; w (N, K / 32 * block bytes) uint8 (GGML blocks; qrepack_bytes() repacked);
 * y (M, ldy) float32, columns [0, N) written.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#if defined(LLMLAB_AVX2) || defined(LLMLAB_AVXVNNI) || defined(LLMLAB_AVX512VNNI)
#include <immintrin.h>
#define LLMLAB_X86 1
#endif

#define QK 32

enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8 };

static int64_t block_bytes(int kind) {
    switch (kind) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q5_0: return 22;
    case Q5_1: return 24;
    case Q8_0: return 34;
    default: return 0;
    }
}

/* IEEE half -> float without F16C (the portable build; also exact for subnormals, inf and NaN). */
static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#ifdef LLMLAB_X86
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp == 0) {
        float f = ldexpf((float)man, -24);
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
#endif
}

/* ---- activations: float rows -> Q8 blocks ---------------------------------------------------------- */

/* One block of 32 floats -> 32 int8 (round half away from zero, as llama.cpp), scale d, xs = sum(q) and
 * s = d*sum(q). Returns sum |q|. */
static inline int quantize_block(const float *x, int8_t *q, float *d, float *s, int32_t *xs) {
#ifdef LLMLAB_X86
    /* max |x| with maxps (32 dependent scalar compares had been about 40% of the quantization's time); a maximum
     * does not depend on the order, and maxps(a, m) keeps m where a is NaN, as the portable loop skips a NaN */
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 mv = _mm256_setzero_ps();
    for (int i = 0; i < QK; i += 8) mv = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask), mv);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    const float amax = _mm_cvtss_f32(h);
#else
    float amax = 0.0f;
    for (int i = 0; i < QK; i++) { /* not fmaxf: a library call where NaN rules keep it from being maxps */
        const float a = fabsf(x[i]);
        amax = a > amax ? a : amax;
    }
#endif
    const float dd = amax / 127.0f, id = dd ? 1.0f / dd : 0.0f;
    int sum = 0, asum = 0;
    for (int i = 0; i < QK; i++) {
        const float v = x[i] * id;
        const int r = (int)(v + (v >= 0.0f ? 0.5f : -0.5f)); /* |v| <= 127: no overflow */
        q[i] = (int8_t)r;
        sum += r;
        asum += r < 0 ? -r : r;
    }
    *d = dd;
    *s = dd * (float)sum;
    *xs = sum;
    return asum;
}

/* Threads for a loop over M rows of per-row work (the quantization; RoPE and SwiGLU in llama_block.c): one below 8
 * rows, where a row is a few microseconds and waking a worker costs more than it saves. */
static inline int row_threads(int64_t M, int nthreads) { return M >= 8 ? nthreads : 1; }

/* quantize_rows' arguments, and the rows [m0, m1) of it that one thread does */
typedef struct {
    const float *x, *norm;
    int64_t ldx, M, K;
    float eps, resid;
    int8_t *q;
    float *d, *s;
    int32_t *xs;
} QuantizeRows;

static void quantize_rows_range(void *arg, int64_t m0, int64_t m1, int tid) {
    const QuantizeRows *a = (const QuantizeRows *)arg;
    const int64_t K = a->K, M = a->M, nb = K / QK;
    const float *norm = a->norm, resid = a->resid;
    int8_t *q = a->q;
    float *d = a->d, *s = a->s;
    int32_t *xs = a->xs;
    (void)tid;
    float *tmp = norm ? (float *)malloc(sizeof(float) * K) : NULL;
    for (int64_t m = m0; m < m1; m++) {
        const float *xm = a->x + m * a->ldx;
        if (tmp) {
            float ss = 0.0f;
            for (int64_t k = 0; k < K; k++) ss += xm[k] * xm[k];
            const float r = 1.0f / sqrtf(ss / (float)K + a->eps);
            for (int64_t k = 0; k < K; k++) tmp[k] = norm[k] * (xm[k] * r);
            xm = tmp;
        }
        for (int64_t b = 0; b < nb; b++) {
            int8_t *q0 = q + m * K + b * QK;
            const int asum = quantize_block(xm + b * QK, q0, d + m * nb + b, s + m * nb + b, xs + m * nb + b);
            if (resid < 0.0f) continue;
            int8_t *q2 = q0 + M * K;
            const int64_t i2 = nb * M + m * nb + b;
            float *d2 = d + i2, *s2 = s + i2;
            if (resid * (float)asum < 127.0f * QK) {
                float e[QK];
                const float d0 = d[m * nb + b];
                for (int i = 0; i < QK; i++) e[i] = xm[b * QK + i] - d0 * (float)q0[i];
                quantize_block(e, q2, d2, s2, xs + i2);
            } else {
                memset(q2, 0, QK);
                *d2 = *s2 = 0.0f;
                xs[i2] = 0;
            }
        }
    }
    free(tmp);
}

/* x (M, K), rows ldx apart -> Q8 blocks: q (M, K) int8, and per block its scale d, s = d * sum(q) and xs = sum(q)
 * (for the zero points and the Q8_0 u8 shift; written here, in the parallel loop, where it had been a serial pass
 * over q before every product), each (M, K/32), a row's scales side by side. (They had been block-major, (K/32, M):
 * then threads quantizing neighbouring rows wrote into the same cache lines, and at 32 rows and 2 threads the
 * quantization took a fifth of the product's time; the tiles read the scales one at a time, in either layout.)
 * With ``norm`` (K floats),
 * each row is first RMS-normalised (Zhang & Sennrich 2019) and multiplied by norm: the layer's RMSNorm fused into
 * the quantization.
 *
 * One Q8 row per row is llama.cpp's Q8_1: 8 bits in blocks of 32, so one large value in a block (an outlier
 * feature, Dettmers et al. 2022, "LLM.int8()", arXiv:2208.07339) leaves the small ones a few steps of its scale.
 * With ``resid`` >= 0 a second, residual Q8 row follows: q (M, K) at q + M K, d, s and xs (M, K/32) at
 * d + M K/32, s + M K/32 and xs + M K/32. Its block b is the block of the rounding error e = x - d q, quantized the same way, so that
 * x = d q + d2 q2 up to e's own rounding (about 2^-14 of the block's largest value), but only where the block has
 * an outlier:
 *
 *   flagged  <=>  max|x| > resid * mean|x|,  taken on the codes:  resid * sum|q| < 127 * 32
 *
 * (q's largest code is 127), else d2 = s2 = 0 and q2 = 0: the GEMM skips a residual block whose d2 is 0. resid = 0
 * flags every block (int8x2); resid < 0 writes no residual rows (int8). The kernels' extra work is the flagged
 * share of the integer dots, on the weights already unpacked for the first row (group_tile). */
void quantize_rows(const float *x, int64_t ldx, const float *norm, float eps, int64_t M, int64_t K, float resid,
                   int8_t *q, float *d, float *s, int32_t *xs, int nthreads) {
    QuantizeRows a = {x, norm, ldx, M, K, eps, resid, q, d, s, xs};
    pool_for(M, row_threads(M, nthreads), quantize_rows_range, &a);
}

/* ---- repacked weights: 8 output rows interleaved ------------------------------------------------------ */

/* qrepack() regroups a matrix's blocks so that one 32-byte vector holds 4 consecutive weights of 8 output rows
 * (llama.cpp's interleaved "q4_0_8x8"-style repacks in ggml-cpu/repack.cpp, here with 4-byte chunks, the
 * operand of one vpdpbusd / vpmaddubsw against 4 broadcast activation bytes). Group g (output rows 8g..8g+7,
 * zero rows past N) and block b form one group-block of 8 * block_bytes bytes, group-major or in pairs of groups
 * whose blocks alternate (the AVX-512 build; group_block):
 *
 *   d[8] f16 | m[8] f16 (Q4_1, Q5_1) | qh[8] u32 (Q5) | qs: Q4/Q5 4 x 32 bytes, Q8_0 8 x 32 bytes
 *
 * Chunk j (weights 4j..4j+3 of a block) of row n sits at bytes 4n..4n+3 of vector j (Q8_0), or in the low
 * nibbles (j < 4) / high nibbles (j >= 4) of vector j % 4 (Q4/Q5: the GGML byte i holds weights i and i + 16, so
 * this is a permutation of 4-byte pieces); bit 4n + i of qh[j] is weight 4j + i's fifth bit. The same size as
 * the GGML blocks.
 *
 * Every output is then, per block b and row m (exact integers, then IEEE floats in this order in every build):
 *   isum = sum_k code_k x_k - z xsum      (z = 8 for Q4_0, 16 for Q5_0, else 0; xsum = sum_k x_k)
 *   acc  = acc + (float)isum * (dw * dx)  [ acc = acc + mw * sx   for Q4_1, Q5_1 ]
 * and, where the row's residual block is written (d2 != 0, quantize_rows), right after it with the same unpacked
 * weights:
 *   isum2 = sum_k code_k x2_k - z xsum2
 *   acc  = acc + (float)isum2 * (dw * d2) [ acc = acc + mw * s2   for Q4_1, Q5_1 ]
 * so a row gives the same bits alone, in a tile of any size, in any build, with any thread count. */

#define NR 8   /* output rows per group */
#define RT 4   /* activation rows per tile */

static int64_t qs_offset(int kind) {
    switch (kind) {
    case Q4_0: return 16;
    case Q4_1: return 32;
    case Q5_0: return 48;
    case Q5_1: return 64;
    default: return 16;
    }
}

static int zero_point(int kind) { return kind == Q4_0 ? 8 : kind == Q5_0 ? 16 : 0; }
static int has_min(int kind) { return kind == Q4_1 || kind == Q5_1; }
static int is_q5(int kind) { return kind == Q5_0 || kind == Q5_1; }

/* The index of group g's block b among a repacked matrix's group-blocks (G groups, nb blocks a row). Group-major
 * (g, b), except in the AVX-512 build, which multiplies two groups at a time (group_pair_tile): there groups 2p and
 * 2p + 1 alternate block by block (block b of 2p, block b of 2p + 1, block b + 1 of 2p, ...), so a pair is read as
 * one stream (two streams a few KB apart had halved the memory bandwidth of a batch-1 step), and a last unpaired
 * group (G odd) has its blocks in a row. (The other builds read the paired layout 15% slower at batch 1 on AVX2:
 * each keeps its own; a copy is repacked by the build that multiplies it, PackedLinear.repacked.) */
#if defined(LLMLAB_AVX512VNNI)
#define PAIRS 1
#endif
static inline int64_t group_block(int64_t g, int64_t b, int64_t nb, int64_t G) {
#ifdef PAIRS
    const int64_t width = g - g % 2 + 1 < G ? 2 : 1;
    return (g - g % 2) * nb + b * width + g % 2;
#else
    (void)G;
    return g * nb + b;
#endif
}

/* 1 where qrepack pairs groups (this build's layout, group_block), else 0. */
int qrepack_paired(void) {
#ifdef PAIRS
    return 1;
#else
    return 0;
#endif
}

/* The bytes of the repacked copy of an (N, K) matrix: whole groups of 8 rows. */
int64_t qrepack_bytes(int kind, int64_t N, int64_t K) { return (N + NR - 1) / NR * NR * (K / QK) * block_bytes(kind); }

/* w (N, K / 32 * block bytes) GGML blocks -> out (qrepack_bytes) in the interleaved layout above. */
int qrepack(int kind, const uint8_t *w, int64_t N, int64_t K, uint8_t *out) {
    const int64_t bb = block_bytes(kind), nb = K / QK, gbytes = NR * bb;
    if (!bb || K % QK) return -1;
    const int64_t qo = qs_offset(kind), hm = has_min(kind), q5 = is_q5(kind);
    const int64_t G = (N + NR - 1) / NR;
    for (int64_t g = 0; g < G; g++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *o = out + group_block(g, b, nb, G) * gbytes;
            memset(o, 0, (size_t)gbytes);
            for (int n = 0; n < NR && g * NR + n < N; n++) {
                const uint8_t *blk = w + ((g * NR + n) * nb + b) * bb;
                memcpy(o + 2 * n, blk, 2);                       /* d */
                if (hm) memcpy(o + 16 + 2 * n, blk + 2, 2);      /* m */
                const uint8_t *qs = blk + 2 + (hm ? 2 : 0) + (q5 ? 4 : 0);
                if (q5) {
                    uint32_t qh;
                    memcpy(&qh, blk + 2 + (hm ? 2 : 0), 4);
                    uint8_t *h = o + (hm ? 32 : 16);
                    for (int j = 0; j < 8; j++) {
                        uint32_t word;
                        memcpy(&word, h + 4 * j, 4);
                        word |= ((qh >> (4 * j)) & 0xFu) << (4 * n);
                        memcpy(h + 4 * j, &word, 4);
                    }
                }
                const int vectors = kind == Q8_0 ? 8 : 4;
                for (int j = 0; j < vectors; j++) memcpy(o + qo + 32 * j + 4 * n, qs + 4 * j, 4);
            }
        }
    return 0;
}

/* Output rows [n0, n0 + cnt) (cnt <= 8) of the group's 8 lanes, row m: y = v or y += v. */
static inline void store_lanes(const float *v, float *y, int cnt, int accumulate) {
    for (int n = 0; n < cnt; n++) y[n] = accumulate ? y[n] + v[n] : v[n];
}

#ifdef LLMLAB_X86
#define INLINE static inline __attribute__((always_inline))

INLINE __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* A little-endian u32 -> 32 bytes, 0x10 where bit j is set (the Q5 fifth bit of byte j). */
INLINE __m256i fifth_bits(const uint8_t *qh) {
    uint32_t bits;
    memcpy(&bits, qh, 4);
    const __m256i shuf = _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202,
                                            0x0303030303030303);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf); /* byte j = byte j/8 of bits */
    v = _mm256_or_si256(v, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));      /* all bits but bit j%8 set */
    v = _mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1));                    /* 0xFF where bit j was set */
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

/* The group-block's 8 weight vectors (chunk j of the 8 rows): u8 codes for Q4/Q5; for Q8_0 the VNNI builds
 * take w + 128 as u8 (corrected by -128 xsum), the AVX2 build |w| (x gets w's sign per row). */
INLINE void load_weights(const int kind, const uint8_t *gb, __m256i *w) {
    const uint8_t *qs = gb + qs_offset(kind);
    if (kind == Q8_0) {
        for (int j = 0; j < 8; j++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
#if defined(LLMLAB_AVX2)
            w[j] = v;
#else
            w[j] = _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80));
#endif
        }
        return;
    }
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int p = 0; p < 4; p++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * p));
        w[p] = _mm256_and_si256(v, low);
        w[p + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
    if (is_q5(kind)) {
        const uint8_t *qh = gb + (has_min(kind) ? 32 : 16);
        for (int j = 0; j < 8; j++) w[j] = _mm256_or_si256(w[j], fifth_bits(qh + 4 * j));
    }
}

/* sum_k code_k x_k over the block for the 8 rows, plus init (exact int32). x: one row's 32 int8 activations. */
INLINE __m256i group_isum(const int kind, const __m256i *w, const int8_t *x, __m256i init) {
#if defined(LLMLAB_AVX2)
    const __m256i ones = _mm256_set1_epi16(1);
    if (kind == Q8_0) { /* |w| x sign(x, w): one pair sum per 16 bits fits (2 * 128 * 127), so madd each */
        __m256i a = init, c = _mm256_setzero_si256();
        for (int j = 0; j < 8; j += 2) {
            a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w[j], w[j]),
                                                                           _mm256_sign_epi8(bcast4(x + 4 * j), w[j])), ones));
            c = _mm256_add_epi32(c, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w[j + 1], w[j + 1]),
                                                                           _mm256_sign_epi8(bcast4(x + 4 * j + 4), w[j + 1])), ones));
        }
        return _mm256_add_epi32(a, c);
    }
    /* 16-bit sums: Q4 pairs are at most 2 * 15 * 127, eight of them fit; Q5 pairs 2 * 31 * 127, four fit */
    __m256i p[8];
    for (int j = 0; j < 8; j++) p[j] = _mm256_maddubs_epi16(w[j], bcast4(x + 4 * j));
    const __m256i lo = _mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3]));
    const __m256i hi = _mm256_add_epi16(_mm256_add_epi16(p[4], p[5]), _mm256_add_epi16(p[6], p[7]));
    if (is_q5(kind))
        return _mm256_add_epi32(init, _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, ones)));
    return _mm256_add_epi32(init, _mm256_madd_epi16(_mm256_add_epi16(lo, hi), ones));
#else
    __m256i a = init, c = _mm256_setzero_si256();
    for (int j = 0; j < 8; j += 2) {
#if defined(LLMLAB_AVX512VNNI)
        a = _mm256_dpbusd_epi32(a, w[j], bcast4(x + 4 * j));
        c = _mm256_dpbusd_epi32(c, w[j + 1], bcast4(x + 4 * j + 4));
#else
        a = _mm256_dpbusd_avx_epi32(a, w[j], bcast4(x + 4 * j));
        c = _mm256_dpbusd_avx_epi32(c, w[j + 1], bcast4(x + 4 * j + 4));
#endif
    }
    return _mm256_add_epi32(a, c);
#endif
}

/* The integer correction per unit of xsum: the zero point, and on the VNNI builds Q8_0's +128 shift. */
INLINE int32_t xsum_factor(const int kind) {
#if defined(LLMLAB_AVX2)
    return -zero_point(kind);
#else
    return kind == Q8_0 ? -128 : -zero_point(kind);
#endif
}

/* One group (8 output rows, rg its repacked blocks) times R activation rows m0..m0+R-1; with ``res`` each row's
 * flagged residual blocks too (q, d, s, xs then hold M residual rows after the M rows, quantize_rows). */
INLINE void group_tile(const int kind, const int R, const int res, const uint8_t *rg, int64_t stride, int64_t nb,
                       const int8_t *q, const float *d, const float *s, const int32_t *xs, int64_t M, int64_t m0,
                       float *y, int64_t ldy, int cnt, int accumulate) {
    const int32_t f = xsum_factor(kind);
    __m256 acc[RT];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = rg + b * stride;
        __m256i w[8];
        load_weights(kind, gb, w);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)gb));
        const __m256 mw = has_min(kind) ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gb + 16)))
                                        : _mm256_setzero_ps();
        for (int r = 0; r < R; r++) {
            const int64_t m = m0 + r;
            const __m256i init = f ? _mm256_set1_epi32(f * xs[m * nb + b]) : _mm256_setzero_si256();
            const __m256i isum = group_isum(kind, w, q + (m * nb + b) * QK, init);
            const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(d[m * nb + b]));
            acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(_mm256_cvtepi32_ps(isum), scale));
            if (has_min(kind)) acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(mw, _mm256_set1_ps(s[m * nb + b])));
            if (res) {
                const int64_t i2 = nb * M + m * nb + b; /* the residual block's scales and sum */
                const float d2 = d[i2];
                if (d2 != 0.0f) {
                    const __m256i init2 = f ? _mm256_set1_epi32(f * xs[i2]) : _mm256_setzero_si256();
                    const __m256i isum2 = group_isum(kind, w, q + ((M + m) * nb + b) * QK, init2);
                    const __m256 scale2 = _mm256_mul_ps(dw, _mm256_set1_ps(d2));
                    acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(_mm256_cvtepi32_ps(isum2), scale2));
                    if (has_min(kind)) acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(mw, _mm256_set1_ps(s[i2])));
                }
            }
        }
    }
    for (int r = 0; r < R; r++) {
        float v[NR];
        _mm256_storeu_ps(v, acc[r]);
        store_lanes(v, y + (m0 + r) * ldy, cnt, accumulate);
    }
}

#if defined(LLMLAB_AVX512VNNI)
#define RT2 6 /* activation rows per pair tile */

/* Two groups' 8-row vectors side by side: lanes 0-7 group g, lanes 8-15 group g + 1. */
INLINE __m512i pair_i(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }
INLINE __m512 pair_halves(const uint8_t *a, const uint8_t *b) {
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a)),
                                                   _mm_loadu_si128((const __m128i *)b), 1));
}

/* group_isum for 16 output rows: each broadcast of 4 activation bytes feeds both groups in one 512-bit vpdpbusd. */
INLINE __m512i pair_isum(const __m512i *w, const int8_t *x, __m512i init) {
    __m512i a = init, c = _mm512_setzero_si512();
    for (int j = 0; j < 8; j += 2) {
        int32_t v0, v1;
        memcpy(&v0, x + 4 * j, 4);
        memcpy(&v1, x + 4 * j + 4, 4);
        a = _mm512_dpbusd_epi32(a, w[j], _mm512_set1_epi32(v0));
        c = _mm512_dpbusd_epi32(c, w[j + 1], _mm512_set1_epi32(v1));
    }
    return _mm512_add_epi32(a, c);
}

/* group_tile for a pair of groups at once (rg: their alternating blocks, group_block; 8 rows and the next cnt1): the
 * same operations lane by lane, in the same order, so the same bits; each activation broadcast, and each epilogue
 * instruction, serves 16 outputs instead of 8. On the AMD EPYC (Zen 4), which runs a 512-bit vpdpbusd at half the
 * rate of a 256-bit one, this still took a 32-row Q4_1 product from 103 to 122-129 GMAC/s on one core: the
 * broadcasts and the epilogue, not the dot products, had been the bound (README, "Pairs of groups"). */
INLINE void group_pair_tile(const int kind, const int R, const int res, const uint8_t *rg, int64_t nb,
                            const int8_t *q, const float *d, const float *s, const int32_t *xs, int64_t M, int64_t m0,
                            float *y, int64_t ldy, int cnt1, int accumulate) {
    const int64_t gbytes = NR * block_bytes(kind);
    const int32_t f = xsum_factor(kind);
    __m512 acc[RT2];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *ga = rg + 2 * b * gbytes, *gb = ga + gbytes; /* the pair's block b, side by side */
        __m256i wa[8], wb[8];
        __m512i w[8];
        load_weights(kind, ga, wa);
        load_weights(kind, gb, wb);
        for (int j = 0; j < 8; j++) w[j] = pair_i(wa[j], wb[j]);
        const __m512 dw = pair_halves(ga, gb);
        const __m512 mw = has_min(kind) ? pair_halves(ga + 16, gb + 16) : _mm512_setzero_ps();
        for (int r = 0; r < R; r++) {
            const int64_t m = m0 + r;
            const __m512i init = f ? _mm512_set1_epi32(f * xs[m * nb + b]) : _mm512_setzero_si512();
            const __m512i isum = pair_isum(w, q + (m * nb + b) * QK, init);
            const __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(d[m * nb + b]));
            acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(_mm512_cvtepi32_ps(isum), scale));
            if (has_min(kind)) acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(mw, _mm512_set1_ps(s[m * nb + b])));
            if (res) {
                const int64_t i2 = nb * M + m * nb + b;
                const float d2 = d[i2];
                if (d2 != 0.0f) {
                    const __m512i init2 = f ? _mm512_set1_epi32(f * xs[i2]) : _mm512_setzero_si512();
                    const __m512i isum2 = pair_isum(w, q + ((M + m) * nb + b) * QK, init2);
                    const __m512 scale2 = _mm512_mul_ps(dw, _mm512_set1_ps(d2));
                    acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(_mm512_cvtepi32_ps(isum2), scale2));
                    if (has_min(kind)) acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(mw, _mm512_set1_ps(s[i2])));
                }
            }
        }
    }
    for (int r = 0; r < R; r++) {
        float v[2 * NR];
        _mm512_storeu_ps(v, acc[r]);
        store_lanes(v, y + (m0 + r) * ldy, NR, accumulate);
        store_lanes(v + NR, y + (m0 + r) * ldy + NR, cnt1, accumulate);
    }
}
#endif
#else
#define INLINE static inline

/* The x86 builds' arithmetic lane by lane (exact integer sums, then the same float operations in the same order),
 * so every build gives bit-identical results (tested). */
static inline void group_tile(const int kind, const int R, const int res, const uint8_t *rg, int64_t stride,
                              int64_t nb, const int8_t *q, const float *d, const float *s, const int32_t *xs,
                              int64_t M, int64_t m0, float *y, int64_t ldy, int cnt, int accumulate) {
    const int64_t qo = qs_offset(kind);
    const int z = zero_point(kind), hm = has_min(kind), q5 = is_q5(kind);
    float acc[RT][NR] = {{0}};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = rg + b * stride;
        int32_t w[NR][QK]; /* row n's codes (signed for Q8_0) */
        float dw[NR], mw[NR];
        for (int n = 0; n < NR; n++) {
            dw[n] = half_to_float(gb + 2 * n);
            mw[n] = hm ? half_to_float(gb + 16 + 2 * n) : 0.0f;
        }
        for (int j = 0; j < 8; j++) {
            uint32_t qh = 0;
            if (q5) memcpy(&qh, gb + (hm ? 32 : 16) + 4 * j, 4);
            for (int n = 0; n < NR; n++)
                for (int i = 0; i < 4; i++) {
                    int32_t c;
                    if (kind == Q8_0) {
                        c = (int8_t)gb[qo + 32 * j + 4 * n + i];
                    } else {
                        const uint8_t byte = gb[qo + 32 * (j % 4) + 4 * n + i];
                        c = j < 4 ? (byte & 0x0F) : (byte >> 4);
                        if (q5) c |= (int32_t)((qh >> (4 * n + i)) & 1) << 4;
                    }
                    w[n][4 * j + i] = c;
                }
        }
        for (int r = 0; r < R; r++) {
            const int64_t m = m0 + r;
            const int8_t *x = q + (m * nb + b) * QK;
            const float dx = d[m * nb + b], sx = s[m * nb + b];
            for (int n = 0; n < NR; n++) {
                int32_t isum = -z * xs[m * nb + b];
                for (int k = 0; k < QK; k++) isum += w[n][k] * x[k];
                const float scale = dw[n] * dx;
                acc[r][n] = acc[r][n] + (float)isum * scale;
                if (hm) acc[r][n] = acc[r][n] + mw[n] * sx;
            }
            if (!res) continue;
            const int64_t i2 = nb * M + m * nb + b; /* the residual block's scales and sum */
            const float d2 = d[i2], s2 = s[i2];
            if (d2 == 0.0f) continue;
            const int8_t *x2 = q + ((M + m) * nb + b) * QK;
            for (int n = 0; n < NR; n++) {
                int32_t isum2 = -z * xs[i2];
                for (int k = 0; k < QK; k++) isum2 += w[n][k] * x2[k];
                const float scale2 = dw[n] * d2;
                acc[r][n] = acc[r][n] + (float)isum2 * scale2;
                if (hm) acc[r][n] = acc[r][n] + mw[n] * s2;
            }
        }
    }
    for (int r = 0; r < R; r++) store_lanes(acc[r], y + (m0 + r) * ldy, cnt, accumulate);
}
#endif

/* ---- matrices ------------------------------------------------------------------------------------------ */

/* One group times every row of x, RT rows at a time; kind, tile size and ``res`` are constants in each
 * instantiation, so the accumulators stay in registers and int8 (no residual rows) pays nothing for the option. */
#define TILES(KIND, RES)                                                                                       \
    for (; m0 + RT <= M; m0 += RT) group_tile(KIND, RT, RES, rg, stride, nb, q, d, s, xs, M, m0, y, ldy, cnt, acc); \
    switch (M - m0) {                                                                                          \
    case 3: group_tile(KIND, 3, RES, rg, stride, nb, q, d, s, xs, M, m0, y, ldy, cnt, acc); break;             \
    case 2: group_tile(KIND, 2, RES, rg, stride, nb, q, d, s, xs, M, m0, y, ldy, cnt, acc); break;             \
    case 1: group_tile(KIND, 1, RES, rg, stride, nb, q, d, s, xs, M, m0, y, ldy, cnt, acc); break;             \
    }
/* One case of a kind switch: TILES_OF(KIND, RES) instantiated with and without the residual rows. */
#define KIND_CASE(TILES_OF, KIND)                                                                              \
    case KIND:                                                                                                 \
        if (res) {                                                                                             \
            TILES_OF(KIND, 1)                                                                                  \
        } else {                                                                                               \
            TILES_OF(KIND, 0)                                                                                  \
        }                                                                                                      \
        break;

#ifdef PAIRS
#define PAIR_TILES(KIND, RES)                                                                                  \
    for (; m0 + RT2 <= M; m0 += RT2) group_pair_tile(KIND, RT2, RES, rg, nb, q, d, s, xs, M, m0, y, ldy, cnt, acc);\
    switch (M - m0) {                                                                                          \
    case 5: group_pair_tile(KIND, 5, RES, rg, nb, q, d, s, xs, M, m0, y, ldy, cnt, acc); break;                \
    case 4: group_pair_tile(KIND, 4, RES, rg, nb, q, d, s, xs, M, m0, y, ldy, cnt, acc); break;                \
    case 3: group_pair_tile(KIND, 3, RES, rg, nb, q, d, s, xs, M, m0, y, ldy, cnt, acc); break;                \
    case 2: group_pair_tile(KIND, 2, RES, rg, nb, q, d, s, xs, M, m0, y, ldy, cnt, acc); break;                \
    case 1: group_pair_tile(KIND, 1, RES, rg, nb, q, d, s, xs, M, m0, y, ldy, cnt, acc); break;                \
    }

/* A pair of groups of one matrix (rg: their alternating blocks, group_block; the second's cnt rows) times every row
 * of x. */
static void pair_times_x(int kind, int res, const uint8_t *rg, int64_t nb, const int8_t *q, const float *d,
                         const float *s, const int32_t *xs, int64_t M, float *y, int64_t ldy, int cnt, int acc) {
    int64_t m0 = 0;
    switch (kind) {
        KIND_CASE(PAIR_TILES, Q4_0)
        KIND_CASE(PAIR_TILES, Q4_1)
        KIND_CASE(PAIR_TILES, Q5_0)
        KIND_CASE(PAIR_TILES, Q5_1)
        KIND_CASE(PAIR_TILES, Q8_0)
    }
}
#endif

/* One group (rg: its block 0, the next ``stride`` bytes on) times every row of x. */
static void group_times_x(int kind, int res, const uint8_t *rg, int64_t stride, int64_t nb, const int8_t *q,
                          const float *d, const float *s, const int32_t *xs, int64_t M, float *y, int64_t ldy,
                          int cnt, int acc) {
    int64_t m0 = 0;
    switch (kind) {
        KIND_CASE(TILES, Q4_0)
        KIND_CASE(TILES, Q4_1)
        KIND_CASE(TILES, Q5_0)
        KIND_CASE(TILES, Q5_1)
        KIND_CASE(TILES, Q8_0)
    }
}

/* qgemm_multi's arguments, and its groups [g0, g1) that one thread does */
typedef struct {
    int nmat;
    const int *kinds;
    const uint8_t *const *w;
    const int64_t *N, *first, *col;
    const int8_t *q;
    const float *d, *s;
    const int32_t *xs;
    int res;
    int64_t M, nb;
    float *y;
    int64_t ldy;
    int accumulate;
    int64_t groups;
} QgemmGroups;

/* The parallel loop's items: spans of SPAN groups, so that a thread's share never splits a pair (with chunks of an
 * odd number of groups, every other boundary did, and a split pair runs as two lone groups at about half the
 * speed: 8% of a batched step's GEMM time had been in lone groups). */
#ifdef PAIRS
#define SPAN 2
#else
#define SPAN 1
#endif

static void qgemm_groups(void *arg, int64_t u0, int64_t u1, int tid) {
    const QgemmGroups *a = (const QgemmGroups *)arg;
    const int64_t g0 = u0 * SPAN, g1 = u1 * SPAN < a->groups ? u1 * SPAN : a->groups;
    (void)tid;
    for (int64_t g = g0; g < g1; g++) {
        int j = 0;
        while (g >= a->first[j + 1]) j++;
        const int64_t gl = g - a->first[j], G = a->first[j + 1] - a->first[j], n0 = gl * NR, left = a->N[j] - n0;
        const int64_t gbytes = NR * block_bytes(a->kinds[j]);
        const uint8_t *rg = a->w[j] + group_block(gl, 0, a->nb, G) * gbytes;
#ifdef PAIRS
        if (gl % 2 == 0 && gl + 1 < G && g + 1 < g1) { /* the pair's second group is this thread's too */
            pair_times_x(a->kinds[j], a->res, rg, a->nb, a->q, a->d, a->s, a->xs, a->M, a->y + a->col[j] + n0,
                         a->ldy, left - NR < NR ? (int)(left - NR) : NR, a->accumulate);
            g++;
            continue;
        }
#endif
        const int64_t stride = (group_block(gl, 1, a->nb, G) - group_block(gl, 0, a->nb, G)) * gbytes;
        group_times_x(a->kinds[j], a->res, rg, stride, a->nb, a->q, a->d, a->s, a->xs, a->M, a->y + a->col[j] + n0,
                      a->ldy, left < NR ? (int)left : NR, a->accumulate);
    }
}

/* Several repacked matrices sharing one quantized input: matrix j (kinds[j], w[j] from qrepack, N[j] rows) writes
 * columns [sum N[<j], sum N[<=j]) of y (M, ldy). With ``accumulate``, y += instead of y =. With ``res``, q, d and s
 * hold M residual rows after the M rows (quantize_rows with resid >= 0). Groups of 8 output rows are split across
 * threads (one parallel loop per call, pool.h). Returns 0, or < 0 for a bad kind or K. */
int qgemm_multi(int nmat, const int *kinds, const uint8_t *const *w, const int64_t *N, const int8_t *q,
                const float *d, const float *s, const int32_t *xs, int res, int64_t M, int64_t K, float *y,
                int64_t ldy, int accumulate, int nthreads) {
    if (K % QK || nmat < 1 || nmat > 8) return -1;
    int64_t groups = 0, first[9], col[9];
    for (int j = 0, c = 0; j < nmat; j++) {
        if (!block_bytes(kinds[j])) return -2;
        first[j] = groups, col[j] = c;
        groups += (N[j] + NR - 1) / NR;
        c += (int)N[j];
    }
    first[nmat] = groups;
    const int64_t nb = K / QK;
    QgemmGroups a = {nmat, kinds, w, N, first, col, q, d, s, xs, res, M, nb, y, ldy, accumulate, groups};
    pool_for((groups + SPAN - 1) / SPAN, nthreads, qgemm_groups, &a);
    return 0;
}

/* y (M, N) = x (M, K) @ W^T for one repacked matrix (qrepack): quantize x (with residual blocks where ``resid``
 * >= 0 flags them, quantize_rows), then the integer product. */
int qlinear_repacked(int kind, const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K,
                     int nthreads, float resid) {
    if (K % QK) return -1;
    if (resid != resid) return -4; /* NaN */
    const int res = resid >= 0.0f;
    const int64_t R = (res ? 2 : 1) * M;
    int8_t *q = (int8_t *)malloc((size_t)(R * K));
    float *d = (float *)malloc(sizeof(float) * R * (K / QK)), *s = (float *)malloc(sizeof(float) * R * (K / QK));
    int32_t *xs = (int32_t *)malloc(sizeof(int32_t) * R * (K / QK));
    int rc = -3;
    if (q && d && s && xs) {
        quantize_rows(x, K, NULL, 0.0f, M, K, resid, q, d, s, xs, nthreads);
        rc = qgemm_multi(1, &kind, &w, &N, q, d, s, xs, res, M, K, y, N, 0, nthreads);
    }
    free(q), free(d), free(s), free(xs);
    return rc;
}

/* The same from GGML blocks (w (N, K / 32 * block bytes)): repacked into a temporary first. */
int qlinear(int kind, const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    if (K % QK || !block_bytes(kind)) return -1;
    uint8_t *r = (uint8_t *)malloc((size_t)qrepack_bytes(kind, N, K));
    if (!r) return -3;
    int rc = qrepack(kind, w, N, K, r);
    if (!rc) rc = qlinear_repacked(kind, x, r, y, M, N, K, nthreads, -1.0f);
    free(r);
    return rc;
}
