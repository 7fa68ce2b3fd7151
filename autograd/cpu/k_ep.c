// autograd/cpu/k_ep.c: expert parallelism's row moves (see k_ep.h). Memory-bound copies and
// weighted sums: one kernel each, which is also the reference.
#include "real.h"
#include "k_ep.h"

#include <string.h>

#define PAR_MIN 16384 // elements below which threads cost more than they save

void K(ep_pack)(real *send, const real *x, const int32_t *pos, int64_t T, int64_t k, int64_t H) {
#pragma omp parallel for schedule(static) if (T * H >= PAR_MIN)
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < k; j++)
            memcpy(send + (int64_t)pos[t * k + j] * H, x + t * H, (size_t)H * sizeof(real));
}

void K(ep_unpack_add)(real *dx, const real *back, const int32_t *pos, int64_t T, int64_t k,
                      int64_t H) {
#pragma omp parallel for schedule(static) if (T * H >= PAR_MIN)
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < k; j++) {
            const real *b = back + (int64_t)pos[t * k + j] * H;
            real *d = dx + t * H;
            for (int64_t h = 0; h < H; h++)
                d[h] += b[h];
        }
}

void K(ep_combine_fwd)(real *out, const real *ret, const real *w, const int32_t *pos, int64_t T,
                       int64_t k, int64_t H) {
#pragma omp parallel for schedule(static) if (T * H >= PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        real *o = out + t * H;
        for (int64_t h = 0; h < H; h++)
            o[h] = 0;
        for (int64_t j = 0; j < k; j++) {
            const real *r = ret + (int64_t)pos[t * k + j] * H;
            real wt = w[t * k + j];
            for (int64_t h = 0; h < H; h++)
                o[h] += wt * r[h];
        }
    }
}

void K(ep_combine_bwd)(real *dret, real *dw, const real *dout, const real *ret, const real *w,
                       const int32_t *pos, int64_t T, int64_t k, int64_t H) {
#pragma omp parallel for schedule(static) if (T * H >= PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        const real *g = dout + t * H;
        for (int64_t j = 0; j < k; j++) {
            int64_t p = pos[t * k + j];
            if (dret) {
                real wt = w[t * k + j], *d = dret + p * H;
                for (int64_t h = 0; h < H; h++)
                    d[h] = wt * g[h];
            }
            if (dw) {
                const real *r = ret + p * H;
                real s = 0;
                for (int64_t h = 0; h < H; h++)
                    s += g[h] * r[h];
                dw[t * k + j] += s;
            }
        }
    }
}
