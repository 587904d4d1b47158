/* Paged decode attention: one new query per sequence against its whole KV cache, read in place from a
 * pool of fixed-size blocks through the sequence's block table (PagedAttention, Kwon et al. 2023,
 * arXiv:2309.06180). Float32 throughout.
 *
 *   q       (n, H, D)                       one query per sequence
 *   k, v    (n_blocks, H_kv, bs, D)          one layer of the pool; a (block, head) tile is bs*D floats
 *   tables  (n, max_blocks) int32           block ids; entries past a sequence's ctx_len are never read
 *   ctx_lens (n,) int32                     keys per sequence, 1 <= ctx_len <= max_blocks * bs
 *   out     (n, H, D)
 *
 * GQA: query head h reads kv head h / rep, rep = H / H_kv. Work is split over (sequence, kv head) pairs;
 * each pair walks its keys in tiles of up to TILE positions (a tile may span several blocks, so block
 * size 1 costs no more softmax bookkeeping than 16), and the rep query heads of the pair share every
 * key and value load. The softmax is computed online (Milakov & Gimelshein 2018, arXiv:1805.02867): a
 * running max m and sum l per query head; when a tile raises m, the earlier sum and accumulator are
 * rescaled by exp(m_old - m_new), so no score vector of length ctx_len is ever stored.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "pool.h"

#define TILE 64   /* keys scored before one softmax rescale: amortizes the rescale, fits L1 */
#define GROUP 4   /* query heads that share a key load; their accumulators stay in registers */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

/* exp(x) for x <= 0 (scores minus their running max), 8 lanes: x = n ln2 + r, |r| <= ln2/2,
 * exp(r) by Cephes' expf polynomial, 2^n built in the exponent bits. Relative error ~1e-7; a scalar
 * expf per score would cost more than the 64-wide dot product that produced it. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f)); /* 2^n stays a normal float; exp(-87) ~ 1.6e-38 */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* ln2 in two parts so r = x - n ln2 keeps its low bits */
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* (sum of a's lanes, sum of b's lanes) with one shuffle sequence. */
static inline void hsum2(__m256 a, __m256 b, float *sa, float *sb) {
    const __m256 h = _mm256_hadd_ps(a, b); /* a01 a23 b01 b23 | a45 a67 b45 b67 */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_hadd_ps(s, s); /* a b a b */
    *sa = _mm_cvtss_f32(s);
    *sb = _mm_cvtss_f32(_mm_shuffle_ps(s, s, 1));
}

/* s[r * TILE + t] = scale * <q_r, key t> for nr <= GROUP query heads q (nr, D) and nt keys. Keys go two
 * at a time: each 8-float chunk of a key is loaded once for all nr heads and each chunk of q once for
 * both keys (a dot product per key and head would be bound by loads, not FMAs). Always inlined with a
 * constant nr, so the 2 * nr accumulators live in registers. */
static inline __attribute__((always_inline)) void score_tile(int nr, const float *const *kp, int nt,
                                                             const float *q, int64_t D, float scale,
                                                             float *s) {
    int t = 0;
    for (; t + 2 <= nt; t += 2) {
        const float *k0 = kp[t], *k1 = kp[t + 1];
        __m256 a[GROUP], b[GROUP];
        for (int r = 0; r < nr; r++) a[r] = b[r] = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) {
            const __m256 x0 = _mm256_loadu_ps(k0 + d), x1 = _mm256_loadu_ps(k1 + d);
            for (int r = 0; r < nr; r++) {
                const __m256 qr = _mm256_loadu_ps(q + r * D + d);
                a[r] = _mm256_fmadd_ps(x0, qr, a[r]);
                b[r] = _mm256_fmadd_ps(x1, qr, b[r]);
            }
        }
        for (int r = 0; r < nr; r++) {
            float s0, s1;
            hsum2(a[r], b[r], &s0, &s1);
            for (int64_t j = d; j < D; j++) { /* D not a multiple of 8 */
                s0 += k0[j] * q[r * D + j];
                s1 += k1[j] * q[r * D + j];
            }
            s[r * TILE + t] = s0 * scale;
            s[r * TILE + t + 1] = s1 * scale;
        }
    }
    for (; t < nt; t++) { /* an odd last key */
        const float *k = kp[t];
        __m256 a[GROUP];
        for (int r = 0; r < nr; r++) a[r] = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) {
            const __m256 kv = _mm256_loadu_ps(k + d);
            for (int r = 0; r < nr; r++) a[r] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q + r * D + d), a[r]);
        }
        for (int r = 0; r < nr; r++) {
            float x = hsum(a[r]);
            for (int64_t j = d; j < D; j++) x += k[j] * q[r * D + j];
            s[r * TILE + t] = x * scale;
        }
    }
}

