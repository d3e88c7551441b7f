/* Fused CPU kernels of the trimming merges (TIES, magnitude pruning, DARE-TIES).
 *
 * Each one does in one pass over a block what takes several torch operations, with the same
 * IEEE operations in the same order per entry (comparisons, products by 0/1 and +-1 factors), so
 * that its output is bit-identical to theirs. The sums across tasks are left to torch, except in
 * the fused TIES kernel, which repeats torch's own order of summation (see "Column sums in
 * torch's order" below; kernels.py checks it against torch before using it).
 *
 * Built at first use with the system's C compiler (see taskvec/native.py), with
 * -ffp-contract=off and no fast-math: every product and comparison is rounded as written.
 */
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(TASKVEC_NO_CLONES)
#define MULTI __attribute__((target_clones("avx2", "default")))
#else
#define MULTI
#endif

#define CHUNK 2048 /* columns per inner loop: a block of T rows of them stays in the first caches */

#define INLINE static inline __attribute__((always_inline)) /* inlined into each clone of its caller */

/* Trim columns [j0, j0 + len) of d (T rows, row stride ld) as if each task's threshold were hi[t]:
 *   tr[t, j] = d[t, j0 + j] * (|d| > hi[t])     (row stride ldt; NaN stays NaN, as in torch)
 *   above[t] += #{j : |d| > hi[t]}
 *   flag[j] |= some task has lo[t] <= |d| <= hi[t] there (its exact threshold may change it) */
INLINE void trim_chunk(const float *restrict d, int64_t ld, int64_t T, int64_t j0, int64_t len, const float *lo,
                       const float *hi, float *restrict tr, int64_t ldt, int64_t *above, int32_t *restrict flag) {
    memset(flag, 0, sizeof(int32_t) * (size_t)len);
    for (int64_t t = 0; t < T; t++) {
        const float *x = d + t * ld + j0;
        float *y = tr + t * ldt;
        const float h = hi[t], l = lo[t];
        int32_t c = 0;
        for (int64_t j = 0; j < len; j++) {
            const float a = fabsf(x[j]);
            const int32_t k = a > h;
            y[j] = x[j] * (float)k;
            c += k;
            flag[j] |= (a >= l) & (a <= h);
        }
        above[t] += c;
    }
}

/* The flagged columns of the chunk at j0: those before main_cols appended to pos (from index m)
 * with their T values in vals (row stride vstride); *tail_any set for one at or after. Returns
 * the new count. */
INLINE int64_t list_kept(const float *restrict d, int64_t ld, int64_t T, int64_t j0, int64_t len,
                         const int32_t *restrict flag, int64_t main_cols, int64_t m, int64_t *restrict pos,
                         float *restrict vals, int64_t vstride, int64_t *tail_any) {
    for (int64_t j = 0; j < len; j++) {
        if (!flag[j]) continue;
        const int64_t col = j0 + j;
        if (col >= main_cols) {
            *tail_any = 1;
            continue;
        }
        pos[m] = col;
        for (int64_t t = 0; t < T; t++) vals[t * vstride + m] = d[t * ld + col];
        m++;
    }
    return m;
}

/* TIES' election on trimmed columns tr (T rows of len, row stride ldt) given their sums mass:
 *   e[j] = mass[j] >= 0 ? 1 : -1;  agree[t, j] = (tr[t, j] * e[j] > 0)
 *   q[t, j] = (tr[t, j] * w[t]) * agree[t, j]  (row stride ldq; unit weights give tr itself)
 *   cnt[j] = max(1, sum_t agree[t, j]) */
INLINE void elect_chunk(const float *restrict tr, int64_t ldt, int64_t T, int64_t len, const float *mass,
                        const float *w, float *restrict q, int64_t ldq, float *restrict e, float *restrict cnt) {
    for (int64_t j = 0; j < len; j++) {
        e[j] = (float)(mass[j] >= 0.0f) * 2.0f - 1.0f; /* exact: 1 or -1 */
        cnt[j] = 0.0f;
    }
    for (int64_t t = 0; t < T; t++) {
        const float *x = tr + t * ldt;
        float *y = q + t * ldq;
        const float wt = w[t]; /* x * 1 is x, bit for bit: unit weights need no branch of their own */
        for (int64_t j = 0; j < len; j++) {
            const float ag = (float)(x[j] * e[j] > 0.0f);
            cnt[j] += ag;
            y[j] = (x[j] * wt) * ag;
        }
    }
    for (int64_t j = 0; j < len; j++) cnt[j] = cnt[j] < 1.0f ? 1.0f : cnt[j];
}

