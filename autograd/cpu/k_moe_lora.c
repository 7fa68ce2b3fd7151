// autograd/cpu/k_moe_lora.c: routed-expert kernels with LoRA on the 3D expert weights:
// reference helpers that materialize the merged weights (the ground truth, used with the
// reference expert kernels of k_moe.c) and the optimized path that applies each expert's
// adapter as two thin GEMMs per block of rows, over dense or quantized expert stacks. Not
// here: operand checks, kernel choice and the reference composition (ops_moe_lora.c), the
// frozen-expert kernels (k_moe.c), decoding quantized weights (k_quant.c).
#include "real.h"
#include "k_moe.h"
#include "k_quant.h"
#include "k_moe_lora.h"

#include "k_blas.h"
// OpenBLAS's cblas.h includes complex.h; its `I` would clash with the intermediate size.
#undef I
#include <omp.h>
#include <string.h>


static real sigmoid(real v) { return 1 / (1 + R_EXP(-v)); }

// Element (o, k) of B_e, expert e's [O, r] factor inside B [O, r*E].
#define B_AT(b, o, k, e, r, E) ((b)[(o) * (r) * (E) + (k) * (E) + (e)])

// ---- reference -------------------------------------------------------------------------

void K(moe_lora_merge)(real *w_eff, const real *w, const real *a, const real *b, int64_t E,
                       int64_t O, int64_t In, int64_t r, real s) {
    memcpy(w_eff, w, (size_t)(E * O * In) * sizeof(real));
    if (!a)
        return;
    for (int64_t e = 0; e < E; e++)
        for (int64_t o = 0; o < O; o++)
            for (int64_t kk = 0; kk < r; kk++) {
                real bv = s * B_AT(b, o, kk, e, r, E);
                const real *arow = a + (e * r + kk) * In;
                real *wrow = w_eff + (e * O + o) * In;
                for (int64_t i = 0; i < In; i++)
                    wrow[i] += bv * arow[i];
            }
}

void K(moe_experts_dweight_ref)(real *dw_gu, real *dw_d, const real *dy, const real *x,
                                const real *w, const int32_t *idx, const real *wgu,
                                const real *wd, int64_t T, int64_t k, int64_t H, int64_t I) {
    for (int64_t t = 0; t < T; t++) {
        const real *xt = x + t * H, *dyt = dy + t * H;
        for (int64_t j = 0; j < k; j++) {
            int64_t e = idx[t * k + j];
            const real *gate = wgu + e * 2 * I * H, *up = gate + I * H, *down = wd + e * H * I;
            real *dgate = dw_gu + e * 2 * I * H, *dup = dgate + I * H, *ddown = dw_d + e * H * I;
            real wt = w[t * k + j];
            for (int64_t i = 0; i < I; i++) {
                real g = 0, u = 0, q = 0;
                for (int64_t h = 0; h < H; h++) {
                    g += gate[i * H + h] * xt[h];
                    u += up[i * H + h] * xt[h];
                    q += down[h * I + i] * dyt[h];
                }
                real sg = sigmoid(g), act = g * sg, z = wt * act * u;
                real dg = wt * q * u * sg * (1 + g * (1 - sg)), du = wt * q * act;
                for (int64_t h = 0; h < H; h++) {
                    ddown[h * I + i] += dyt[h] * z;
                    dgate[i * H + h] += dg * xt[h];
                    dup[i * H + h] += du * xt[h];
                }
            }
        }
    }
}

void K(moe_lora_grad_from_dense)(real *da, real *db, const real *dw, const real *a,
                                 const real *b, int64_t E, int64_t O, int64_t In, int64_t r,
                                 real s) {
    for (int64_t e = 0; e < E; e++)
        for (int64_t kk = 0; kk < r; kk++) {
            const real *arow = a + (e * r + kk) * In;
            for (int64_t o = 0; o < O; o++) {
                const real *dwrow = dw + (e * O + o) * In;
                real bv = B_AT(b, o, kk, e, r, E), acc = 0;
                for (int64_t i = 0; i < In; i++) {
                    acc += dwrow[i] * arow[i];
                    if (da)
                        da[(e * r + kk) * In + i] += s * bv * dwrow[i];
                }
                if (db)
                    B_AT(db, o, kk, e, r, E) += s * acc;
            }
        }
}

