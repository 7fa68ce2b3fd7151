// autograd/cpu/k_vexp.h: exp over arrays (prototypes; no include guard on purpose: read once
// per element type).

// z[i] = exp(z[i] - sub) for 0 <= i < n, in place; returns the sum of the new values (in
// double; for arguments <= 0, as the softmax passes: f32 sums are carried in float lanes).
// f32: vectorized (AVX2 + FMA when the processor has them), relative error below
// 4e-7 per element against exp in double; f64: libm's exp.
double K(vexp_sum)(real *z, int64_t n, real sub);
// The same without the AVX2 copy (f32: the baseline-instruction lanes), so that tests cover
// both copies on any processor.
double K(vexp_sum_generic)(real *z, int64_t n, real sub);
