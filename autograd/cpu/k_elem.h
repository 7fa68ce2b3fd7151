// autograd/cpu/k_elem.h: elementwise kernels (prototypes; no include guard on purpose).
// Pointer comments give shapes; n is the element count.
void K(add_fwd)(real *y, const real *a, const real *b, int64_t n);          // y, a, b (n)
void K(mul_fwd)(real *y, const real *a, const real *b, int64_t n);          // y, a, b (n)
void K(scale_fwd)(real *y, const real *a, real s, int64_t n);               // y, a (n)
void K(acc)(real *g, const real *dy, int64_t n);                            // g += dy
void K(acc_mul)(real *g, const real *dy, const real *b, int64_t n);         // g += dy*b
void K(acc_scale)(real *g, const real *dy, real s, int64_t n);              // g += s*dy
real K(sum_fwd)(const real *a, int64_t n);