// ---- optimized -----------------------------------------------------------------------------
// Slots are counting-sorted by expert and each expert's rows run as blocks of up to ROWS rows
// through its GEMMs. The adapter adds, per block, U = X A_e^T (nb x r) and G += s U B_e^T.
// B_e's columns are strided by E inside B, which BLAS cannot address, so both B matrices are
// first repacked per expert into contiguous [E][O][r] stacks (and their gradients
// accumulated in that layout, then added back). Experts are spread over an OpenMP team, one
// expert per thread at a time with single-threaded GEMMs (an expert's GEMMs are too small to
// split well): each slot's output row goes to its own row of a (T*k, H) buffer in sorted
// order, and the tokens' rows are summed from it afterwards, so no two threads write the
// same memory. Small problems (or one busy expert) run the experts in order with threaded
// GEMMs instead. Quantized stacks differ only in where an expert's dense weights come from:
// a busy expert's two matrices are decoded once into its thread's buffer and the same GEMMs
// run on them (an expert with no rows is never decoded).

#define ROWS 256

typedef struct {
    int64_t *off;  // (E + 1) first sorted position of each expert
    int64_t *cur;  // (E) fill cursor while sorting
    int32_t *perm; // (T*k) slot t*k + j at each sorted position
    int32_t *inv;  // (T*k) sorted position of each slot
    real *bgu;     // (E, 2I, r) B_gu repacked, then (E, 2I, r) its gradient
    real *bd;      // (E, H, r) B_d repacked, then (E, H, r) its gradient
    real *rows;    // (T*k, H) per-slot output rows (y in forward, dx in backward), sorted
    real *buf;     // (team, ROWS * (3H + 4I + 4r)) block buffers, one set per thread
    real *dec;     // (team, 3IH) decoded expert weights per thread; quantized stacks only
    int team;      // threads the buffers were sized for
} lora_ws;

// Where the expert weights come from: dense stacks (gu, d) or quantized ones (qgu, qd).
typedef struct {
    const real *gu, *d;       // (E, 2I, H), (E, H, I) or NULL
    const kq_weight *qgu, *qd; // the same stacks quantized, or NULL
} wsrc;

static size_t round64(size_t b) { return (b + 63) & ~(size_t)63; }

static void *carve(unsigned char **p, size_t bytes) {
    void *r = *p;
    *p += round64(bytes);
    return r;
}

static size_t packed_reals(int64_t E, int64_t O, int64_t r) { return (size_t)(2 * E * O * r); }
static size_t buf_reals(int64_t H, int64_t I, int64_t r) {
    return (size_t)(ROWS * (3 * H + 4 * I + 4 * r));
}
static size_t dec_reals(int64_t H, int64_t I) { return (size_t)(3 * I * H); }

// Threads the buffers are sized for: the OpenMP team the caller would get.
static int ws_team(void) { return omp_get_max_threads(); }

// Lays the workspace out (sizes only when base is NULL); returns the bytes it spans. The
// decode buffers take no room unless `quant`.
static size_t ws_carve(lora_ws *w, void *base, int64_t T, int64_t k, int64_t E, int64_t H,
                       int64_t I, int64_t r, int quant) {
    unsigned char *p = base, *p0 = base;
    w->team = ws_team();
    w->off = carve(&p, (size_t)(E + 1) * sizeof(int64_t));
    w->cur = carve(&p, (size_t)E * sizeof(int64_t));
    w->perm = carve(&p, (size_t)(T * k) * sizeof(int32_t));
    w->inv = carve(&p, (size_t)(T * k) * sizeof(int32_t));
    w->bgu = carve(&p, packed_reals(E, 2 * I, r) * sizeof(real));
    w->bd = carve(&p, packed_reals(E, H, r) * sizeof(real));
    w->rows = carve(&p, (size_t)(T * k * H) * sizeof(real));
    w->buf = carve(&p, (size_t)w->team * buf_reals(H, I, r) * sizeof(real));
    w->dec = quant ? carve(&p, (size_t)w->team * dec_reals(H, I) * sizeof(real)) : NULL;
    return (size_t)(p - p0);
}

