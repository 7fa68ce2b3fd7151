#!/usr/bin/env python3
"""Reference numbers for molt's evaluation statistics (tests/test_eval_stats.c).

Writes tests/fixtures/eval/stats.json: fixed data sets (per system, one value per example,
null = missing) and, for each, the numbers molt's infer/eval/stats.c must reproduce:

  replay  the percentile bootstrap recomputed here with molt's own generator (xoshiro256**
          seeded through splitmix64, as autograd/rng.c; resample index floor(u * n) with
          u = (next >> 11) * 2^-53, n draws per resample in order): the same resamples, the
          resample means with NumPy (nanmean, summed in draw order), the interval with
          numpy.quantile (method 'linear') and the shifted-null p-value
          (1 + #{|m_b - dbar| >= |dbar|}) / (B' + 1). The C test matches these to 1e-12.
  scipy   scipy.stats.bootstrap(method='percentile', paired=True for differences) on the
          same data with SCIPY_RESAMPLES resamples, its bootstrap distribution's standard
          deviation, and the p-value by the same definition from that distribution. molt
          (10000 resamples) must agree within the Monte-Carlo tolerance in "tolerance".
  mcnemar statsmodels' mcnemar(table, exact=True) p-values, from the data and for fixed
          tables.
  holm    statsmodels' multipletests(p, method='holm') adjusted p-values.

Every float is written with Python's repr, which round-trips. Run from the repository root:
  /work/venv-stats/bin/python tools/reference/eval_stats_reference.py
"""
import json
import math
import platform

import numpy as np
import scipy
import scipy.stats
import statsmodels
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

OUT = "tests/fixtures/eval/stats.json"
MASK = (1 << 64) - 1
SCIPY_RESAMPLES = 200000
OPTS = [  # molt's default first; the SciPy comparison uses it
    {"n_resamples": 10000, "level": 0.95, "seed": 0},
    {"n_resamples": 2000, "level": 0.90, "seed": 12345},
]
TOL = {
    "replay_abs": 1e-12,
    # |molt - scipy| <= interval_sd * sd (+ 1/n for 0/1 data, one atom of the discrete
    # resample distribution): the 2.5% quantile of 10000 resamples has a standard error of
    # about 0.027 sd, SciPy's of 200000 about 0.006 sd, so 0.15 sd is over 5 standard errors.
    "interval_sd": 0.15,
    # |p_molt - p_scipy| <= p_se * sqrt(p (1 - p) / 10000) + p_abs
    "p_se": 5.0,
    "p_abs": 2e-4,
    "mcnemar_rel": 1e-12,
    "holm_abs": 1e-15,
}


# ---- molt's generator -------------------------------------------------------------------
def rotl(x, k):
    return ((x << k) | (x >> (64 - k))) & MASK


class MoltRng:
    """autograd/rng.c: xoshiro256** with its state seeded by four splitmix64 outputs."""

    def __init__(self, seed):
        x = seed & MASK
        self.s = []
        for _ in range(4):
            x = (x + 0x9E3779B97F4A7C15) & MASK
            z = x
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
            self.s.append(z ^ (z >> 31))

    def next(self):
        s0, s1, s2, s3 = self.s
        result = (rotl((s1 * 5) & MASK, 7) * 9) & MASK
        t = (s1 << 17) & MASK
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        s3 = rotl(s3, 45)
        self.s = [s0, s1, s2, s3]
        return result

    def uniform(self):
        return float(self.next() >> 11) * 2.0**-53

    def index(self, n):
        return min(int(self.uniform() * float(n)), n - 1)


_index_cache = {}


def resample_indices(seed, n, B):
    """[B, n] indices: every molt bootstrap call restarts the generator from the seed."""
    key = (seed, n, B)
    if key not in _index_cache:
        r = MoltRng(seed)
        _index_cache[key] = np.array([[r.index(n) for _ in range(n)] for _ in range(B)],
                                     dtype=np.int64)
    return _index_cache[key]


