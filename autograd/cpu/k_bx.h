// autograd/cpu/k_bx.h: the vocabulary projection of inference on Intel AMX: an f32 weight
// matrix held as two bf16 planes (hi + lo) and multiplied by an f32 x held the same way, in
// three bf16 tile products (prototypes; f32 only, no per-type copies: read once by
// cpu/kernels.h through its own guard).
//
// The numbers. Each f32 value v splits into hi = bf16(v), rounded to nearest even, and
// lo = bf16(v - hi), so hi + lo keeps 16 to 17 significant bits of v (|v - hi - lo| <=
// 2^-17 |v|). y[t, o] is the sum over k of hi(x)hi(w) + lo(x)hi(w) + hi(x)lo(w) (lo(x)lo(w),
// below 2^-16 of a term, is left out): every product is exact in f32 and the hardware adds
// them into an f32 sum. Against the f32 product the result differs by a few 1e-6 of the
// largest logit: more than f32's own rounding, far less than bf16 (the format the model's
// real checkpoints store this matrix in).
//
// The order, which makes the product batch-invariant like bi_linear (cpu/k_bi.h): K is cut
// into tiles of BX_KT elements, padded with zeros; for y[t, o] the tiles come in increasing
// k, and within a tile the three products in the order above, each one instruction adding
// its 32 terms onto the f32 sum. Between runs of BX_QT tiles the sum is stored and reloaded
// unchanged. Nothing depends on T, on the other rows of x, on the tile a row falls in or on
// the threads (they split the weight rows).
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifndef MOLT_K_BX_H
#define MOLT_K_BX_H

#define BX_RT 16    // rows of x per tile, weight rows per block
#define BX_KT 32    // elements of K per tile
#define BX_QT 4     // tiles along K between stores of the sums
#define BX_PANEL 32 // blocks of weight rows per panel (a thread's unit of work)

// True when this processor and kernel run AMX-BF16 tiles (asked once per process) and
// MOLT_AMX is not "0".
bool bx_amx(void);

// Splits v into its bf16 hi and lo halves (above).
void bx_split(float v, uint16_t *hi, uint16_t *lo);
// The f32 value of bf16 h.
float bx_bf16(uint16_t h);

// Bytes the packed form of a (rows, cols) matrix takes: rows and cols rounded up to BX_RT
// and BX_KT, 4 bytes per element (the two planes).
size_t bx_pack_bytes(int64_t rows, int64_t cols);
// Packs w (rows, cols) row-major into dst (bx_pack_bytes), in the order bx_linear reads it.
void bx_pack(uint16_t *dst, const float *w, int64_t rows, int64_t cols, int nthreads);
// True when the packed form takes exactly the F32 matrix's bytes (rows a multiple of BX_RT,
// cols of BX_KT): then bx_pack_in_place can write it over the matrix.
bool bx_pack_in_place_ok(int64_t rows, int64_t cols);
// Packs w over itself (the same bytes afterwards hold bx_pack's output, as uint16_t). False,
// with w unchanged, when the shape does not allow it or a panel's copy (BX_PANEL * BX_RT
// rows) cannot be allocated.
bool bx_pack_in_place(float *w, int64_t rows, int64_t cols, int nthreads);
// hi (part 0) or lo (part 1) half of element (r, k) of a packed matrix (0 outside w).
uint16_t bx_packed_at(const uint16_t *wp, int64_t rows, int64_t cols, int64_t r, int64_t k,
                      int part);

// Bytes of workspace bx_linear needs for T rows with up to nthreads threads.
size_t bx_ws_bytes(int64_t T, int64_t cols, int nthreads);
// y (T, rows) = x (T, cols) . W^T on AMX, W packed by bx_pack; y overwritten; ws holds
// bx_ws_bytes(T, cols, nthreads) bytes aligned to 64. Only when bx_amx() is true.
void bx_linear(float *y, const float *x, const uint16_t *wp, int64_t T, int64_t rows,
               int64_t cols, int nthreads, void *ws);
// The reference: the same three products of the same halves, summed in f64, in plain C.
void bx_linear_ref(float *y, const float *x, const uint16_t *wp, int64_t T, int64_t rows,
                   int64_t cols);
// dx (T, cols) += dy (T, rows) . (hi + lo of W): the backward rule for x, in plain C.
void bx_linear_bwd_x(float *dx, const float *dy, const uint16_t *wp, int64_t T, int64_t rows,
                     int64_t cols);


// ---- the layers' products on prompt rows (prefill) -----------------------------------------
// Needs kq_weight (k_quant.h) declared first, as cpu/kernels.h does.
//
// The same three products, for a weight of any format (F32 included) decoded panel by panel
// as bi_linear_q decodes it, with the roles of the operands swapped: the weight rows are the
// A operand (16 rows of 32 elements a tile, no re-layout) and x the B operand, so the
// decoded weights are split once per call and x's halves are shared by every panel. The
// halves here are what AVX512-BF16 conversion gives: bf16(v) rounded to nearest even with
// a subnormal v taken as zero (bxq_half), lo = bf16(v - hi) the same way. y[t, o] is the f32
// sum over K tiles in increasing k, within a tile hi(w)hi(x), hi(w)lo(x), lo(w)hi(x), each
// one instruction adding its 32 terms. Nothing depends on T, on the other rows of x or on
// the threads (they split the weight rows), so it is batch-invariant like bi_linear_q, with
// other numbers: a few 1e-6 of the largest output away from the f32 product.

// True when bx_amx() is and the processor converts to bf16 (AVX512-BF16).
bool bxq_available(void);
// The hi half of v as bxq_linear computes it (lo: bxq_half(v - bf16 value of hi)).
uint16_t bxq_half(float v);
// The values bi_linear_q multiplies: rows [row0, row0 + n) of the flattened weight (matrix
// e's row o is row e * rows + o), into dst (n, cols) (k_bi.c).
void bi_decode_f32(float *dst, const kq_weight *w, int64_t row0, int64_t n);
// Bytes of workspace bxq_linear needs for T rows with up to nthreads threads.
size_t bxq_ws_bytes(const kq_weight *w, int64_t T, int nthreads);
// y (T, w->rows) = x (T, w->cols) . W_e^T on AMX (above), y overwritten; ws holds
// bxq_ws_bytes(w, T, nthreads) bytes aligned to 64. Only when bxq_available() is true.
void bxq_linear(float *y, const float *x, const kq_weight *w, int64_t e, int64_t T,
                int nthreads, void *ws);
// The reference: the same three products of the same halves, summed in f64, in plain C.
void bxq_linear_ref(float *y, const float *x, const kq_weight *w, int64_t e, int64_t T);
// bxq_linear where bxq_available(), else bxq_linear_ref (ws unused then): the numbers of the
// bf16 pairs on any processor.
void bxq_linear_any(float *y, const float *x, const kq_weight *w, int64_t e, int64_t T,
                    int nthreads, void *ws);

#endif