static lora_ws ws_layout(void *base, int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                         int64_t r, int quant) {
    lora_ws w;
    ws_carve(&w, base, T, k, E, H, I, r, quant);
    return w;
}

size_t K(moe_experts_lora_ws_bytes)(int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                                    int64_t r) {
    lora_ws w;
    return ws_carve(&w, NULL, T, k, E, H, I, r, 0);
}

size_t K(moe_experts_lora_q_ws_bytes)(int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                                      int64_t r) {
    lora_ws w;
    return ws_carve(&w, NULL, T, k, E, H, I, r, 1);
}

// Stable counting sort of the slots by expert, and its inverse.
static void dispatch(lora_ws *w, const int32_t *idx, int64_t n, int64_t E) {
    K(moe_dispatch)(w->off, w->cur, w->perm, idx, n, E);
    for (int64_t q = 0; q < n; q++)
        w->inv[w->perm[q]] = (int32_t)q;
}

// Threads for the expert loop: 1 (experts in order, threaded GEMMs) below about 4 Mflop or
// with fewer than two busy experts per thread, else the whole team (blas_team_loop).
static int expert_team(const lora_ws *w, int64_t E, int64_t n_slots, int64_t H, int64_t I) {
    int busy = 0;
    for (int64_t e = 0; e < E; e++)
        busy += w->off[e + 1] > w->off[e];
    double flops = 6.0 * (double)n_slots * (double)H * (double)I;
    return flops < 4e6 || busy < 2 * w->team ? 1 : w->team;
}

// dst (T, H) (+)= the k sorted rows of each token: rows[inv[t*k + j]].
static void gather_tokens(real *dst, const lora_ws *w, int64_t T, int64_t k, int64_t H,
                          int accumulate) {
#pragma omp parallel for schedule(static) if (T * k * H >= 65536)
    for (int64_t t = 0; t < T; t++) {
        real *d = dst + t * H;
        if (!accumulate)
            memset(d, 0, (size_t)H * sizeof(real));
        for (int64_t j = 0; j < k; j++) {
            const real *src = w->rows + (int64_t)w->inv[t * k + j] * H;
            for (int64_t h = 0; h < H; h++)
                d[h] += src[h];
        }
    }
}

// packed (E, O, r) <- B (O, r*E)
static void pack_b(real *packed, const real *b, int64_t E, int64_t O, int64_t r) {
    for (int64_t o = 0; o < O; o++)
        for (int64_t kk = 0; kk < r; kk++)
            for (int64_t e = 0; e < E; e++)
                packed[(e * O + o) * r + kk] = B_AT(b, o, kk, e, r, E);
}

// dB (O, r*E) += packed (E, O, r)
static void unpack_add_b(real *db, const real *packed, int64_t E, int64_t O, int64_t r) {
    for (int64_t o = 0; o < O; o++)
        for (int64_t kk = 0; kk < r; kk++)
            for (int64_t e = 0; e < E; e++)
                B_AT(db, o, kk, e, r, E) += packed[(e * O + o) * r + kk];
}

// C (m, n) = beta C + alpha op(A) op(B), row-major, op = transpose when ta/tb.
static void gemm(int ta, int tb, int64_t m, int64_t n, int64_t kd, real alpha, const real *a,
                 int64_t lda, const real *b, int64_t ldb, real beta, real *c, int64_t ldc) {
    R_GEMM(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
           (int)m, (int)n, (int)kd, alpha, a, (int)lda, b, (int)ldb, beta, c, (int)ldc);
}

