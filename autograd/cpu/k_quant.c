// autograd/cpu/k_quant.c: kernels with frozen quantized weights, compiled once per element
// type: decoding (one element, or a range block by block), linear forward and input
// gradient, and routed experts. Decoding is done in fp32 exactly as the formats define it
// (bitsandbytes' order of operations for NF4), then widened to `real`. Not here: encoding
// (autograd/quant.c), operand checks and the choice of kernel (ops_qlinear.c).
#include "real.h"
#include "k_moe.h"
#include "k_quant.h"
#include "k_bi.h"

#include "k_blas.h"
// OpenBLAS's cblas.h includes complex.h; its `I` would clash with the intermediate size.
#undef I
#include <omp.h>
#include <string.h>


// ---- decoding --------------------------------------------------------------------------

static float bf16_value(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

// Absmax of NF4 block b: stored as is, or code * second-level scale + offset, rounded after
// the product and after the sum, as bitsandbytes' dequantize_blockwise then `+= offset` do.
static float nf4_absmax(const kq_weight *w, int64_t b) {
    if (!w->absmax_q)
        return w->scale[b];
    float m = w->dyn_code[w->absmax_q[b]] * w->absmax_scale[b / 256];
    return m + w->absmax_offset;
}

static int nf4_nibble(const uint8_t *p, int64_t i) {
    uint8_t byte = p[i >> 1];
    return (i & 1) ? byte & 15 : byte >> 4;
}

// Scale applying to flat element i of an INT8/FP8 weight.
static float row_scale(const kq_weight *w, int64_t i) {
    if (w->format == KQ_FP8 && !w->scale_per_row)
        return w->scale[i / (w->rows * w->cols)];
    return w->scale[i / w->cols];
}

real K(kq_elem)(const kq_weight *w, int64_t i) {
    switch (w->format) {
    case KQ_F32: return ((const float *)w->data)[i];
    case KQ_BF16: return bf16_value(((const uint16_t *)w->data)[i]);
    case KQ_INT8: return (float)((const int8_t *)w->data)[i] * row_scale(w, i);
    case KQ_FP8: return w->fp8_code[((const uint8_t *)w->data)[i]] * row_scale(w, i);
    case KQ_NF4: return w->nf4_code[nf4_nibble(w->data, i)] * nf4_absmax(w, i / 64);
    default: return 0; // formats are validated before any kernel runs
    }
}

// dst (end - i) = NF4 elements [i, end), all inside one block: a 16-entry table of the
// block's scaled codes, then one lookup per nibble.
static void nf4_block(real *dst, const kq_weight *w, int64_t i, int64_t end) {
    float a = nf4_absmax(w, i / 64), lut[16];
    for (int j = 0; j < 16; j++)
        lut[j] = w->nf4_code[j] * a;
    const uint8_t *p = w->data;
    if (i & 1) {
        *dst++ = lut[p[i >> 1] & 15];
        i++;
    }
    for (; i + 1 < end; i += 2) {
        uint8_t byte = p[i >> 1];
        *dst++ = lut[byte >> 4];
        *dst++ = lut[byte & 15];
    }
    if (i < end)
        *dst = lut[p[i >> 1] >> 4];
}

// Elements [i, end) that share one scale (a row, or a matrix for per-tensor FP8).
static void scaled_run(real *dst, const kq_weight *w, int64_t i, int64_t end) {
    float s = row_scale(w, i);
    if (w->format == KQ_INT8) {
        const int8_t *q = w->data;
        for (int64_t k = i; k < end; k++)
            *dst++ = (float)q[k] * s;
    } else {
        const uint8_t *q = w->data;
        for (int64_t k = i; k < end; k++)
            *dst++ = w->fp8_code[q[k]] * s;
    }
}

void K(kq_dequant_range)(real *dst, const kq_weight *w, int64_t start, int64_t n) {
    int64_t end = start + n;
    if (w->format == KQ_F32 || w->format == KQ_BF16) {
        for (int64_t k = start; k < end; k++)
            *dst++ = K(kq_elem)(w, k);
        return;
    }
    // runs: NF4 blocks of 64, else spans sharing one scale
    int64_t run = w->format == KQ_NF4 ? 64
                  : (w->format == KQ_FP8 && !w->scale_per_row) ? w->rows * w->cols
                                                               : w->cols;
    for (int64_t i = start; i < end;) {
        int64_t stop = (i / run + 1) * run;
        if (stop > end)
            stop = end;
        if (w->format == KQ_NF4)
            nf4_block(dst, w, i, stop);
        else
            scaled_run(dst, w, i, stop);
        dst += stop - i;
        i = stop;
    }
}

// ---- linear, reference ---------------------------------------------------------------------

void K(qlinear_fwd_ref)(real *y, const real *x, const kq_weight *w, int64_t e, int64_t T) {
    int64_t rows = w->rows, cols = w->cols, base = e * rows * cols;
    for (int64_t t = 0; t < T; t++)
        for (int64_t o = 0; o < rows; o++) {
            double acc = 0;
            for (int64_t i = 0; i < cols; i++)
                acc += (double)x[t * cols + i] * K(kq_elem)(w, base + o * cols + i);
            y[t * rows + o] = (real)acc;
        }
}

void K(qlinear_bwd_x_ref)(real *dx, const real *dy, const kq_weight *w, int64_t e, int64_t T) {
    int64_t rows = w->rows, cols = w->cols, base = e * rows * cols;
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < cols; i++) {
            double acc = 0;
            for (int64_t o = 0; o < rows; o++)
                acc += (double)dy[t * rows + o] * K(kq_elem)(w, base + o * cols + i);
            dx[t * cols + i] += (real)acc;
        }
}

