// autograd/ops_attention.c: PLACEHOLDER until the rope/attention group lands.
#include "internal.h"
#define NOT_YET(name) molt_err(MOLT_EUNSUPPORTED, "%s: not implemented yet", name)
molt_status ag_rope_table_init(ag_rope_table *t, const ag_rope_config *cfg) { (void)t; (void)cfg; return NOT_YET("rope_table"); }
double ag_yarn_mscale(double s, double m) { (void)s; (void)m; return 1.0; }
ag_tensor *ag_rope(ag_ctx *c, ag_tensor *x, ag_tensor *p, const ag_rope_table *t, int s) { (void)c; (void)x; (void)p; (void)t; (void)s; NOT_YET("rope"); return NULL; }
ag_tensor *ag_attention(ag_ctx *c, ag_tensor *q, ag_tensor *k, ag_tensor *v, ag_tensor *s, ag_tensor *qt, double sc) { (void)c; (void)q; (void)k; (void)v; (void)s; (void)qt; (void)sc; NOT_YET("attention"); return NULL; }
molt_status ag_backward_rope(ag_ctx *c, ag_node *n) { (void)c; (void)n; return NOT_YET("rope"); }
molt_status ag_backward_attention(ag_ctx *c, ag_node *n) { (void)c; (void)n; return NOT_YET("attention"); }
