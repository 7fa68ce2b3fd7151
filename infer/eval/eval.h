// infer/eval/eval.h: the public API of molt's evaluation library: paired statistics over
// examples (bootstrap intervals and p-values, McNemar's exact test, Holm's correction,
// win/tie/loss counts), text metrics for generated answers, the results model a runner
// fills (datasets x examples x systems), the report files written from it (report.md,
// report.json, samples.jsonl, report.html with inline SVG charts), and the `molt report`
// command (charts of a training run's metrics.jsonl).
//
// Not here: running the model. The runner (`molt eval`) computes predictions, losses and
// metric values and hands them to this library; nothing here reads a model or a tokenizer.
#ifndef MOLT_INFER_EVAL_H
#define MOLT_INFER_EVAL_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "../../common/err.h"

// ---- statistics (stats.c) -------------------------------------------------------------
// Every statistic is over examples. A value is either finite or missing (NaN); an infinite
// value is an error (MOLT_EARG naming its index).
//
// Bootstrap (percentile method, Efron): resample b = 0..B-1 draws n example indices with
// replacement, i = floor(u * n) for u = ag_rng_uniform() of one generator seeded with
// opts.seed (autograd's xoshiro256** seeded through splitmix64), n draws per resample in
// order. Every call restarts the generator from the seed, so the same n, B and seed give the
// same resamples in every call (every system and metric of a table share them: common random
// numbers), and a number never depends on which others were computed.
// A resample's statistic is the mean of the values present (not NaN) among the drawn
// examples, summed in draw order (NumPy: nanmean); a resample that drew no present value
// has no statistic and is left out (B' <= B resamples remain). The interval is the
// (1-level)/2 and (1+level)/2 quantiles of the B' resample means, linearly interpolated
// between order statistics (NumPy's default percentile method 'linear').
//
// Paired comparison of a system against the baseline: d_i = sys_i - base_i (missing when
// either is missing), bootstrapped as above over all n examples. Its two-sided p-value is
// the bootstrap distribution shifted to the null (mean difference 0):
//     p = (1 + #{b : |m_b - dbar| >= |dbar|}) / (B' + 1)
// where dbar is the mean of the present d_i and m_b the resample means; so p > 0 always, and
// p = 1 when dbar = 0.
typedef struct {
    int n_resamples; // B >= 1 (default 10000)
    double level;    // confidence level, in (0, 1) (default 0.95)
    uint64_t seed;   // generator seed (default 0)
} ev_boot_opts;
void ev_boot_opts_default(ev_boot_opts *o);
// MOLT_EARG naming the field when a value is out of range.
molt_status ev_boot_opts_check(const ev_boot_opts *o);

// What a metric is, for the statistics: binary metrics (values 0 or 1) get McNemar's test;
// for lower_is_better metrics (loss, perplexity) a win is a lower value than the baseline's.
typedef struct {
    const char *name;
    bool binary;
    bool lower_is_better;
} ev_metric_def;

typedef struct {
    int64_t n;         // values present
    int64_t n_missing; // values missing (NaN)
    double mean;       // mean of the present values
    double lo, hi;     // percentile bootstrap interval of the mean
} ev_mean_ci;

// Mean of x[0..n) with its bootstrap interval. MOLT_EARG when n == 0, when every value is
// missing, or for an infinite value.
molt_status ev_boot_mean(const double *x, int64_t n, const ev_boot_opts *o, ev_mean_ci *out);

typedef struct {
    int64_t n;             // examples where both values are present
    int64_t n_missing;     // examples where either is missing
    double diff;           // mean of sys - base over those
    double lo, hi;         // paired percentile bootstrap interval of diff
    double p_boot;         // two-sided bootstrap p-value (definition above)
    int64_t win, tie, loss; // examples where the system is better / equal / worse (exact ==)
    int64_t n01, n10;      // binary metrics: base 0 and sys 1 / base 1 and sys 0 (else 0)
    double p_mcnemar;      // binary metrics: McNemar's exact p on (n01, n10) (else NaN)
} ev_paired;

// The system's values sys[0..n_sys) against the baseline's base[0..n_base) on the same
// examples in the same order. MOLT_EARG naming m->name for different lengths, no complete
// pair, an infinite value, or (binary metrics) a present value other than 0 or 1.
molt_status ev_boot_paired(const double *sys, int64_t n_sys, const double *base, int64_t n_base,
                           const ev_metric_def *m, const ev_boot_opts *o, ev_paired *out);

// McNemar's exact test (statsmodels mcnemar(table, exact=True)): with k = min(n01, n10) of
// the m = n01 + n10 discordant pairs, p = min(1, 2 * P(X <= k)) for X ~ Binomial(m, 1/2);
// p = 1 when m = 0. MOLT_EARG for a negative count.
molt_status ev_mcnemar_exact(int64_t n01, int64_t n10, double *p);

// Holm's step-down correction (statsmodels multipletests(p, method='holm')): the finite
// p-values, sorted ascending (ties keep their order), get adj_(j) = min(1, max over i <= j
// of (m - i) * p_(i)) for j = 0..m-1, m the number of finite p-values; NaN entries stay NaN
// and do not count toward m. p and adj may be the same array. MOLT_EARG for a p-value
// outside [0, 1].
molt_status ev_holm(const double *p, int n, double *adj);

// ---- text metrics for the generate task (metrics.c) ----------------------------------
// Normalization, applied to prediction and reference alike, in this order (SQuAD's order):
//   EV_NORM_CASE      ASCII letters A-Z to a-z (other bytes, UTF-8 included, unchanged)
//   EV_NORM_PUNCT     deletes the 32 ASCII punctuation characters
//                     !"#$%&'()*+,-./:;<=>?@[\]^_`{|}~  (Python's string.punctuation)
//   EV_NORM_ARTICLES  deletes the whitespace-separated words "a", "an", "the" (exact bytes:
//                     with EV_NORM_CASE also "A", "The", ...)
//   EV_NORM_SPACE     trims ASCII whitespace (space, \t, \n, \v, \f, \r) at both ends and
//                     collapses every inner run to one space
// EV_NORM_SQUAD is all four (SQuAD v1.1's normalize_answer for ASCII text).
enum {
    EV_NORM_CASE = 1u << 0,
    EV_NORM_PUNCT = 1u << 1,
    EV_NORM_ARTICLES = 1u << 2,
    EV_NORM_SPACE = 1u << 3,
    EV_NORM_SQUAD = EV_NORM_CASE | EV_NORM_PUNCT | EV_NORM_ARTICLES | EV_NORM_SPACE,
};

typedef enum {
    EV_TM_EXACT,      // "exact_match": normalized prediction == normalized reference (0/1)
    EV_TM_CONTAINS,   // "contains": normalized reference is a substring of the normalized
                      // prediction; an empty reference is contained (0/1)
    EV_TM_REGEX,      // "regex=PATTERN": PCRE2 (UTF) pattern found anywhere in the raw
                      // prediction (anchor it with ^ and $); the reference is unused (0/1)
    EV_TM_TOKEN_F1,   // "token_f1": SQuAD's bag-of-tokens F1 of the whitespace-split
                      // normalized texts; 1 when both have no token, 0 when one has none
    EV_TM_JSON_VALID, // "json_valid": the prediction is one JSON text (any value; leading
                      // and trailing whitespace allowed) (0/1)
    EV_TM_JSON_FIELD, // "json_field=PATH": prediction and reference parse as JSON and the
                      // values at PATH are equal as JSON values (jansson's json_equal:
                      // object key order does not matter, integer 1 and real 1.0 differ);
                      // 0 when the prediction is not JSON or lacks PATH (0/1)
    EV_TM_COUNT
} ev_text_metric_kind;

// A metric parsed from a spec NAME[:OPT+OPT...][=ARG]: NAME one of the names above, OPT
// one of case, punct, articles, space, squad (all four) or none (the default: no
// normalization), allowed for exact_match, contains and token_f1; ARG required by regex
// (the pattern, taken verbatim up to the end of the spec) and json_field (a dotted path:
// object keys, or decimal indices into arrays, e.g. "answer.items.0.name"; no empty part).
typedef struct {
    ev_text_metric_kind kind;
    unsigned norm; // EV_NORM_* flags
    char *name;    // the spec as given: the metric's name in reports
    char *arg;     // regex pattern or JSON path, NULL for the others
    void *re;      // compiled PCRE2 pattern (regex only)
    void *md;      // PCRE2 match data (regex only)
} ev_text_metric;

// Parses and checks spec (an invalid regex: MOLT_EARG naming the pattern, PCRE2's message
// and the offset in the pattern). On error *m is left empty (nothing to free).
molt_status ev_text_metric_parse(ev_text_metric *m, const char *spec);
void ev_text_metric_free(ev_text_metric *m);
// The statistics' view of the metric: name, binary (every kind but token_f1), higher is
// better. The name points into m.
ev_metric_def ev_text_metric_def(const ev_text_metric *m);
// The metric's value for one prediction (NUL-terminated) against its reference, in [0, 1].
// MOLT_EFORMAT when the reference is unusable (json_field: the reference is not JSON or
// lacks PATH) or a regex cannot run on the prediction (invalid UTF-8, PCRE2 match limit);
// the message names the metric. Not thread-safe per metric (regex match data): one
// ev_text_metric per thread.
molt_status ev_text_metric_eval(const ev_text_metric *m, const char *pred, const char *ref,
                                double *value);
// Normalizes s under flags (EV_NORM_*) into a new molt_malloc'ed string (*out); MOLT_ENOMEM.
molt_status ev_normalize(const char *s, unsigned flags, char **out);

// ---- the results model (results.c) ---------------------------------------------------
// One dataset's results, filled by the runner: its systems (one of them the baseline) and
// metrics, then per example an id, an optional category, the reference text, and per
// system the prediction, the loss and one value per metric (NaN = missing). Strings are
// copied in. Fill with ev_dataset_init, then ev_dataset_add per example and ev_dataset_set
// per example and system (every pair must be set before the statistics are computed).
typedef struct {
    char *id;
    char *category;  // NULL when the example has none
    char *target;    // reference text (may be "")
    char **pred;     // [n_systems] prediction text or NULL (loss and choice tasks)
    double *loss;    // [n_systems] per-example loss (mean NLL per token), NaN when none
    double *values;  // [n_systems * n_metrics] value of metric j for system s at s*n_metrics+j
    bool *set;       // [n_systems] whether ev_dataset_set was called
} ev_example;

typedef struct {
    char *name;           // dataset name (file name or suite entry)
    char *task;           // "loss", "choice", "generate" (any label)
    int n_systems;
    char **systems;       // [n_systems] unique names
    int baseline;         // index into systems
    int n_metrics;
    ev_metric_def *metrics; // [n_metrics] (names copied)
    int64_t n_examples, cap;
    ev_example *ex;       // [n_examples]
} ev_dataset;

// MOLT_EARG for no system, no metric, an empty or repeated system or metric name, or a
// baseline out of range (messages name the dataset and the culprit).
molt_status ev_dataset_init(ev_dataset *d, const char *name, const char *task, int n_systems,
                            const char *const *systems, int baseline, int n_metrics,
                            const ev_metric_def *metrics);
void ev_dataset_free(ev_dataset *d);
// Appends an example (id required, category may be NULL, target NULL means ""); its index
// is d->n_examples - 1 afterwards.
molt_status ev_dataset_add(ev_dataset *d, const char *id, const char *category,
                           const char *target);
// Records system s's result on example i: prediction (NULL for none), loss (NaN for none)
// and values[0..n_metrics). MOLT_EARG for an index out of range or a result set twice.
molt_status ev_dataset_set(ev_dataset *d, int64_t i, int s, const char *prediction,
                           double loss, const double *values);
// Index of the system named name, or -1.
int ev_dataset_system(const ev_dataset *d, const char *name);

// The statistics of one table: all examples, or those of one category.
typedef struct {
    char *category;     // NULL: all examples; else the category ("" for examples without
                        // one, shown as "(none)", when other examples have one)
    int64_t n_examples;
    ev_mean_ci *mean;   // [n_metrics * n_systems], metric j system s at j*n_systems+s
    ev_paired *cmp;     // [n_metrics * n_systems], the baseline's entry zeroed
    double *p;          // [n_metrics * n_systems] reported p: McNemar for binary metrics,
                        // else the bootstrap's; NaN for the baseline
    double *p_holm;     // [n_metrics * n_systems] p after Holm across the metric's
                        // comparisons (== p when there is only one)
} ev_table;

