/* One Llama decoder block (RMSNorm, GQA attention with RoPE on a static KV cache, SwiGLU) in one C call,
 * on packed GGML weights through the integer kernels of qgemm.c: the decode step without PyTorch's
 * per-op overhead (models/native_step.py; the eager PyTorch block is the reference it is tested against).
 *
 *   h   = rmsnorm(x) -> Q8 blocks                       (fused with the quantization)
 *   qkv = h @ [Wq; Wk; Wv]^T                            (one parallel loop over all three)
 *   q, k = rope(q), rope(k); cache[start + t] = k, v     (rotate-half layout, cos/sin from the caller)
 *   a   = softmax(q k^T / sqrt(D) + mask) v              (per row and head, causal, key mask)
 *   x  += a @ Wo^T
 *   g,u = rmsnorm(x) @ [Wgate; Wup]^T
 *   x  += (silu(g) * u) @ Wdown^T
 *
 * Shapes: x (B*T, dim) float32, updated in place; cos, sin (B*T, head_dim); k_cache, v_cache this layer's
 * (B, n_kv_heads, max_len, head_dim), float32, or IEEE half with ``kv_half`` (llama.cpp's default F16 cache: half
 * the bytes that every decode step reads; written rounded to nearest even, as PyTorch's .to(float16), and read
 * back exactly); key_mask (B, mask_stride) uint8 or NULL (1 = a real key).
 */
#include "qgemm.c"

typedef struct {
    int n_qkv, kinds_qkv[3];
    const uint8_t *w_qkv[3];
    int64_t rows_qkv[3];
    int kind_o;
    const uint8_t *w_o;
    int n_up, kinds_up[2]; /* gate, up */
    const uint8_t *w_up[2];
    int64_t rows_up[2];
    int kind_down;
    const uint8_t *w_down;
    const float *attn_norm, *ffn_norm;
    int64_t dim, n_heads, n_kv_heads, head_dim, ffn_dim;
    float eps;
    float act_resid; /* residual Q8 blocks: < 0 none (llama.cpp's Q8_1), 0 every block, T where max|x| > T mean|x|
                        (quantize_rows) */
} LlamaBlock;

typedef struct { /* Q8 blocks of M rows of K values */
    int8_t *q;
    float *d, *s;
    int32_t *xs;
} QRows;

static int qrows_alloc(QRows *r, int64_t M, int64_t K) {
    r->q = (int8_t *)malloc((size_t)(M * K));
    r->d = (float *)malloc(sizeof(float) * M * (K / QK));
    r->s = (float *)malloc(sizeof(float) * M * (K / QK));
    r->xs = (int32_t *)malloc(sizeof(int32_t) * M * (K / QK));
    return r->q && r->d && r->s && r->xs;
}

static void qrows_free(QRows *r) { free(r->q), free(r->d), free(r->s), free(r->xs); }

