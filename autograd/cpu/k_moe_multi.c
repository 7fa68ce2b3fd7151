// autograd/cpu/k_moe_multi.c: routed experts over a batch of mixed adapters (contract in
// k_moe_multi.h). The routing slots are counting-sorted by (expert, adapter), so each
// expert's rows come in runs of one adapter. Experts are spread over the OpenMP team, one
// expert per thread with single-threaded products; per block of an expert's rows:
//   G = X W_gu[e]^T (base, all rows)       then per adapter run: G += s ((X A_gu,e^T) B_gu,e^T)
//   Z = w * silu(gate) * up                (the routing weight folded in, as k_moe.c does)
//   O = Z W_d[e]^T  (base, all rows)       then per adapter run: O += s ((Z A_d,e^T) B_d,e^T)
// and O's rows land in a per-slot buffer; each token then sums its k rows in j order.
// B_e's columns are strided by E inside B, so each (adapter, expert) pair's B_e is packed into
// a contiguous (out, r) matrix first.
#include "real.h"
#include "k_quant.h"
#include "k_bi.h"
#include "k_moe_lora.h"
#include "k_moe_multi.h"
#if MOLT_REAL == 32
#include "k_bx.h"
#endif

#include <omp.h>
#include <string.h>

#define ROWS 256

static real sigmoid(real v) { return 1 / (1 + R_EXP(-v)); }

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

static int64_t max_rank(const K(moe_lora) *set, int n) {
    int64_t r = 1;
    for (int s = 0; s < n; s++)
        if ((set[s].a_gu || set[s].a_d) && set[s].r > r)
            r = set[s].r;
    return r;
}

// Per-thread buffers (reals): X (ROWS, H), G (ROWS, 2I), O (ROWS, H), U (ROWS, r),
// D (ROWS, max(2I, H)), Bp (max(2I, H), r).
static int64_t thread_reals(int64_t H, int64_t I, int64_t r) {
    int64_t wide = max64(2 * I, H);
    return ROWS * (H + 2 * I + H + r + wide) + wide * r;
}

// Bytes of one thread's decode scratch: bi_linear_q's, then (f32) bxq_linear's.
static size_t bi_bytes(const K(moe_stacks) *st) {
    size_t a = K(bi_linear_q_ws_bytes)(st->qgu, ROWS, 1);
    size_t b = K(bi_linear_q_ws_bytes)(st->qd, ROWS, 1);
    return ((a > b ? a : b) + 63) / 64 * 64;
}

static size_t qws_bytes(const K(moe_stacks) *st) {
    if (!st->qgu)
        return 0;
    size_t n = bi_bytes(st) + 64;
#if MOLT_REAL == 32
    size_t a = bxq_ws_bytes(st->qgu, ROWS, 1), b = bxq_ws_bytes(st->qd, ROWS, 1);
    n += ((a > b ? a : b) + 63) / 64 * 64;
#endif
    return n;
}

size_t K(moe_multi_ws_bytes)(const K(moe_stacks) *st, const K(moe_lora) *set, int n,
                             int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                             int nthreads) {
    int team = nthreads < 1 ? 1 : nthreads;
    int64_t keys = 2 * E * (n + 1);
    size_t b = (size_t)(keys + 1) * sizeof(int64_t) * 2   // off, cur
               + (size_t)(T * k) * sizeof(int32_t) * 3    // key, perm, inv
               + (size_t)(T * k * H) * sizeof(real)       // per-slot output rows
               + (size_t)team * (size_t)thread_reals(H, I, max_rank(set, n)) * sizeof(real)
               + (size_t)team * qws_bytes(st) + 256;
    return b;
}

// The adapter key of a token: its slot when that adapter has expert LoRA here, else -1.
static int32_t adapter_of(const int32_t *slot, int64_t t, const K(moe_lora) *set, int n) {
    int32_t s = slot[t];
    return s >= 0 && s < n && (set[s].a_gu || set[s].a_d) ? s : -1;
}

void K(moe_lora_b_expert)(real *bp, const real *b, int64_t out, int64_t r, int64_t E,
                          int64_t e) {
    for (int64_t o = 0; o < out; o++)
        for (int64_t q = 0; q < r; q++)
            bp[o * r + q] = b[o * r * E + q * E + e];
}

// y (m, out) = x (m, in) . W_e^T for expert e of a dense or quantized stack; rows [nf, m) of
// a quantized one through bxq_linear (f32; qws: bi_linear_q's scratch, then bxq_linear's).
static void expert_prod(real *y, const real *x, int64_t m, int64_t nf, const real *dense,
                        const kq_weight *q, int64_t e, int64_t out, int64_t in, void *qws,
                        size_t bi_off) {
    if (!q) {
        K(bi_linear)(y, x, dense + e * out * in, m, out, in, 1);
        return;
    }
#if MOLT_REAL == 32
    if (nf < m) {
        if (nf > 0)
            K(bi_linear_q)(y, x, q, e, nf, 1, qws);
        bxq_linear_any(y + nf * out, x + nf * in, q, e, m - nf, 1, (char *)qws + bi_off);
        return;
    }
#else
    (void)nf, (void)bi_off;
#endif
    K(bi_linear_q)(y, x, q, e, m, 1, qws);
}

