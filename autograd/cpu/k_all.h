// autograd/cpu/k_all.h: includes each kernel group's prototypes (no include guards: read
// once per element type by cpu/kernels.h).
#include "k_elem.h"
#include "k_nn.h"
#include "k_linear.h"
#include "k_rope.h"
#include "k_attention.h"
#include "k_moe.h"
#include "k_ce.h"
#include "k_quant.h"
#include "k_moe_lora.h"
#include "k_vexp.h"
#include "k_bi.h"
#include "k_lora_multi.h"
