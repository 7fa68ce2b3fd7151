// autograd/cpu/k_bx.c: the bf16-pair products on AMX tiles (contracts and the order in
// k_bx.h): the vocabulary projection's packing, tile kernel, plain-C reference and backward
// rule; then the prompt rows' product on decoded weights (bxq_linear, at the end).
//
// Layout. The weight matrix is cut into blocks of BX_RT rows; a block's tile for K tile kt
// holds its hi plane (BX_KT/2 pair rows of BX_RT x 2 bf16: element (n, k) at
// (k/2)*32 + 2n + k%2, the pairing AMX's B operand takes) followed by its lo plane, 2 KiB in
// all. Panels of BX_PANEL blocks are stored one after another; inside a panel the tiles go
// by runs of BX_QT along K: run 0 of every block, then run 1, and so on. That is the order
// the kernel reads, so the weights stream from memory once, in address order, and one
// prefetch a tile ahead keeps the next tile on its way.
//
// The kernel. Each thread takes a run of panels. For every run of BX_QT K tiles, every
// block of the panel meets every row of x two tiles of 16 rows at a time: C0 and C1 hold the
// sums of the two row tiles, B hi and lo one weight tile, A hi and lo of each row tile the
// matching tile of x. x's halves for one run (BX_QT tiles, up to BX_SWEEP row tiles) stay
// in L1 while the panel's blocks pass; the sums between runs go to the thread's workspace,
// the last run's to y. More than BX_SWEEP row tiles take several sweeps over each panel.
// 131072 x 512 (the small preset's vocabulary projection), 2 threads, `molt bench ops`: 32
// rows in 10.7 ms against 18.0 ms for bi_linear (a plain read of the 268 MB: 8.6 ms); one
// row 9.3 ms against 8.8 ms. The weights stream from memory at 80% of a plain read.
#define _GNU_SOURCE
#include "real.h"

#if MOLT_REAL == 32

#include "k_quant.h"
#include "k_bx.h"
#include "../../common/err.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define BX_HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define BX_HAVE_AMX 0
#endif

// Row tiles of x one sweep over a panel serves.
#define BX_SWEEP 4
// Work below this many multiply-adds runs on one thread.
#define BX_PAR_MIN ((int64_t)1 << 17)

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t up(int64_t n, int64_t m) { return (n + m - 1) / m; }

// ---- halves -------------------------------------------------------------------------------

float bx_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

// v rounded to bf16, to nearest even; NaN stays a (quiet) NaN, and a finite v whose
// rounding would overflow is truncated instead, so hi never turns a number into infinity.
static uint16_t to_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u);
    uint32_t r = u + 0x7fffu + ((u >> 16) & 1u);
    if ((r & 0x7f800000u) == 0x7f800000u && (u & 0x7f800000u) != 0x7f800000u)
        r = u;
    return (uint16_t)(r >> 16);
}

void bx_split(float v, uint16_t *hi, uint16_t *lo) {
    *hi = to_bf16(v);
    float h = bx_bf16(*hi);
    *lo = isfinite(h) ? to_bf16(v - h) : 0;
}

// ---- layout -------------------------------------------------------------------------------

// Index (in bf16 elements) of the hi plane of block nb's tile kt; the lo plane follows.
static int64_t tile_at(int64_t nb, int64_t kt, int64_t NB, int64_t KT) {
    int64_t p0 = nb / BX_PANEL * BX_PANEL, pn = min64(BX_PANEL, NB - p0);
    int64_t q0 = kt / BX_QT * BX_QT, qn = min64(BX_QT, KT - q0);
    return (p0 * KT + q0 * pn + (nb - p0) * qn + (kt - q0)) * 1024;
}

size_t bx_pack_bytes(int64_t rows, int64_t cols) {
    return (size_t)(up(rows, BX_RT) * up(cols, BX_KT)) * 2048;
}

// Packs tile kt of block nb from src, which holds rows src0.. of the (rows, cols) matrix.
static void pack_tile(uint16_t *h, const float *src, int64_t src0, int64_t rows, int64_t cols,
                      int64_t nb, int64_t kt) {
    uint16_t *l = h + 512;
    for (int n = 0; n < BX_RT; n++)
        for (int kk = 0; kk < BX_KT; kk++) {
            int64_t r = nb * BX_RT + n, k = kt * BX_KT + kk;
            float v = r < rows && k < cols ? src[(r - src0) * cols + k] : 0.0f;
            int at = kk / 2 * 32 + 2 * n + kk % 2;
            bx_split(v, &h[at], &l[at]);
        }
}

