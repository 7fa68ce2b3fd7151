// autograd/cpu/k_nn.h: kernels of the shape and neural-network ops (prototypes; no include
// guard on purpose: read once per element type). `_ref` kernels are the plain reference
// loops; the unsuffixed twin is the OpenMP variant selected when ag_reference_kernels() is
// false. Backward kernels accumulate (+=) into their gradient outputs.

// Shape-op backward: g[gs . i] += dy[ds . i] for every index i of the 4-dim space `shape`
// (strides in elements; a zero stride in gs sums over that dim).
void K(strided_acc)(real *g, const int64_t *gs, const real *dy, const int64_t *ds,
                    const int64_t *shape);

// Softmax over the last dim: y = exp(x - max) / sum.
void K(softmax_fwd_ref)(real *y, const real *x, int64_t rows, int64_t cols); // y, x (rows, cols)
void K(softmax_fwd)(real *y, const real *x, int64_t rows, int64_t cols);     // y, x (rows, cols)
// dx += y * (dy - sum(dy * y)) per row.
void K(softmax_bwd_ref)(real *dx, const real *y, const real *dy, int64_t rows,
                        int64_t cols); // dx, y, dy (rows, cols)
void K(softmax_bwd)(real *dx, const real *y, const real *dy, int64_t rows,
                    int64_t cols); // dx, y, dy (rows, cols)

// y = silu(g) * u.
void K(swiglu_fwd_ref)(real *y, const real *g, const real *u, int64_t n); // y, g, u (n)
void K(swiglu_fwd)(real *y, const real *g, const real *u, int64_t n);     // y, g, u (n)
// dg += dy * u * silu'(g), du += dy * silu(g); dg or du may be NULL.
void K(swiglu_bwd_ref)(real *dg, real *du, const real *g, const real *u, const real *dy,
                       int64_t n); // all (n)
void K(swiglu_bwd)(real *dg, real *du, const real *g, const real *u, const real *dy,
                   int64_t n); // all (n)

// y[t] = table[ids[t]] (ids already checked to lie in [0, V)).
void K(embedding_fwd_ref)(real *y, const real *table, const int32_t *ids, int64_t n,
                          int64_t c); // y (n, c), table (V, c), ids (n)
void K(embedding_fwd)(real *y, const real *table, const int32_t *ids, int64_t n,
                      int64_t c); // y (n, c), table (V, c), ids (n)
// dtable[ids[t]] += dy[t]; repeated ids add up.
void K(embedding_bwd_ref)(real *dtable, const real *dy, const int32_t *ids, int64_t n,
                          int64_t c); // dtable (V, c), dy (n, c), ids (n)
void K(embedding_bwd)(real *dtable, const real *dy, const int32_t *ids, int64_t n,
                      int64_t c); // dtable (V, c), dy (n, c), ids (n)

// Inverted dropout with the keep mask derived from (seed, element index) by a hash, so the
// backward pass regenerates exactly the forward mask without storing it.
// Element i's mask comes from index first + i (a rank's rows of a batch split over ranks).
void K(dropout_fwd)(real *y, const real *x, uint64_t seed, double p, int64_t first,
                    int64_t n);                                                  // y, x (n)
void K(dropout_bwd)(real *dx, const real *dy, uint64_t seed, double p, int64_t first,
                    int64_t n);                                                  // dx += (n)
// One stable softmax row: y = exp(x - max) / sum, the sum accumulated in double.
void K(softmax_row)(real *y, const real *x, int64_t n);                   // y, x (n)
