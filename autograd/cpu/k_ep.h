// autograd/cpu/k_ep.h: the row moves of expert parallelism around the all-to-alls
// (prototypes; no include guard on purpose: read once per element type by cpu/kernels.h).
// Sizes: T tokens, k experts per token, H hidden, S = T*k routing slots. pos[t*k + j] is the
// row of slot (t, j) in the send buffer (slots grouped by destination rank). Each kernel is
// a plain loop over tokens, parallel over tokens for large batches; every token's row is
// computed by one thread in a fixed order, so the result does not depend on the threads.

// Dispatch forward: send[pos[t*k+j]] = x[t].
void K(ep_pack)(real *send,          // send (S, H)
                const real *x,       // x (T, H)
                const int32_t *pos,  // pos (T*k)
                int64_t T, int64_t k, int64_t H);
// Dispatch backward: dx[t] += sum_j back[pos[t*k+j]] (j ascending).
void K(ep_unpack_add)(real *dx,          // dx (T, H), accumulated
                      const real *back,  // back (S, H)
                      const int32_t *pos, int64_t T, int64_t k, int64_t H);
// Combine forward: out[t] = sum_j w[t,j] * ret[pos[t*k+j]] (j ascending); out overwritten.
void K(ep_combine_fwd)(real *out,         // out (T, H)
                       const real *ret,   // ret (S, H) the experts' outputs, returned
                       const real *w,     // w (T, k)
                       const int32_t *pos, int64_t T, int64_t k, int64_t H);
// Combine backward: dret[pos[t*k+j]] = w[t,j] * dout[t] (when dret is not NULL) and
// dw[t,j] += dout[t] . ret[pos[t*k+j]] (when dw is not NULL).
void K(ep_combine_bwd)(real *dret,        // dret (S, H) or NULL, overwritten
                       real *dw,          // dw (T, k) or NULL, accumulated
                       const real *dout,  // dout (T, H)
                       const real *ret,   // ret (S, H)
                       const real *w,     // w (T, k)
                       const int32_t *pos, int64_t T, int64_t k, int64_t H);
