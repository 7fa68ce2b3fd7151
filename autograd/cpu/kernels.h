// autograd/cpu/kernels.h: prototypes of every CPU kernel, for f32 and f64. The op files
// include this; each cpu/k_*.c includes its own k_*.h after cpu/real.h.
#ifndef MOLT_CPU_KERNELS_H
#define MOLT_CPU_KERNELS_H

#include <stdint.h>

#define real float
#define K(name) name##_f32
#include "k_all.h"
#undef real
#undef K

#define real double
#define K(name) name##_f64
#include "k_all.h"
#undef real
#undef K

#include "k_bx.h"

#endif