// ---- linear, optimized ---------------------------------------------------------------------
// Forward: tiles of whole weight rows (a contiguous range of the flattened weight) are
// dequantized into a per-thread buffer and multiplied with BLAS into y's matching columns;
// threads own disjoint tiles. Input gradient: every tile of rows adds into all of dx, so the
// threads split dx by column strips instead, each walking the weight's row tiles over its
// strip. A tile of up to 256 rows keeps BLAS's repacking of the activations (once per call)
// small next to the multiply. The BLAS calls run inside an OpenMP team, where OpenBLAS's own
// (pthread) threads would oversubscribe the cores, so it is held at one thread meanwhile.

#define TILE_CAP ((int64_t)1 << 20) // elements of one thread's tile buffer (at most)
#define TILE_ROWS 256

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Elements of one thread's buffer: a whole small matrix, else TILE_CAP (or one row).
static int64_t buf_elems(const kq_weight *w) {
    return min64(w->rows * w->cols, max64(TILE_CAP, w->cols));
}

size_t K(qlinear_ws_bytes)(const kq_weight *w, int64_t T, int nthreads) {
    (void)T;
    return (size_t)(nthreads < 1 ? 1 : nthreads) * (size_t)buf_elems(w) * sizeof(real);
}

// Below about 4 Mflop a team costs more than it saves (and on a busy machine one
// descheduled member stalls the whole region).
static int team_size(int nthreads, int64_t T, const kq_weight *w) {
    double flops = 2.0 * (double)T * (double)w->rows * (double)w->cols;
    return flops < 4e6 || nthreads < 1 ? 1 : nthreads;
}

// Rows per forward tile: what fits the buffer, at most TILE_ROWS, and small enough that
// every thread of the team gets a tile.
static int64_t fwd_tile_rows(const kq_weight *w, int team) {
    int64_t R = min64(min64(TILE_ROWS, w->rows), max64(1, buf_elems(w) / w->cols));
    int64_t even = (w->rows + team - 1) / team;
    return even < R ? even : R;
}

// One product's operands for the tile and strip loops (blas_team_loop's ctx): R rows of W_e
// per tile (forward) or S columns per strip (backward), B decoded weights per thread.
typedef struct {
    real *y;          // y, or dx
    const real *x;    // x, or dy
    const kq_weight *w;
    int64_t e, T, R, S, B;
    real *ws;         // (team, B)
} tile_job;

