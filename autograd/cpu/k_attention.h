// autograd/cpu/k_attention.h: causal packed-sequence attention kernels (prototypes; no
// include guard on purpose). Shapes: q, k, dq, dk (T, H, Dqk); v, dv, o, dout (T, H, Dv);
// lse (T, H) the log-sum-exp of each query's scaled scores (the only state kept for
// backward); seg (T); qtemp (T) or NULL for all ones. Token t attends to s <= t with
// seg[s] == seg[t]; score = scale * qtemp[t] * q_t . k_s. Backward ACCUMULATES into dq, dk,
// dv, any of which may be NULL (no gradient wanted).
#include <stddef.h>

void K(attention_fwd_ref)(real *o, real *lse, const real *q, const real *k, const real *v,
                          const int32_t *seg, const real *qtemp, double scale, int64_t T,
                          int64_t H, int64_t Dqk, int64_t Dv);
void K(attention_bwd_ref)(real *dq, real *dk, real *dv, const real *dout, const real *o,
                          const real *lse, const real *q, const real *k, const real *v,
                          const int32_t *seg, const real *qtemp, double scale, int64_t T,
                          int64_t H, int64_t Dqk, int64_t Dv);

// Optimized kernels (BLAS on query blocks, OpenMP over heads and blocks) need a workspace of
// attention_ws_bytes(T, nthreads) bytes and, in kv_lo (T), the first position of each
// token's segment (the smallest s with seg[s] == seg[t]), so that blocks skip keys of
// earlier packed sequences. nthreads is the OpenMP team size to use.
size_t K(attention_ws_bytes)(int64_t T, int nthreads);
void K(attention_fwd_fast)(real *o, real *lse, const real *q, const real *k, const real *v,
                           const int32_t *seg, const int64_t *kv_lo, const real *qtemp,
                           double scale, int64_t T, int64_t H, int64_t Dqk, int64_t Dv,
                           void *ws, int nthreads);
void K(attention_bwd_fast)(real *dq, real *dk, real *dv, const real *dout, const real *o,
                           const real *lse, const real *q, const real *k, const real *v,
                           const int32_t *seg, const int64_t *kv_lo, const real *qtemp,
                           double scale, int64_t T, int64_t H, int64_t Dqk, int64_t Dv,
                           void *ws, int nthreads);