typedef struct {
    const ev_dataset *d; // not owned
    int n_tables;        // 1 + number of categories
    ev_table *tables;    // [0]: all examples; then categories sorted by bytes, "" last
    // Histogram data: per system, loss - baseline loss per example where both are
    // finite; n_loss_diff[s] == 0 for the baseline or when no losses were recorded.
    double **loss_diff;  // [n_systems] arrays
    int64_t *n_loss_diff; // [n_systems]
} ev_dataset_stats;

// Every statistic of d. MOLT_EARG naming dataset, example and system for: no example, an
// example without a result for some system, a metric with no value for some system, a
// binary metric with a value other than 0/1, an infinite value.
molt_status ev_dataset_stats_compute(const ev_dataset *d, const ev_boot_opts *o,
                                     ev_dataset_stats *out);
void ev_dataset_stats_free(ev_dataset_stats *s);

// ---- reports (report.c, html.c) ------------------------------------------------------
typedef struct {
    ev_boot_opts boot;
    int n;                  // datasets
    ev_dataset_stats *ds;   // [n]
} ev_report;

// Computes the statistics of datasets ds[0..n) (not copied: they must outlive r).
molt_status ev_report_compute(ev_report *r, const ev_dataset *const *ds, int n,
                              const ev_boot_opts *o);
void ev_report_free(ev_report *r);
// Writes into dir (created if missing; files replaced atomically through NAME.tmp):
//   report.md     one table per dataset (and per category): system, metric, mean [95% CI],
//                 difference vs baseline [95% CI], p (Holm-adjusted when more than one
//                 comparison), W/T/L, n
//   report.json   the same numbers in full precision, plus config_json (a JSON object
//                 given by the runner, e.g. its resolved configuration; NULL for {})
//   samples.jsonl one line per example and system: dataset, id, category, target,
//                 system, prediction, metrics, loss
//   report.html   the tables plus inline SVG charts (per metric: each system's mean and
//                 interval; per system: histogram of per-example loss differences vs the
//                 baseline), self-contained (no script, font or URL)
// The files depend only on the inputs and the seed. MOLT_EARG when config_json is not a
// JSON object, MOLT_EIO naming the file that could not be written.
molt_status ev_report_write(const ev_report *r, const char *dir, const char *config_json);
// The summary table (report.md's numbers, aligned text) to f.
void ev_report_print(const ev_report *r, FILE *f);

// ---- molt report (cli_report.c) ------------------------------------------------------
// `molt report --run OUTPUT_DIR [--out FILE]`: charts of OUTPUT_DIR/metrics.jsonl (training
// and eval loss, learning rate, gradient norm, tokens/s against step) as a self-contained
// HTML file (default OUTPUT_DIR/report.html); prints its path. Exit 0, 1 (error), 2 (usage).
int ev_cmd_report(int argc, char **argv);

// ---- molt eval: the runner (run.c, records.c, cli_eval.c) -------------------------------
// Every system (the base and each adapter) runs every example of every dataset through one
// serving engine (infer/engine/): one base model in memory plus the adapters, each engine
// step one batched forward over requests of all systems. Records are read and tokenized once.
typedef enum { EV_TASK_LOSS, EV_TASK_CHOICE, EV_TASK_GENERATE, EV_TASK_COUNT } ev_task;
const char *ev_task_name(ev_task t);                 // "loss", "choice", "generate"
molt_status ev_task_parse(const char *s, ev_task *t); // MOLT_EARG naming s

#define EV_MAX_SYSTEMS 64
#define EV_MAX_DATA 32
#define EV_MAX_METRICS 16
#define EV_MAX_STOP 8
#define EV_MAX_CHOICES 64