/* (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) over the two halves of one head */
static inline void rope(float *v, const float *cos, const float *sin, int64_t D) {
    const int64_t h = D / 2;
    for (int64_t i = 0; i < h; i++) {
        const float a = v[i], b = v[i + h];
        v[i] = a * cos[i] - b * sin[i];
        v[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

/* float -> IEEE half, rounded to nearest even (overflow to inf, subnormals kept), as F16C's vcvtps2ph and
 * PyTorch's .to(float16); the portable build's integer version gives the same bits (tested against PyTorch). */
static inline uint16_t float_to_half(float f) {
#ifdef LLMLAB_X86
    return (uint16_t)_cvtss_sh(f, 0);
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* at or past 65520, halfway to 2^16: inf */
    if (a >= 0x38800000u) {                                  /* a normal half: rebias, round off 13 bits */
        uint32_t m = a - 0x38000000u;
        m += 0xfffu + ((m >> 13) & 1u);
        return (uint16_t)(sign | (m >> 13));
    }
    if (a <= 0x33000000u) return (uint16_t)sign; /* at most 2^-25, half the smallest subnormal: to zero (even) */
    const uint32_t e = a >> 23, mant = (a & 0x7fffffu) | 0x800000u, shift = 126u - e; /* units of 2^-24 */
    uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
    q += rem > halfway || (rem == halfway && (q & 1u));
    return (uint16_t)(sign | q);
#endif
}

/* n floats -> IEEE halves (the cache write); exported for the tests. */
void float_to_half_rows(const float *x, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = float_to_half(x[i]);
}

/* n IEEE halves -> floats, exactly (the attention's reads of a half cache). */
static inline void half_to_float_rows(const uint16_t *h, float *out, int64_t n) {
    int64_t i = 0;
#ifdef LLMLAB_X86
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; i++) out[i] = half_to_float((const uint8_t *)(h + i));
}

/* e^x for the softmax and SiLU in plain C that every build vectorises (glibc's expf is one call per element),
 * computed in double and rounded once, so it is the correctly rounded float e^x but for the rare argument whose
 * e^x lies within ~1e-11 (relative) of a rounding boundary: x = n ln2 + r, n = round(x / ln2) (the 1.5 * 2^52
 * trick: n lands in the low mantissa bits, no float-to-int conversion), |r| <= ln2 / 2; e^r by its Taylor series
 * to r^11 / 11! (truncation below 1e-15); 2^n put into the exponent field. x is clamped to [-104, 89], where the
 * float result is 0 (or a denormal) below and inf above anyway; NaN stays NaN. The same IEEE operations in the
 * same order in every build, so the builds agree bit for bit. */
static inline float exp_poly(float xf) {
    double x = xf;
    x = x < -104.0 ? -104.0 : x;
    x = x > 89.0 ? 89.0 : x;
    const double magic = 6755399441055744.0; /* 1.5 * 2^52 */
    const double t = x * 1.4426950408889634 + magic;
    const double n = t - magic;
    int64_t ti;
    memcpy(&ti, &t, 8);
    const double r = x - n * 0.6931471805599453;
    double p = 1.0 / 39916800.0; /* 1/11! */
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const int64_t bits = (ti - 0x4338000000000000LL + 1023) << 52; /* 2^n */
    double scale;
    memcpy(&scale, &bits, 8);
    return (float)(p * scale);
}

/* Eight lane sums added as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)): the order of the vector builds'
 * horizontal-add tree (scores8), so every build gives the same bits. */
static inline float lanes_sum(const float *l) { return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])); }

/* <a, b> over n floats (n % 8 == 0 is not required): element i into lane i % 8 in order, the lanes added as
 * lanes_sum, then the tail; the compiler vectorises the lanes without reassociating. */
static inline float dot(const float *a, const float *b, int64_t n) {
    float lane[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) lane[l] = lane[l] + a[i + l] * b[i + l];
    float tail = 0.0f;
    for (; i < n; i++) tail = tail + a[i] * b[i];
    return lanes_sum(lane) + tail;
}

/* w[0] + ... + w[n - 1] in dot()'s order (lanes, lanes_sum, tail): vectorised, and the same bits everywhere. */
static inline float sum_lanes(const float *w, int64_t n) {
    float lane[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) lane[l] = lane[l] + w[i + l];
    float tail = 0.0f;
    for (; i < n; i++) tail = tail + w[i];
    return lanes_sum(lane) + tail;
}

#if defined(LLMLAB_X86)
/* 8 floats as one value (GCC / Clang vector extensions): lane-wise IEEE operations, the same results as the
 * portable loops below, with the accumulators held in registers (a float array indexed in a loop may live on
 * the stack). */
typedef float f8 __attribute__((vector_size(32)));

static inline f8 load8(const float *p) {
    f8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* dot(a, b_k) * scale for the 8 rows b_k = b + k ldb (n % 8 == 0), each summed exactly as dot() sums it: eight
 * independent chains over the columns, then one horizontal-add tree for all eight (the lanes_sum order). */
static inline void scores8(const float *a, const float *b, int64_t ldb, int64_t n, float scale, float *out) {
    __m256 c[8];
    for (int k = 0; k < 8; k++) c[k] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
        const __m256 x = _mm256_loadu_ps(a + i);
        for (int k = 0; k < 8; k++) c[k] = _mm256_add_ps(c[k], _mm256_mul_ps(x, _mm256_loadu_ps(b + k * ldb + i)));
    }
    /* hadd(p, q) = [p0+p1, p2+p3, q0+q1, q2+q3 | p4+p5, p6+p7, q4+q5, q6+q7]: two levels give each row's
     * (l0+l1)+(l2+l3) in the low half and (l4+l5)+(l6+l7) in the high half */
    const __m256 lo = _mm256_hadd_ps(_mm256_hadd_ps(c[0], c[1]), _mm256_hadd_ps(c[2], c[3])); /* rows 0..3 */
    const __m256 hi = _mm256_hadd_ps(_mm256_hadd_ps(c[4], c[5]), _mm256_hadd_ps(c[6], c[7])); /* rows 4..7 */
    const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
    _mm256_storeu_ps(out, _mm256_mul_ps(sum, _mm256_set1_ps(scale)));
}