/* Trim a block d (T rows of n columns, row stride ld) by `trim_chunk` into tr (row stride n),
 * listing the columns to settle by `list_kept`. Returns how many were listed. */
MULTI int64_t tv_trim_block(const float *restrict d, int64_t ld, int64_t T, int64_t n, int64_t main_cols,
                            const float *lo, const float *hi, float *restrict tr, int64_t *above,
                            int64_t *restrict pos, float *restrict vals, int64_t vstride, int64_t *tail_any) {
    int32_t flag[CHUNK];
    int64_t m = 0;
    for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
        const int64_t len = n - j0 < CHUNK ? n - j0 : CHUNK;
        trim_chunk(d, ld, T, j0, len, lo, hi, tr + j0, n, above, flag);
        m = list_kept(d, ld, T, j0, len, flag, main_cols, m, pos, vals, vstride, tail_any);
    }
    return m;
}

/* `elect_chunk` over trimmed deltas tr (T rows of n, row stride ld) and their sums mass (n,), the
 * per-column sums torch computed: q (row stride n) and count (n,), so that the merged column is
 * q.sum(0) / count. */
MULTI void tv_elect(const float *restrict tr, int64_t ld, int64_t T, int64_t n, const float *mass, const float *w,
                    float *restrict q, float *restrict count) {
    float e[CHUNK];
    for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
        const int64_t len = n - j0 < CHUNK ? n - j0 : CHUNK;
        elect_chunk(tr + j0, ld, T, len, mass + j0, w, q + j0, n, e, count + j0);
    }
}

/* The order of |x| is that of the float's bit pattern with the sign cleared (a NaN above
 * infinity): selections below work on those 31-bit keys. */
static inline uint32_t abs_key(float x) {
    uint32_t k;
    memcpy(&k, &x, sizeof k);
    return k & 0x7FFFFFFFu;
}

/* select_T(v, n, r): the r-th smallest (0-based) of v[0..n) (no NaN), v reordered (Hoare's selection) */
#define DEFINE_SELECT(name, type)                             \
    static type name(type *v, int64_t n, int64_t r) {         \
        int64_t lo = 0, hi = n - 1;                           \
        while (lo < hi) {                                     \
            const type pivot = v[lo + (hi - lo) / 2];         \
            int64_t i = lo, j = hi;                           \
            while (i <= j) {                                  \
                while (v[i] < pivot) i++;                     \
                while (v[j] > pivot) j--;                     \
                if (i <= j) {                                 \
                    const type t = v[i];                      \
                    v[i] = v[j];                              \
                    v[j] = t;                                 \
                    i++;                                      \
                    j--;                                      \
                }                                             \
            }                                                 \
            if (r <= j)                                       \
                hi = j;                                       \
            else if (r >= i)                                  \
                lo = i;                                       \
            else                                              \
                return v[r];                                  \
        }                                                     \
        return v[lo];                                         \
    }
DEFINE_SELECT(select_key, uint32_t)
DEFINE_SELECT(select_float, float)
DEFINE_SELECT(select_int, int64_t)

/* The r_hi-th and r_lo-th largest |x| (1-based ranks, r_hi <= r_lo <= m) of x[0..m), into
 * out[0] and out[1]: a histogram of the keys' top 16 bits finds the bins that hold them, then a
 * selection among the entries of those bins. `work` holds m keys. Returns 0, or -1 when the
 * ranks are out of range or memory runs out. */
