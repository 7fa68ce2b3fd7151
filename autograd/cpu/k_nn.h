// autograd/cpu/k_nn.h: softmax, swiglu, embedding, dropout kernels (prototypes; no include guard on purpose).