static inline f8 splat8(float x) { return (f8){x, x, x, x, x, x, x, x}; }

/* The largest of p[0..n): 8 lanes of maxps (maxps(a, m) = a > m ? a : m, the portable loop's select), then the
 * lanes; a maximum does not depend on the order (but for the sign of a zero, which e^(x - m) does not see). */
static inline float max_of(const float *p, int64_t n) {
    __m256 v = _mm256_set1_ps(-INFINITY);
    int64_t s = 0;
    for (; s + 8 <= n; s += 8) v = _mm256_max_ps(_mm256_loadu_ps(p + s), v);
    float lane[8], m = -INFINITY;
    _mm256_storeu_ps(lane, v);
    for (int l = 0; l < 8; l++) m = lane[l] > m ? lane[l] : m;
    for (; s < n; s++) m = p[s] > m ? p[s] : m;
    return m;
}

/* oa (D) = sum_s wa[s] V[s] over the na keys, and ob likewise over nb keys when ob is not NULL (V rows D apart):
 * each column summed in key order from 0 (the portable loop's order), 32 columns at a time, the two queries
 * sharing each loaded V row. */
static inline void weighted_values(const float *wa, int64_t na, float *oa, const float *wb, int64_t nb, float *ob,
                                   const float *V, int64_t D) {
    if (!ob) nb = 0;
    const int64_t both = na < nb ? na : nb;
    int64_t i0 = 0;
    for (; i0 + 32 <= D; i0 += 32) {
        f8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        for (int64_t s = 0; s < both; s++) {
            const float *v = V + s * D + i0;
            const f8 x0 = load8(v), x1 = load8(v + 8), x2 = load8(v + 16), x3 = load8(v + 24);
            const f8 u = splat8(wa[s]), t = splat8(wb[s]);
            a0 = a0 + u * x0, a1 = a1 + u * x1, a2 = a2 + u * x2, a3 = a3 + u * x3;
            b0 = b0 + t * x0, b1 = b1 + t * x1, b2 = b2 + t * x2, b3 = b3 + t * x3;
        }
        for (int64_t s = both; s < na; s++) {
            const float *v = V + s * D + i0;
            const f8 u = splat8(wa[s]);
            a0 = a0 + u * load8(v), a1 = a1 + u * load8(v + 8), a2 = a2 + u * load8(v + 16), a3 = a3 + u * load8(v + 24);
        }
        for (int64_t s = both; s < nb; s++) {
            const float *v = V + s * D + i0;
            const f8 t = splat8(wb[s]);
            b0 = b0 + t * load8(v), b1 = b1 + t * load8(v + 8), b2 = b2 + t * load8(v + 16), b3 = b3 + t * load8(v + 24);
        }
        const f8 ra[4] = {a0, a1, a2, a3}, rb[4] = {b0, b1, b2, b3};
        memcpy(oa + i0, ra, sizeof ra);
        if (ob) memcpy(ob + i0, rb, sizeof rb);
    }
    for (int q = 0; q < (ob ? 2 : 1); q++) { /* the last D % 32 columns */
        const float *w = q ? wb : wa;
        float *o = q ? ob : oa;
        const int64_t n = q ? nb : na;
        for (int64_t i = i0; i < D; i++) o[i] = 0.0f;
        for (int64_t s = 0; s < n; s++)
            for (int64_t i = i0; i < D; i++) o[i] += w[s] * V[s * D + i];
    }
}
#else
static inline float max_of(const float *p, int64_t n) {
    float m = -INFINITY;
    for (int64_t s = 0; s < n; s++) m = p[s] > m ? p[s] : m;
    return m;
}

