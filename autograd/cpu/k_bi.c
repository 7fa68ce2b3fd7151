// autograd/cpu/k_bi.c: batch-invariant matrix products for inference (contracts in k_bi.h):
// the choice of instruction-set copy, the split of the weight rows over threads and the
// walk over tiles; the f32 tile kernels are in k_bi_tmpl.h (one copy per instruction set).
//
// The fixed order. For output y[t, o], element k of x[t] times element k of weight row o
// (the value kq_dequant_range gives for quantized formats) goes to lane k % 16 of 16 partial
// sums, lanes accumulated in increasing k, each step one fused multiply-add in the AVX2 and
// AVX-512F copies (multiply, then add, in the baseline copy and in f64); the elements past
// the last multiple of 16 are the last step with zeros in the missing lanes. The 16 lanes are
// then added pairwise in a fixed tree: l + (l+8) for l < 8, then l + (l+4), l + (l+2),
// l + (l+1). Nothing in this depends on T, on the other rows, on the tile a row falls in or
// on the thread that computes it: threads split the weight rows (output columns), never a
// dot product, and tiles only share loads.
//
// f32 tiling: panels of weight rows (about BI_PANEL_BYTES of f32 weights, at least one panel
// per thread) are handed to the threads (bi_linear: a run of consecutive panels each);
// inside a panel, tiles of up to mr rows of x times nr weight rows run through the copy's
// register-blocked kernel. When x fits in L1 (decode) each tile of weight rows meets every
// row of x before the next tile is read, and the next tile's rows are prefetched meanwhile;
// otherwise (prefill, or a decode batch of many rows) each group of rows of x meets the
// whole panel, which stays in L2 while x streams past it. There bi_linear's tile calls
// also bring the thread's next panel into L2, a row each (one line per step along K),
// spread evenly over all the panel's passes, so that the next panel's first pass does not
// wait on memory (131072 x 512 with 31 rows, 2 threads: about 15% faster). Quantized
// weights are decoded in registers for T <= BI_REG_T (up to 8 rows of x per decoded
// vector: measured faster than the decode buffer up to T = 16 even where that decodes
// twice); above that each panel is decoded once into the thread's workspace and the dense
// kernel runs on it (prefill: the decode is spread over T rows). Both give the same values,
// so the same bits. NF4 with cols % 64 != 0 (rows starting inside a block) is decoded
// through kq_dequant_range. Rows of at most 16 columns (one vector, a LoRA's B) go 16 weight
// rows at a time, their 16 sums reduced together; the tree is the same. bi_dots is the tile
// kernel over row pointers; bi_wsum (a weighted sum of rows, summed over rows, not along
// them) has its own order, stated in k_bi.h. f64 (gradient checks) runs plain loops in the
// same orders.
#include "real.h"
#include "k_quant.h"
#include "k_bi.h"

#include <omp.h>
#include <string.h>

#if MOLT_REAL == 32
#include "k_bi_isa.h"
#include "k_bx.h"
#endif

// Work below this many multiply-adds runs on one thread.
#define BI_PAR_MIN ((int64_t)1 << 17)
// Bytes of f32 weights in one panel (one thread's unit of work, kept in its L2).
#define BI_PANEL_BYTES ((int64_t)512 << 10)
// Largest T for which quantized weights are decoded in registers.
#define BI_REG_T 16
// Bytes of x up to which every row of x goes through a tile of weight rows in turn.
#define BI_X_L1_BYTES (24 << 10)

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static int team_for(int64_t T, int64_t rows, int64_t cols, int nthreads) {
    return T * rows * cols < BI_PAR_MIN || nthreads < 1 ? 1 : nthreads;
}

#if MOLT_REAL == 32

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Weight rows per panel: about BI_PANEL_BYTES, a multiple of `nr`, and small enough that
// each of `team` threads gets one.
static int64_t panel_rows(int64_t rows, int64_t cols, int nr, int team) {
    int64_t p = max64(nr, BI_PANEL_BYTES / (4 * max64(cols, 1)) / nr * nr);
    int64_t share = (rows + team - 1) / team;
    share = (share + nr - 1) / nr * nr;
    return max64(nr, min64(p, share));
}