// Z (nb, I) <- weight * silu(gate) * up from the pre-activations G (nb, 2I).
static void swiglu_rows(real *Z, const real *G, const real *w, const int32_t *perm, int64_t nb,
                        int64_t I) {
    for (int64_t rr = 0; rr < nb; rr++) {
        real wt = w[perm[rr]];
        const real *g = G + rr * 2 * I;
        for (int64_t i = 0; i < I; i++)
            Z[rr * I + i] = wt * g[i] * sigmoid(g[i]) * g[I + i];
    }
}

// G (nb, 2I) <- d pre-activations in place, given Q = dL/dZ; dw += q . silu(gate) * up.
static void swiglu_back_rows(real *G, const real *Q, real *dw, const real *w,
                             const int32_t *perm, int64_t nb, int64_t I) {
    for (int64_t rr = 0; rr < nb; rr++) {
        real wt = w[perm[rr]], dws = 0, *g = G + rr * 2 * I;
        for (int64_t i = 0; i < I; i++) {
            real gv = g[i], u = g[I + i], q = Q[rr * I + i], sg = sigmoid(gv), act = gv * sg;
            dws += q * act * u;
            g[i] = wt * q * u * sg * (1 + gv * (1 - sg));
            g[I + i] = wt * q * act;
        }
        if (dw)
            dw[perm[rr]] += dws;
    }
}

// One expert's block: sizes and the expert's slices of every operand.
typedef struct {
    int64_t nb, H, I, r;
    real s;
    const real *wgu, *wd;   // (2I, H), (H, I)
    const real *agu, *ad;   // (r, H), (r, I) or NULL without that LoRA
    const real *bgu, *bd;   // packed (2I, r), (H, r)
} blk;

// Expert e's dense weights (2I, H) and (H, I): pointers into dense stacks, or its quantized
// matrices decoded into dec (3IH reals, the calling thread's own).
static void expert_weights(const wsrc *src, real *dec, int64_t e, int64_t H, int64_t I,
                           const real **gu, const real **d) {
    if (!src->qgu) {
        *gu = src->gu + e * 2 * I * H;
        *d = src->d + e * H * I;
        return;
    }
    K(kq_dequant_range)(dec, src->qgu, e * 2 * I * H, 2 * I * H);
    K(kq_dequant_range)(dec + 2 * I * H, src->qd, e * H * I, H * I);
    *gu = dec;
    *d = dec + 2 * I * H;
}

// egu (2I, H) and ed (H, I) are expert e's own weights (see expert_weights).
static blk block_of(const lora_ws *m, const K(moe_lora) *l, const real *egu, const real *ed,
                    int64_t e, int64_t nb, int64_t H, int64_t I) {
    int64_t r = l->r;
    blk b = {nb, H, I, r, l->s, egu, ed, NULL, NULL, m->bgu + e * 2 * I * r, m->bd + e * H * r};
    if (l->a_gu)
        b.agu = l->a_gu + e * r * H;
    if (l->a_d)
        b.ad = l->a_d + e * r * I;
    return b;
}

// G (nb, 2I) = X W_gu^T + s (X A^T) B^T, keeping U = X A^T (nb, r).
static void gate_up_rows(real *G, real *U, const real *X, const blk *b) {
    int64_t I2 = 2 * b->I;
    gemm(0, 1, b->nb, I2, b->H, 1, X, b->H, b->wgu, b->H, 0, G, I2);
    if (!b->agu)
        return;
    gemm(0, 1, b->nb, b->r, b->H, 1, X, b->H, b->agu, b->H, 0, U, b->r);
    gemm(0, 1, b->nb, I2, b->r, b->s, U, b->r, b->bgu, b->r, 1, G, I2);
}