static inline void weighted_values(const float *wa, int64_t na, float *oa, const float *wb, int64_t nb, float *ob,
                                   const float *V, int64_t D) {
    for (int q = 0; q < (ob ? 2 : 1); q++) {
        const float *w = q ? wb : wa;
        float *o = q ? ob : oa;
        const int64_t n = q ? nb : na;
        for (int64_t i = 0; i < D; i++) o[i] = 0.0f;
        for (int64_t s = 0; s < n; s++)
            for (int64_t i = 0; i < D; i++) o[i] += w[s] * V[s * D + i];
    }
}
#endif

#define QROWS 4 /* query positions per work item: with the heads of one KV group they share each K/V load */

/* Causal GQA attention of the new rows over the cache. A work item is one (sequence, KV head, QROWS positions):
 * its rep * QROWS query vectors walk the keys together, so each key and value row is loaded once for all of
 * them. Each query's arithmetic (scores in key order, max, exp, sum, weighted values in key order) does not
 * depend on which others share its work item: the same bits alone, in a batch, or in another chunking. */
typedef struct {
    const LlamaBlock *w;
    const float *qkv;
    const void *kc, *vc; /* float, or IEEE half with kv_half */
    float *out;
    int64_t B, T, max_len, start, mask_stride;
    const uint8_t *key_mask;
    int kv_half;
} Attention;

/* The work items [i0, i1) of attention(), item = (b * Hkv + hk) * nqb + qb. */
static void attention_items(void *arg, int64_t i0, int64_t i1, int tid) {
    const Attention *a = (const Attention *)arg;
    const LlamaBlock *w = a->w;
    const float *qkv = a->qkv;
    float *out = a->out;
    const int64_t T = a->T, max_len = a->max_len, start = a->start, mask_stride = a->mask_stride;
    const uint8_t *key_mask = a->key_mask;
    const int64_t H = w->n_heads, Hkv = w->n_kv_heads, D = w->head_dim, rep = H / Hkv;
    const int64_t width = (H + 2 * Hkv) * D, S = start + T, nqb = (T + QROWS - 1) / QROWS;
    const float scale = 1.0f / sqrtf((float)D);
    const int64_t most = QROWS * rep;
    (void)tid;
    float *p = (float *)malloc(sizeof(float) * most * S); /* scores, then weights, per query */
    const float **qv = (const float **)malloc(sizeof(float *) * most);
    float **ov = (float **)malloc(sizeof(float *) * most);
    int64_t *pos = (int64_t *)malloc(sizeof(int64_t) * most);
    /* a half cache: the item's keys and values converted to floats once, for all its queries */
    float *kbuf = a->kv_half ? (float *)malloc(sizeof(float) * S * D) : NULL;
    float *vbuf = a->kv_half ? (float *)malloc(sizeof(float) * S * D) : NULL;
    for (int64_t item = i0; item < i1; item++) {
        const int64_t b = item / (Hkv * nqb), hk = item / nqb % Hkv, qb = item % nqb;
        const int64_t t0 = qb * QROWS, nt = T - t0 < QROWS ? T - t0 : QROWS, nq = nt * rep;
        const int64_t head = (b * Hkv + hk) * max_len * D, last = start + t0 + nt - 1; /* the item's last key */
        const float *K = kbuf, *V = vbuf;
        if (a->kv_half) {
            half_to_float_rows((const uint16_t *)a->kc + head, kbuf, (last + 1) * D);
            half_to_float_rows((const uint16_t *)a->vc + head, vbuf, (last + 1) * D);
        } else {
            K = (const float *)a->kc + head, V = (const float *)a->vc + head;
        }
        const uint8_t *km = key_mask ? key_mask + b * mask_stride : NULL;
        for (int64_t j = 0; j < nq; j++) {
            const int64_t t = t0 + j / rep, h = hk * rep + j % rep;
            qv[j] = qkv + (b * T + t) * width + h * D;
            ov[j] = out + (b * T + t) * H * D + h * D;
            pos[j] = start + t;
        }
        for (int64_t s0 = 0; s0 <= last; s0 += 8) { /* 8 keys at a time: loaded once for the item's queries */
            const int64_t ns = last + 1 - s0 < 8 ? last + 1 - s0 : 8;
            for (int64_t j = 0; j < nq; j++) {
                float *pj = p + j * S;
                if (s0 > pos[j]) continue;
#if defined(LLMLAB_X86)
                if (ns == 8 && D % 8 == 0) { /* keys past pos[j] get a score too: never read */
                    scores8(qv[j], K + s0 * D, D, D, scale, pj + s0);
                    continue;
                }
#endif
                for (int64_t k = 0; k < ns; k++) pj[s0 + k] = dot(qv[j], K + (s0 + k) * D, D) * scale;
            }
        }
        for (int64_t j = 0; j < nq; j++) {
            float *pj = p + j * S;
            const int64_t n = pos[j] + 1;
            if (km)
                for (int64_t s = 0; s < n - 1; s++) pj[s] = km[s] ? pj[s] : -INFINITY; /* padding; a query sees itself */
            const float m = max_of(pj, n);
            for (int64_t s = 0; s < n; s++) { /* no reduction, no branch: vectorised */
                const float e = exp_poly(pj[s] - m);
                pj[s] = pj[s] == -INFINITY ? 0.0f : e;
            }
            const float total = sum_lanes(pj, n);
            for (int64_t s = 0; s < n; s++) pj[s] = pj[s] / total;
        }
        for (int64_t j = 0; j < nq; j += 2) /* two queries at a time share each V row */
            weighted_values(p + j * S, pos[j] + 1, ov[j], p + (j + 1) * S, j + 1 < nq ? pos[j + 1] + 1 : 0,
                            j + 1 < nq ? ov[j + 1] : NULL, V, D);
    }
    free(p), free(qv), free(ov), free(pos), free(kbuf), free(vbuf);
}