// NF4 rows start on a block (and a byte) only when cols is a multiple of 64.
static int aligned_rows(const kq_weight *w) { return w->format != KQ_NF4 || w->cols % 64 == 0; }

// ---- instruction-set copy ------------------------------------------------------------------

static const bi_kernels *const copies[BI_ISA_COUNT] = {
    &bi_kernels_base, &bi_kernels_avx2, &bi_kernels_avx512, &bi_kernels_avx512vbmi};
static int isa_now = -1; // set on first use; tests may change it between calls

int bi_isa_best(void) {
    static int best = -1; // benign race: every thread computes the same value
    if (best < 0) {
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vbmi"))
            best = BI_ISA_AVX512VBMI;
        else if (__builtin_cpu_supports("avx512f"))
            best = BI_ISA_AVX512;
        else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
            best = BI_ISA_AVX2;
        else
            best = BI_ISA_BASE;
    }
    return best;
}

int bi_isa(void) {
    if (isa_now < 0)
        isa_now = bi_isa_best();
    return isa_now;
}

int bi_set_isa(int isa) {
    int best = bi_isa_best();
    isa_now = isa < 0 || isa > best ? best : isa;
    return isa_now;
}

const char *bi_isa_name(int isa) {
    static const char *const names[BI_ISA_COUNT] = {"base", "avx2", "avx512", "avx512vbmi"};
    return isa >= 0 && isa < BI_ISA_COUNT ? names[isa] : "?";
}

float bi_read(const float *p, int64_t n, int nthreads) {
    const bi_kernels *kn = copies[bi_isa()];
    int team = nthreads < 1 ? 1 : nthreads;
    int64_t chunk = ((n + team - 1) / team + 63) / 64 * 64;
    float s = 0;
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1) reduction(+ : s)
    for (int i = 0; i < team; i++) {
        int64_t k0 = min64(n, i * chunk);
        s += kn->read(p + k0, min64(n, k0 + chunk) - k0);
    }
    return s;
}

// ---- dense ---------------------------------------------------------------------------------------

// One dense tile: rows t0 .. t0+mr-1 of x against weight rows o .. o+n-1 of the panel
// starting at row o0 (w: its first row; rows stored one after another).
static void dense_tile(const bi_kernels *kn, float *y, const float *x, const float *w,
                       int64_t T, int64_t rows, int64_t cols, int64_t t0, int64_t o0,
                       int64_t o, int64_t o1, const char *far) {
    int mr = (int)min64(kn->mr, T - t0), n = (int)min64(kn->nr, o1 - o);
    const float *xr[BI_MR_CAP], *wr[BI_NR_CAP];
    for (int i = 0; i < mr; i++)
        xr[i] = x + (t0 + i) * cols;
    for (int j = 0; j < kn->nr; j++)
        wr[j] = w + (o - o0 + (j < n ? j : n - 1)) * cols;
    kn->dense(y + t0 * rows + o, rows, xr, mr, wr, n, cols, kn->nr * cols, far);
}