// Tile ti of the forward: rows [ti R, ti R + R) of y, that tile of W_e decoded into the
// thread's buffer, then one GEMM.
static void fwd_tile(void *ctx, int64_t ti, int tid) {
    const tile_job *j = ctx;
    const kq_weight *w = j->w;
    int64_t rows = w->rows, cols = w->cols, r0 = ti * j->R, nr = min64(j->R, rows - r0);
    real *buf = j->ws + (size_t)tid * (size_t)j->B;
    K(kq_dequant_range)(buf, w, (j->e * rows + r0) * cols, nr * cols);
    R_GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)j->T, (int)nr, (int)cols, 1, j->x,
           (int)cols, buf, (int)cols, 0, j->y + r0, (int)rows);
}

void K(qlinear_fwd)(real *y, const real *x, const kq_weight *w, int64_t e, int64_t T,
                    int nthreads, void *ws) {
    int64_t rows = w->rows;
#if MOLT_REAL == 32
    if (w->format == KQ_F32) { // nothing to decode: one GEMM on the stored matrix
        int64_t cols = w->cols;
        R_GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)rows, (int)cols, 1, x,
               (int)cols, (const float *)w->data + e * rows * cols, (int)cols, 0, y, (int)rows);
        return;
    }
#endif
    int team = team_size(nthreads, T, w);
    int64_t R = fwd_tile_rows(w, team), n_tiles = (rows + R - 1) / R, B = buf_elems(w);
    if (team > n_tiles)
        team = (int)n_tiles;
    tile_job j = {.y = y, .x = x, .w = w, .e = e, .T = T, .R = R, .B = B, .ws = ws};
    blas_team_loop(team, n_tiles, fwd_tile, &j);
}

// Columns per strip of dx: all of them for one thread, else an even share rounded up to
// whole NF4 blocks (64) so that strips start on block boundaries when cols allows.
static int64_t strip_cols(const kq_weight *w, int team) {
    if (team <= 1)
        return w->cols;
    int64_t s = (w->cols + team - 1) / team;
    s = (s + 63) / 64 * 64;
    return s < w->cols ? s : w->cols;
}

// dx[:, c0:c0+nc] += dy . W_e[:, c0:c0+nc], row tile by row tile.
static void bwd_strip(real *dx, const real *dy, const kq_weight *w, int64_t e, int64_t T,
                      int64_t c0, int64_t nc, real *buf, int64_t B) {
    int64_t rows = w->rows, cols = w->cols;
    int64_t R = min64(min64(TILE_ROWS, rows), max64(1, B / nc));
    for (int64_t r0 = 0; r0 < rows; r0 += R) {
        int64_t nr = min64(R, rows - r0);
        for (int64_t r = 0; r < nr; r++)
            K(kq_dequant_range)(buf + r * nc, w, (e * rows + r0 + r) * cols + c0, nc);
        R_GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)T, (int)nc, (int)nr, 1,
               dy + r0, (int)rows, buf, (int)nc, 1, dx + c0, (int)cols);
    }
}

// Strip si of the backward (blas_team_loop's body), on the thread's buffer.
static void bwd_strip_body(void *ctx, int64_t si, int tid) {
    const tile_job *j = ctx;
    int64_t c0 = si * j->S;
    bwd_strip(j->y, j->x, j->w, j->e, j->T, c0, min64(j->S, j->w->cols - c0),
              j->ws + (size_t)tid * (size_t)j->B, j->B);
}

void K(qlinear_bwd_x)(real *dx, const real *dy, const kq_weight *w, int64_t e, int64_t T,
                      int nthreads, void *ws) {
    int64_t cols = w->cols;
#if MOLT_REAL == 32
    if (w->format == KQ_F32) {
        int64_t rows = w->rows;
        R_GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)T, (int)cols, (int)rows, 1, dy,
               (int)rows, (const float *)w->data + e * rows * cols, (int)cols, 1, dx,
               (int)cols);
        return;
    }