/* acc_r (D) += sum_t p[r * TILE + t] * value t, for nr <= GROUP heads: each value chunk loaded once. */
static inline __attribute__((always_inline)) void accumulate_tile(int nr, const float *const *vp, int nt,
                                                                  const float *p, float *acc, int64_t D) {
    int64_t d = 0;
    /* 16 floats a step: 2 * nr independent FMA chains instead of nr, which would wait on FMA latency */
    for (; d + 16 <= D; d += 16) {
        __m256 a[GROUP], b[GROUP];
        for (int r = 0; r < nr; r++) {
            a[r] = _mm256_loadu_ps(acc + r * D + d);
            b[r] = _mm256_loadu_ps(acc + r * D + d + 8);
        }
        for (int t = 0; t < nt; t++) {
            const __m256 v0 = _mm256_loadu_ps(vp[t] + d), v1 = _mm256_loadu_ps(vp[t] + d + 8);
            for (int r = 0; r < nr; r++) {
                const __m256 pr = _mm256_set1_ps(p[r * TILE + t]);
                a[r] = _mm256_fmadd_ps(pr, v0, a[r]);
                b[r] = _mm256_fmadd_ps(pr, v1, b[r]);
            }
        }
        for (int r = 0; r < nr; r++) {
            _mm256_storeu_ps(acc + r * D + d, a[r]);
            _mm256_storeu_ps(acc + r * D + d + 8, b[r]);
        }
    }
    for (; d + 8 <= D; d += 8) {
        __m256 a[GROUP];
        for (int r = 0; r < nr; r++) a[r] = _mm256_loadu_ps(acc + r * D + d);
        for (int t = 0; t < nt; t++) {
            const __m256 vv = _mm256_loadu_ps(vp[t] + d);
            for (int r = 0; r < nr; r++) a[r] = _mm256_fmadd_ps(_mm256_set1_ps(p[r * TILE + t]), vv, a[r]);
        }
        for (int r = 0; r < nr; r++) _mm256_storeu_ps(acc + r * D + d, a[r]);
    }
    for (; d < D; d++)
        for (int t = 0; t < nt; t++)
            for (int r = 0; r < nr; r++) acc[r * D + d] += p[r * TILE + t] * vp[t][d];
}

/* Dispatch on the group size with a constant, so each case gets its own register allocation. */
static void score_group(int nr, const float *const *kp, int nt, const float *q, int64_t D, float scale,
                        float *s) {
    switch (nr) {
    case 1: score_tile(1, kp, nt, q, D, scale, s); break;
    case 2: score_tile(2, kp, nt, q, D, scale, s); break;
    case 3: score_tile(3, kp, nt, q, D, scale, s); break;
    default: score_tile(GROUP, kp, nt, q, D, scale, s); break;
    }
}

static void accumulate_group(int nr, const float *const *vp, int nt, const float *p, float *acc, int64_t D) {
    switch (nr) {
    case 1: accumulate_tile(1, vp, nt, p, acc, D); break;
    case 2: accumulate_tile(2, vp, nt, p, acc, D); break;
    case 3: accumulate_tile(3, vp, nt, p, acc, D); break;
    default: accumulate_tile(GROUP, vp, nt, p, acc, D); break;
    }
}

/* One (sequence, kv head) pair: the rep query heads q (rep, D) against keys 0..len-1 -> o (rep, D).
 * scratch: rep * TILE scores + rep * D accumulator + 2 * rep (max, sum) floats. */