// One expert's forward: its slots' output rows into m->rows (sorted positions).
static void expert_fwd(const lora_ws *m, real *buf, real *dec, const real *x, const real *w,
                       const wsrc *src, const K(moe_lora) *lora, int64_t e, int64_t k,
                       int64_t H, int64_t I) {
    if (m->off[e + 1] == m->off[e])
        return;
    int64_t r = lora->r;
    real *X = buf, *G = X + ROWS * H, *Z = G + ROWS * 2 * I, *U = Z + ROWS * I;
    real *V = U + ROWS * r;
    const real *egu, *ed;
    expert_weights(src, dec, e, H, I, &egu, &ed);
    for (int64_t r0 = m->off[e]; r0 < m->off[e + 1]; r0 += ROWS) {
        int64_t nb = m->off[e + 1] - r0 < ROWS ? m->off[e + 1] - r0 : ROWS;
        blk b = block_of(m, lora, egu, ed, e, nb, H, I);
        real *O = m->rows + r0 * H;
        K(moe_gather)(X, x, m->perm + r0, nb, k, H);
        gate_up_rows(G, U, X, &b);
        swiglu_rows(Z, G, w, m->perm + r0, nb, I);
        gemm(0, 1, nb, H, I, 1, Z, I, b.wd, I, 0, O, H);
        if (b.ad) {
            gemm(0, 1, nb, r, I, 1, Z, I, b.ad, I, 0, V, r);
            gemm(0, 1, nb, H, r, b.s, V, r, b.bd, r, 1, O, H);
        }
    }
}

// The expert loop's operands (blas_team_loop's ctx); the backward's fields are unused by the
// forward.
typedef struct {
    const lora_ws *m;
    const real *x, *w;
    const wsrc *src;
    const K(moe_lora) *lora;
    int64_t k, H, I;
    real *dw, *dbgu, *dbd;
    const K(moe_lora_grad) *g;
    const real *dy;
    int want_dx;
} expert_job;

// Thread tid's buffers in the workspace (buf_reals and dec_reals of them each).
static real *thread_buf(const expert_job *j, int tid) {
    return j->m->buf + (size_t)tid * buf_reals(j->H, j->I, j->lora->r);
}
static real *thread_dec(const expert_job *j, int tid) {
    return j->m->dec ? j->m->dec + (size_t)tid * dec_reals(j->H, j->I) : NULL;
}

static void expert_fwd_body(void *ctx, int64_t e, int tid) {
    const expert_job *j = ctx;
    expert_fwd(j->m, thread_buf(j, tid), thread_dec(j, tid), j->x, j->w, j->src, j->lora, e,
               j->k, j->H, j->I);
}

static void lora_fwd(real *y, const real *x, const real *w, const int32_t *idx,
                     const wsrc *src, const K(moe_lora) *lora, int64_t T, int64_t k, int64_t E,
                     int64_t H, int64_t I, void *ws) {
    int64_t r = lora->r;
    lora_ws m = ws_layout(ws, T, k, E, H, I, r, src->qgu != NULL);
    dispatch(&m, idx, T * k, E);
    if (lora->a_gu)
        pack_b(m.bgu, lora->b_gu, E, 2 * I, r);
    if (lora->a_d)
        pack_b(m.bd, lora->b_d, E, H, r);
    expert_job j = {.m = &m, .x = x, .w = w, .src = src, .lora = lora, .k = k, .H = H, .I = I};
    blas_team_loop(expert_team(&m, E, T * k, H, I), E, expert_fwd_body, &j);
    gather_tokens(y, &m, T, k, H, 0);
}

void K(moe_experts_lora_fwd)(real *y, const real *x, const real *w, const int32_t *idx,
                             const real *wgu, const real *wd, const K(moe_lora) *lora,
                             int64_t T, int64_t k, int64_t E, int64_t H, int64_t I, void *ws) {
    wsrc src = {wgu, wd, NULL, NULL};
    lora_fwd(y, x, w, idx, &src, lora, T, k, E, H, I, ws);
}

void K(moe_experts_lora_q_fwd)(real *y, const real *x, const real *w, const int32_t *idx,
                               const kq_weight *gu, const kq_weight *down,
                               const K(moe_lora) *lora, int64_t T, int64_t k, int64_t E,
                               int64_t H, int64_t I, void *ws) {
    wsrc src = {NULL, NULL, gu, down};
    lora_fwd(y, x, w, idx, &src, lora, T, k, E, H, I, ws);
}

