/* Integer-dot products of float activations with GGML-packed weights (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1).
 *
 * The activations of a call are quantized once to Q8 blocks (32 int8 values, one float scale d and the
 * block's scaled sum s = d * sum(q), as llama.cpp's Q8_1), and every weight block is multiplied with
 * them in integer arithmetic (llama.cpp's ggml_vec_dot_q4_1_q8_1 and friends):
 *
 *   Q8_0  w = dw * qw          (qw int8)     dot = dw * dx * sum(qw qx)
 *   Q4_0  w = dw * (qw - 8)    (qw 0..15)    dot = dw * (dx * sum(qw qx) - 8 sx)
 *   Q4_1  w = dw * qw + mw     (qw 0..15)    dot = dw * dx * sum(qw qx) + mw sx
 *   Q5_0  w = dw * (qw - 16)   (qw 0..31)    dot = dw * (dx * sum(qw qx) - 16 sx)
 *   Q5_1  w = dw * qw + mw     (qw 0..31)    dot = dw * dx * sum(qw qx) + mw sx
 *
 * so the unsigned 4/5-bit weights meet signed int8 activations directly (maddubs / dpbusd take u8 x s8),
 * and signed Q8_0 weights use the sign trick (|w| times x with w's sign). Low nibbles hold weights
 * 0..15 of a block, high nibbles 16..31; Q5's fifth bits are a little-endian u32, bit j for weight j.
 *
 * One source, several builds, chosen at run time from the CPU's features (nn/packed_linear.py):
 *   LLMLAB_AVX512VNNI  256-bit vpdpbusd (AVX512-VNNI + VL)     LLMLAB_AVXVNNI  256-bit vpdpbusd (AVX-VNNI)
 *   LLMLAB_AVX2        vpmaddubsw + vpmaddwd                   (none)          portable C, any CPU
 * With several rows of x (batched decode, speculative verification, prefill) each weight block is
 * unpacked once and multiplied with a tile of up to ROW_TILE rows. Output rows are split across threads
 * with OpenMP: one parallel region per call, also for several matrices sharing one input (Q, K and V;
 * gate and up), whose outputs are written side by side.
 *
 * Shapes: x (M, K) float32; w (N, K / 32 * block bytes) uint8; y (M, ldy) float32, columns [0, N) written.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(LLMLAB_AVX2) || defined(LLMLAB_AVXVNNI) || defined(LLMLAB_AVX512VNNI)
#include <immintrin.h>
#define LLMLAB_X86 1
#endif

#define QK 32
#define ROW_TILE 4

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

/* One block of 32 floats -> 32 int8 (round half away from zero, as llama.cpp), scale d and s = d*sum(q). */
static inline void quantize_block(const float *x, int8_t *q, float *d, float *s) {
    float amax = 0.0f;
    for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(x[i]));
    const float dd = amax / 127.0f, id = dd ? 1.0f / dd : 0.0f;
    int sum = 0;
    for (int i = 0; i < QK; i++) {
        const float v = x[i] * id;
        const int r = (int)(v + (v >= 0.0f ? 0.5f : -0.5f)); /* |v| <= 127: no overflow */
        q[i] = (int8_t)r;
        sum += r;
    }
    *d = dd;
    *s = dd * (float)sum;
}

/* x (M, K), rows ldx apart -> q (M, K) int8, d and s (K/32, M): block-major, so a tile's rows have their
 * scales side by side. With ``norm`` (K floats), each row is first RMS-normalised (Zhang & Sennrich 2019) and
 * multiplied by norm: the layer's RMSNorm fused into the quantization. */
void quantize_rows(const float *x, int64_t ldx, const float *norm, float eps, int64_t M, int64_t K, int8_t *q,
                   float *d, float *s, int nthreads) {
    const int64_t nb = K / QK;
#pragma omp parallel num_threads(M >= 8 ? nthreads : 1)
    {
        float *tmp = norm ? (float *)malloc(sizeof(float) * K) : NULL;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * ldx;
            if (tmp) {
                float ss = 0.0f;
                for (int64_t k = 0; k < K; k++) ss += xm[k] * xm[k];
                const float r = 1.0f / sqrtf(ss / (float)K + eps);
                for (int64_t k = 0; k < K; k++) tmp[k] = norm[k] * (xm[k] * r);
                xm = tmp;
            }
            for (int64_t b = 0; b < nb; b++)
                quantize_block(xm + b * QK, q + m * K + b * QK, d + b * M + m, s + b * M + m);
        }
        free(tmp);
    }
}