int64_t tv_abs_order_stats(const float *restrict x, int64_t m, int64_t r_hi, int64_t r_lo, uint32_t *restrict work,
                           float *out) {
    if (r_hi < 1 || r_lo < r_hi || r_lo > m || m > INT32_MAX) return -1;
    /* four histograms filled in turn, summed after: neighbouring entries often share a bin, and
     * one histogram would make each increment wait for the previous one */
    int32_t(*part)[1 << 15] = calloc(4, sizeof *part);
    int64_t *hist = malloc(sizeof(int64_t) << 15);
    if (!part || !hist) {
        free(part);
        free(hist);
        return -1;
    }
    int64_t i4 = 0;
    for (; i4 + 4 <= m; i4 += 4) {
        part[0][abs_key(x[i4]) >> 16]++;
        part[1][abs_key(x[i4 + 1]) >> 16]++;
        part[2][abs_key(x[i4 + 2]) >> 16]++;
        part[3][abs_key(x[i4 + 3]) >> 16]++;
    }
    for (; i4 < m; i4++) part[0][abs_key(x[i4]) >> 16]++;
    for (int64_t d = 0; d < (1 << 15); d++)
        hist[d] = (int64_t)part[0][d] + part[1][d] + part[2][d] + part[3][d];
    /* bins from the top: dh holds the r_hi-th largest (`higher` entries are in bins above it),
     * dl the r_lo-th */
    int64_t above = 0, higher = 0, dh = -1, dl = -1;
    for (int64_t d = (1 << 15) - 1; d >= 0; d--) {
        const int64_t c = hist[d];
        if (dh < 0 && above + c >= r_hi) {
            dh = d;
            higher = above;
        }
        if (above + c >= r_lo) {
            dl = d;
            break;
        }
        above += c;
    }
    int64_t k = 0;
    for (int64_t i = 0; i < m; i++) {
        const uint32_t key = abs_key(x[i]);
        const int64_t d = key >> 16;
        if (d >= dl && d <= dh) work[k++] = key;
    }
    /* ranks from the top among the candidates -> 0-based ranks from the bottom */
    free(part);
    free(hist);
    const uint32_t khi = select_key(work, k, k - (r_hi - higher));
    const uint32_t klo = select_key(work, k, k - (r_lo - higher));
    memcpy(&out[0], &khi, sizeof khi);
    memcpy(&out[1], &klo, sizeof klo);
    return 0;
}

/* The entries of x[0..m) with lo <= |x| <= hi: their |x| into cand and their positions pos[j]
 * into cpos, in order; with cand NULL, only counted. Returns how many. cand and cpos hold one
 * entry more than that (the last one is written and dropped). */
int64_t tv_candidates(const float *restrict x, int64_t m, const int64_t *restrict pos, float lo, float hi,
                      float *restrict cand, int64_t *restrict cpos) {
    int64_t k = 0;
    if (!cand) {
        for (int64_t j = 0; j < m; j++) {
            const float a = fabsf(x[j]);
            k += (a >= lo) & (a <= hi);
        }
        return k;
    }
    for (int64_t j = 0; j < m; j++) { /* written every time, kept when inside: no branch to mispredict */
        const float a = fabsf(x[j]);
        cand[k] = a;
        cpos[k] = pos[j];
        k += (a >= lo) & (a <= hi);
    }
    return k;
}

/* Keep the top r of the candidates cand[0..k) (|x| values, no NaN) at flat positions pos: the
 * threshold (the r-th largest) into *thr and the cut-off position (the need-th smallest position
 * among the entries equal to it, need = r - #entries above it) into *cut. Returns 0, or -1 when
 * r is not in [1, k] or memory runs out. */
int64_t tv_select(const float *restrict cand, const int64_t *restrict pos, int64_t k, int64_t r, float *thr,
                  int64_t *cut) {
    if (r < 1 || r > k) return -1;
    float *v = malloc(sizeof(float) * (size_t)k);
    int64_t *p = malloc(sizeof(int64_t) * (size_t)k);
    if (!v || !p) {
        free(v);
        free(p);
        return -1;
    }
    memcpy(v, cand, sizeof(float) * (size_t)k);
    const float t = select_float(v, k, k - r);
    int64_t above = 0, eq = 0;
    for (int64_t j = 0; j < k; j++) {
        above += cand[j] > t;
        if (cand[j] == t) p[eq++] = pos[j];
    }
    *thr = t;
    *cut = select_int(p, eq, r - above - 1);
    free(v);
    free(p);
    return 0;
}

