/* One Llama decoder block (RMSNorm, GQA attention with RoPE on a static KV cache, SwiGLU) in one C call,
 * on packed GGML weights through the integer kernels of qgemm.c: the decode step without PyTorch's
 * per-op overhead (models/native_step.py; the eager PyTorch block is the reference it is tested against).
 *
 *   h   = rmsnorm(x) -> Q8 blocks                       (fused with the quantization)
 *   qkv = h @ [Wq; Wk; Wv]^T                            (one parallel region over all three)
 *   q, k = rope(q), rope(k); cache[start + t] = k, v     (rotate-half layout, cos/sin from the caller)
 *   a   = softmax(q k^T / sqrt(D) + mask) v              (per row and head, causal, key mask)
 *   x  += a @ Wo^T
 *   g,u = rmsnorm(x) @ [Wgate; Wup]^T
 *   x  += (silu(g) * u) @ Wdown^T
 *
 * Shapes: x (B*T, dim) float32, updated in place; cos, sin (B*T, head_dim); k_cache, v_cache this layer's
 * (B, n_kv_heads, max_len, head_dim); key_mask (B, mask_stride) uint8 or NULL (1 = a real key).
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
} QRows;

static int qrows_alloc(QRows *r, int64_t M, int64_t K) {
    r->q = (int8_t *)malloc((size_t)(M * K));
    r->d = (float *)malloc(sizeof(float) * M * (K / QK));
    r->s = (float *)malloc(sizeof(float) * M * (K / QK));
    return r->q && r->d && r->s;
}

static void qrows_free(QRows *r) { free(r->q), free(r->d), free(r->s); }

/* (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) over the two halves of one head */
static inline void rope(float *v, const float *cos, const float *sin, int64_t D) {
    const int64_t h = D / 2;
    for (int64_t i = 0; i < h; i++) {
        const float a = v[i], b = v[i + h];
        v[i] = a * cos[i] - b * sin[i];
        v[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

/* <a, b> over n floats (n % 8 == 0 is not required) in 8 independent lanes summed pairwise: the compiler
 * vectorises it without reassociating, so every build gives the same bits. */
static inline float dot(const float *a, const float *b, int64_t n) {
    float lane[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) lane[l] = lane[l] + a[i + l] * b[i + l];
    float tail = 0.0f;
    for (; i < n; i++) tail = tail + a[i] * b[i];
    return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7])) + tail;
}

#define QROWS 4 /* query positions per work item: with the heads of one KV group they share each K/V load */

/* Causal GQA attention of the new rows over the cache. A work item is one (sequence, KV head, QROWS positions):
 * its rep * QROWS query vectors walk the keys together, so each key and value row is loaded once for all of
 * them. Each query's arithmetic (scores in key order, max, exp, sum, weighted values in key order) does not
 * depend on which others share its work item: the same bits alone, in a batch, or in another chunking. */