# ---- the replayed bootstrap -------------------------------------------------------------
def seq_mean(x):
    """Mean of the present values, summed in order as molt does."""
    s, m = 0.0, 0
    for v in x:
        if not math.isnan(v):
            s += v
            m += 1
    return s / m


def shifted_p(means, dbar):
    means = means[~np.isnan(means)]
    extreme = int(np.sum(np.abs(means - dbar) >= abs(dbar)))
    return (1 + extreme) / (len(means) + 1)


def replay(x, opts):
    """molt's bootstrap of one column x (NaN = missing)."""
    n = len(x)
    idx = resample_indices(opts["seed"], n, opts["n_resamples"])
    present = ~np.isnan(x)
    vals = np.where(present, x, 0.0)[idx]
    sums = np.cumsum(vals, axis=1)[:, -1]  # cumsum adds left to right: draw order
    counts = present[idx].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    valid = means[~np.isnan(means)]
    lv = opts["level"]
    lo, hi = np.quantile(valid, [(1 - lv) / 2, (1 + lv) / 2], method="linear")
    dbar = seq_mean(x)
    return {"n": int(present.sum()), "n_missing": int(n - present.sum()), "mean": dbar,
            "lo": float(lo), "hi": float(hi), "p": shifted_p(means, dbar)}


def scipy_boot(data, paired, seed):
    lv = OPTS[0]["level"]
    if paired:
        def stat(s, b, axis):
            return np.nanmean(s - b, axis=axis)
    else:
        def stat(x, axis):
            return np.nanmean(x, axis=axis)
    res = scipy.stats.bootstrap(data, stat, n_resamples=SCIPY_RESAMPLES, paired=paired,
                                vectorized=True, confidence_level=lv, method="percentile",
                                rng=np.random.default_rng(seed), batch=20000)
    dist = res.bootstrap_distribution
    r = {"lo": float(res.confidence_interval.low), "hi": float(res.confidence_interval.high),
         "sd": float(np.nanstd(dist))}
    if paired:  # the p-value of the difference, by molt's definition, from SciPy's resamples
        r["p"] = shifted_p(dist, seq_mean(data[0] - data[1]))
    return r


# ---- data sets --------------------------------------------------------------------------
def datasets():
    g = np.random.default_rng(20240611)
    out = []
    n = 40  # per-example losses (lower is better)
    base = g.normal(2.0, 0.5, n)
    out.append({"name": "loss", "binary": False, "lower_is_better": True, "scipy": True,
                "systems": {"base": base, "r8": base - 0.15 + g.normal(0, 0.2, n),
                            "r16": base + g.normal(0, 0.3, n)}})
    n = 60  # 0/1 accuracy
    base = (g.random(n) < 0.55).astype(float)
    a = base.copy()
    a[g.random(n) < 0.25] = 1.0  # gains
    a[g.random(n) < 0.08] = 0.0  # a few losses
    b = base.copy()
    b[g.random(n) < 0.10] = 1.0
    b[g.random(n) < 0.10] = 0.0
    out.append({"name": "accuracy", "binary": True, "lower_is_better": False, "scipy": True,
                "systems": {"base": base, "ckpt-1": a, "ckpt-2": b}})
    n = 30  # a score with missing values in both columns
    base = np.round(g.uniform(0, 1, n), 3)
    sysv = np.round(np.clip(base + g.normal(0.05, 0.1, n), 0, 1), 3)
    base[[3, 11, 17]] = np.nan
    sysv[[11, 20, 25, 26]] = np.nan
    out.append({"name": "missing", "binary": False, "lower_is_better": False, "scipy": True,
                "systems": {"base": base, "adapter": sysv}})
    # three examples: a coarse discrete resample distribution (replay only)
    out.append({"name": "tiny", "binary": False, "lower_is_better": False, "scipy": False,
                "systems": {"base": np.array([0.5, 0.25, 1.0]),
                            "adapter": np.array([0.75, 0.25, 0.5])}})
    return out