// y (T, columns [o0, o1) of rows) from weight rows w[0 .. o1-o0) (stride cols). When x fits
// in L1 each tile of weight rows meets every row of x before the next is read (decode:
// the weights come from memory once); otherwise each group of rows of x meets the whole
// panel, which stays in L2 (prefill), and brings the next_rows rows at `next` (the thread's
// next panel; NULL: none) into L2 meanwhile.
static void dense_panel(const bi_kernels *kn, float *y, const float *x, const float *w,
                        int64_t T, int64_t rows, int64_t cols, int64_t o0, int64_t o1,
                        const float *next, int64_t next_rows) {
    if (cols <= 16) { // one vector per row (a LoRA's B): 16 rows at a time, sums reduced together
        for (int64_t t = 0; t < T; t++)
            for (int64_t o = o0; o < o1; o += 16)
                kn->shortk(y + t * rows + o, x + t * cols, w + (o - o0) * cols,
                           (int)min64(16, o1 - o), cols);
        return;
    }
    if (T * cols * 4 <= BI_X_L1_BYTES) {
        for (int64_t o = o0; o < o1; o += kn->nr)
            for (int64_t t0 = 0; t0 < T; t0 += kn->mr)
                dense_tile(kn, y, x, w, T, rows, cols, t0, o0, o, o1, NULL);
        return;
    }
    // the next panel's rows dealt out evenly over the panel's tile calls: call c brings in
    // row a when its share [a, b) is not empty (one row a call: with more rows than calls,
    // the rest of the share is left to the hardware)
    int64_t tiles = (o1 - o0 + kn->nr - 1) / kn->nr;
    int64_t calls = (T + kn->mr - 1) / kn->mr * tiles;
    int64_t c = 0;
    for (int64_t t0 = 0; t0 < T; t0 += kn->mr)
        for (int64_t o = o0; o < o1; o += kn->nr, c++) {
            const char *far = NULL;
            int64_t a = c * next_rows / calls, b = (c + 1) * next_rows / calls;
            if (b > a)
                far = (const char *)(next + a * cols);
            dense_tile(kn, y, x, w, T, rows, cols, t0, o0, o, o1, far);
        }
}

// Thread me of nt's run of panels.
static void dense_run(const bi_kernels *kn, float *y, const float *x, const float *w, int64_t T,
                      int64_t rows, int64_t cols, int64_t P, int64_t n_pan, int me, int nt) {
    int64_t p0 = n_pan * me / nt, p1 = n_pan * (me + 1) / nt;
    for (int64_t p = p0; p < p1; p++) {
        int64_t o0 = p * P, o1 = min64(rows, o0 + P);
        int64_t next_rows = p + 1 < p1 ? min64(rows, o1 + P) - o1 : 0;
        dense_panel(kn, y, x, w + o0 * cols, T, rows, cols, o0, o1, w + o1 * cols, next_rows);
    }
}

// One thread runs on the caller's thread, outside any parallel region: inside another
// one (an expert or an adapter group per thread) a region of its own, even of one thread,
// would be a nested region that OpenMP sets up (and allocates for) at every call.
void K(bi_linear)(real *y, const real *x, const real *w, int64_t T, int64_t rows, int64_t cols,
                  int nthreads) {
    const bi_kernels *kn = copies[bi_isa()];
    int team = team_for(T, rows, cols, nthreads);
    int64_t P = panel_rows(rows, cols, kn->nr, team), n_pan = (rows + P - 1) / P;
    if (team == 1) {
        dense_run(kn, y, x, w, T, rows, cols, P, n_pan, 0, 1);
        return;
    }
    if (n_pan < 2 * team && T >= 4 * team * kn->mr) {
        // a thin weight (a LoRA's A) and many rows of x: the threads split x's rows instead,
        // each against the whole weight (a row's products are the same either way)
        int64_t chunk = (T + team - 1) / team;
        chunk = (chunk + kn->mr - 1) / kn->mr * kn->mr;
        int64_t P1 = panel_rows(rows, cols, kn->nr, 1), n1 = (rows + P1 - 1) / P1;
#pragma omp parallel num_threads(team)
        {
            int64_t t0 = min64(T, chunk * omp_get_thread_num()), t1 = min64(T, t0 + chunk);
            if (t1 > t0)
                dense_run(kn, y + t0 * rows, x + t0 * cols, w, t1 - t0, rows, cols, P1, n1, 0,
                          1);
        }
        return;
    }
#pragma omp parallel num_threads(team)
    dense_run(kn, y, x, w, T, rows, cols, P, n_pan, omp_get_thread_num(), omp_get_num_threads());
}

void K(bi_dots)(real *y, const real *a, const real *const *rows, int64_t n, int64_t K) {
    const bi_kernels *kn = copies[bi_isa()];
    const float *x[1] = {a};
    for (int64_t o = 0; o < n; o += kn->nr) {
        int cnt = (int)min64(kn->nr, n - o);
        const float *wr[BI_NR_CAP];
        for (int j = 0; j < kn->nr; j++)
            wr[j] = rows[o + (j < cnt ? j : cnt - 1)];
        kn->dense(y + o, 0, x, 1, wr, cnt, K, 0, NULL);
    }
}