#endif
    int team = team_size(nthreads, T, w);
    int64_t S = strip_cols(w, team), n_strips = (cols + S - 1) / S, B = buf_elems(w);
    if (team > n_strips)
        team = (int)n_strips;
    tile_job j = {.y = dx, .x = dy, .w = w, .e = e, .T = T, .S = S, .B = B, .ws = ws};
    blas_team_loop(team, n_strips, bwd_strip_body, &j);
}

// ---- routed experts, reference -------------------------------------------------------------

static real sigmoid(real v) { return 1 / (1 + R_EXP(-v)); }

// Row i of matrix e of w times v (cols entries), in double.
static double row_dot(const kq_weight *w, int64_t e, int64_t i, const real *v) {
    int64_t base = (e * w->rows + i) * w->cols;
    double acc = 0;
    for (int64_t h = 0; h < w->cols; h++)
        acc += (double)K(kq_elem)(w, base + h) * v[h];
    return acc;
}

void K(qmoe_fwd_ref)(real *y, const real *x, const real *w, const int32_t *idx,
                     const kq_weight *gu, const kq_weight *down, int64_t T, int64_t k) {
    int64_t H = gu->cols, I = gu->rows / 2;
    memset(y, 0, (size_t)(T * H) * sizeof(real));
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < k; j++) {
            int64_t e = idx[t * k + j];
            for (int64_t i = 0; i < I; i++) {
                real g = (real)row_dot(gu, e, i, x + t * H);
                real u = (real)row_dot(gu, e, I + i, x + t * H);
                real a = g * sigmoid(g) * u * w[t * k + j];
                for (int64_t h = 0; h < H; h++)
                    y[t * H + h] += K(kq_elem)(down, (e * H + h) * I + i) * a;
            }
        }
}

void K(qmoe_bwd_ref)(real *dx, real *dw, const real *dy, const real *x, const real *w,
                     const int32_t *idx, const kq_weight *gu, const kq_weight *down, int64_t T,
                     int64_t k) {
    int64_t H = gu->cols, I = gu->rows / 2;
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < k; j++) {
            int64_t e = idx[t * k + j];
            real wt = w[t * k + j];
            double dws = 0;
            for (int64_t i = 0; i < I; i++) {
                real g = (real)row_dot(gu, e, i, x + t * H);
                real u = (real)row_dot(gu, e, I + i, x + t * H);
                real sg = sigmoid(g), act = g * sg;
                double q = 0; // (dy . down_e)_i
                for (int64_t h = 0; h < H; h++)
                    q += (double)dy[t * H + h] * K(kq_elem)(down, (e * H + h) * I + i);
                dws += q * act * u;
                if (!dx)
                    continue;
                real da = wt * (real)q, dg = da * u * sg * (1 + g * (1 - sg)), du = da * act;
                int64_t gb = e * 2 * I * H;
                for (int64_t h = 0; h < H; h++)
                    dx[t * H + h] += dg * K(kq_elem)(gu, gb + i * H + h) +
                                     du * K(kq_elem)(gu, gb + (I + i) * H + h);
            }
            if (dw)
                dw[t * k + j] += (real)dws;
        }
}

// ---- routed experts, optimized -------------------------------------------------------------
// The T*k (token, choice) slots are counting-sorted by expert, and each expert's slots go
// through in blocks of up to ROWS: gather, fused quantized GEMM (gate/up), SwiGLU, fused
// quantized GEMM (down), add into the tokens' rows. Blocks run one after another (the
// threads work inside each fused GEMM), which keeps the sums in a fixed order.

#define ROWS 256

typedef struct {
    int64_t *off;  // (E + 1) first sorted position of each expert
    int64_t *cur;  // (E) fill cursor while sorting
    int32_t *perm; // (T*k) slot t*k + j at each sorted position
    real *X, *DY;  // (ROWS, H) gathered activations and output gradients
    real *G;       // (ROWS, 2I) gate/up, then their gradients
    real *A;       // (ROWS, I) SwiGLU output, or dY . down
    real *O;       // (ROWS, H) expert output or input gradient
    void *qws;     // scratch of the fused GEMMs
} qmoe_ws;

static size_t round64(size_t b) { return (b + 63) & ~(size_t)63; }