// G (m, out) += s * ((X A_e^T) B_e^T) for the rows of one adapter, A_e = rows e*r.. of a;
// B_e from bp (E, out, r) when the adapter has it re-laid, else gathered from b into Bp.
// bws (f32): the rows are marked, and the product with B_e (read as an F32 matrix) goes
// through bxq_linear_any with that scratch; X A_e^T stays F32 (as fast there as splitting X).
static void lora_add(real *G, int64_t ldg, const real *X, int64_t m, int64_t in, int64_t out,
                     const real *a, const real *b, const real *bp, int64_t r, real s, int64_t E,
                     int64_t e, real *U, real *D, real *Bp, void *bws) {
    K(bi_linear)(U, X, a + e * r * in, m, r, in, 1);
    const real *be = bp ? bp + e * out * r : Bp;
    if (!bp)
        K(moe_lora_b_expert)(Bp, b, out, r, E, e);
#if MOLT_REAL == 32
    if (bws) {
        kq_weight vb = {.format = KQ_F32, .n_mat = 1, .rows = out, .cols = r, .data = be};
        bxq_linear_any(D, U, &vb, 0, m, 1, bws);
    } else
#else
    (void)bws;
#endif
        K(bi_linear)(D, U, be, m, out, r, 1);
    for (int64_t i = 0; i < m; i++)
        for (int64_t o = 0; o < out; o++)
            G[i * ldg + o] += D[i * out + o] * s;
}

// lora_add over rows [i0, i1) of a block whose rows from nf on are marked for bxq_linear.
static void lora_add_rows(real *G, int64_t ldg, const real *X, int64_t i0, int64_t i1,
                          int64_t nf, int64_t in, int64_t out, const real *a, const real *b,
                          const real *bp, int64_t r, real s, int64_t E, int64_t e, real *U,
                          real *D, real *Bp, void *bws) {
    int64_t mid = nf < i0 ? i0 : nf > i1 ? i1 : nf;
    if (mid > i0)
        lora_add(G + i0 * ldg, ldg, X + i0 * in, mid - i0, in, out, a, b, bp, r, s, E, e, U, D,
                 Bp, NULL);
    if (i1 > mid)
        lora_add(G + mid * ldg, ldg, X + mid * in, i1 - mid, in, out, a, b, bp, r, s, E, e, U,
                 D, Bp, bws);
}

typedef struct {
    int64_t *off;       // (keys + 1) first sorted position of each (expert, adapter) key
    int32_t *perm;      // (T*k) slot at each sorted position
    int32_t *inv;       // (T*k) sorted position of each slot
    real *rows;         // (T*k, H) output row of each sorted position
    real *tbuf;         // (team, thread_reals) per-thread buffers
    unsigned char *qws; // (team, qws_bytes) per-thread decode scratch
} multi_ws;

static void expert_block(const multi_ws *m, int64_t p0, int64_t nb, int64_t nf, int64_t e,
                         const real *x, const real *w, const int32_t *slot,
                         const K(moe_stacks) *st, const K(moe_lora) *set, int n, int64_t k,
                         int64_t E, int64_t H, int64_t I, real *tb, void *qws) {
    int64_t I2 = 2 * I, r = max_rank(set, n), wide = max64(I2, H);
    real *X = tb, *G = X + ROWS * H, *O = G + ROWS * I2, *U = O + ROWS * H, *D = U + ROWS * r,
         *Bp = D + ROWS * wide;
    for (int64_t i = 0; i < nb; i++)
        memcpy(X + i * H, x + (m->perm[p0 + i] / k) * H, (size_t)H * sizeof(real));
    size_t bo = st->qgu ? bi_bytes(st) : 0;
    void *bws = qws ? (char *)qws + bo : NULL; // bxq_linear's (marked rows: quantized only)
    expert_prod(G, X, nb, nf, st->gu, st->qgu, e, I2, H, qws, bo);
    // runs of one adapter inside the block (the sort put them together)
    for (int64_t i0 = 0; i0 < nb;) {
        int32_t a = adapter_of(slot, m->perm[p0 + i0] / k, set, n);
        int64_t i1 = i0 + 1;
        while (i1 < nb && adapter_of(slot, m->perm[p0 + i1] / k, set, n) == a)
            i1++;
        if (a >= 0 && set[a].a_gu)
            lora_add_rows(G, I2, X, i0, i1, nf, H, I2, set[a].a_gu, set[a].b_gu, set[a].bp_gu,
                          set[a].r, set[a].s, E, e, U, D, Bp, bws);
        i0 = i1;
    }
    for (int64_t i = 0; i < nb; i++) { // Z into X's room (X is no longer needed)
        real wt = w[m->perm[p0 + i]];
        for (int64_t j = 0; j < I; j++) {
            real g = G[i * I2 + j];
            X[i * I + j] = wt * g * sigmoid(g) * G[i * I2 + I + j];
        }
    }
    expert_prod(O, X, nb, nf, st->down, st->qd, e, H, I, qws, bo);
    for (int64_t i0 = 0; i0 < nb;) {
        int32_t a = adapter_of(slot, m->perm[p0 + i0] / k, set, n);
        int64_t i1 = i0 + 1;
        while (i1 < nb && adapter_of(slot, m->perm[p0 + i1] / k, set, n) == a)
            i1++;
        if (a >= 0 && set[a].a_d)
            lora_add_rows(O, H, X, i0, i1, nf, I, H, set[a].a_d, set[a].b_d, set[a].bp_d,
                          set[a].r, set[a].s, E, e, U, D, Bp, bws);
        i0 = i1;
    }
    memcpy(m->rows + p0 * H, O, (size_t)(nb * H) * sizeof(real));
}