/* ---- one weight block times up to ROW_TILE activation blocks ---------------------------------------- */

#ifdef LLMLAB_X86
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum over groups of 4 of u8 a times s8 b -> 8 int32, as float */
static inline __m256 dot_us8(__m256i a, __m256i b) {
#if defined(LLMLAB_AVX512VNNI)
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b));
#elif defined(LLMLAB_AVXVNNI)
    return _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b));
#else
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}

/* 16 packed bytes -> 32 u8 values 0..15 (weights 0..15 from the low nibbles, 16..31 from the high). */
static inline __m256i unpack_nibbles(const uint8_t *qs) {
    const __m128i p = _mm_loadu_si128((const __m128i *)qs);
    const __m256i v = _mm256_set_m128i(_mm_srli_epi16(p, 4), p);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

/* A little-endian u32 -> 32 bytes, 0x10 where bit j is set (the Q5 fifth bit of weight j). */
static inline __m256i fifth_bits(const uint8_t *qh) {
    uint32_t bits;
    memcpy(&bits, qh, 4);
    const __m256i shuf = _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202,
                                            0x0303030303030303);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf); /* byte j = byte j/8 of bits */
    v = _mm256_or_si256(v, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));      /* all bits but bit j%8 set */
    v = _mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1));                    /* 0xFF where bit j was set */
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

#define INLINE static inline __attribute__((always_inline))

/* The weight block as 32 bytes (unsigned codes for Q4/Q5, signed for Q8_0), its scale and offset factor. */
INLINE __m256i load_block(const int kind, const uint8_t *blk, float *dw, float *c) {
    *dw = half_to_float(blk);
    switch (kind) {
    case Q8_0: *c = 0.0f; return _mm256_loadu_si256((const __m256i *)(blk + 2));
    case Q4_0: *c = -8.0f * *dw; return unpack_nibbles(blk + 2);
    case Q4_1: *c = half_to_float(blk + 2); return unpack_nibbles(blk + 4);
    case Q5_0: *c = -16.0f * *dw; return _mm256_or_si256(unpack_nibbles(blk + 6), fifth_bits(blk + 2));
    default: *c = half_to_float(blk + 2); return _mm256_or_si256(unpack_nibbles(blk + 8), fifth_bits(blk + 4));
    }
}

/* <w, x> for one block pair as 8 float partial sums (the sign trick for signed Q8_0 weights). */
INLINE __m256 block_dot(const int kind, __m256i w, __m256i aw, const int8_t *qx) {
    const __m256i x = _mm256_loadu_si256((const __m256i *)qx);
    return kind == Q8_0 ? dot_us8(aw, _mm256_sign_epi8(x, w)) : dot_us8(w, x);
}

/* y[m0 + r, n] (r < R) for one weight row: R rows (a constant after inlining) share each unpacked block.
 * Every row sums its even and odd blocks in two accumulators (consecutive multiply-adds do not wait on each
 * other) in the same order whatever R is, so a row gives the same bits alone or in a batch. */
