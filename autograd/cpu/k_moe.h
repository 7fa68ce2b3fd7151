// autograd/cpu/k_moe.h: moe kernels (prototypes; no include guard on purpose).