void bx_pack(uint16_t *dst, const float *w, int64_t rows, int64_t cols, int nthreads) {
    int64_t NB = up(rows, BX_RT), KT = up(cols, BX_KT);
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
    for (int64_t nb = 0; nb < NB; nb++)
        for (int64_t kt = 0; kt < KT; kt++)
            pack_tile(dst + tile_at(nb, kt, NB, KT), w, 0, rows, cols, nb, kt);
}

bool bx_pack_in_place_ok(int64_t rows, int64_t cols) {
    return rows > 0 && cols > 0 && rows % BX_RT == 0 && cols % BX_KT == 0;
}

// A panel's packed tiles take exactly the bytes of its rows in F32 (whole blocks, whole
// tiles), so each panel is copied out and packed back over its own rows. The copies are
// allocated before any panel is touched: without them nothing changes.
bool bx_pack_in_place(float *w, int64_t rows, int64_t cols, int nthreads) {
    if (!bx_pack_in_place_ok(rows, cols))
        return false;
    int64_t NB = rows / BX_RT, KT = cols / BX_KT, NP = up(NB, BX_PANEL);
    size_t panel = (size_t)(BX_PANEL * BX_RT * cols);
    int nt = nthreads > 0 ? nthreads : 1;
    float *tmp = molt_malloc((size_t)nt * panel * sizeof *tmp);
    if (!tmp && nt > 1 && (tmp = molt_malloc(panel * sizeof *tmp)) != NULL)
        nt = 1;
    if (!tmp)
        return false;
    uint16_t *dst = (uint16_t *)(void *)w;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t p = 0; p < NP; p++) {
        float *t = tmp + (size_t)omp_get_thread_num() * panel;
        int64_t nb0 = p * BX_PANEL, pn = min64(BX_PANEL, NB - nb0);
        memcpy(t, w + nb0 * BX_RT * cols, (size_t)(pn * BX_RT * cols) * sizeof *t);
        for (int64_t j = 0; j < pn; j++)
            for (int64_t kt = 0; kt < KT; kt++)
                pack_tile(dst + tile_at(nb0 + j, kt, NB, KT), t, nb0 * BX_RT, rows, cols,
                          nb0 + j, kt);
    }
    molt_free(tmp);
    return true;
}

uint16_t bx_packed_at(const uint16_t *wp, int64_t rows, int64_t cols, int64_t r, int64_t k,
                      int part) {
    int64_t NB = up(rows, BX_RT), KT = up(cols, BX_KT);
    int64_t kk = k % BX_KT, n = r % BX_RT;
    return wp[tile_at(r / BX_RT, k / BX_KT, NB, KT) + 512 * part + kk / 2 * 32 + 2 * n + kk % 2];
}

// ---- reference and backward ---------------------------------------------------------------

void bx_linear_ref(float *y, const float *x, const uint16_t *wp, int64_t T, int64_t rows,
                   int64_t cols) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t o = 0; o < rows; o++) {
            double s = 0;
            for (int64_t k = 0; k < cols; k++) {
                uint16_t xh, xl;
                bx_split(x[t * cols + k], &xh, &xl);
                double wh = bx_bf16(bx_packed_at(wp, rows, cols, o, k, 0));
                double wl = bx_bf16(bx_packed_at(wp, rows, cols, o, k, 1));
                s += (double)bx_bf16(xh) * wh + (double)bx_bf16(xl) * wh + (double)bx_bf16(xh) * wl;
            }
            y[t * rows + o] = (float)s;
        }
}

void bx_linear_bwd_x(float *dx, const float *dy, const uint16_t *wp, int64_t T, int64_t rows,
                     int64_t cols) {
    int64_t NB = up(rows, BX_RT), KT = up(cols, BX_KT);
    float w[BX_RT][BX_KT];
    for (int64_t nb = 0; nb < NB; nb++)
        for (int64_t kt = 0; kt < KT; kt++) {
            const uint16_t *h = wp + tile_at(nb, kt, NB, KT), *l = h + 512;
            for (int n = 0; n < BX_RT; n++)
                for (int kk = 0; kk < BX_KT; kk++) {
                    int at = kk / 2 * 32 + 2 * n + kk % 2;
                    w[n][kk] = bx_bf16(h[at]) + bx_bf16(l[at]);
                }
            int64_t nn = min64(BX_RT, rows - nb * BX_RT), kn = min64(BX_KT, cols - kt * BX_KT);
            for (int64_t t = 0; t < T; t++)
                for (int64_t n = 0; n < nn; n++) {
                    float g = dy[t * rows + nb * BX_RT + n];
                    float *d = dx + t * cols + kt * BX_KT;
                    for (int64_t kk = 0; kk < kn; kk++)
                        d[kk] += g * w[n][kk];
                }
        }
}