def counts(s, b, binary, lower_is_better):
    ok = ~np.isnan(s) & ~np.isnan(b)
    s, b = s[ok], b[ok]
    better = (s < b) if lower_is_better else (s > b)
    r = {"win": int(better.sum()), "tie": int((s == b).sum()),
         "loss": int((~better & (s != b)).sum())}
    if binary:
        r["n01"] = int(((b == 0) & (s == 1)).sum())
        r["n10"] = int(((b == 1) & (s == 0)).sum())
        table = np.array([[0, r["n01"]], [r["n10"], 0]])  # a and d do not enter the test
        r["p_mcnemar"] = float(mcnemar(table, exact=True).pvalue)
    return r


def jlist(x):
    return [None if math.isnan(v) else float(v) for v in x]


def main():
    fixture = {"about": __doc__.strip().splitlines()[0],
               "versions": {"python": platform.python_version(), "numpy": np.__version__,
                            "scipy": scipy.__version__, "statsmodels": statsmodels.__version__},
               "opts": OPTS, "scipy_resamples": SCIPY_RESAMPLES, "tolerance": TOL}
    # the first indices molt's generator gives, for debugging a replay mismatch
    fixture["indices"] = []
    for seed, n in ((0, 40), (12345, 60), (2**64 - 1, 7)):
        r = MoltRng(seed)
        fixture["indices"].append({"seed": str(seed), "n": n,
                                   "first": [r.index(n) for _ in range(16)]})
    out = []
    for k, d in enumerate(datasets()):
        names = list(d["systems"])
        base = d["systems"][names[0]]
        e = {"name": d["name"], "binary": d["binary"], "lower_is_better": d["lower_is_better"],
             "baseline": names[0], "systems": {s: jlist(v) for s, v in d["systems"].items()},
             "order": names, "replay": [], "scipy": None}
        for opts in OPTS:
            r = {"mean": {s: replay(v, opts) for s, v in d["systems"].items()}, "paired": {}}
            for s in names[1:]:
                v = d["systems"][s]
                rp = replay(v - base, opts)
                rp.update(counts(v, base, d["binary"], d["lower_is_better"]))
                r["paired"][s] = rp
            for m in r["mean"].values():
                del m["p"]  # a mean has no p-value
            ps = [r["paired"][s]["p_mcnemar" if d["binary"] else "p"] for s in names[1:]]
            adj = multipletests(ps, method="holm")[1]
            r["holm"] = {s: float(a) for s, a in zip(names[1:], adj)}
            e["replay"].append(r)
        if d["scipy"]:
            e["scipy"] = {"mean": {s: scipy_boot((v,), False, 100 + k)
                                   for s, v in d["systems"].items()},
                          "paired": {s: scipy_boot((d["systems"][s], base), True, 200 + k)
                                     for s in names[1:]}}
        out.append(e)
    fixture["datasets"] = out
    fixture["mcnemar"] = []
    for n01, n10 in ((0, 0), (5, 0), (0, 5), (1, 1), (7, 3), (10, 12), (3, 17), (40, 70),
                     (200, 260), (1000, 1100), (1500, 1700)):
        p = mcnemar(np.array([[0, n01], [n10, 0]]), exact=True).pvalue
        fixture["mcnemar"].append({"n01": n01, "n10": n10, "p": float(p)})
    fixture["holm"] = []
    for ps in ([0.01, 0.04, 0.03, 0.005], [0.2, 0.2, 0.01], [0.5], [0.03, 0.03, 0.03, 0.03],
               [0.001, 0.9, 0.0125, 0.04, 0.6]):
        fixture["holm"].append({"p": ps, "adj": [float(a) for a in
                                                 multipletests(ps, method="holm")[1]]})
    with open(OUT, "w") as f:
        json.dump(fixture, f, indent=1, allow_nan=False)
        f.write("\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