// Hands out consecutive 64-byte-rounded pieces of base; with base NULL it only counts.
typedef struct {
    unsigned char *base;
    size_t used;
} carver;

static void *carve(carver *c, size_t bytes) {
    void *r = c->base ? c->base + c->used : NULL;
    c->used += round64(bytes);
    return r;
}

// Scratch of the fused GEMMs: the training ones' or the batch-invariant ones' (qmoe_fwd_bi),
// whichever is larger.
static size_t qws_bytes(const kq_weight *gu, const kq_weight *down, int nthreads) {
    size_t a = K(qlinear_ws_bytes)(gu, ROWS, nthreads);
    size_t b = K(qlinear_ws_bytes)(down, ROWS, nthreads);
    size_t c = K(bi_linear_q_ws_bytes)(gu, ROWS, nthreads);
    size_t d = K(bi_linear_q_ws_bytes)(down, ROWS, nthreads);
    a = a > b ? a : b;
    c = c > d ? c : d;
    return a > c ? a : c;
}

// Lays the workspace out (base NULL: only counts) and returns its size.
static size_t qmoe_layout(qmoe_ws *m, void *base, const kq_weight *gu, const kq_weight *down,
                          int64_t T, int64_t k, int nthreads) {
    int64_t E = gu->n_mat, H = gu->cols, I = gu->rows / 2;
    carver c = {base, 0};
    qmoe_ws w;
    w.off = carve(&c, (size_t)(E + 1) * sizeof(int64_t));
    w.cur = carve(&c, (size_t)E * sizeof(int64_t));
    w.perm = carve(&c, (size_t)(T * k) * sizeof(int32_t));
    w.X = carve(&c, (size_t)(ROWS * H) * sizeof(real));
    w.DY = carve(&c, (size_t)(ROWS * H) * sizeof(real));
    w.G = carve(&c, (size_t)(ROWS * 2 * I) * sizeof(real));
    w.A = carve(&c, (size_t)(ROWS * I) * sizeof(real));
    w.O = carve(&c, (size_t)(ROWS * H) * sizeof(real));
    w.qws = carve(&c, qws_bytes(gu, down, nthreads));
    if (m)
        *m = w;
    return c.used;
}

size_t K(qmoe_ws_bytes)(const kq_weight *gu, const kq_weight *down, int64_t T, int64_t k,
                        int nthreads) {
    return qmoe_layout(NULL, NULL, gu, down, T, k, nthreads);
}

// Stable counting sort of the slots by expert.
static void dispatch(qmoe_ws *w, const int32_t *idx, int64_t n, int64_t E) {
    K(moe_dispatch)(w->off, w->cur, w->perm, idx, n, E);
}

// A (nb, I) = routing weight * silu(gate) * up, from G (nb, 2I).
static void swiglu_rows(real *A, const real *G, const real *w, const int32_t *perm, int64_t nb,
                        int64_t I) {
    for (int64_t r = 0; r < nb; r++) {
        real wt = w[perm[r]];
        const real *g = G + r * 2 * I;
        for (int64_t i = 0; i < I; i++)
            A[r * I + i] = wt * g[i] * sigmoid(g[i]) * g[I + i];
    }
}

void K(qmoe_fwd)(real *y, const real *x, const real *w, const int32_t *idx,
                 const kq_weight *gu, const kq_weight *down, int64_t T, int64_t k,
                 int nthreads, void *ws) {
    qmoe_ws m;
    qmoe_layout(&m, ws, gu, down, T, k, nthreads);
    int64_t E = gu->n_mat, H = gu->cols, I = gu->rows / 2;
    dispatch(&m, idx, T * k, E);
    memset(y, 0, (size_t)(T * H) * sizeof(real));
    for (int64_t e = 0; e < E; e++)
        for (int64_t r0 = m.off[e]; r0 < m.off[e + 1]; r0 += ROWS) {
            int64_t nb = min64(m.off[e + 1] - r0, ROWS);
            K(moe_gather)(m.X, x, m.perm + r0, nb, k, H);
            K(qlinear_fwd)(m.G, m.X, gu, e, nb, nthreads, m.qws);
            swiglu_rows(m.A, m.G, w, m.perm + r0, nb, I);
            K(qlinear_fwd)(m.O, m.A, down, e, nb, nthreads, m.qws);
            K(moe_scatter_add)(y, m.O, m.perm + r0, nb, k, H);
        }
}