INLINE void tile(const int kind, const int R, const uint8_t *wrow, int64_t nb, int64_t bbytes, const int8_t *q,
                 const float *d, const float *s, int64_t M, int64_t m0, float *y, int64_t ldy, int accumulate) {
    __m256 acc[2][ROW_TILE];
    float off[2][ROW_TILE];
    __m128 off4[2] = {_mm_setzero_ps(), _mm_setzero_ps()}; /* R == 4: the offsets of the 4 rows side by side */
    for (int r = 0; r < R; r++) acc[0][r] = acc[1][r] = _mm256_setzero_ps(), off[0][r] = off[1][r] = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        float dw, c;
        const __m256i w = load_block(kind, wrow + b * bbytes, &dw, &c);
        const __m256i aw = _mm256_sign_epi8(w, w);
        const int odd = (int)(b & 1);
        const float *db = d + b * M + m0, *sb = s + b * M + m0; /* scales are block-major: d[b][m] */
        if (R == ROW_TILE) { /* the 4 rows' scales and offsets in one vector op each (the same IEEE products) */
            float scale[ROW_TILE];
            _mm_storeu_ps(scale, _mm_mul_ps(_mm_set1_ps(dw), _mm_loadu_ps(db)));
            const __m128 o = _mm_mul_ps(_mm_set1_ps(c), _mm_loadu_ps(sb));
            /* b & 1 picks the accumulators; spelled out twice so they stay in registers */
            if (odd) {
                off4[1] = _mm_add_ps(off4[1], o);
                for (int r = 0; r < ROW_TILE; r++)
                    acc[1][r] = _mm256_add_ps(acc[1][r], _mm256_mul_ps(_mm256_broadcast_ss(scale + r),
                                                                       block_dot(kind, w, aw, q + (m0 + r) * nb * QK + b * QK)));
            } else {
                off4[0] = _mm_add_ps(off4[0], o);
                for (int r = 0; r < ROW_TILE; r++)
                    acc[0][r] = _mm256_add_ps(acc[0][r], _mm256_mul_ps(_mm256_broadcast_ss(scale + r),
                                                                       block_dot(kind, w, aw, q + (m0 + r) * nb * QK + b * QK)));
            }
            continue;
        }
        for (int r = 0; r < R; r++) {
            const __m256 p = block_dot(kind, w, aw, q + (m0 + r) * nb * QK + b * QK);
            if (odd) {
                acc[1][r] = _mm256_add_ps(acc[1][r], _mm256_mul_ps(_mm256_set1_ps(dw * db[r]), p));
                off[1][r] += c * sb[r];
            } else {
                acc[0][r] = _mm256_add_ps(acc[0][r], _mm256_mul_ps(_mm256_set1_ps(dw * db[r]), p));
                off[0][r] += c * sb[r];
            }
        }
    }
    if (R == ROW_TILE) {
        _mm_storeu_ps(off[0], off4[0]);
        _mm_storeu_ps(off[1], off4[1]);
    }
    for (int r = 0; r < R; r++) {
        float *out = y + (m0 + r) * ldy;
        const float v = hsum(_mm256_add_ps(acc[0][r], acc[1][r])) + off[0][r] + off[1][r];
        *out = accumulate ? *out + v : v;
    }
}

/* Two weight rows times one row of x (decoding): the x block, its scale and sum are loaded once for both, and
 * the two rows' chains interleave. Each row's arithmetic is tile(kind, 1, ...)'s, so the same bits. */
/* Block b of both rows: a_r += (dw_r dx) <w_r, x>, o_r += c_r sx, as tile() does for one row. */
INLINE void pair_block(const int kind, const uint8_t *w0, const uint8_t *w1, int64_t b, int64_t bbytes,
                       const int8_t *q, const float *d, const float *s, __m256 *a0, __m256 *a1, float *o0, float *o1) {
    float dw0, c0, dw1, c1;
    const __m256i v0 = load_block(kind, w0 + b * bbytes, &dw0, &c0);
    const __m256i v1 = load_block(kind, w1 + b * bbytes, &dw1, &c1);
    const __m256 p0 = block_dot(kind, v0, _mm256_sign_epi8(v0, v0), q + b * QK);
    const __m256 p1 = block_dot(kind, v1, _mm256_sign_epi8(v1, v1), q + b * QK);
    *a0 = _mm256_add_ps(*a0, _mm256_mul_ps(_mm256_set1_ps(dw0 * d[b]), p0));
    *a1 = _mm256_add_ps(*a1, _mm256_mul_ps(_mm256_set1_ps(dw1 * d[b]), p1));
    *o0 += c0 * s[b];
    *o1 += c1 * s[b];
}

INLINE void pair1(const int kind, const uint8_t *w0, const uint8_t *w1, int64_t nb, int64_t bbytes, const int8_t *q,
                  const float *d, const float *s, float *y, int accumulate) {
    __m256 a00 = _mm256_setzero_ps(), a01 = _mm256_setzero_ps(), a10 = _mm256_setzero_ps(), a11 = _mm256_setzero_ps();
    float o00 = 0.0f, o01 = 0.0f, o10 = 0.0f, o11 = 0.0f; /* row r, even / odd blocks */
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        pair_block(kind, w0, w1, b, bbytes, q, d, s, &a00, &a10, &o00, &o10);
        pair_block(kind, w0, w1, b + 1, bbytes, q, d, s, &a01, &a11, &o01, &o11);
    }
    if (b < nb) pair_block(kind, w0, w1, b, bbytes, q, d, s, &a00, &a10, &o00, &o10); /* an even last block */
    const float v0 = hsum(_mm256_add_ps(a00, a01)) + o00 + o01, v1 = hsum(_mm256_add_ps(a10, a11)) + o10 + o11;
    y[0] = accumulate ? y[0] + v0 : v0;
    y[1] = accumulate ? y[1] + v1 : v1;
}

