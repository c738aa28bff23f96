/* CPU kernels for product-key retrieval and single-neuron experts (fp32), called through
 * ctypes on a range of rows each (the caller runs ranges on its threads: ctypes releases the
 * GIL). Each kernel equals the torch code it replaces (raymoe/kernels/native/__init__.py),
 * and the tests compare them.
 *
 * Top-k order is canonical (raymoe/routing/select.py): score descending, then index
 * ascending. The kernels visit entries in ascending index and insert an entry only when it
 * beats the k-th kept one strictly, after those it ties with, so that order is what they keep.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* Insert (v, i) into vals/idx (n kept, descending), dropping the last when k are kept. */
static inline void insert(float *vals, int64_t *idx, int64_t *n, int64_t k, float v, int64_t i) {
    int64_t p = *n < k ? (*n)++ : k - 1;
    while (p > 0 && vals[p - 1] < v) {
        vals[p] = vals[p - 1];
        idx[p] = idx[p - 1];
        p--;
    }
    vals[p] = v;
    idx[p] = i;
}

/* The entries of row[0, m) >= t, with their indices, in index order -> how many. */
static int64_t at_least(const float *row, int64_t m, float t, float *val, int64_t *idx) {
    int64_t n = 0, j = 0;
#ifdef __AVX512F__
    const __m512 tv = _mm512_set1_ps(t);
    const __m512i step = _mm512_set1_epi32(16);
    __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int32_t pos[16];
    for (; j + 16 <= m; j += 16, lane = _mm512_add_epi32(lane, step)) {
        __mmask16 keep = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + j), tv, _CMP_GE_OQ);
        if (!keep) continue;
        int c = __builtin_popcount(keep);
        _mm512_mask_compressstoreu_ps(val + n, keep, _mm512_loadu_ps(row + j));
        _mm512_mask_compressstoreu_epi32(pos, keep, lane);
        for (int l = 0; l < c; l++) idx[n + l] = pos[l];
        n += c;
    }
#endif
    for (; j < m; j++) {  /* branchless: the comparison's outcome is a coin toss */
        val[n] = row[j];
        idx[n] = j;
        n += row[j] >= t;
    }
    return n;
}

/* Top-k of entries (val[j], idx[j]), j < n, given in index order, into vr/ir (n >= k). */
static void top_of(const float *val, const int64_t *idx, int64_t n, int64_t k, float *vr,
                   int64_t *ir) {
    int64_t kept = 0;
    for (int64_t j = 0; j < n; j++) {
        if (kept == k && !(val[j] > vr[k - 1])) continue;
        insert(vr, ir, &kept, k, val[j], idx[j]);
    }
}

/* s: [rows, m] -> vals, idx: [rows, k] (k <= m), rows [r0, r1). First a threshold that at
 * least k entries reach: the least of k lane maxima (lane c holds the entries j = c mod k,
 * so each lane's maximum is a distinct entry); then the top-k of the entries that reach it
 * (~50 of a row of 1,024 random scores, k = 16), in index order. Returns 0, or -1 when out
 * of memory. */
int rm_topk(const float *s, int64_t m, int64_t k, int64_t r0, int64_t r1, float *vals,
            int64_t *idx) {
    float *cv = malloc((size_t)(m + k) * sizeof(float)), *lanes = cv + m;
    int64_t *ci = malloc((size_t)m * sizeof(int64_t)), *all = malloc((size_t)m * sizeof(int64_t));
    if (!cv || !ci || !all) {
        free(cv), free(ci), free(all);
        return -1;
    }
    for (int64_t j = 0; j < m; j++) all[j] = j;
    for (int64_t r = r0; r < r1; r++) {
        const float *row = s + r * m;
        memcpy(lanes, row, (size_t)k * sizeof(float));
        for (int64_t j = k; j + k <= m; j += k)
            for (int64_t c = 0; c < k; c++) lanes[c] = row[j + c] > lanes[c] ? row[j + c] : lanes[c];
        float t = lanes[0];
        for (int64_t c = 1; c < k; c++) t = lanes[c] < t ? lanes[c] : t;
        int64_t got = at_least(row, m, t, cv, ci);
        if (got >= k)
            top_of(cv, ci, got, k, vals + r * k, idx + r * k);
        else /* only with NaNs: every entry, in order */
            top_of(row, all, m, k, vals + r * k, idx + r * k);
    }
    free(cv), free(ci), free(all);
    return 0;
}

