// autograd/rng.c: xoshiro256** seeded through splitmix64; the one generator behind
// initialization and dropout, so a seed fixes every random draw.
#include "autograd.h"

#include <math.h>

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void ag_rng_seed(ag_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t ag_rng_next(ag_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double ag_rng_uniform(ag_rng *r) { return (double)(ag_rng_next(r) >> 11) * 0x1.0p-53; }

double ag_rng_normal(ag_rng *r) {
    double u1 = ag_rng_uniform(r), u2 = ag_rng_uniform(r);
    if (u1 < 1e-300)
        u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * 3.14159265358979323846 * u2);
}

void ag_fill_uniform(ag_tensor *t, ag_rng *r, double lo, double hi) {
    for (int64_t i = 0; i < t->numel; i++)
        ag_set(t, i, lo + (hi - lo) * ag_rng_uniform(r));
}

void ag_fill_normal(ag_tensor *t, ag_rng *r, double mean, double std) {
    for (int64_t i = 0; i < t->numel; i++)
        ag_set(t, i, mean + std * ag_rng_normal(r));
}