/* Trim columns d (T rows of m, row stride ld) at flat positions pos by exact thresholds:
 *   out[t, j] = d[t, j] * (|d| > thr[t] || (|d| == thr[t] && pos[j] <= cut[t]))   (row stride ldo) */
MULTI void tv_exact_trim(const float *restrict d, int64_t ld, int64_t T, int64_t m, const int64_t *restrict pos,
                         const float *thr, const int64_t *cut, float *restrict out, int64_t ldo) {
    for (int64_t t = 0; t < T; t++) {
        const float *x = d + t * ld;
        float *y = out + t * ldo;
        const float h = thr[t];
        const int64_t c = cut[t];
        for (int64_t j = 0; j < m; j++) {
            const float a = fabsf(x[j]);
            const int32_t k = (a > h) | ((a == h) & (pos[j] <= c));
            y[j] = x[j] * (float)k;
        }
    }
}

/* ---- Column sums in torch's order ------------------------------------------------------------
 * torch sums a (T, n) float32 array over its first dimension (x.sum(0), on one thread) in a fixed
 * order per column: columns [0, g), g = group * (n / group), with one running sum over the rows
 * in cascaded chunks of 16 (`multi_row_sum`); the others as four interleaved partial sums of
 * rows t = 4i + k, then the leftover rows, then the partials (`row_sum`); the result is added
 * to a zero. `group` is 4 vector widths (32 floats with AVX2). The functions below repeat it so
 * that a fused kernel's sums are those of torch; `kernels.py` checks them against torch before
 * using them, and uses torch's own sums otherwise. */

#define LEVEL_STEP 16 /* rows per cascade level (torch: max(4, ceil(log2(size)) / 4) = 4 bits below 2^20 rows) */

/* sum over rows first, first + step, ... (size of them) of buf (row stride ld), columns [0, len) */
INLINE void cascade_cols(const float *restrict buf, int64_t ld, int64_t first, int64_t step, int64_t size, int64_t len,
                         float *restrict res, float *restrict a1, float *restrict a2, float *restrict a3) {
    for (int64_t j = 0; j < len; j++) res[j] = a1[j] = a2[j] = a3[j] = 0.0f;
    int64_t i = 0;
    while (i + LEVEL_STEP <= size) {
        for (int64_t r = 0; r < LEVEL_STEP; r++, i++) {
            const float *x = buf + (first + i * step) * ld;
            for (int64_t j = 0; j < len; j++) res[j] += x[j];
        }
        for (int64_t j = 0; j < len; j++) {
            a1[j] += res[j];
            res[j] = 0.0f;
        }
        if (i & (15 << 4)) continue;
        for (int64_t j = 0; j < len; j++) {
            a2[j] += a1[j];
            a1[j] = 0.0f;
        }
        if (i & (15 << 8)) continue;
        for (int64_t j = 0; j < len; j++) {
            a3[j] += a2[j];
            a2[j] = 0.0f;
        }
    }
    for (; i < size; i++) {
        const float *x = buf + (first + i * step) * ld;
        for (int64_t j = 0; j < len; j++) res[j] += x[j];
    }
    for (int64_t j = 0; j < len; j++) res[j] += a1[j];
    for (int64_t j = 0; j < len; j++) res[j] += a2[j];
    for (int64_t j = 0; j < len; j++) res[j] += a3[j];
}

/* torch's column sums of buf (T rows, row stride ld) for columns [0, len), all of one kind:
 * cascade (ilp = 0) or four interleaved partials (ilp = 1). tmp holds 6 * len floats. */