static void row_times_x(int kind, const uint8_t *wrow, int64_t nb, const int8_t *q, const float *d, const float *s,
                        int64_t M, float *y, int64_t ldy, int acc);

#define PAIR_CASE(KIND) case KIND: pair1(KIND, w0, w1, nb, block_bytes(KIND), q, d, s, y, acc); break;

/* y[n], y[n + 1] for one row of x and two rows of one matrix. Not for Q8_0: its 32-byte blocks already keep
 * the core busy, and two at once ran 1.7x slower (spilled registers; measured on AVX2). */
static void pair_times_x(int kind, const uint8_t *w0, const uint8_t *w1, int64_t nb, const int8_t *q, const float *d,
                         const float *s, float *y, int acc) {
    switch (kind) {
        PAIR_CASE(Q4_0)
        PAIR_CASE(Q4_1)
        PAIR_CASE(Q5_0)
        PAIR_CASE(Q5_1)
    case Q8_0:
        row_times_x(kind, w0, nb, q, d, s, 1, y, 1, acc);
        row_times_x(kind, w1, nb, q, d, s, 1, y + 1, 1, acc);
        break;
    }
}
#define HAVE_PAIR 1
#else
/* The block's 32 integer weights (the unsigned code for Q4/Q5), its scale, and the offset factor. */
static inline void unpack_block(int kind, const uint8_t *blk, int32_t *w, float *dw, float *c) {
    *dw = half_to_float(blk);
    *c = 0.0f;
    if (kind == Q8_0) {
        for (int i = 0; i < QK; i++) w[i] = (int8_t)blk[2 + i];
        return;
    }
    const int has_min = kind == Q4_1 || kind == Q5_1, five = kind == Q5_0 || kind == Q5_1;
    const uint8_t *qs = blk + 2 + (has_min ? 2 : 0) + (five ? 4 : 0);
    uint32_t qh = 0;
    if (five) memcpy(&qh, blk + 2 + (has_min ? 2 : 0), 4);
    for (int i = 0; i < 16; i++) {
        w[i] = qs[i] & 0x0F;
        w[i + 16] = qs[i] >> 4;
    }
    if (five)
        for (int i = 0; i < QK; i++) w[i] |= (int32_t)((qh >> i) & 1) << 4;
    *c = has_min ? half_to_float(blk + 2) : (five ? -16.0f : -8.0f) * *dw;
}

#define INLINE static inline

/* The x86 builds' arithmetic, lane by lane: 8 lanes of 4 products each, scaled and added per block, summed
 * in the order hsum() uses, so every build gives bit-identical results (tested). */
static inline void block_lanes(const int32_t *w, const int8_t *x, float scale, float *acc) {
    for (int l = 0; l < 8; l++) {
        const int32_t lane = w[4 * l] * x[4 * l] + w[4 * l + 1] * x[4 * l + 1] + w[4 * l + 2] * x[4 * l + 2] +
                             w[4 * l + 3] * x[4 * l + 3];
        acc[l] = acc[l] + scale * (float)lane;
    }
}

static inline float hsum_lanes(const float *a) {
    const float s0 = a[0] + a[4], s1 = a[1] + a[5], s2 = a[2] + a[6], s3 = a[3] + a[7];
    return (s0 + s2) + (s1 + s3);
}

static inline void tile(const int kind, const int R, const uint8_t *wrow, int64_t nb, int64_t bbytes,
                        const int8_t *q, const float *d, const float *s, int64_t M, int64_t m0, float *y,
                        int64_t ldy, int accumulate) {
    float acc[2][ROW_TILE][8] = {{{0}}}, off[2][ROW_TILE] = {{0}};
    for (int64_t b = 0; b < nb; b++) {
        const int odd = (int)(b & 1);
        int32_t w[QK];
        float dw, c;
        unpack_block(kind, wrow + b * bbytes, w, &dw, &c);
        for (int r = 0; r < R; r++) {
            block_lanes(w, q + ((m0 + r) * nb + b) * QK, dw * d[b * M + m0 + r], acc[odd][r]);
            off[odd][r] += c * s[b * M + m0 + r];
        }
    }
    for (int r = 0; r < R; r++) {
        float sum[8];
        for (int l = 0; l < 8; l++) sum[l] = acc[0][r][l] + acc[1][r][l];
        float *out = y + (m0 + r) * ldy;
        const float v = hsum_lanes(sum) + off[0][r] + off[1][r];
        *out = accumulate ? *out + v : v;
    }
}
#endif

