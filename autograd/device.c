// autograd/device.c: PLACEHOLDER until the CUDA plumbing lands.
#include "autograd.h"
#include <string.h>
void ag_device_query(ag_device_info *info) { memset(info, 0, sizeof *info); }
molt_status ag_cuda_describe(int i, char *buf, size_t cap) { (void)i; (void)buf; (void)cap; return molt_err(MOLT_EDEVICE, "no CUDA"); }
ag_tensor *ag_to_device(ag_tensor *t, ag_device d) { (void)t; (void)d; molt_err(MOLT_EDEVICE, "no CUDA"); return NULL; }
void ag_device_tensor_free(ag_tensor *t) { (void)t; }
molt_status ag_device_add(ag_tensor *y, const ag_tensor *a, const ag_tensor *b) { (void)y; (void)a; (void)b; return molt_err(MOLT_EDEVICE, "no CUDA"); }
