// autograd/cpu/k_bi_avx512vbmi.c: the AVX-512F + VBMI copy of the f32 batch-invariant tile
// kernels (body in k_bi_avx512.h; VBMI only changes how NF4 nibbles become indices). Built
// only in the f32 pass; chosen at run time by k_bi.c.
#include "real.h"

#if MOLT_REAL == 32

#include <immintrin.h>
#include <string.h>

// Every function below is compiled for AVX-512F + VBMI + FMA (GCC and clang spell it differently).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vbmi,fma"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512vbmi,fma")
#endif

#define BI_VBMI 1
#define BI_TABLE bi_kernels_avx512vbmi
#include "k_bi_avx512.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif
