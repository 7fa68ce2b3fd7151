// autograd/cpu/k_bi_avx512.c: the AVX-512F copy of the f32 batch-invariant tile kernels (body
// in k_bi_avx512.h). Built only in the f32 pass; chosen at run time by k_bi.c.
#include "real.h"

#if MOLT_REAL == 32

#include <immintrin.h>
#include <string.h>

// Every function below is compiled for AVX-512F + FMA (GCC and clang spell it differently).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,fma"))), apply_to = function)
#else
#pragma GCC target("avx512f,fma")
#endif

#define BI_VBMI 0
#define BI_TABLE bi_kernels_avx512
#include "k_bi_avx512.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif
