// autograd/cpu/k_bi_avx512.c: the AVX-512F copy of the f32 batch-invariant tile kernels (body
// in k_bi_avx512.h). Built only in the f32 pass; chosen at run time by k_bi.c.
#include "real.h"

#if MOLT_REAL == 32

#pragma GCC target("avx512f,fma")

#define BI_VBMI 0
#define BI_TABLE bi_kernels_avx512
#include "k_bi_avx512.h"

#endif
