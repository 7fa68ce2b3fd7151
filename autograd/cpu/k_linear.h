// autograd/cpu/k_linear.h: linear kernels (prototypes; no include guard on purpose).
