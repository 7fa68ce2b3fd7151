// adapters/internal.h: helpers shared by the files of the adapters module (not public).
#ifndef MOLT_ADAPTERS_INTERNAL_H
#define MOLT_ADAPTERS_INTERNAL_H

#include "adapters.h"

// Every adaptable unit of m in model order (A/B unset); *units is freed with molt_free.
molt_status lora_list_units(mdl_model *m, lora_unit **units, int *n);
// PEFT's key of a unit: the module path, or the parameter path for units PEFT adapts as
// parameters (router weight, routed experts); rank/alpha patterns match it.
void lora_peft_key(const lora_unit *u, char *buf, size_t cap);
// MOLT_EFORMAT naming file, the tensor (PEFT name) and the element when an A or B of ad
// holds a NaN or an infinity: such an adapter only turns outputs into NaN.
molt_status lora_check_finite(const lora_adapter *ad, const char *file);

#endif
