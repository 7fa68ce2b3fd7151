// autograd/ops_shape.c: PLACEHOLDER until the shape/elementwise group lands.
#include "internal.h"
#define NOT_YET(name) molt_err(MOLT_EUNSUPPORTED, "%s: not implemented yet", name)
ag_tensor *ag_cast(ag_ctx *c, ag_tensor *a, ag_dtype to) { (void)c; (void)a; (void)to; NOT_YET("cast"); return NULL; }
ag_tensor *ag_reshape(ag_ctx *c, ag_tensor *a, int nd, const int64_t *s) { (void)c; (void)a; (void)nd; (void)s; NOT_YET("reshape"); return NULL; }
ag_tensor *ag_transpose(ag_ctx *c, ag_tensor *a, int d0, int d1) { (void)c; (void)a; (void)d0; (void)d1; NOT_YET("transpose"); return NULL; }
ag_tensor *ag_slice(ag_ctx *c, ag_tensor *a, int dim, int64_t s, int64_t l) { (void)c; (void)a; (void)dim; (void)s; (void)l; NOT_YET("slice"); return NULL; }
molt_status ag_split(ag_ctx *c, ag_tensor *a, int dim, int n, const int64_t *s, ag_tensor **o) { (void)c; (void)a; (void)dim; (void)n; (void)s; (void)o; return NOT_YET("split"); }
ag_tensor *ag_concat(ag_ctx *c, int n, ag_tensor *const *xs, int dim) { (void)c; (void)n; (void)xs; (void)dim; NOT_YET("concat"); return NULL; }
ag_tensor *ag_expand(ag_ctx *c, ag_tensor *a, int dim, int64_t n) { (void)c; (void)a; (void)dim; (void)n; NOT_YET("expand"); return NULL; }
ag_tensor *ag_dropout(ag_ctx *c, ag_tensor *a, double p, ag_rng *r) { (void)c; (void)a; (void)p; (void)r; NOT_YET("dropout"); return NULL; }
ag_tensor *ag_embedding(ag_ctx *c, ag_tensor *t, ag_tensor *ids) { (void)c; (void)t; (void)ids; NOT_YET("embedding"); return NULL; }
ag_tensor *ag_softmax(ag_ctx *c, ag_tensor *x) { (void)c; (void)x; NOT_YET("softmax"); return NULL; }
ag_tensor *ag_swiglu(ag_ctx *c, ag_tensor *g, ag_tensor *u) { (void)c; (void)g; (void)u; NOT_YET("swiglu"); return NULL; }
molt_status ag_backward_cast(ag_ctx *c, ag_node *n) { (void)c; (void)n; return NOT_YET("cast"); }
molt_status ag_backward_reshape(ag_ctx *c, ag_node *n) { (void)c; (void)n; return NOT_YET("reshape"); }
molt_status ag_backward_transpose(ag_ctx *c, ag_node *n) { (void)c; (void)n; return NOT_YET("transpose"); }
molt_status ag_backward_slice(ag_ctx *c, ag_node *n) { (void)c; (void)n; return NOT_YET("slice"); }
molt_status ag_backward_concat(ag_ctx *c, ag_node *n) { (void)c; (void)n; return NOT_YET("concat"); }
molt_status ag_backward_expand(ag_ctx *c, ag_node *n) { (void)c; (void)n; return NOT_YET("expand"); }
molt_status ag_backward_dropout(ag_ctx *c, ag_node *n) { (void)c; (void)n; return NOT_YET("dropout"); }
molt_status ag_backward_embedding(ag_ctx *c, ag_node *n) { (void)c; (void)n; return NOT_YET("embedding"); }
molt_status ag_backward_softmax(ag_ctx *c, ag_node *n) { (void)c; (void)n; return NOT_YET("softmax"); }
molt_status ag_backward_swiglu(ag_ctx *c, ag_node *n) { (void)c; (void)n; return NOT_YET("swiglu"); }