INLINE void torch_colsum(const float *restrict buf, int64_t ld, int64_t T, int64_t len, int ilp, float *restrict out,
                         float *restrict tmp) {
    float *a1 = tmp, *a2 = tmp + len, *a3 = tmp + 2 * len;
    if (!ilp) {
        cascade_cols(buf, ld, 0, 1, T, len, out, a1, a2, a3);
    } else {
        const int64_t size_ilp = T / 4;
        float *p[4] = {out, tmp + 3 * len, tmp + 4 * len, tmp + 5 * len};
        for (int k = 0; k < 4; k++) cascade_cols(buf, ld, k, 4, size_ilp, len, p[k], a1, a2, a3);
        for (int64_t t = 4 * size_ilp; t < T; t++) {
            const float *x = buf + t * ld;
            for (int64_t j = 0; j < len; j++) out[j] += x[j];
        }
        for (int k = 1; k < 4; k++)
            for (int64_t j = 0; j < len; j++) out[j] += p[k][j];
    }
    for (int64_t j = 0; j < len; j++) out[j] = 0.0f + out[j]; /* torch adds the sum to a zeroed output */
}

/* x.sum(0) of x (T rows of n, row stride ld) in torch's order for `group` (see above), n >= 16. */
int64_t tv_colsum(const float *restrict x, int64_t ld, int64_t T, int64_t n, int64_t group, float *restrict out) {
    float *tmp = malloc(sizeof(float) * 6 * (size_t)(n > 0 ? n : 1));
    if (!tmp) return -1;
    const int64_t g = group * (n / group);
    torch_colsum(x, ld, T, g, 0, out, tmp);
    torch_colsum(x + g, ld, T, n - g, 1, out + g, tmp);
    free(tmp);
    return 0;
}

#define FCH 256 /* columns per chunk of the fused TIES kernel */

/* TIES on block d (T rows of n >= 16 columns, row stride ld), as if each task's threshold were
 * hi[t], in one pass: what `tv_trim_block` computes (above, pos, vals, tail_any; the return
 * value), and the merged block into out (n,):
 *   tr = d * (|d| > hi);  mass = sum_t tr (by_count: sum_t sign(tr));  e = mass >= 0 ? 1 : -1
 *   agree = tr * e > 0;   out = sum_t (tr * w) * agree / max(1, sum_t agree)
 * with every sum in torch's order for `group` (see `tv_colsum`): bit-identical to the torch
 * operations of `elect_and_merge` on `trim_block`'s output. Returns -1 when out of memory. */
MULTI int64_t tv_ties_block(const float *restrict d, int64_t ld, int64_t T, int64_t n, int64_t main_cols,
                            const float *lo, const float *hi, int64_t group, const float *w, int64_t by_count,
                            float *restrict out, int64_t *above, int64_t *restrict pos, float *restrict vals,
                            int64_t vstride, int64_t *tail_any) {
    float *scratch = malloc(sizeof(float) * ((size_t)(2 * T + 10) * FCH));
    if (!scratch) return -1;
    float *tr = scratch, *q = tr + T * FCH, *mass = q + T * FCH, *e = mass + FCH, *cnt = e + FCH, *tmp = cnt + FCH;
    int32_t flag[FCH];
    int64_t m = 0;
    const int64_t g = group * (n / group);
    for (int ilp = 0; ilp < 2; ilp++) {
        const int64_t start = ilp ? g : 0, end = ilp ? n : g;
        for (int64_t j0 = start; j0 < end; j0 += FCH) {
            const int64_t len = end - j0 < FCH ? end - j0 : FCH;
            trim_chunk(d, ld, T, j0, len, lo, hi, tr, FCH, above, flag);
            m = list_kept(d, ld, T, j0, len, flag, main_cols, m, pos, vals, vstride, tail_any);
            if (by_count) {
                for (int64_t t = 0; t < T; t++) {
                    const float *x = tr + t * FCH;
                    float *y = q + t * FCH;
                    for (int64_t j = 0; j < len; j++) y[j] = (float)(x[j] > 0.0f) - (float)(x[j] < 0.0f);
                }
                torch_colsum(q, FCH, T, len, ilp, mass, tmp);
            } else {
                torch_colsum(tr, FCH, T, len, ilp, mass, tmp);
            }
            elect_chunk(tr, FCH, T, len, mass, w, q, FCH, e, cnt);
            torch_colsum(q, FCH, T, len, ilp, mass, tmp); /* the total, in mass's buffer */
            float *o = out + j0;
            for (int64_t j = 0; j < len; j++) o[j] = mass[j] / cnt[j];
        }
    }
    free(scratch);
    return m;
}
