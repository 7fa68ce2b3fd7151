// autograd/cpu/k_attention.h: attention kernels (prototypes; no include guard on purpose).
