/* CPU kernels for the router's dispatch stage (raymoe/_private/data/dispatch.py): split a
 * batch's [T, S] routed pairs into one sub-batch per shard, with each sub-batch's places
 * digest, and the digest a shard checks a sub-batch against. Each equals the torch code it
 * replaces, and the tests compare them.
 *
 * A pair's place is packed as shard << 32 | local (-1: an empty slot). Digests are sums of
 * squares of (expert * K + local) in wrapping 64-bit arithmetic, over the non-empty places.
 */
#include <stdint.h>

#define EMPTY (-1)

static inline uint64_t square_key(int64_t expert, int64_t local, uint64_t k) {
    uint64_t key = (uint64_t)expert * k + (uint64_t)local;
    return key * key;
}

/* Places and per-shard counts of T tokens of S slots each. With ``table`` (each of E experts'
 * one packed place), ``place[i]`` is looked up from ``ids[i]``; else ``place`` is given.
 * ``per`` [T, N]: how many of a token's slots each shard holds. Returns 1 when a place names
 * a shard outside [0, N), 2 when an id is E or more, else 0. */
int rm_split_count(const int64_t *ids, const int64_t *table, int64_t E, int64_t *place,
                   int64_t T, int64_t S, int64_t N, int64_t *per) {
    for (int64_t t = 0; t < T; t++) {
        int64_t *row = per + t * N;
        for (int64_t n = 0; n < N; n++) row[n] = 0;
        for (int64_t s = 0; s < S; s++) {
            int64_t i = t * S + s;
            if (table) {
                if (ids[i] >= E) return 2;
                place[i] = ids[i] >= 0 ? table[ids[i]] : EMPTY;
            }
            if (place[i] < 0) continue;
            int64_t n = place[i] >> 32;
            if (n >= N) return 1;
            row[n]++;
        }
    }
    return 0;
}

/* Fill each shard's sub-batch. For shard n with work (``width[n]`` > 0): ``tok[n]`` [t_n]
 * the rows sent, and [t_n, width[n]] each of ``loc[n]``, ``wt[n]``, ``gid[n]`` and ``slot[n]``
 * (a token's slots on n in slot order, then -1 / 0 pads); ``digest[n]`` its places digest.
 * ``scratch``: room for 2 N int64 (the shard count has no small bound: not on the stack). */
void rm_split_fill(const int64_t *place, const int64_t *ids, const float *w, const int64_t *per,
                   int64_t T, int64_t S, int64_t N, const int64_t *width, int64_t *const *tok,
                   int64_t *const *loc, float *const *wt, int64_t *const *gid,
                   int64_t *const *slot, uint64_t k, int64_t *digest, int64_t *scratch) {
    int64_t *rows = scratch, *fill = scratch + N;
    uint64_t *sum = (uint64_t *)digest;
    for (int64_t n = 0; n < N; n++) rows[n] = 0, sum[n] = 0;
    for (int64_t t = 0; t < T; t++) {
        const int64_t *count = per + t * N;
        for (int64_t n = 0; n < N; n++) {
            fill[n] = 0;
            if (count[n]) tok[n][rows[n]] = t;
        }
        for (int64_t s = 0; s < S; s++) {
            int64_t i = t * S + s, p = place[i];
            if (p < 0) continue;
            int64_t n = p >> 32, local = p & 0xFFFFFFFF;
            int64_t at = rows[n] * width[n] + fill[n]++;
            loc[n][at] = local;
            wt[n][at] = w[i];
            gid[n][at] = ids[i];
            slot[n][at] = s;
            sum[n] += square_key(ids[i], local, k);
        }
        for (int64_t n = 0; n < N; n++) {
            if (!count[n]) continue;
            for (int64_t j = fill[n]; j < width[n]; j++) {
                int64_t at = rows[n] * width[n] + j;
                loc[n][at] = EMPTY, wt[n][at] = 0.0f, gid[n][at] = EMPTY, slot[n][at] = EMPTY;
            }
            rows[n]++;
        }
    }
}

/* The digest of ``n`` places ``local`` (-1: padding) over the experts a shard holds at them
 * (``experts`` [size]); returns 1 when a place is at or beyond ``size``, else 0. */
int rm_places_digest(const int64_t *local, int64_t n, const int64_t *experts, int64_t size,
                     uint64_t k, int64_t *digest) {
    uint64_t sum = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t l = local[i];
        if (l < 0) continue;
        if (l >= size) return 1;
        sum += square_key(experts[l], l, k);
    }
    *digest = (int64_t)sum;
    return 0;
}