// ---- prompt rows: halves, workspace, reference ----------------------------------------------

// Weight rows decoded and split per panel (a thread's unit of work).
#define BQ_PANEL 32

uint16_t bxq_half(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) // NaN: kept, made quiet
        return (uint16_t)((u >> 16) | 0x40u);
    if ((u & 0x7f800000u) == 0 && (u & 0x7fffffu) != 0) // subnormal: taken as zero
        return (uint16_t)((u >> 16) & 0x8000u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static void bq_split(float v, double *hi, double *lo) {
    uint16_t h = bxq_half(v);
    float hf = bx_bf16(h);
    *hi = hf;
    *lo = bx_bf16(bxq_half(v - hf));
}

// Workspace: x's halves (a 2 KiB tile pair per token tile and K tile), then per thread the
// panel's decoded rows (f32), its tiles (hi + lo, 4 bytes an element) and 2 KiB for sums.
static size_t bq_x_bytes(int64_t T, int64_t cols) {
    return (size_t)(up(T, BX_RT) * up(cols, BX_KT)) * 2048;
}
static size_t bq_thread_bytes(int64_t cols) {
    return (size_t)BQ_PANEL * (size_t)cols * 4 + (size_t)(BQ_PANEL * up(cols, BX_KT)) * 128 +
           4096;
}

size_t bxq_ws_bytes(const kq_weight *w, int64_t T, int nthreads) {
    size_t per = (bq_thread_bytes(w->cols) + 63) / 64 * 64;
    return bq_x_bytes(T, w->cols) + (size_t)(nthreads > 0 ? nthreads : 1) * per;
}

void bxq_linear_ref(float *y, const float *x, const kq_weight *w, int64_t e, int64_t T) {
    int64_t rows = w->rows, cols = w->cols;
    float *row = malloc((size_t)cols * sizeof *row);
    if (!row)
        abort(); // a test-sized reference: no way to report
    for (int64_t o = 0; o < rows; o++) {
        bi_decode_f32(row, w, e * rows + o, 1);
        for (int64_t t = 0; t < T; t++) {
            double s = 0;
            for (int64_t k = 0; k < cols; k++) {
                double wh, wl, xh, xl;
                bq_split(row[k], &wh, &wl);
                bq_split(x[t * cols + k], &xh, &xl);
                s += wh * xh + wl * xh + wh * xl;
            }
            y[t * rows + o] = (float)s;
        }
    }
    free(row);
}

void bxq_linear_any(float *y, const float *x, const kq_weight *w, int64_t e, int64_t T,
                    int nthreads, void *ws) {
    if (bxq_available())
        bxq_linear(y, x, w, e, T, nthreads, ws);
    else
        bxq_linear_ref(y, x, w, e, T);
}

// ---- AMX ----------------------------------------------------------------------------------

// The workspace: x's halves (a 2 KiB tile pair per K tile and row tile), then per thread
// the partial sums of a panel's blocks for one sweep and a 1 KiB tile for edge stores.
static size_t ws_x_bytes(int64_t RB, int64_t KT) { return (size_t)(KT * RB) * 2048; }
static size_t ws_thread_bytes(int64_t RB) {
    return (size_t)(BX_PANEL * min64(RB, BX_SWEEP)) * 1024 + 1024;
}

size_t bx_ws_bytes(int64_t T, int64_t cols, int nthreads) {
    int64_t RB = up(T, BX_RT), KT = up(cols, BX_KT);
    return ws_x_bytes(RB, KT) + (size_t)(nthreads > 0 ? nthreads : 1) * ws_thread_bytes(RB);
}

#if BX_HAVE_AMX

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

bool bx_amx(void) {
    static int state = -1; // benign race: every thread finds the same answer
    if (state < 0) {
        const char *env = getenv("MOLT_AMX");
        unsigned a, b, c, d;
        int ok = !(env && !strcmp(env, "0")) && __get_cpuid_count(7, 0, &a, &b, &c, &d) &&
                 (d >> 24 & 1u) && (d >> 22 & 1u); // AMX-TILE, AMX-BF16
        // Linux hands out the 8 KiB of tile state only to processes that ask for it
        if (ok && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0)
            ok = 0;
        state = ok;
    }
    return state == 1;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_cfg;

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("amx-tile,amx-bf16"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")
#endif

// Stores tile 0 or 1 (which) for row tile rb of block nb: into y when the tile lies inside
// it, else through tmp, only the rows and columns that exist.
#define STORE_C(which, dst_rows0, nb)                                                      \
    do {                                                                                    \
        int64_t r0_ = (dst_rows0), c0_ = (nb) * BX_RT;                                      \
        if (r0_ + BX_RT <= T && c0_ + BX_RT <= rows) {                                      \
            _tile_stored(which, y + r0_ * rows + c0_, rows * (int64_t)sizeof(float));       \
        } else {                                                                            \
            _tile_stored(which, tmp, BX_RT * sizeof(float));                                \
            for (int64_t r_ = 0; r_ < BX_RT && r0_ + r_ < T; r_++)                          \
                for (int64_t c_ = 0; c_ < BX_RT && c0_ + c_ < rows; c_++)                   \
                    y[(r0_ + r_) * rows + c0_ + c_] = tmp[r_ * BX_RT + c_];                 \
        }                                                                                   \
    } while (0)

// One thread's panels [p0, p1).
static void amx_panels(float *y, const uint16_t *wp, const uint16_t *xs, int64_t T,
                       int64_t rows, int64_t cols, int64_t p0, int64_t p1, float *part,
                       float *tmp) {
    int64_t NB = up(rows, BX_RT), KT = up(cols, BX_KT), RB = up(T, BX_RT);
    int64_t sw = min64(RB, BX_SWEEP); // row tiles of partial sums per block in part
    tile_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) {
        // with a single row tile (T <= 16: decode) the sums and x's tiles hold T rows: the
        // rows past T are neither loaded nor multiplied (the same bits for the others, a
        // twelfth less time at T = 1 on a 131072 x 512 head)
        cfg.rows[i] = RB == 1 && i != 2 && i != 3 ? (uint8_t)T : BX_RT;
        cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
    for (int64_t pan = p0; pan < p1; pan++) {
        int64_t nb0 = pan * BX_PANEL, pn = min64(BX_PANEL, NB - nb0);
        for (int64_t s0 = 0; s0 < RB; s0 += BX_SWEEP) {
            int64_t s1 = min64(RB, s0 + BX_SWEEP);
            for (int64_t q0 = 0; q0 < KT; q0 += BX_QT) {
                int64_t qn = min64(BX_QT, KT - q0);
                int last = q0 + qn >= KT;
                const uint16_t *Bq = wp + (nb0 * KT + q0 * pn) * 1024;
                for (int64_t j = 0; j < pn; j++) {
                    const uint16_t *B = Bq + j * qn * 1024;
                    for (int64_t rb = s0; rb < s1; rb += 2) {
                        int two = rb + 1 < s1;
                        float *c0 = part + (j * sw + (rb - s0)) * 256, *c1 = c0 + 256;
                        if (q0 == 0) {
                            _tile_zero(0);
                            _tile_zero(1);
                        } else {
                            _tile_loadd(0, c0, 64);
                            if (two)
                                _tile_loadd(1, c1, 64);
                        }
                        for (int64_t kt = 0; kt < qn; kt++) {
                            const uint16_t *Bt = B + kt * 1024;
                            const uint16_t *A = xs + ((q0 + kt) * RB + rb) * 1024;
                            if (rb == s0) // the stream's next tile (it runs on past the panel)
                                for (int i = 0; i < 2048; i += 64)
                                    _mm_prefetch((const char *)(Bt + 1024) + i, _MM_HINT_T0);
                            _tile_loadd(2, Bt, 64);
                            _tile_loadd(3, Bt + 512, 64);
                            _tile_loadd(4, A, 64);
                            _tile_loadd(5, A + 512, 64);
                            _tile_dpbf16ps(0, 4, 2); // hi x . hi w
                            _tile_dpbf16ps(0, 5, 2); // lo x . hi w
                            _tile_dpbf16ps(0, 4, 3); // hi x . lo w
                            if (two) {
                                _tile_loadd(6, A + 1024, 64);
                                _tile_loadd(7, A + 1536, 64);
                                _tile_dpbf16ps(1, 6, 2);
                                _tile_dpbf16ps(1, 7, 2);
                                _tile_dpbf16ps(1, 6, 3);
                            }
                        }
                        if (!last) {
                            _tile_stored(0, c0, 64);
                            if (two)
                                _tile_stored(1, c1, 64);
                        } else {
                            STORE_C(0, rb * BX_RT, nb0 + j);
                            if (two)
                                STORE_C(1, (rb + 1) * BX_RT, nb0 + j);
                        }
                    }
                }
            }
        }
    }
    _tile_release();
}

#undef STORE_C

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

void bx_linear(float *y, const float *x, const uint16_t *wp, int64_t T, int64_t rows,
               int64_t cols, int nthreads, void *ws) {
    if (T < 1 || rows < 1)
        return;
    int64_t NB = up(rows, BX_RT), KT = up(cols, BX_KT), RB = up(T, BX_RT);
    int64_t NP = up(NB, BX_PANEL);
    // x's halves, one 1 KiB tile per (K tile, row tile), hi then lo: A's layout, zero-padded
    uint16_t *xs = ws;
    for (int64_t kt = 0; kt < KT; kt++)
        for (int64_t rb = 0; rb < RB; rb++) {
            uint16_t *h = xs + (kt * RB + rb) * 1024, *l = h + 512;
            for (int r = 0; r < BX_RT; r++)
                for (int kk = 0; kk < BX_KT; kk++) {
                    int64_t t = rb * BX_RT + r, k = kt * BX_KT + kk;
                    bx_split(t < T && k < cols ? x[t * cols + k] : 0.0f, &h[r * 32 + kk],
                             &l[r * 32 + kk]);
                }
        }
    int team = T * rows * cols < BX_PAR_MIN || nthreads < 1 ? 1 : nthreads;
    if (team > NP)
        team = (int)NP;
    char *per = (char *)ws + ws_x_bytes(RB, KT);
    size_t per_bytes = ws_thread_bytes(RB);
#pragma omp parallel num_threads(team)
    {
        int id = omp_get_thread_num(), n = omp_get_num_threads();
        float *part = (float *)(per + (size_t)id * per_bytes);
        float *tmp = (float *)((char *)part + per_bytes - 1024);
        amx_panels(y, wp, xs, T, rows, cols, NP * id / n, NP * (id + 1) / n, part, tmp);
    }
}


// ---- prompt rows on AMX ---------------------------------------------------------------------

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")
#endif

bool bxq_available(void) {
    static int state = -1; // benign race, as in bx_amx
    if (state < 0) {
        __builtin_cpu_init();
        state = bx_amx() && __builtin_cpu_supports("avx512bf16");
    }
    return state == 1;
}

// The halves of the n (<= 32, the rest zero) values at v: 32 bf16 each, in order.
static inline void bq_split32(const float *v, int64_t n, __m512i *hi, __m512i *lo) {
    __mmask16 m0 = n >= 16 ? (__mmask16)0xffff : n > 0 ? (__mmask16)((1u << n) - 1) : 0;
    __mmask16 m1 = n >= 32 ? (__mmask16)0xffff : n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : 0;
    __m512 a = _mm512_maskz_loadu_ps(m0, v), b = _mm512_maskz_loadu_ps(m1, v + 16);
    __m512i h = (__m512i)_mm512_cvtne2ps_pbh(b, a);
    __m512 ha = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
    __m512 hb = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
    *hi = h;
    *lo = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(b, hb), _mm512_sub_ps(a, ha));
}

// r[i][j] -> r[j][i] for 16 rows of 16 32-bit elements.
static inline void bq_tr16(__m512i *r) {
    __m512i a[16], b[16];
    for (int k = 0; k < 16; k += 2) {
        a[k] = _mm512_unpacklo_epi32(r[k], r[k + 1]);
        a[k + 1] = _mm512_unpackhi_epi32(r[k], r[k + 1]);
    }
    for (int m = 0; m < 16; m += 4) {
        b[m] = _mm512_unpacklo_epi64(a[m], a[m + 2]);
        b[m + 1] = _mm512_unpackhi_epi64(a[m], a[m + 2]);
        b[m + 2] = _mm512_unpacklo_epi64(a[m + 1], a[m + 3]);
        b[m + 3] = _mm512_unpackhi_epi64(a[m + 1], a[m + 3]);
    }
    for (int q = 0; q < 4; q++) {
        __m512i c0 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0x44);
        __m512i c1 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0xee);
        __m512i c2 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0x44);
        __m512i c3 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0xee);
        r[q] = _mm512_shuffle_i32x4(c0, c2, 0x88);
        r[4 + q] = _mm512_shuffle_i32x4(c0, c2, 0xdd);
        r[8 + q] = _mm512_shuffle_i32x4(c1, c3, 0x88);
        r[12 + q] = _mm512_shuffle_i32x4(c1, c3, 0xdd);
    }
}

