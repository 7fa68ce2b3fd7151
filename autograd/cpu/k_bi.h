// autograd/cpu/k_bi.h: batch-invariant matrix products for inference (prototypes; no include
// guard on purpose: read once per element type by cpu/kernels.h, after k_quant.h).
//
// "Batch-invariant": every output element y[t, o] is a function of x[t, :] and row o of the
// weight alone, computed in a summation order fixed by `cols`, so it has the same bits
// whatever T is, whatever the other rows of x hold, whichever row t is, and however many
// threads run. Serving relies on it: a request's tokens then do not depend on what else is
// in the batch (BLAS GEMMs do not promise that: their blocking changes with the row count).
// Not here: backward (training uses the BLAS kernels), shape checks (the op files).
#include <stddef.h>
#include <stdint.h>

// y (T, rows) = x (T, cols) . W^T, W dense (rows, cols) row-major; y overwritten.
void K(bi_linear)(real *y,       // y (T, rows)
                  const real *x, // x (T, cols)
                  const real *w, // w (rows, cols)
                  int64_t T, int64_t rows, int64_t cols, int nthreads);

// Bytes of workspace bi_linear_q needs for T rows with up to nthreads threads.
size_t K(bi_linear_q_ws_bytes)(const kq_weight *w, int64_t T, int nthreads);
// y (T, rows) = x (T, cols) . W_e^T for matrix e of a quantized weight view (any format,
// F32 included), y overwritten; ws holds bi_linear_q_ws_bytes(w, T, nthreads) bytes.
void K(bi_linear_q)(real *y,       // y (T, w->rows)
                    const real *x, // x (T, w->cols)
                    const kq_weight *w, int64_t e, int64_t T, int nthreads, void *ws);