// Q (nb, I) = dL/dZ = DY W_d + s (DY B_d) A_d, and the down LoRA gradients:
// dB_d += s DY^T (Z A_d^T), dA_d += s (DY B_d)^T Z. P (nb, r) and V (nb, r) are scratch.
static void down_back(real *Q, real *P, real *V, real *dbd, real *dad, const real *DY,
                      const real *Z, const blk *b) {
    int64_t nb = b->nb, H = b->H, I = b->I, r = b->r;
    gemm(0, 0, nb, I, H, 1, DY, H, b->wd, I, 0, Q, I);
    if (!b->ad)
        return;
    gemm(0, 0, nb, r, H, 1, DY, H, b->bd, r, 0, P, r);
    if (dbd) {
        gemm(0, 1, nb, r, I, 1, Z, I, b->ad, I, 0, V, r);
        gemm(1, 0, H, r, nb, b->s, DY, H, V, r, 1, dbd, r);
    }
    if (dad)
        gemm(1, 0, r, I, nb, b->s, P, r, Z, I, 1, dad, I);
    gemm(0, 0, nb, I, r, b->s, P, r, b->ad, I, 1, Q, I);
}

// From DH = dL/dG (nb, 2I): the gate/up LoRA gradients dB_gu += s DH^T U,
// dA_gu += s (DH B_gu)^T X, and DX (nb, H) = DH W_gu + s (DH B_gu) A_gu when DX is given.
// Returns whether DX was written.
static int gate_up_back(real *DX, real *P, real *dbgu, real *dagu, const real *DH,
                        const real *U, const real *X, const blk *b) {
    int64_t nb = b->nb, H = b->H, I2 = 2 * b->I, r = b->r;
    if (b->agu && dbgu)
        gemm(1, 0, I2, r, nb, b->s, DH, I2, U, r, 1, dbgu, r);
    int lora_dx = b->agu && (DX || dagu);
    if (lora_dx)
        gemm(0, 0, nb, r, I2, 1, DH, I2, b->bgu, r, 0, P, r);
    if (b->agu && dagu)
        gemm(1, 0, r, H, nb, b->s, P, r, X, H, 1, dagu, H);
    if (!DX)
        return 0;
    gemm(0, 0, nb, H, I2, 1, DH, I2, b->wgu, H, 0, DX, H);
    if (b->agu)
        gemm(0, 0, nb, H, r, b->s, P, r, b->agu, H, 1, DX, H);
    return 1;
}

// One expert's backward: LoRA gradients of expert e (its own slices: no other thread
// touches them), routing-weight gradients of its slots, and with want_dx the slots' input
// gradient rows into m->rows (sorted positions).
static void expert_bwd(const lora_ws *m, real *buf, real *dec, real *dw,
                       const K(moe_lora_grad) *g, real *dbgu, real *dbd, const real *dy,
                       const real *x, const real *w, const wsrc *src, const K(moe_lora) *lora,
                       int64_t e, int64_t k, int64_t H, int64_t I, int want_dx) {
    if (m->off[e + 1] == m->off[e])
        return;
    int64_t r = lora->r;
    real *X = buf, *DY = X + ROWS * H, *G = DY + ROWS * H, *Z = G + ROWS * 2 * I;
    real *Q = Z + ROWS * I, *U = Q + ROWS * I, *V = U + ROWS * r, *P = V + ROWS * r;
    const real *egu, *ed;
    expert_weights(src, dec, e, H, I, &egu, &ed);
    for (int64_t r0 = m->off[e]; r0 < m->off[e + 1]; r0 += ROWS) {
        int64_t nb = m->off[e + 1] - r0 < ROWS ? m->off[e + 1] - r0 : ROWS;
        blk b = block_of(m, lora, egu, ed, e, nb, H, I);
        K(moe_gather)(X, x, m->perm + r0, nb, k, H);
        K(moe_gather)(DY, dy, m->perm + r0, nb, k, H);
        // activations are recomputed rather than saved by the forward
        gate_up_rows(G, U, X, &b);
        swiglu_rows(Z, G, w, m->perm + r0, nb, I);
        down_back(Q, P, V, dbd ? dbd + e * H * r : NULL, g->a_d ? g->a_d + e * r * I : NULL,
                  DY, Z, &b);
        swiglu_back_rows(G, Q, dw, w, m->perm + r0, nb, I);
        gate_up_back(want_dx ? m->rows + r0 * H : NULL, P,
                     dbgu ? dbgu + e * 2 * I * r : NULL,
                     g->a_gu ? g->a_gu + e * r * H : NULL, G, U, X, &b);
    }
}

