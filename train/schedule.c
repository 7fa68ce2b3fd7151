// train/schedule.c: learning-rate schedules with linear warmup (constant, linear decay,
// cosine decay), with the same formulas as transformers' get_*_schedule_with_warmup so a
// run here and a run there see the same learning rate at every step.
//
// Not here: the optimizer (optim.c); restarts, polynomial or minimum-lr variants.
#include "train.h"

#include <math.h>
#include <string.h>

// math.pi; M_PI is not part of C11.
static const double sched_pi = 3.14159265358979323846;

static const char *const kind_names[SCHED_KIND_COUNT] = {"constant", "linear", "cosine"};

const char *sched_kind_name(sched_kind kind) {
    return (unsigned)kind < SCHED_KIND_COUNT ? kind_names[kind] : "?";
}

molt_status sched_kind_parse(const char *name, sched_kind *kind) {
    for (int k = 0; k < SCHED_KIND_COUNT; k++)
        if (name && strcmp(name, kind_names[k]) == 0) {
            *kind = (sched_kind)k;
            return MOLT_OK;
        }
    return molt_err(MOLT_EARG, "unknown lr schedule '%s' (expected constant, linear or cosine)",
                    name ? name : "(null)");
}

molt_status sched_init(sched_state *s, sched_kind kind, double lr_max, int64_t warmup_steps,
                       int64_t total_steps) {
    if ((unsigned)kind >= SCHED_KIND_COUNT)
        return molt_err(MOLT_EARG, "schedule: unknown kind %d", (int)kind);
    if (!isfinite(lr_max) || lr_max <= 0)
        return molt_err(MOLT_EARG, "schedule: learning rate must be finite and > 0, got %g",
                        lr_max);
    if (warmup_steps < 0 || total_steps < 0)
        return molt_err(MOLT_EARG, "schedule: negative step count (warmup %lld, total %lld)",
                        (long long)warmup_steps, (long long)total_steps);
    s->kind = kind;
    s->lr_max = lr_max;
    s->warmup_steps = warmup_steps;
    s->total_steps = total_steps;
    s->num_cycles = 0.5;
    s->step = 0;
    return MOLT_OK;
}

static int64_t max_i64(int64_t a, int64_t b) {
    return a > b ? a : b;
}

double sched_factor(const sched_state *s, int64_t step) {
    // transformers divides by max(1, warmup) and max(1, total - warmup) in floating point.
    if (step < s->warmup_steps)
        return (double)step / (double)max_i64(1, s->warmup_steps);
    double span = (double)max_i64(1, s->total_steps - s->warmup_steps);
    switch (s->kind) {
    case SCHED_CONSTANT:
        return 1.0;
    case SCHED_LINEAR:
        return fmax(0.0, (double)(s->total_steps - step) / span);
    case SCHED_COSINE: {
        double progress = (double)(step - s->warmup_steps) / span;
        return fmax(0.0, 0.5 * (1.0 + cos(sched_pi * s->num_cycles * 2.0 * progress)));
    }
    default:
        return 0.0;
    }
}

double sched_lr(const sched_state *s) {
    return s->lr_max * sched_factor(s, s->step);
}

void sched_advance(sched_state *s) {
    s->step += 1;
}