// x's halves as B tiles: for token tile tb and K tile kt, the pair (k, k+1) of token t at
// 32-bit element (k/2) * 16 + t of the hi tile, then the lo tile.
static void bq_prep_x(uint16_t *xs, const float *x, int64_t T, int64_t cols, int64_t tb) {
    int64_t KT = up(cols, BX_KT);
    for (int64_t kt = 0; kt < KT; kt++) {
        uint16_t *h = xs + (tb * KT + kt) * 1024, *l = h + 512;
        __m512i vh[16], vl[16];
        for (int64_t t = 0; t < BX_RT; t++) {
            int64_t row = tb * BX_RT + t;
            if (row < T) {
                bq_split32(x + row * cols + kt * BX_KT, cols - kt * BX_KT, &vh[t], &vl[t]);
            } else {
                vh[t] = _mm512_setzero_si512();
                vl[t] = vh[t];
            }
        }
        bq_tr16(vh);
        bq_tr16(vl);
        for (int p = 0; p < 16; p++) {
            _mm512_storeu_si512(h + p * 32, vh[p]);
            _mm512_storeu_si512(l + p * 32, vl[p]);
        }
    }
}

// NF4 rows whose blocks start on a byte (cols a multiple of 64): each block's 16 values
// (code * absmax in f32, the values bi_decode_f32 gives) are split once, and each weight's
// halves looked up from its nibble (weight 2i the high nibble of byte i).
static void bq_nf4_row(uint16_t *h, const kq_weight *w, int64_t row) {
    int64_t cols = w->cols, nb = cols / 64;
    const uint8_t *p = (const uint8_t *)w->data + row * (cols / 2);
    const __m512 code = _mm512_loadu_ps(w->nf4_code);
    for (int64_t b = 0; b < nb; b++) {
        int64_t i = row * nb + b;
        float am = w->absmax_q
                       ? w->dyn_code[w->absmax_q[i]] * w->absmax_scale[i / 256] + w->absmax_offset
                       : w->scale[i];
        float lut[16];
        _mm512_storeu_ps(lut, _mm512_mul_ps(code, _mm512_set1_ps(am)));
        __m512i th, tl;
        bq_split32(lut, 16, &th, &tl);
        for (int u = 0; u < 2; u++, h += 1024) {
            const __m128i *q = (const __m128i *)(p + b * 32 + u * 16);
            __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(q));
            __m512i lo = _mm512_and_si512(d, _mm512_set1_epi32(15));
            __m512i ix = _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(lo, 16));
            _mm512_storeu_si512(h, _mm512_permutexvar_epi16(ix, th));
            _mm512_storeu_si512(h + 512, _mm512_permutexvar_epi16(ix, tl));
        }
    }
}

