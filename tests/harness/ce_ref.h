// tests/harness/ce_ref.h: the cross-entropy loss from its definition, every logit
// materialized, for the fused-loss tests (test_ops_ce.c, test_ops_ce_lowrank.c) to compare
// against: logits by loops, log-softmax with the row max subtracted, the target's entry
// picked, weighted mean over the mask, and the gradient with respect to each logit.
#ifndef MOLT_TEST_CE_REF_H
#define MOLT_TEST_CE_REF_H

#include "autograd/autograd.h"

// z (T x V, malloc'ed, freed by the caller) = h w^T, plus h2 w2^T when h2 is not NULL; read
// in double from tensors of any float dtype. h [T, C], w [V, C], h2 [T, R], w2 [V, R].
double *ce_ref_logits(const ag_tensor *h, const ag_tensor *w, const ag_tensor *h2,
                      const ag_tensor *w2);
// The mean loss sum_t m_t (lse_t - z[t, y_t]) / sum_t m_t over logits z (T x V) against
// targets (I32 [T]) with mask weights (NULL = all ones); 0 when the mask sums to 0. g (T x V,
// may be NULL) gets d loss / d z = (softmax - onehot) m_t / sum m.
double ce_ref_loss(const double *z, int64_t T, int64_t V, const ag_tensor *targets,
                   const ag_tensor *mask, double *g);

#endif