static void attend_pair(const float *q, const float *k, const float *v, const int32_t *table, int64_t len,
                        int64_t head, int64_t Hkv, int64_t bs, int64_t D, int rep, float scale, float *o,
                        float *scratch) {
    float *s = scratch;              /* (rep, TILE) scores, then probabilities */
    float *acc = s + rep * TILE;     /* (rep, D) unnormalized output */
    float *m = acc + rep * D;        /* (rep,) running max */
    float *l = m + rep;              /* (rep,) running sum of exp(score - m) */
    const float *kp[TILE], *vp[TILE];
    for (int r = 0; r < rep; r++) m[r] = -INFINITY, l[r] = 0.0f;
    for (int64_t j = 0; j < rep * D; j++) acc[j] = 0.0f;
    for (int64_t t0 = 0; t0 < len; t0 += TILE) {
        const int nt = (int)(len - t0 < TILE ? len - t0 : TILE);
        for (int t = 0; t < nt; t++) { /* position -> row of its block's (head) tile, no copy */
            const int64_t pos = t0 + t;
            const int64_t off = (((int64_t)table[pos / bs] * Hkv + head) * bs + pos % bs) * D;
            kp[t] = k + off;
            vp[t] = v + off;
        }
        for (int r0 = 0; r0 < rep; r0 += GROUP) {
            const int nr = rep - r0 < GROUP ? rep - r0 : GROUP;
            score_group(nr, kp, nt, q + r0 * D, D, scale, s + r0 * TILE);
        }
        for (int r = 0; r < rep; r++) {
            float *sr = s + r * TILE;
            float mt = m[r];
            for (int t = 0; t < nt; t++) mt = sr[t] > mt ? sr[t] : mt;
            const float corr = expf(m[r] - mt); /* 0 on the first tile (m = -inf), else <= 1 */
            m[r] = mt;
            __m256 sum8 = _mm256_setzero_ps();
            const __m256 mv = _mm256_set1_ps(mt);
            int t = 0;
            for (; t + 8 <= nt; t += 8) {
                const __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(sr + t), mv));
                _mm256_storeu_ps(sr + t, p);
                sum8 = _mm256_add_ps(sum8, p);
            }
            float sum = hsum(sum8);
            for (; t < nt; t++) sum += (sr[t] = expf(sr[t] - mt));
            l[r] = l[r] * corr + sum;
            if (corr != 1.0f)
                for (int64_t j = 0; j < D; j++) acc[r * D + j] *= corr;
        }
        for (int r0 = 0; r0 < rep; r0 += GROUP) {
            const int nr = rep - r0 < GROUP ? rep - r0 : GROUP;
            accumulate_group(nr, vp, nt, s + r0 * TILE, acc + r0 * D, D);
        }
    }
    for (int r = 0; r < rep; r++) {
        const float inv = 1.0f / l[r]; /* l >= 1: the max key contributes exp(0) */
        for (int64_t j = 0; j < D; j++) o[r * D + j] = acc[r * D + j] * inv;
    }
}

/* paged_decode's arguments, and the (sequence, kv head) pairs [p0, p1) of it that one thread does */
typedef struct {
    const float *q, *k, *v;
    const int32_t *tables, *ctx_lens;
    float *out;
    int64_t H, Hkv, D, bs, max_blocks;
    float scale;
    int rep;
    _Atomic int failed;
} PagedPairs;

static void paged_pairs(void *arg, int64_t p0, int64_t p1, int tid) {
    PagedPairs *a = (PagedPairs *)arg;
    const int64_t H = a->H, Hkv = a->Hkv, D = a->D, rep = a->rep;
    (void)tid;
    float *scratch = (float *)malloc(sizeof(float) * rep * (TILE + D + 2));
    if (!scratch) {
        atomic_store(&a->failed, 1);
        return;
    }
    for (int64_t p = p0; p < p1; p++) {
        const int64_t i = p / Hkv, g = p % Hkv;
        attend_pair(a->q + (i * H + g * rep) * D, a->k, a->v, a->tables + i * a->max_blocks, a->ctx_lens[i], g,
                    Hkv, a->bs, D, (int)rep, a->scale, a->out + (i * H + g * rep) * D, scratch);
    }
    free(scratch);
}

/* Returns 0, or a negative code for arguments it refuses (checked before any work, nothing written). */
int paged_decode(const float *q, const float *k, const float *v, const int32_t *tables,
                 const int32_t *ctx_lens, float *out, int64_t n, int64_t H, int64_t Hkv, int64_t D,
                 int64_t bs, int64_t n_blocks, int64_t max_blocks, float scale, int nthreads) {
    if (n < 0 || H < 1 || Hkv < 1 || D < 1 || bs < 1 || n_blocks < 1 || max_blocks < 1) return -1;
    if (H % Hkv) return -2;
    /* every block a sequence reads must be in the pool: a bad table must not read outside it */
    for (int64_t i = 0; i < n; i++) {
        const int64_t len = ctx_lens[i];
        if (len < 1 || len > max_blocks * bs) return -3;
        for (int64_t b = 0; b < (len + bs - 1) / bs; b++) {
            const int32_t id = tables[i * max_blocks + b];
            if (id < 0 || id >= n_blocks) return -4;
        }
    }
    const int rep = (int)(H / Hkv);
    /* A decode step for one short sequence is a few microseconds of work: waking another thread costs as
     * much, so small problems run on the calling thread. */
    int64_t work = 0;
    for (int64_t i = 0; i < n; i++) work += ctx_lens[i];
    work *= H * D;
    PagedPairs a = {q, k, v, tables, ctx_lens, out, H, Hkv, D, bs, max_blocks, scale, rep, 0};
    pool_for_chunks(n * Hkv, n * Hkv, work >= (1 << 17) ? nthreads : 1, paged_pairs, &a); /* lengths differ */
    return atomic_load(&a.failed) ? -5 : 0;
}
