// autograd/ops_linear.c: PLACEHOLDER until the linear/rmsnorm/cross-entropy group lands.
#include "internal.h"
#define NOT_YET(name) molt_err(MOLT_EUNSUPPORTED, "%s: not implemented yet", name)
ag_tensor *ag_linear(ag_ctx *c, ag_tensor *x, ag_tensor *w) { (void)c; (void)x; (void)w; NOT_YET("linear"); return NULL; }
ag_tensor *ag_rmsnorm(ag_ctx *c, ag_tensor *x, ag_tensor *w, double e) { (void)c; (void)x; (void)w; (void)e; NOT_YET("rmsnorm"); return NULL; }
ag_tensor *ag_cross_entropy_linear(ag_ctx *c, ag_tensor *h, ag_tensor *w, ag_tensor *t, ag_tensor *m, int64_t ch) { (void)c; (void)h; (void)w; (void)t; (void)m; (void)ch; NOT_YET("cross_entropy_linear"); return NULL; }
molt_status ag_backward_linear(ag_ctx *c, ag_node *n) { (void)c; (void)n; return NOT_YET("linear"); }
molt_status ag_backward_rmsnorm(ag_ctx *c, ag_node *n) { (void)c; (void)n; return NOT_YET("rmsnorm"); }
molt_status ag_backward_ce_linear(ag_ctx *c, ag_node *n) { (void)c; (void)n; return NOT_YET("ce"); }