void K(qmoe_fwd_bi)(real *y, const real *x, const real *w, const int32_t *idx,
                    const kq_weight *gu, const kq_weight *down, int64_t T, int64_t k,
                    int nthreads, void *ws) {
    qmoe_ws m;
    qmoe_layout(&m, ws, gu, down, T, k, nthreads);
    int64_t E = gu->n_mat, H = gu->cols, I = gu->rows / 2;
    dispatch(&m, idx, T * k, E);
    memset(y, 0, (size_t)(T * H) * sizeof(real));
    for (int64_t e = 0; e < E; e++)
        for (int64_t r0 = m.off[e]; r0 < m.off[e + 1]; r0 += ROWS) {
            int64_t nb = min64(m.off[e + 1] - r0, ROWS);
            K(moe_gather)(m.X, x, m.perm + r0, nb, k, H);
            K(bi_linear_q)(m.G, m.X, gu, e, nb, nthreads, m.qws);
            swiglu_rows(m.A, m.G, w, m.perm + r0, nb, I);
            K(bi_linear_q)(m.O, m.A, down, e, nb, nthreads, m.qws);
            K(moe_scatter_add)(y, m.O, m.perm + r0, nb, k, H);
        }
}

// Turns G (nb, 2I) into (dgate, dup) in place given Q = dY . down (nb, I), and adds each
// slot's routing-weight gradient q . act to dw.
static void swiglu_back_rows(real *G, const real *Q, real *dw, const real *w,
                             const int32_t *perm, int64_t nb, int64_t I) {
    for (int64_t r = 0; r < nb; r++) {
        real wt = w[perm[r]], dws = 0, *g = G + r * 2 * I;
        for (int64_t i = 0; i < I; i++) {
            real gv = g[i], u = g[I + i], q = Q[r * I + i];
            real sg = sigmoid(gv), act = gv * sg;
            dws += q * act * u;
            g[i] = wt * q * u * sg * (1 + gv * (1 - sg));
            g[I + i] = wt * q * act;
        }
        if (dw)
            dw[perm[r]] += dws;
    }
}

void K(qmoe_bwd)(real *dx, real *dw, const real *dy, const real *x, const real *w,
                 const int32_t *idx, const kq_weight *gu, const kq_weight *down, int64_t T,
                 int64_t k, int nthreads, void *ws) {
    qmoe_ws m;
    qmoe_layout(&m, ws, gu, down, T, k, nthreads);
    int64_t E = gu->n_mat, H = gu->cols, I = gu->rows / 2;
    dispatch(&m, idx, T * k, E);
    for (int64_t e = 0; e < E; e++)
        for (int64_t r0 = m.off[e]; r0 < m.off[e + 1]; r0 += ROWS) {
            int64_t nb = min64(m.off[e + 1] - r0, ROWS);
            K(moe_gather)(m.X, x, m.perm + r0, nb, k, H);
            K(moe_gather)(m.DY, dy, m.perm + r0, nb, k, H);
            // gate/up are recomputed rather than kept by the forward
            K(qlinear_fwd)(m.G, m.X, gu, e, nb, nthreads, m.qws);
            memset(m.A, 0, (size_t)(nb * I) * sizeof(real));
            K(qlinear_bwd_x)(m.A, m.DY, down, e, nb, nthreads, m.qws);
            swiglu_back_rows(m.G, m.A, dw, w, m.perm + r0, nb, I);
            if (!dx)
                continue;
            memset(m.O, 0, (size_t)(nb * H) * sizeof(real));
            K(qlinear_bwd_x)(m.O, m.G, gu, e, nb, nthreads, m.qws);
            K(moe_scatter_add)(dx, m.O, m.perm + r0, nb, k, H);
        }
}
