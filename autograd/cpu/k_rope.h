// autograd/cpu/k_rope.h: rope kernels (prototypes; no include guard on purpose).