static void attention(const LlamaBlock *w, const float *qkv, float *out, int64_t B, int64_t T, const void *kc,
                      const void *vc, int kv_half, int64_t max_len, int64_t start, const uint8_t *key_mask,
                      int64_t mask_stride, int nthreads) {
    Attention a = {w, qkv, kc, vc, out, B, T, max_len, start, mask_stride, key_mask, kv_half};
    const int64_t items = B * w->n_kv_heads * ((T + QROWS - 1) / QROWS);
    pool_for_chunks(items, items, nthreads, attention_items, &a); /* one item a claim: later positions cost more */
}

/* The per-row steps between the products, each a parallel loop over rows like the quantization (they had been
 * serial: at 2 threads the second thread waited through them, 5-8% of a batched step's samples in pool_worker). */
typedef struct {
    const LlamaBlock *w;
    float *rows; /* qkv (M, (H + 2 Hkv) D) for rope_rows; gate | up (M, 2F) for swiglu_rows */
    const float *cos, *sin;
    void *k_cache, *v_cache;
    int kv_half;
    int64_t T, max_len, start;
} RowsArgs;

/* q, k = rope(q), rope(k) of rows [r0, r1); their k and v written to the cache at position start + row % T. */
static void rope_rows(void *arg, int64_t r0, int64_t r1, int tid) {
    const RowsArgs *a = (const RowsArgs *)arg;
    const int64_t H = a->w->n_heads, Hkv = a->w->n_kv_heads, D = a->w->head_dim, width = (H + 2 * Hkv) * D;
    (void)tid;
    for (int64_t row = r0; row < r1; row++) {
        const int64_t b = row / a->T, pos = a->start + row % a->T;
        float *r = a->rows + row * width;
        for (int64_t h = 0; h < H + Hkv; h++) rope(r + h * D, a->cos + row * D, a->sin + row * D, D);
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t at = ((b * Hkv + h) * a->max_len + pos) * D;
            if (a->kv_half) {
                float_to_half_rows(r + (H + h) * D, (uint16_t *)a->k_cache + at, D);
                float_to_half_rows(r + (H + Hkv + h) * D, (uint16_t *)a->v_cache + at, D);
            } else {
                memcpy((float *)a->k_cache + at, r + (H + h) * D, sizeof(float) * D);
                memcpy((float *)a->v_cache + at, r + (H + Hkv + h) * D, sizeof(float) * D);
            }
        }
    }
}

/* h = silu(gate) * up of rows [r0, r1), written over the gate. */
static void swiglu_rows(void *arg, int64_t r0, int64_t r1, int tid) {
    const RowsArgs *a = (const RowsArgs *)arg;
    const int64_t F = a->w->ffn_dim;
    (void)tid;
    for (int64_t row = r0; row < r1; row++) {
        float *g = a->rows + row * 2 * F; /* gate in [0, F), up in [F, 2F) */
        for (int64_t i = 0; i < F; i++) g[i] = g[i] / (1.0f + exp_poly(-g[i])) * g[F + i];
    }
}

