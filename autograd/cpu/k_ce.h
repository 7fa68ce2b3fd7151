// autograd/cpu/k_ce.h: ce kernels (prototypes; no include guard on purpose).