void K(bi_wsum)(real *y, const real *p, const real *const *rows, int64_t n, int64_t K) {
    copies[bi_isa()]->wsum(y, p, rows, n, K);
}

// ---- quantized --------------------------------------------------------------------------------

static int use_registers(const kq_weight *w, int64_t T) {
    return T <= BI_REG_T && aligned_rows(w);
}

// Rows of one thread's decode buffer.
static int64_t buf_rows(const kq_weight *w, const bi_kernels *kn) {
    return max64(kn->nr, BI_PANEL_BYTES / (4 * max64(w->cols, 1)) / kn->nr * kn->nr);
}

size_t K(bi_linear_q_ws_bytes)(const kq_weight *w, int64_t T, int nthreads) {
    if (w->format == KQ_F32 || use_registers(w, T))
        return 0;
    const bi_kernels *kn = copies[bi_isa()];
    int nt = nthreads < 1 ? 1 : nthreads;
    return (size_t)nt * (size_t)buf_rows(w, kn) * (size_t)w->cols * sizeof(float);
}

// Weight rows [o0, o1) of matrix e decoded in registers, every row of x.
static void quant_panel(const bi_kernels *kn, float *y, const float *x, const kq_weight *w,
                        int64_t e, int64_t T, int64_t o0, int64_t o1) {
    int64_t rows = w->rows, cols = w->cols;
    for (int64_t t0 = 0; t0 < T; t0 += kn->qmr) {
        int mr = (int)min64(kn->qmr, T - t0);
        const float *xr[BI_MR_CAP];
        for (int i = 0; i < mr; i++)
            xr[i] = x + (t0 + i) * cols;
        int qnr = kn->qnr[mr];
        for (int64_t o = o0; o < o1; o += qnr) {
            int n = (int)min64(qnr, o1 - o);
            int64_t rf[BI_NR_CAP];
            for (int j = 0; j < qnr; j++)
                rf[j] = e * rows + o + (j < n ? j : n - 1);
            kn->quant(y + t0 * rows + o, rows, xr, mr, w, rf, n);
        }
    }
}

// Contract in k_bx.h: the values bi_linear_q multiplies, rows [row0, row0 + n) of the
// flattened weight, into dst (n, cols).
void bi_decode_f32(float *dst, const kq_weight *w, int64_t row0, int64_t n) {
    if (w->format == KQ_F32)
        memcpy(dst, (const float *)w->data + row0 * w->cols, (size_t)(n * w->cols) * sizeof *dst);
    else if (aligned_rows(w))
        copies[bi_isa()]->decode(dst, w, row0, n);
    else
        K(kq_dequant_range)(dst, w, row0 * w->cols, n * w->cols);
}

// Panel p (rows of P) of matrix e: decoded in registers, or into buf and multiplied there.
static void quant_panel_any(const bi_kernels *kn, float *y, const float *x, const kq_weight *w,
                            int64_t e, int64_t T, int64_t P, int64_t p, int reg, float *buf) {
    int64_t rows = w->rows, cols = w->cols;
    int64_t o0 = p * P, o1 = min64(rows, o0 + P);
    if (reg) {
        quant_panel(kn, y, x, w, e, T, o0, o1);
        return;
    }
    if (aligned_rows(w))
        kn->decode(buf, w, e * rows + o0, o1 - o0);
    else
        K(kq_dequant_range)(buf, w, (e * rows + o0) * cols, (o1 - o0) * cols);
    dense_panel(kn, y, x, buf, T, rows, cols, o0, o1, NULL, 0);
}