void K(moe_multi_fwd)(real *y, const real *x, const real *w, const int32_t *idx,
                      const int32_t *slot, const uint8_t *bx, const K(moe_stacks) *st,
                      const K(moe_lora) *set, int n, int64_t T, int64_t k, int64_t E, int64_t H,
                      int64_t I, int nthreads, void *ws) {
    int team = nthreads < 1 ? 1 : nthreads;
    // keys: (expert, kind, adapter); kind 1 = a row for bxq_linear, sorted after kind 0
    int64_t A = n + 1, keys = 2 * E * A, S = T * k;
    multi_ws m;
    m.off = ws;
    int64_t *cur = m.off + keys + 1;
    int32_t *key = (int32_t *)(cur + keys + 1);
    m.perm = key + S;
    m.inv = m.perm + S;
    m.rows = (real *)(((uintptr_t)(m.inv + S) + 63) & ~(uintptr_t)63);
    m.tbuf = m.rows + S * H;
    int64_t per = thread_reals(H, I, max_rank(set, n));
    m.qws = (unsigned char *)(((uintptr_t)(m.tbuf + team * per) + 63) & ~(uintptr_t)63);
    size_t qper = qws_bytes(st);
    for (int64_t s = 0; s < S; s++) {
        int kind = bx && st->qgu && bx[s / k] != 0;
        key[s] = (int32_t)((idx[s] * 2 + kind) * A + adapter_of(slot, s / k, set, n) + 1);
    }
    memset(m.off, 0, (size_t)(keys + 1) * sizeof(int64_t));
    for (int64_t s = 0; s < S; s++)
        m.off[key[s] + 1]++;
    for (int64_t q = 0; q < keys; q++) {
        m.off[q + 1] += m.off[q];
        cur[q] = m.off[q];
    }
    for (int64_t s = 0; s < S; s++) {
        int64_t p = cur[key[s]]++;
        m.perm[p] = (int32_t)s;
        m.inv[s] = (int32_t)p;
    }
    int busy = 0;
    for (int64_t e = 0; e < E; e++)
        busy += m.off[(e + 1) * 2 * A] > m.off[e * 2 * A];
    int nt = busy < team ? (busy > 0 ? busy : 1) : team;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t e = 0; e < E; e++) {
        int th = omp_get_thread_num();
        real *tb = m.tbuf + th * per;
        void *qws = m.qws + (size_t)th * qper;
        int64_t lo = m.off[e * 2 * A], mid = m.off[e * 2 * A + A], hi = m.off[(e + 1) * 2 * A];
        for (int64_t p0 = lo; p0 < hi; p0 += ROWS) {
            int64_t nb = hi - p0 < ROWS ? hi - p0 : ROWS;
            int64_t nf = mid - p0 < 0 ? 0 : mid - p0 > nb ? nb : mid - p0;
            expert_block(&m, p0, nb, nf, e, x, w, slot, st, set, n, k, E, H, I, tb, qws);
        }
    }
    for (int64_t t = 0; t < T; t++) {
        real *yt = y + t * H;
        memset(yt, 0, (size_t)H * sizeof(real));
        for (int64_t j = 0; j < k; j++) {
            const real *o = m.rows + (int64_t)m.inv[t * k + j] * H;
            for (int64_t h = 0; h < H; h++)
                yt[h] += o[h];
        }
    }
}