/* Product keys: each row's top-k of v1[a] + v2[b] over the k x k pairs, ordered by score
 * descending, then pair position a * k + b ascending. v1, v2 are descending, so a pair with
 * (a + 1)(b + 1) > k has k pairs at least as good at lower positions: it is never kept and
 * never visited. v1, v2: [rows, k] -> vals, pos: [rows, k], rows [r0, r1). */
void rm_pk_pairs(const float *v1, const float *v2, int64_t k, int64_t r0, int64_t r1,
                 float *vals, int64_t *pos) {
    for (int64_t r = r0; r < r1; r++) {
        const float *a1 = v1 + r * k, *a2 = v2 + r * k;
        float *vr = vals + r * k;
        int64_t *pr = pos + r * k, n = 0;
        for (int64_t a = 0; a < k; a++) {
            for (int64_t b = 0; (a + 1) * (b + 1) <= k; b++) {
                float v = a1[a] + a2[b];
                if (n == k && !(v > vr[k - 1])) continue;
                insert(vr, pr, &n, k, v, a * k + b);
            }
        }
    }
}

enum { ACT_RELU = 0, ACT_GELU = 1, ACT_GELU_TANH = 2, ACT_SILU = 3 };

static inline float act(int kind, float s) {
    switch (kind) {
    case ACT_RELU:
        return s > 0.f ? s : 0.f;
    case ACT_GELU:
        return 0.5f * s * (1.f + erff(s * (float)M_SQRT1_2));
    case ACT_GELU_TANH: {
        const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
        return 0.5f * s * (1.f + tanhf(c * (s + 0.044715f * s * s * s)));
    }
    default:
        return s / (1.f + expf(-s));
    }
}

#define LANES 16

static inline float dot(const float *u, const float *x, int64_t d) {
    float acc[LANES] = {0};
    int64_t c = 0;
    for (; c + LANES <= d; c += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += u[c + l] * x[c + l];
    float s = 0.f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    for (; c < d; c++) s += u[c] * x[c];
    return s;
}

static inline void prefetch_row(const float *p, int64_t d) {
    for (int64_t c = 0; c < d; c += 64 / sizeof(float)) __builtin_prefetch(p + c);
}

/* PEER: y[t] = sum_j w[t, j] act(U[ids[t, j]] . x[t]) V[ids[t, j]], ids < 0 skipped.
 * x: [T, d], ids, w: [T, S], U, V: [E, d] -> y: [T, d], tokens [t0, t1). */
void rm_peer(const float *x, const int64_t *ids, const float *w, int64_t S, int64_t d,
             const float *U, const float *V, int kind, int64_t t0, int64_t t1, float *y) {
    const int64_t ahead = 8;
    for (int64_t t = t0; t < t1; t++) {
        const float *xt = x + t * d;
        const int64_t *it = ids + t * S;
        float *yt = y + t * d;
        memset(yt, 0, (size_t)d * sizeof(float));
        for (int64_t j = 0; j < S && j < ahead; j++)
            if (it[j] >= 0) prefetch_row(U + it[j] * d, d), prefetch_row(V + it[j] * d, d);
        for (int64_t j = 0; j < S; j++) {
            if (j + ahead < S && it[j + ahead] >= 0) {
                prefetch_row(U + it[j + ahead] * d, d);
                prefetch_row(V + it[j + ahead] * d, d);
            }
            if (it[j] < 0) continue;
            float h = act(kind, dot(U + it[j] * d, xt, d)) * w[t * S + j];
            const float *v = V + it[j] * d;
            for (int64_t c = 0; c < d; c++) yt[c] += h * v[c];
        }
    }
}
