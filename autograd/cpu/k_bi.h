// autograd/cpu/k_bi.h: batch-invariant matrix products for inference (prototypes; the
// instruction-set controls have a guard, the prototypes have none on purpose: read once per
// element type by cpu/kernels.h, after k_quant.h).
//
// "Batch-invariant": every output element y[t, o] is a function of x[t, :] and row o of the
// weight alone, computed in a summation order fixed by `cols`, so it has the same bits
// whatever T is, whatever the other rows of x hold, whichever row t is, and however many
// threads run. Serving relies on it: a request's tokens then do not depend on what else is
// in the batch (BLAS GEMMs do not promise that: their blocking changes with the row count).
// The order (k_bi.c states it) is the same for every weight format, so bi_linear_q on any
// format gives the bits of bi_linear on the dequantized matrix. Within one process the f32
// kernels run one instruction-set copy (the best the processor has: AVX-512F with or
// without VBMI, else AVX2 + FMA, else the baseline); the AVX-512F and AVX2 copies give the
// same bits, the baseline (no fused multiply-add) does not.
// Not here: backward (training uses the BLAS kernels), shape checks (the op files).
#include <stddef.h>
#include <stdint.h>

#ifndef MOLT_K_BI_ISA
#define MOLT_K_BI_ISA

// Instruction-set copies of the f32 kernels, in increasing order of preference
// (BI_ISA_AVX512VBMI: AVX-512F with VBMI's byte shuffles for NF4).
enum { BI_ISA_BASE, BI_ISA_AVX2, BI_ISA_AVX512, BI_ISA_AVX512VBMI, BI_ISA_COUNT };

// The copy the f32 kernels run now.
int bi_isa(void);
// The best copy this processor runs (what bi_isa gives unless bi_set_isa changed it).
int bi_isa_best(void);
// For tests and benchmarks only: makes the f32 kernels run copy `isa` (capped at
// bi_isa_best(); -1 restores the best). Not thread-safe: call it between kernel calls.
// Returns the copy now in use.
int bi_set_isa(int isa);
// "avx512vbmi", "avx512", "avx2" or "base".
const char *bi_isa_name(int isa);
// Reads the n floats at p once with the current copy's vector loads, split over nthreads
// threads as the kernels split weights, and returns a value depending on all of them: the
// plain read that benchmarks compare the kernels' weight bandwidth with.
float bi_read(const float *p, int64_t n, int nthreads);

#endif

// y (T, rows) = x (T, cols) . W^T, W dense (rows, cols) row-major; y overwritten.
void K(bi_linear)(real *y,       // y (T, rows)
                  const real *x, // x (T, cols)
                  const real *w, // w (rows, cols)
                  int64_t T, int64_t rows, int64_t cols, int nthreads);

// y[j] = dot(a, rows[j]) over K elements for j < n, each in bi_linear's order (the bits of
// bi_linear with x = a and weight rows rows[0..n)); on the calling thread.
void K(bi_dots)(real *y, const real *a, const real *const *rows, int64_t n, int64_t K);
// y[k] = sum over s < n of p[s] * rows[s][k] for k < K (y overwritten): for each k the terms
// are added in increasing s onto a sum starting at 0, each one multiply-add (fused in the
// AVX-512F and AVX2 copies, multiply then add in the baseline and in f64); on the calling
// thread. Nothing depends on which other rows are in the call besides rows[0..n).
void K(bi_wsum)(real *y, const real *p, const real *const *rows, int64_t n, int64_t K);
// Bytes of workspace bi_linear_q needs for T rows with up to nthreads threads.
size_t K(bi_linear_q_ws_bytes)(const kq_weight *w, int64_t T, int nthreads);
// y (T, rows) = x (T, cols) . W_e^T for matrix e of a quantized weight view (any format,
// F32 included), y overwritten; ws holds bi_linear_q_ws_bytes(w, T, nthreads) bytes. The
// result equals bi_linear on the matrix kq_dequant_range decodes, bit for bit.
void K(bi_linear_q)(real *y,       // y (T, w->rows)
                    const real *x, // x (T, w->cols)
                    const kq_weight *w, int64_t e, int64_t T, int nthreads, void *ws);