static void bq_prep_w(uint16_t *a, float *f, const kq_weight *w, int64_t r0, int64_t n) {
    int64_t cols = w->cols, KT = up(cols, BX_KT), NR = up(n, 2 * BX_RT) * 2 * BX_RT;
    int nf4 = w->format == KQ_NF4 && cols % 64 == 0;
    for (int64_t row = 0; row < NR; row++) {
        uint16_t *h = a + (row / BX_RT * KT) * 1024 + row % BX_RT * 32;
        if (row < n && nf4) {
            bq_nf4_row(h, w, r0 + row);
            continue;
        }
        if (row < n)
            bi_decode_f32(f, w, r0 + row, 1);
        for (int64_t kt = 0; kt < KT; kt++, h += 1024) {
            __m512i vh, vl;
            if (row < n) {
                bq_split32(f + kt * BX_KT, cols - kt * BX_KT, &vh, &vl);
            } else {
                vh = _mm512_setzero_si512();
                vl = vh;
            }
            _mm512_storeu_si512(h, vh);
            _mm512_storeu_si512(h + 512, vl);
        }
    }
}

// y's columns o0 .. o0+15 (weight rows) and rows t0 .. t0+15 from a tile of sums held as
// [weight row][token] in c, the parts that exist.
static void bq_store(float *y, const float *c, int64_t T, int64_t rows, int64_t t0, int64_t o0) {
    int64_t tn = min64(BX_RT, T - t0), on = min64(BX_RT, rows - o0);
    __m512i r[16];
    for (int i = 0; i < 16; i++)
        r[i] = _mm512_loadu_si512(c + i * BX_RT);
    bq_tr16(r);
    __mmask16 m = on >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << on) - 1);
    for (int64_t t = 0; t < tn; t++)
        _mm512_mask_storeu_epi32(y + (t0 + t) * rows + o0, m, r[t]);
}