static void expert_bwd_body(void *ctx, int64_t e, int tid) {
    const expert_job *j = ctx;
    expert_bwd(j->m, thread_buf(j, tid), thread_dec(j, tid), j->dw, j->g, j->dbgu, j->dbd, j->dy,
               j->x, j->w, j->src, j->lora, e, j->k, j->H, j->I, j->want_dx);
}

static void lora_bwd(real *dx, real *dw, const K(moe_lora_grad) *g, const real *dy,
                     const real *x, const real *w, const int32_t *idx, const wsrc *src,
                     const K(moe_lora) *lora, int64_t T, int64_t k, int64_t E, int64_t H,
                     int64_t I, void *ws) {
    int64_t r = lora->r;
    lora_ws m = ws_layout(ws, T, k, E, H, I, r, src->qgu != NULL);
    dispatch(&m, idx, T * k, E);
    // packed B, then its gradient right after it in the same stack
    real *dbgu = lora->a_gu && g->b_gu ? m.bgu + E * 2 * I * r : NULL;
    real *dbd = lora->a_d && g->b_d ? m.bd + E * H * r : NULL;
    if (lora->a_gu)
        pack_b(m.bgu, lora->b_gu, E, 2 * I, r);
    if (lora->a_d)
        pack_b(m.bd, lora->b_d, E, H, r);
    if (dbgu)
        memset(dbgu, 0, (size_t)(E * 2 * I * r) * sizeof(real));
    if (dbd)
        memset(dbd, 0, (size_t)(E * H * r) * sizeof(real));
    expert_job j = {.m = &m, .x = x, .w = w, .src = src, .lora = lora, .k = k, .H = H, .I = I,
                    .dw = dw, .g = g, .dbgu = dbgu, .dbd = dbd, .dy = dy, .want_dx = dx != NULL};
    blas_team_loop(expert_team(&m, E, T * k, H, I), E, expert_bwd_body, &j);
    if (dx)
        gather_tokens(dx, &m, T, k, H, 1);
    if (dbgu)
        unpack_add_b(g->b_gu, dbgu, E, 2 * I, r);
    if (dbd)
        unpack_add_b(g->b_d, dbd, E, H, r);
}

void K(moe_experts_lora_bwd)(real *dx, real *dw, const K(moe_lora_grad) *g, const real *dy,
                             const real *x, const real *w, const int32_t *idx, const real *wgu,
                             const real *wd, const K(moe_lora) *lora, int64_t T, int64_t k,
                             int64_t E, int64_t H, int64_t I, void *ws) {
    wsrc src = {wgu, wd, NULL, NULL};
    lora_bwd(dx, dw, g, dy, x, w, idx, &src, lora, T, k, E, H, I, ws);
}

void K(moe_experts_lora_q_bwd)(real *dx, real *dw, const K(moe_lora_grad) *g, const real *dy,
                               const real *x, const real *w, const int32_t *idx,
                               const kq_weight *gu, const kq_weight *down,
                               const K(moe_lora) *lora, int64_t T, int64_t k, int64_t E,
                               int64_t H, int64_t I, void *ws) {
    wsrc src = {NULL, NULL, gu, down};
    lora_bwd(dx, dw, g, dy, x, w, idx, &src, lora, T, k, E, H, I, ws);
}