static void attention(const LlamaBlock *w, const float *qkv, float *out, int64_t B, int64_t T, const float *kc,
                      const float *vc, int64_t max_len, int64_t start, const uint8_t *key_mask,
                      int64_t mask_stride, int nthreads) {
    const int64_t H = w->n_heads, Hkv = w->n_kv_heads, D = w->head_dim, rep = H / Hkv;
    const int64_t width = (H + 2 * Hkv) * D, S = start + T, nqb = (T + QROWS - 1) / QROWS;
    const float scale = 1.0f / sqrtf((float)D);
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t most = QROWS * rep;
        float *p = (float *)malloc(sizeof(float) * most * S); /* scores, then weights, per query */
        const float **qv = (const float **)malloc(sizeof(float *) * most);
        float **ov = (float **)malloc(sizeof(float *) * most);
        int64_t *pos = (int64_t *)malloc(sizeof(int64_t) * most);
        float *mx = (float *)malloc(sizeof(float) * most), *sum = (float *)malloc(sizeof(float) * most);
#pragma omp for schedule(dynamic) collapse(3)
        for (int64_t b = 0; b < B; b++)
            for (int64_t hk = 0; hk < Hkv; hk++)
                for (int64_t qb = 0; qb < nqb; qb++) {
                    const int64_t t0 = qb * QROWS, nt = T - t0 < QROWS ? T - t0 : QROWS, nq = nt * rep;
                    const float *K = kc + (b * Hkv + hk) * max_len * D, *V = vc + (b * Hkv + hk) * max_len * D;
                    const uint8_t *km = key_mask ? key_mask + b * mask_stride : NULL;
                    for (int64_t j = 0; j < nq; j++) {
                        const int64_t t = t0 + j / rep, h = hk * rep + j % rep;
                        qv[j] = qkv + (b * T + t) * width + h * D;
                        ov[j] = out + (b * T + t) * H * D + h * D;
                        pos[j] = start + t;
                        mx[j] = -INFINITY;
                        sum[j] = 0.0f;
                    }
                    const int64_t last = start + t0 + nt - 1;
                    for (int64_t s = 0; s <= last; s++) {
                        const float *ks = K + s * D;
                        const int pad = km && !km[s];
                        for (int64_t j = 0; j < nq; j++) {
                            float *pj = p + j * S;
                            if (s > pos[j]) continue;
                            if (pad && s != pos[j]) { /* padding; a query always sees itself */
                                pj[s] = -INFINITY;
                                continue;
                            }
                            pj[s] = dot(qv[j], ks, D) * scale;
                            mx[j] = pj[s] > mx[j] ? pj[s] : mx[j]; /* fmaxf would be a library call */
                        }
                    }
                    for (int64_t j = 0; j < nq; j++) {
                        float *pj = p + j * S;
                        for (int64_t s = 0; s <= pos[j]; s++) {
                            pj[s] = pj[s] == -INFINITY ? 0.0f : expf(pj[s] - mx[j]);
                            sum[j] += pj[s];
                        }
                        for (int64_t i = 0; i < D; i++) ov[j][i] = 0.0f;
                    }
                    for (int64_t s = 0; s <= last; s++) {
                        const float *vs = V + s * D;
                        for (int64_t j = 0; j < nq; j++) {
                            if (s > pos[j]) continue;
                            const float ps = p[j * S + s] / sum[j];
                            if (ps != 0.0f)
                                for (int64_t i = 0; i < D; i++) ov[j][i] += ps * vs[i];
                        }
                    }
                }
        free(p), free(qv), free(ov), free(pos), free(mx), free(sum);
    }
}

int llama_block(const LlamaBlock *w, float *x, int64_t B, int64_t T, const float *cos, const float *sin,
                float *k_cache, float *v_cache, int64_t max_len, int64_t start, const uint8_t *key_mask,
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

    quantize_rows(x, dim, w->attn_norm, w->eps, M, dim, resid, hx.q, hx.d, hx.s, nthreads);
    rc = qgemm_multi(w->n_qkv, w->kinds_qkv, w->w_qkv, w->rows_qkv, hx.q, hx.d, hx.s, res, M, dim, qkv, width, 0,
                      nthreads);
    if (rc) goto done;
    for (int64_t row = 0; row < M; row++) {
        const int64_t b = row / T, pos = start + row % T;
        float *r = qkv + row * width;
        for (int64_t h = 0; h < H + Hkv; h++) rope(r + h * D, cos + row * D, sin + row * D, D);
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t at = ((b * Hkv + h) * max_len + pos) * D;
            memcpy(k_cache + at, r + (H + h) * D, sizeof(float) * D);
            memcpy(v_cache + at, r + (H + Hkv + h) * D, sizeof(float) * D);
        }
    }
    attention(w, qkv, att, B, T, k_cache, v_cache, max_len, start, key_mask, mask_stride, nthreads);
    quantize_rows(att, H * D, NULL, 0.0f, M, H * D, resid, ha.q, ha.d, ha.s, nthreads);
    rc = qgemm_multi(1, &w->kind_o, &w->w_o, &dim, ha.q, ha.d, ha.s, res, M, H * D, x, dim, 1, nthreads);
    if (rc) goto done;

    quantize_rows(x, dim, w->ffn_norm, w->eps, M, dim, resid, hx.q, hx.d, hx.s, nthreads);
    rc = qgemm_multi(w->n_up, w->kinds_up, w->w_up, w->rows_up, hx.q, hx.d, hx.s, res, M, dim, gu, 2 * F, 0,
                      nthreads);
    if (rc) goto done;
    for (int64_t row = 0; row < M; row++) {
        float *g = gu + row * 2 * F; /* gate in [0, F), up in [F, 2F): h written over the gate */
        for (int64_t i = 0; i < F; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * g[F + i];
    }
    quantize_rows(gu, 2 * F, NULL, 0.0f, M, F, resid, hf.q, hf.d, hf.s, nthreads); /* the F columns of h */
    rc = qgemm_multi(1, &w->kind_down, &w->w_down, &dim, hf.q, hf.d, hf.s, res, M, F, x, dim, 1, nthreads);
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
        quantize_rows(x, K, norm, eps, M, K, resid, h.q, h.d, h.s, nthreads);
        rc = qgemm_multi(1, &kind, &w, &N, h.q, h.d, h.s, res, M, K, y, N, 0, nthreads);
    }
    qrows_free(&h);
    return rc;
}