// Sums 0 and 2: blocks A0, A1 against one token tile B0 (x's hi then lo).
static inline void bq_one(const uint16_t *A0, const uint16_t *A1, const uint16_t *B0,
                          int64_t KT) {
    for (int64_t kt = 0; kt < KT; kt++) {
        int64_t at = kt * 1024;
        _tile_loadd(4, A0 + at, 64);
        _tile_loadd(5, A1 + at, 64);
        _tile_loadd(6, B0 + at, 64);
        _tile_loadd(7, B0 + at + 512, 64);
        _tile_dpbf16ps(0, 4, 6); // hi w . hi x
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(0, 4, 7); // hi w . lo x
        _tile_dpbf16ps(2, 5, 7);
        _tile_loadd(4, A0 + at + 512, 64);
        _tile_loadd(5, A1 + at + 512, 64);
        _tile_dpbf16ps(0, 4, 6); // lo w . hi x
        _tile_dpbf16ps(2, 5, 6);
    }
}

// Sums 0-3: blocks A0, A1 against token tiles B0, B1.
static inline void bq_two(const uint16_t *A0, const uint16_t *A1, const uint16_t *B0,
                          const uint16_t *B1, int64_t KT) {
    for (int64_t kt = 0; kt < KT; kt++) {
        int64_t at = kt * 1024;
        _tile_loadd(4, A0 + at, 64);
        _tile_loadd(5, A1 + at, 64);
        _tile_loadd(6, B0 + at, 64);
        _tile_loadd(7, B1 + at, 64);
        _tile_dpbf16ps(0, 4, 6); // hi w . hi x
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        _tile_loadd(6, B0 + at + 512, 64);
        _tile_loadd(7, B1 + at + 512, 64);
        _tile_dpbf16ps(0, 4, 6); // hi w . lo x
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        _tile_loadd(4, A0 + at + 512, 64);
        _tile_loadd(5, A1 + at + 512, 64);
        _tile_loadd(6, B0 + at, 64);
        _tile_loadd(7, B1 + at, 64);
        _tile_dpbf16ps(0, 4, 6); // lo w . hi x
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
}

// Panel rows [o0, o0 + n) of y against every row of x, two blocks by two token tiles at a
// time: the four sums in tiles 0-3, the blocks' halves in 4-5 and x's in 6-7, loaded so that
// each product finds its operands (hi w . hi x for all four, then hi w . lo x, then
// lo w . hi x; a last odd token tile goes alone). The panel's blocks are padded with zeros
// to an even count.
static void bq_panel(float *y, const uint16_t *a, const uint16_t *xs, int64_t T, int64_t rows,
                     int64_t cols, int64_t o0, int64_t n, float *c) {
    int64_t KT = up(cols, BX_KT), NB = up(n, BX_RT), TB = up(T, BX_RT);
    for (int64_t b = 0; b < NB; b += 2) {
        const uint16_t *A0 = a + b * KT * 1024, *A1 = A0 + KT * 1024;
        for (int64_t tb = 0; tb < TB; tb += 2) {
            const uint16_t *B0 = xs + tb * KT * 1024, *B1 = B0 + KT * 1024;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            if (tb + 1 == TB) // a last token tile alone: the same products, sums 0 and 2
                bq_one(A0, A1, B0, KT);
            else
                bq_two(A0, A1, B0, B1, KT);
            int64_t t0 = tb * BX_RT, oa = o0 + b * BX_RT, ob = oa + BX_RT;
            _tile_stored(0, c, 64);
            _tile_stored(1, c + 256, 64);
            _tile_stored(2, c + 512, 64);
            _tile_stored(3, c + 768, 64);
            bq_store(y, c, T, rows, t0, oa);
            if (t0 + BX_RT < T)
                bq_store(y, c + 256, T, rows, t0 + BX_RT, oa);
            if (ob < o0 + n) {
                bq_store(y, c + 512, T, rows, t0, ob);
                if (t0 + BX_RT < T)
                    bq_store(y, c + 768, T, rows, t0 + BX_RT, ob);
            }
        }
    }
}

// The tile configuration of bxq_linear: eight tiles of 16 rows of 64 bytes.
static void bq_config(void) {
    tile_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) {
        cfg.rows[i] = BX_RT;
        cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
}

// The tiles given back (a function of its own: bxq_linear, declared in k_bx.h outside the
// target region, must not use the tile instructions itself).
static void bq_release(void) { _tile_release(); }

// Panel p of matrix e: decoded and split into a, then against every row of x.
static void bq_panel_at(float *y, const kq_weight *w, int64_t e, const uint16_t *xs, int64_t T,
                        int64_t p, char *mine) {
    int64_t rows = w->rows, cols = w->cols, o0 = p * BQ_PANEL, n = min64(BQ_PANEL, rows - o0);
    size_t per_bytes = (bq_thread_bytes(cols) + 63) / 64 * 64;
    float *f = (float *)(void *)mine;
    uint16_t *a = (uint16_t *)(void *)(mine + (size_t)BQ_PANEL * (size_t)cols * 4);
    float *c = (float *)(void *)(mine + per_bytes - 4096);
    bq_prep_w(a, f, w, e * rows + o0, n);
    bq_panel(y, a, xs, T, rows, cols, o0, n, c);
}

// One thread runs on the caller's thread, outside any parallel region (as bi_linear does:
// no nested region to set up per call inside an expert's or an adapter group's thread).
void bxq_linear(float *y, const float *x, const kq_weight *w, int64_t e, int64_t T,
                int nthreads, void *ws) {
    int64_t rows = w->rows, cols = w->cols;
    if (T < 1 || rows < 1)
        return;
    int64_t TB = up(T, BX_RT), NP = up(rows, BQ_PANEL);
    int team = T * rows * cols < BX_PAR_MIN || nthreads < 1 ? 1 : nthreads;
    if (team > NP && team > TB)
        team = (int)(NP > TB ? NP : TB);
    uint16_t *xs = ws;
    char *per = (char *)ws + bq_x_bytes(T, cols);
    size_t per_bytes = (bq_thread_bytes(cols) + 63) / 64 * 64;
    if (team == 1) {
        for (int64_t tb = 0; tb < TB; tb++)
            bq_prep_x(xs, x, T, cols, tb);
        bq_config();
        for (int64_t p = 0; p < NP; p++)
            bq_panel_at(y, w, e, xs, T, p, per);
        bq_release();
        return;
    }
#pragma omp parallel num_threads(team)
    {
        char *mine = per + (size_t)omp_get_thread_num() * per_bytes;
#pragma omp for schedule(static)
        for (int64_t tb = 0; tb < TB; tb++)
            bq_prep_x(xs, x, T, cols, tb);
        bq_config();
#pragma omp for schedule(dynamic, 1)
        for (int64_t p = 0; p < NP; p++)
            bq_panel_at(y, w, e, xs, T, p, mine);
        bq_release();
    }
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else

bool bx_amx(void) { return false; }

void bx_linear(float *y, const float *x, const uint16_t *wp, int64_t T, int64_t rows,
               int64_t cols, int nthreads, void *ws) {
    (void)y, (void)x, (void)wp, (void)T, (void)rows, (void)cols, (void)nthreads, (void)ws;
    abort(); // callers ask bx_amx() first
}

bool bxq_available(void) { return false; }

void bxq_linear(float *y, const float *x, const kq_weight *w, int64_t e, int64_t T,
                int nthreads, void *ws) {
    (void)y, (void)x, (void)w, (void)e, (void)T, (void)nthreads, (void)ws;
    abort(); // callers ask bxq_available() first
}

#endif

#endif