/* ---- matrices ------------------------------------------------------------------------------------------ */

/* One weight row times every row of x, ROW_TILE rows at a time; kind and tile size are constants in each
 * instantiation, so the accumulators stay in registers. */
#define TILE_CASE(KIND)                                                                                       \
    case KIND:                                                                                                \
        for (; m0 + ROW_TILE <= M; m0 += ROW_TILE) tile(KIND, ROW_TILE, wrow, nb, bb, q, d, s, M, m0, y, ldy, acc); \
        switch (M - m0) {                                                                                     \
        case 3: tile(KIND, 3, wrow, nb, bb, q, d, s, M, m0, y, ldy, acc); break;                              \
        case 2: tile(KIND, 2, wrow, nb, bb, q, d, s, M, m0, y, ldy, acc); break;                              \
        case 1: tile(KIND, 1, wrow, nb, bb, q, d, s, M, m0, y, ldy, acc); break;                              \
        }                                                                                                     \
        break;

static void row_times_x(int kind, const uint8_t *wrow, int64_t nb, const int8_t *q, const float *d, const float *s,
                        int64_t M, float *y, int64_t ldy, int acc) {
    const int64_t bb = block_bytes(kind);
    int64_t m0 = 0;
    switch (kind) {
        TILE_CASE(Q4_0)
        TILE_CASE(Q4_1)
        TILE_CASE(Q5_0)
        TILE_CASE(Q5_1)
        TILE_CASE(Q8_0)
    }
}

/* Several matrices sharing one quantized input: matrix j (kinds[j], w[j], N[j] rows) writes columns
 * [sum N[<j], sum N[<=j]) of y (M, ldy). With ``accumulate``, y += instead of y =. Returns 0, or < 0 for a
 * bad kind or K. */
int qgemm_multi(int nmat, const int *kinds, const uint8_t *const *w, const int64_t *N, const int8_t *q,
                const float *d, const float *s, int64_t M, int64_t K, float *y, int64_t ldy, int accumulate,
                int nthreads) {
    if (K % QK || nmat < 1 || nmat > 8) return -1;
    int64_t total = 0, first[9];
    for (int j = 0; j < nmat; j++) {
        if (!block_bytes(kinds[j])) return -2;
        first[j] = total;
        total += N[j];
    }
    first[nmat] = total;
    const int64_t nb = K / QK;
#ifdef HAVE_PAIR
    if (M == 1) { /* decoding one sequence: weight rows in pairs */
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t p = 0; p < (total + 1) / 2; p++) {
            const int64_t n = 2 * p;
            int j = 0;
            while (n >= first[j + 1]) j++;
            const int64_t rb = nb * block_bytes(kinds[j]);
            const uint8_t *wrow = w[j] + (n - first[j]) * rb;
            if (n + 1 < first[j + 1]) {
                pair_times_x(kinds[j], wrow, wrow + rb, nb, q, d, s, y + n, accumulate);
            } else { /* the last row of a matrix with an odd count: alone, and the next matrix's first too */
                row_times_x(kinds[j], wrow, nb, q, d, s, 1, y + n, ldy, accumulate);
                if (n + 1 < total)
                    row_times_x(kinds[j + 1], w[j + 1], nb, q, d, s, 1, y + n + 1, ldy, accumulate);
            }
        }
        return 0;
    }
#endif
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < total; n++) {
        int j = 0;
        while (n >= first[j + 1]) j++;
        const uint8_t *wrow = w[j] + (n - first[j]) * nb * block_bytes(kinds[j]);
        row_times_x(kinds[j], wrow, nb, q, d, s, M, y + n, ldy, accumulate);
    }
    return 0;
}

/* y (M, N) = x (M, K) @ W^T for one packed matrix: quantize x, then the integer product. */
int qlinear(int kind, const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    if (K % QK) return -1;
    int8_t *q = (int8_t *)malloc((size_t)(M * K));
    float *d = (float *)malloc(sizeof(float) * M * (K / QK)), *s = (float *)malloc(sizeof(float) * M * (K / QK));
    if (!q || !d || !s) {
        free(q), free(d), free(s);
        return -3;
    }
    quantize_rows(x, K, NULL, 0.0f, M, K, q, d, s, nthreads);
    const int rc = qgemm_multi(1, &kind, &w, &N, q, d, s, M, K, y, N, 0, nthreads);
    free(q), free(d), free(s);
    return rc;
}