int llama_block(const LlamaBlock *w, float *x, int64_t B, int64_t T, const float *cos, const float *sin,
                void *k_cache, void *v_cache, int kv_half, int64_t max_len, int64_t start, const uint8_t *key_mask,
                int64_t mask_stride, int nthreads) {
    const int64_t M = B * T, dim = w->dim, H = w->n_heads, Hkv = w->n_kv_heads, D = w->head_dim;
    const int64_t F = w->ffn_dim, width = (H + 2 * Hkv) * D;
    const float resid = w->act_resid;
    const int res = resid >= 0.0f, L = res ? 2 : 1; /* Q8 rows allocated per activation row */
    if (start + T > max_len) return -10;
    if (resid != resid) return -4;
    QRows hx = {0}, ha = {0}, hf = {0};
    float *qkv = (float *)malloc(sizeof(float) * M * width);
    float *att = (float *)malloc(sizeof(float) * M * H * D);
    float *gu = (float *)malloc(sizeof(float) * M * 2 * F);
    int rc = -3;
    if (!qkv || !att || !gu || !qrows_alloc(&hx, L * M, dim) || !qrows_alloc(&ha, L * M, H * D) || !qrows_alloc(&hf, L * M, F))
        goto done;

    quantize_rows(x, dim, w->attn_norm, w->eps, M, dim, resid, hx.q, hx.d, hx.s, hx.xs, nthreads);
    rc = qgemm_multi(w->n_qkv, w->kinds_qkv, w->w_qkv, w->rows_qkv, hx.q, hx.d, hx.s, hx.xs, res, M, dim, qkv, width,
                     0, nthreads);
    if (rc) goto done;
    RowsArgs ra = {w, qkv, cos, sin, k_cache, v_cache, kv_half, T, max_len, start};
    pool_for(M, row_threads(M, nthreads), rope_rows, &ra);
    attention(w, qkv, att, B, T, k_cache, v_cache, kv_half, max_len, start, key_mask, mask_stride, nthreads);
    quantize_rows(att, H * D, NULL, 0.0f, M, H * D, resid, ha.q, ha.d, ha.s, ha.xs, nthreads);
    rc = qgemm_multi(1, &w->kind_o, &w->w_o, &dim, ha.q, ha.d, ha.s, ha.xs, res, M, H * D, x, dim, 1, nthreads);
    if (rc) goto done;

    quantize_rows(x, dim, w->ffn_norm, w->eps, M, dim, resid, hx.q, hx.d, hx.s, hx.xs, nthreads);
    rc = qgemm_multi(w->n_up, w->kinds_up, w->w_up, w->rows_up, hx.q, hx.d, hx.s, hx.xs, res, M, dim, gu, 2 * F,
                     0, nthreads);
    if (rc) goto done;
    ra.rows = gu;
    pool_for(M, row_threads(M, nthreads), swiglu_rows, &ra);
    quantize_rows(gu, 2 * F, NULL, 0.0f, M, F, resid, hf.q, hf.d, hf.s, hf.xs, nthreads); /* the F columns of h */
    rc = qgemm_multi(1, &w->kind_down, &w->w_down, &dim, hf.q, hf.d, hf.s, hf.xs, res, M, F, x, dim, 1, nthreads);
done:
    free(qkv), free(att), free(gu);
    qrows_free(&hx), qrows_free(&ha), qrows_free(&hf);
    return rc;
}

/* logits (M, N) = rmsnorm(x) @ W^T: the final norm fused into the head's quantization. */
int norm_qlinear(int kind, const float *x, const float *norm, float eps, const uint8_t *w, float *y, int64_t M,
                 int64_t N, int64_t K, int nthreads, float resid) {
    QRows h;
    int rc = -3;
    if (resid != resid) return -4;
    const int res = resid >= 0.0f;
    if (qrows_alloc(&h, (res ? 2 : 1) * M, K)) {
        quantize_rows(x, K, norm, eps, M, K, resid, h.q, h.d, h.s, h.xs, nthreads);
        rc = qgemm_multi(1, &kind, &w, &N, h.q, h.d, h.s, h.xs, res, M, K, y, N, 0, nthreads);
    }
    qrows_free(&h);
    return rc;
}