void K(bi_linear_q)(real *y, const real *x, const kq_weight *w, int64_t e, int64_t T,
                    int nthreads, void *ws) {
    int64_t rows = w->rows, cols = w->cols;
    if (w->format == KQ_F32) {
        K(bi_linear)(y, x, (const float *)w->data + e * rows * cols, T, rows, cols, nthreads);
        return;
    }
    const bi_kernels *kn = copies[bi_isa()];
    int team = team_for(T, rows, cols, nthreads), reg = use_registers(w, T);
    int64_t P = reg ? panel_rows(rows, cols, kn->qnr[min64(T, kn->qmr)], team)
                    : min64(buf_rows(w, kn), panel_rows(rows, cols, kn->nr, team));
    int64_t n_pan = (rows + P - 1) / P;
    if (team > n_pan)
        team = (int)n_pan;
    if (team <= 1) { // on the caller's thread (see bi_linear)
        for (int64_t p = 0; p < n_pan; p++)
            quant_panel_any(kn, y, x, w, e, T, P, p, reg, ws);
        return;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(team)
    for (int64_t p = 0; p < n_pan; p++)
        quant_panel_any(kn, y, x, w, e, T, P, p, reg,
                        (float *)ws + (size_t)omp_get_thread_num() * (size_t)buf_rows(w, kn) *
                                          (size_t)cols);
}

#else // f64: plain loops in the same order (multiply, then add)

static real dot_fixed(const real *a, const real *b, int64_t n) {
    real acc[16] = {0};
    int64_t k = 0;
    for (; k + 16 <= n; k += 16)
        for (int j = 0; j < 16; j++)
            acc[j] += a[k + j] * b[k + j];
    for (int j = 0; k < n; k++, j++)
        acc[j] += a[k] * b[k];
    for (int s = 8; s > 0; s /= 2)
        for (int j = 0; j < s; j++)
            acc[j] += acc[j + s];
    return acc[0];
}

void K(bi_linear)(real *y, const real *x, const real *w, int64_t T, int64_t rows, int64_t cols,
                  int nthreads) {
    int team = team_for(T, rows, cols, nthreads);
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
    for (int64_t o = 0; o < rows; o++)
        for (int64_t t = 0; t < T; t++)
            y[t * rows + o] = dot_fixed(x + t * cols, w + o * cols, cols);
}

void K(bi_dots)(real *y, const real *a, const real *const *rows, int64_t n, int64_t K) {
    for (int64_t j = 0; j < n; j++)
        y[j] = dot_fixed(a, rows[j], K);
}

void K(bi_wsum)(real *y, const real *p, const real *const *rows, int64_t n, int64_t K) {
    for (int64_t k = 0; k < K; k++) {
        real acc = 0;
        for (int64_t s = 0; s < n; s++)
            acc += p[s] * rows[s][k];
        y[k] = acc;
    }
}

// Weight rows decoded per tile (per thread).
#define BI_TILE_ROWS 16

size_t K(bi_linear_q_ws_bytes)(const kq_weight *w, int64_t T, int nthreads) {
    (void)T;
    int nt = nthreads < 1 ? 1 : nthreads;
    return (size_t)nt * BI_TILE_ROWS * (size_t)w->cols * sizeof(real);
}

void K(bi_linear_q)(real *y, const real *x, const kq_weight *w, int64_t e, int64_t T,
                    int nthreads, void *ws) {
    int64_t rows = w->rows, cols = w->cols;
    int64_t n_tiles = (rows + BI_TILE_ROWS - 1) / BI_TILE_ROWS;
    int team = team_for(T, rows, cols, nthreads);
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
    for (int64_t tile = 0; tile < n_tiles; tile++) {
        real *buf = (real *)ws + (size_t)omp_get_thread_num() * BI_TILE_ROWS * (size_t)cols;
        int64_t r0 = tile * BI_TILE_ROWS, nr = min64(rows - r0, BI_TILE_ROWS);
        K(kq_dequant_range)(buf, w, (e * rows + r0) * cols, nr * cols);
        for (int64_t r = 0; r < nr; r++)
            for (int64_t t = 0; t < T; t++)
                y[t * rows + r0 + r] = dot_fixed(x + t * cols, buf + r * cols, cols);
    }
}

#endif