// One dataset of a run.
//   loss      metric "loss": per example, the mean negative log-likelihood of its trained
//             tokens (the training template and loss mask); the summary also gives the
//             token-weighted mean over the dataset (what molt train --eval-only prints) and
//             its perplexity
//   choice    metrics "acc" (the choice with the highest total log-likelihood is the answer)
//             and "acc_norm" (the same with the total divided by the choice's length in
//             characters), as lm-evaluation-harness defines them; the context is computed
//             once per example and system and its cache blocks reused by every choice
//   generate  text metrics (see ev_text_metric_parse; default exact_match) of the answer
//             generated after the prompt against the reference
typedef struct {
    const char *path;   // JSONL file (compressed files and archives as the data layer reads)
    const char *name;   // name in the reports (NULL: the path)
    ev_task task;
    int n_metrics;      // generate: text metric specs (0: exact_match)
    const char *metrics[EV_MAX_METRICS];
    int max_tokens;     // generate: tokens at most per answer (0: 64)
    double temperature; // generate: 0 = greedy (default); else seeded sampling
    int top_k;
    double top_p;       // 0 = 1
    uint64_t seed;      // sampling seed (each example and system: seed + example index)
    int n_stop;         // generate: stop strings (the answer ends before the first one)
    const char *stop[EV_MAX_STOP];
} ev_data_spec;

typedef struct {
    const char *model_dir;
    const char *base_quant;   // SPEC (model.h) or NULL
    const char *tokenizer;    // NULL: beside the model
    bool base;                // the base model is a system, named "base"
    int n_adapters;
    const char *adapter_name[EV_MAX_SYSTEMS];
    const char *adapter_path[EV_MAX_SYSTEMS]; // PEFT dir, .h5 adapter or step-N.h5
    const char *baseline;     // NULL: "base" when present, else the first adapter
    int64_t limit;            // examples per dataset (0: all)
    bool skip_bad;            // count and skip bad records instead of stopping
    ev_boot_opts boot;
    const char *out_dir;      // reports go here (NULL: none written)
    int n_data;
    ev_data_spec data[EV_MAX_DATA];
    int kv_cache_mib, max_batch_tokens, max_num_seqs; // engine sizes (0: defaults)
    bool progress;            // progress on stderr (a bar on a terminal, lines otherwise)
    const char *config_json;  // the resolved configuration, for report.json (NULL: {})
    // Across ranks (mpirun): world (autograd/comm/comm.h) NULL or of one rank: one process.
    // Otherwise example i of every dataset runs on rank i % ranks (all its systems), each
    // rank with its own engine; with par_expert = E > 1 the routed experts are split over
    // groups of E consecutive ranks (each rank holds n_routed_experts / E of them, their
    // engines step together). Rank 0 gathers every result at the end and alone writes
    // and prints the report: the same files as one process (an example's numbers do not
    // depend on which requests share its batches). The final gather waits for a slower
    // rank up to the world's timeout plus the time this rank's own share took.
    struct ag_comm *world;
    int par_expert;           // parallel.expert (0 or 1: every rank holds every expert)
    int par_data;             // parallel.data (0: ranks / expert); data x expert = ranks
    double par_timeout_s;     // parallel.timeout_s, for the caller's world (0: the default)
} ev_run_opts;
void ev_run_opts_default(ev_run_opts *o);

// What a run measured besides the report (per dataset d and system s at d*n_systems+s).
typedef struct {
    int n_systems, n_data;
    double token_loss[EV_MAX_DATA * EV_MAX_SYSTEMS];   // loss task: token-weighted mean NLL
    int64_t tokens_computed;  // prompt tokens the engine computed for the whole run
    int64_t tokens_naive;     // what recomputing every choice's context would have computed
    int64_t tokens_cached;    // prompt tokens taken from the prefix cache
    int64_t data_computed[EV_MAX_DATA], data_naive[EV_MAX_DATA], data_cached[EV_MAX_DATA];
    double seconds;           // wall time of the run (model load included)
    int64_t examples, bad;    // examples used, bad records skipped (all datasets)
    int ranks, rank;          // the job's ranks and this one's (1 and 0 alone); counters
                              // above are the whole job's, the report rank 0's alone
} ev_run_summary;

// Runs the evaluation: loads the model and adapters, reads every dataset, runs every
// system on it, computes the statistics, prints the summary table to stdout and, with
// out_dir, writes report.md, report.json, samples.jsonl and report.html there. Errors: an
// adapter that does not fit the base (its name and tensor), two systems with one name, no
// system, a baseline that is not a system, a bad record (FILE:LINE) unless skip_bad, an
// empty dataset.
molt_status ev_run(const ev_run_opts *o, ev_run_summary *sum);

// `molt eval ...` (cli_eval.c). Exit 0, 1 (error), 2 (usage).
int ev_cmd_eval(int argc, char **argv);

#endif
