// autograd/ops_moe.c: PLACEHOLDER until the MoE group lands.
#include "internal.h"
#define NOT_YET(name) molt_err(MOLT_EUNSUPPORTED, "%s: not implemented yet", name)
ag_tensor *ag_moe_router(ag_ctx *c, ag_tensor *l, const ag_router_config *cfg, ag_tensor **idx) { (void)c; (void)l; (void)cfg; (void)idx; NOT_YET("moe_router"); return NULL; }
ag_tensor *ag_moe_experts(ag_ctx *c, ag_tensor *x, ag_tensor *w, ag_tensor *i, ag_tensor *gu, ag_tensor *d) { (void)c; (void)x; (void)w; (void)i; (void)gu; (void)d; NOT_YET("moe_experts"); return NULL; }
molt_status ag_backward_moe_router(ag_ctx *c, ag_node *n) { (void)c; (void)n; return NOT_YET("moe_router"); }
molt_status ag_backward_moe_experts(ag_ctx *c, ag_node *n) { (void)c; (void)n; return NOT_YET("moe_experts"); }
