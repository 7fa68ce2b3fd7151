// tests/test_engine.c: the serving engine on the tiny preset with two adapters written by
// molt. Many requests of mixed adapters in flight at once each give exactly the tokens of
// inf_generate on the same prompt and adapter (greedy and seeded sampling); the prefix cache
// serves repeated prompts (same tokens out, counted); a KV cache too small for all requests
// at once preempts and recomputes sequences, still with the same tokens, and its blocks in
// use return to 0; one adapter slot for two adapters evicts and reloads them; cancelling,
// unloading an adapter in use, bad requests, prompt log-probabilities, and shutdown.
#include "harness/harness.h"
#include "adapters/adapters.h"
#include "infer/engine/engine.h"
#include "infer/infer.h"
#include "model/model.h"

#include <dirent.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define N_AD 2
static const char *specs[N_AD] = {
    "r=4,alpha=8,seed=11,targets=q_a_proj+q_b_proj+kv_a_proj_with_mqa+kv_b_proj+o_proj+"
    "gate_proj+up_proj+down_proj+experts.gate_up_proj+experts.down_proj+lm_head",
    "r=2,alpha=3,seed=12,targets=kv_b_proj+o_proj+experts.gate_up_proj+experts.down_proj"};

static char dir[64];
static char ad_path[N_AD][128];
static const char *ad_name[N_AD] = {"alpha", "beta"};

// The tiny model (with Tekken) and two adapter files, once for all tests.
static void setup_all(void) {
    snprintf(dir, sizeof dir, "/tmp/molt-engine-XXXXXX");
    if (!mkdtemp(dir))
        abort();
    const char *src = getenv("MOLT_SOURCE_DIR");
    char preset[4096], tok[4096];
    snprintf(preset, sizeof preset, "%s/configs/models/tiny.json", src ? src : ".");
    snprintf(tok, sizeof tok, "%s/configs/tokenizers/tekken.json", src ? src : ".");
    mdl_init_opts o = {.preset = preset, .out_dir = dir, .seed = 5, .tokenizer = tok};
    if (mdl_init_model(&o) != MOLT_OK)
        abort();
    mdl_model m = {0};
    if (mdl_load(dir, &m) != MOLT_OK)
        abort();
    for (int i = 0; i < N_AD; i++) {
        lora_spec s;
        lora_adapter ad;
        snprintf(ad_path[i], sizeof ad_path[i], "%s/ad%d.h5", dir, i);
        if (lora_spec_parse(specs[i], &s) != MOLT_OK ||
            lora_attach(&m, &s, LORA_WIRE_NONE, &ad) != MOLT_OK)
            abort();
        lora_randomize_b(&ad, 100 + i, 0.5);
        if (lora_save(&ad, ad_path[i]) != MOLT_OK)
            abort();
        lora_detach(&ad);
    }
    mdl_free(&m);
}

static void teardown_all(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
}

// An engine over the tiny model with both adapters; kv_tokens 0 = the default cache.
static eng_engine *engine(int kv_tokens, int block, int max_loaded, int batch_tokens) {
    eng_opts o;
    eng_opts_default(&o);
    o.model_dir = dir;
    o.kv_cache_tokens = kv_tokens;
    o.block_tokens = block;
    o.max_loaded_adapters = max_loaded;
    o.max_batch_tokens = batch_tokens;
    o.max_num_seqs = batch_tokens < 64 ? batch_tokens : 64;
    eng_engine *e;
    ck_assert_ok(eng_create(&o, &e));
    for (int i = 0; i < N_AD; i++)
        ck_assert_ok(eng_adapter_add(e, ad_name[i], ad_path[i]));
    ck_assert_ok(eng_start(e));
    return e;
}

static void some_ids(int32_t *ids, int n, uint64_t seed) {
    ag_rng r;
    ag_rng_seed(&r, seed);
    for (int i = 0; i < n; i++)
        ids[i] = 1000 + (int32_t)(ag_rng_next(&r) % 100000);
}

// What inf_generate gives alone for this prompt, adapter (-1: base) and sampling.
static int solo(const int32_t *prompt, int np, int adapter, int max_tokens,
                const inf_sample_opts *so, int32_t *out) {
    mdl_model m = {0};
    ck_assert_ok(mdl_load(dir, &m));
    mdl_bank bank;
    ck_assert_ok(mdl_bank_init(&bank, &m, 1));
    void *h = NULL;
    if (adapter >= 0)
        ck_assert_ok(inf_adapter_bank(&m, ad_path[adapter], &bank, 0, &h));
    inf_gen_opts o;
    inf_gen_opts_default(&o);
    o.max_tokens = max_tokens;
    o.sample = *so;
    o.bank = &bank;
    o.slot = adapter >= 0 ? 0 : -1;
    o.eos = 2;
    int n;
    ck_assert_ok(inf_generate(&m, prompt, np, &o, out, &n, NULL));
    mdl_bank_free(&bank);
    inf_adapter_detach(h);
    mdl_free(&m);
    return n;
}

typedef struct {
    int32_t prompt[80];
    int np, adapter, max_tokens;
    inf_sample_opts so;
    eng_req *q;
    int32_t got[64];
    double lp[64]; // the chosen tokens' log-probabilities
    int n_got;
    eng_event done;
} job;

static void submit(eng_engine *e, job *j) {
    eng_request r;
    eng_request_default(&r);
    r.prompt = j->prompt;
    r.n_prompt = j->np;
    r.adapter = j->adapter >= 0 ? ad_name[j->adapter] : NULL;
    r.max_tokens = j->max_tokens;
    r.sample = j->so;
    r.logprobs = 0;
    ck_assert_ok(eng_submit(e, &r, &j->q));
}

// Drains a job's events until DONE (fails on ERROR).
static void drain(job *j) {
    eng_event ev;
    while (eng_next(j->q, &ev, 60000)) {
        ck_assert_msg(ev.kind != ENG_EV_ERROR, "request failed: %s", ev.message);
        if (ev.kind == ENG_EV_TOKEN) {
            ck_assert_int_eq(ev.index, j->n_got);
            j->lp[j->n_got] = ev.logprob;
            j->got[j->n_got++] = ev.token;
        } else if (ev.kind == ENG_EV_DONE) {
            j->done = ev;
            break;
        }
    }
    ck_assert_int_eq(j->done.kind, ENG_EV_DONE);
    eng_release(j->q);
}

static void check_against_solo(job *jobs, int n) {
    for (int i = 0; i < n; i++) {
        int32_t want[64];
        int nw = solo(jobs[i].prompt, jobs[i].np, jobs[i].adapter, jobs[i].max_tokens,
                      &jobs[i].so, want);
        ck_assert_msg(jobs[i].n_got == nw, "job %d: %d tokens, alone %d", i, jobs[i].n_got, nw);
        for (int t = 0; t < nw; t++)
            ck_assert_msg(jobs[i].got[t] == want[t], "job %d (adapter %d) token %d: %d, alone %d",
                          i, jobs[i].adapter, t, jobs[i].got[t], want[t]);
        ck_assert_int_eq(jobs[i].done.n_gen, nw);
        ck_assert_int_eq(jobs[i].done.n_prompt, jobs[i].np);
    }
}

static void make_jobs(job *jobs, int n, int prompt_base, uint64_t seed) {
    for (int i = 0; i < n; i++) {
        job *j = &jobs[i];
        memset(j, 0, sizeof *j);
        j->np = prompt_base + (i * 7) % 23;
        some_ids(j->prompt, j->np, seed + (uint64_t)i);
        j->adapter = i % (N_AD + 1) - 1;
        j->max_tokens = 6 + i % 5;
        inf_sample_opts_default(&j->so);
        if (i % 4 == 3) { // seeded sampling
            j->so.temperature = 0.8;
            j->so.top_k = 40;
            j->so.seed = 1000 + (uint64_t)i;
        }
    }
}

START_TEST(test_mixed_batch_equals_solo_runs) {
    eng_engine *e = engine(0, 16, 4, 512);
    enum { N = 12 };
    job jobs[N];
    make_jobs(jobs, N, 5, 40);
    for (int i = 0; i < N; i++)
        submit(e, &jobs[i]);
    for (int i = 0; i < N; i++)
        drain(&jobs[i]);
    // each again alone through the engine (prompt blocks now from the prefix cache): the
    // same tokens with the same log-probabilities, bit for bit
    for (int i = 0; i < N; i++) {
        job again = jobs[i];
        again.n_got = 0;
        submit(e, &again);
        drain(&again);
        ck_assert_int_eq(again.n_got, jobs[i].n_got);
        ck_assert_msg(!memcmp(again.lp, jobs[i].lp, (size_t)again.n_got * sizeof(double)),
                      "job %d: log-probabilities differ between the crowd and alone", i);
        ck_assert_int_eq(again.done.n_cached, (jobs[i].np - 1) / 16 * 16);
    }
    eng_stats st;
    eng_get_stats(e, &st);
    ck_assert_int_eq(st.kv_blocks_used, 0);
    ck_assert_int_eq(st.running + st.waiting, 0);
    ck_assert_int_gt(st.steps, 0);
    ck_assert_int_eq(st.adapters_registered, 2);
    eng_free(e);
    check_against_solo(jobs, N);
}
END_TEST

// A cache of 48 tokens in blocks of 4 for 6 requests of up to 48 tokens each: sequences are
// preempted and computed again; every request still gets its solo tokens.
START_TEST(test_preemption_keeps_outputs) {
    eng_engine *e = engine(48, 4, 4, 64);
    eng_stats st;
    ck_assert_int_eq(eng_kv_capacity_tokens(e), 48);
    enum { N = 6 };
    job jobs[N];
    make_jobs(jobs, N, 14, 70);
    for (int i = 0; i < N; i++) {
        jobs[i].max_tokens = 12;
        submit(e, &jobs[i]);
    }
    for (int i = 0; i < N; i++)
        drain(&jobs[i]);
    eng_get_stats(e, &st);
    ck_assert_int_eq(st.kv_blocks_used, 0);
    ck_assert_int_gt(st.preemptions, 0);
    eng_free(e);
    check_against_solo(jobs, N);
}
END_TEST

START_TEST(test_prefix_cache) {
    eng_engine *e = engine(0, 4, 4, 512);
    job a = {0}, b = {0};
    a.np = b.np = 30;
    some_ids(a.prompt, 30, 9);
    memcpy(b.prompt, a.prompt, sizeof a.prompt);
    a.adapter = b.adapter = 0;
    a.max_tokens = b.max_tokens = 5;
    inf_sample_opts_default(&a.so);
    b.so = a.so;
    submit(e, &a);
    drain(&a);
    submit(e, &b);
    drain(&b);
    ck_assert_int_eq(a.done.n_cached, 0);
    ck_assert_int_eq(b.done.n_cached, 28); // 7 whole blocks of the 29 tokens before the last
    ck_assert_int_eq(b.n_got, a.n_got);
    ck_assert(!memcmp(a.got, b.got, (size_t)a.n_got * sizeof(int32_t)));
    job c = b; // another adapter: nothing shared
    c.adapter = 1;
    c.n_got = 0;
    submit(e, &c);
    drain(&c);
    ck_assert_int_eq(c.done.n_cached, 0);
    eng_stats st;
    eng_get_stats(e, &st);
    ck_assert_int_eq(st.prefix_hit_tokens, 28);
    eng_free(e);
    check_against_solo(&a, 1);
}
END_TEST

// One slot for two adapters: alternating requests evict and reload them.
START_TEST(test_adapter_eviction) {
    eng_engine *e = engine(0, 16, 1, 512);
    enum { N = 4 };
    job jobs[N];
    make_jobs(jobs, N, 8, 90);
    for (int i = 0; i < N; i++) {
        jobs[i].adapter = i % 2;
        submit(e, &jobs[i]);
        drain(&jobs[i]);
    }
    eng_stats st;
    eng_get_stats(e, &st);
    ck_assert_int_ge(st.adapter_loads, 4);
    ck_assert_int_ge(st.adapter_evictions, 3);
    ck_assert_int_le(st.adapters_resident, 1);
    // both at once with one slot: the second waits for the first, then runs
    for (int i = 0; i < 2; i++) {
        jobs[i].n_got = 0;
        submit(e, &jobs[i]);
    }
    for (int i = 0; i < 2; i++)
        drain(&jobs[i]);
    eng_free(e);
    check_against_solo(jobs, N);
}
END_TEST

START_TEST(test_cancel_remove_and_errors) {
    eng_engine *e = engine(0, 16, 4, 512);
    job j = {0};
    j.np = 10;
    some_ids(j.prompt, 10, 3);
    j.adapter = 1;
    j.max_tokens = 200;
    inf_sample_opts_default(&j.so);
    eng_request r;
    eng_request_default(&r);
    r.prompt = j.prompt;
    r.n_prompt = 10;
    r.adapter = "beta";
    r.max_tokens = 200;
    r.ignore_eos = true;
    eng_req *q;
    ck_assert_ok(eng_submit(e, &r, &q));
    eng_event ev;
    ck_assert_int_eq(eng_next(q, &ev, 60000), 1); // running
    ck_assert_ok(eng_adapter_remove(e, "beta"));  // in use: it finishes, new ones are refused
    ck_assert(!eng_adapter_exists(e, "beta"));
    eng_req *q2;
    ck_assert_int_eq(eng_submit(e, &r, &q2), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "The model `beta` does not exist.");
    eng_cancel(q);
    int n = 0;
    while (eng_next(q, &ev, 60000) && ev.kind == ENG_EV_TOKEN)
        n++;
    ck_assert_int_eq(ev.kind, ENG_EV_DONE);
    ck_assert_int_eq(ev.finish, ENG_FINISH_CANCEL);
    ck_assert_int_lt(n, 199);
    ck_assert_int_eq(eng_next(q, &ev, 0), 0);
    eng_release(q);
    ck_assert_ok(eng_adapter_add(e, "beta", ad_path[1])); // the name is free again
    ck_assert_int_eq(eng_adapter_add(e, "beta", ad_path[1]), MOLT_EARG);
    ck_assert_int_eq(eng_adapter_add(e, "gamma", "/nonexistent/adapter"), MOLT_EIO);
    eng_adapter_info info[4];
    ck_assert_int_eq(eng_adapter_list(e, info, 4), 2);
    ck_assert_str_eq(info[1].name, "beta");
    ck_assert_int_eq(info[1].rank_max, 2);
    // bad requests
    r.adapter = NULL;
    r.max_tokens = eng_max_model_len(e);
    ck_assert_int_eq(eng_submit(e, &r, &q2), MOLT_EARG);
    ck_assert_msg(strstr(molt_err_msg(), "maximum context length is 512 tokens") &&
                  strstr(molt_err_msg(), "you requested 522 tokens"), "%s", molt_err_msg());
    r.max_tokens = 4;
    int32_t bad = eng_vocab_size(e);
    r.prompt = &bad;
    r.n_prompt = 1;
    ck_assert_int_eq(eng_submit(e, &r, &q2), MOLT_EARG);
    r.prompt = j.prompt;
    r.n_prompt = 10;
    r.logprobs = 21;
    ck_assert_int_eq(eng_submit(e, &r, &q2), MOLT_EARG);
    r.logprobs = -1;
    r.sample.temperature = -1;
    ck_assert_int_eq(eng_submit(e, &r, &q2), MOLT_EARG);
    eng_stats st;
    eng_get_stats(e, &st);
    ck_assert_int_eq(st.kv_blocks_used, 0);
    eng_free(e);
}
END_TEST

// Prompt log-probabilities (echo): one per prompt token after the first, consistent with the
// alternatives; generated tokens' log-probabilities match their top-1 under greedy decoding.
START_TEST(test_logprobs) {
    eng_engine *e = engine(0, 16, 4, 8);
    int32_t p[20];
    some_ids(p, 20, 77);
    eng_request r;
    eng_request_default(&r);
    r.prompt = p;
    r.n_prompt = 20;
    r.max_tokens = 3;
    r.logprobs = 5;
    r.prompt_logprobs = true;
    eng_req *q;
    ck_assert_ok(eng_submit(e, &r, &q));
    eng_event ev;
    int next_prompt = 1, n_tok = 0;
    while (eng_next(q, &ev, 60000)) {
        if (ev.kind == ENG_EV_PROMPT) {
            ck_assert_int_eq(ev.index, next_prompt++);
            ck_assert_int_eq(ev.token, p[ev.index]);
        } else if (ev.kind == ENG_EV_TOKEN) {
            ck_assert_int_eq(ev.token, ev.top_ids[0]); // greedy takes the most probable
            ck_assert(fabs(ev.logprob - ev.top_logprobs[0]) < 1e-12);
            n_tok++;
        } else {
            break;
        }
        ck_assert_int_eq(ev.n_top, 5);
        ck_assert(ev.logprob <= 0 && isfinite(ev.logprob));
        for (int i = 1; i < ev.n_top; i++)
            ck_assert(ev.top_logprobs[i] <= ev.top_logprobs[i - 1]);
        double mass = 0;
        for (int i = 0; i < ev.n_top; i++)
            mass += exp(ev.top_logprobs[i]);
        ck_assert(mass <= 1 + 1e-9);
    }
    ck_assert_int_eq(ev.kind, ENG_EV_DONE);
    ck_assert_int_eq(next_prompt, 20); // 19 prompt tokens, delivered across 8-token chunks
    ck_assert_int_eq(n_tok, 3);
    eng_release(q);
    // max_tokens 0 with prompt log-probabilities: the prompt is scored, nothing generated
    r.max_tokens = 0;
    ck_assert_ok(eng_submit(e, &r, &q));
    int prompts = 0;
    while (eng_next(q, &ev, 60000) && ev.kind == ENG_EV_PROMPT)
        prompts++;
    ck_assert_int_eq(prompts, 19);
    ck_assert_int_eq(ev.kind, ENG_EV_DONE);
    ck_assert_int_eq(ev.finish, ENG_FINISH_LENGTH);
    ck_assert_int_eq(ev.n_gen, 0);
    eng_release(q);
    // from index 18 only: the same values, bit for bit, with the leading block from the prefix
    // cache; and a request that only computes its prompt (reusing what is cached)
    double full[20];
    r.prompt_logprobs_from = 0;
    ck_assert_ok(eng_submit(e, &r, &q));
    while (eng_next(q, &ev, 60000) && ev.kind == ENG_EV_PROMPT)
        full[ev.index] = ev.logprob;
    eng_release(q);
    eng_request prime = r;
    prime.prompt_logprobs = false;
    prime.compute_prompt = true;
    ck_assert_ok(eng_submit(e, &prime, &q));
    ck_assert_int_eq(eng_next(q, &ev, 60000), 1);
    ck_assert_int_eq(ev.kind, ENG_EV_DONE);
    ck_assert_int_eq(ev.n_cached, 16); // the first request's prompt block
    eng_release(q);
    r.prompt_logprobs_from = 18;
    ck_assert_ok(eng_submit(e, &r, &q));
    int want = 18;
    while (eng_next(q, &ev, 60000) && ev.kind == ENG_EV_PROMPT) {
        ck_assert_int_eq(ev.index, want++);
        ck_assert(ev.logprob == full[ev.index]);
    }
    ck_assert_int_eq(want, 20);
    ck_assert_int_eq(ev.n_cached, 16); // rows 17 on are computed; the block before is cached
    eng_release(q);
    eng_free(e);
}
END_TEST

// A stop id ends generation and is named in the DONE event.
START_TEST(test_stop_token) {
    eng_engine *e = engine(0, 16, 4, 512);
    int32_t p[6];
    some_ids(p, 6, 8);
    job j = {0};
    memcpy(j.prompt, p, sizeof p);
    j.np = 6;
    j.adapter = -1;
    j.max_tokens = 8;
    inf_sample_opts_default(&j.so);
    submit(e, &j);
    drain(&j);
    ck_assert_int_ge(j.n_got, 3);
    eng_request r;
    eng_request_default(&r);
    r.prompt = p;
    r.n_prompt = 6;
    r.max_tokens = 8;
    r.stop_ids = &j.got[2];
    r.n_stop_ids = 1;
    eng_req *q;
    ck_assert_ok(eng_submit(e, &r, &q));
    eng_event ev;
    int n = 0;
    while (eng_next(q, &ev, 60000) && ev.kind == ENG_EV_TOKEN)
        n++;
    ck_assert_int_eq(ev.kind, ENG_EV_DONE);
    ck_assert_int_eq(ev.finish, ENG_FINISH_STOP);
    ck_assert_int_eq(ev.stop_token, j.got[2]);
    ck_assert_int_le(n, 3);
    eng_release(q);
    eng_free(e);
}
END_TEST

// Shutdown lets running requests finish within the grace period, refuses new ones, and
// aborts what is left after it.
START_TEST(test_shutdown) {
    eng_engine *e = engine(0, 16, 4, 512);
    int32_t p[8];
    some_ids(p, 8, 5);
    eng_request r;
    eng_request_default(&r);
    r.prompt = p;
    r.n_prompt = 8;
    r.max_tokens = 4;
    eng_req *q;
    ck_assert_ok(eng_submit(e, &r, &q));
    eng_shutdown(e, 30);
    eng_event ev;
    int n = 0;
    while (eng_next(q, &ev, 1000) && ev.kind == ENG_EV_TOKEN)
        n++;
    ck_assert_int_eq(ev.kind, ENG_EV_DONE);
    ck_assert_int_ne(ev.finish, ENG_FINISH_ABORT);
    eng_release(q);
    ck_assert_int_eq(eng_submit(e, &r, &q), MOLT_EUNSUPPORTED);
    eng_free(e);
}
END_TEST

// Threads of this process (Linux: the entries of /proc/self/task).
static int n_threads(void) {
    DIR *d = opendir("/proc/self/task");
    if (!d)
        return -1;
    int n = 0;
    for (struct dirent *x; (x = readdir(d));)
        n += x->d_name[0] != '.';
    closedir(d);
    return n;
}

typedef struct {
    int before, after;
    molt_status st;
} create_probe;

// On a thread that has never run an OpenMP region: eng_create with 2 OpenMP threads, and the
// process's thread count before and after (waiting up to 2 s for exiting threads to go).
static void *create_on_fresh_thread(void *arg) {
    create_probe *p = arg;
    omp_set_num_threads(2);
    p->before = n_threads();
    eng_opts o;
    eng_opts_default(&o);
    o.model_dir = dir;
    o.base_quant = "nf4,lm_head=nf4"; // lm_head: enough blocks to quantize in parallel
    eng_engine *e;
    p->st = eng_create(&o, &e);
    if (p->st != MOLT_OK)
        return NULL;
    for (int i = 0; i < 200 && (p->after = n_threads()) != p->before; i++)
        nanosleep(&(struct timespec){0, 10 * 1000 * 1000}, NULL);
    eng_free(e);
    return NULL;
}

// Loading the model runs parallel regions; their OpenMP workers must not stay behind on the
// thread that called eng_create (the server's main thread), where they would sit beside the
// engine thread's own team for the whole run. Before eng_start, the engine has started no
// thread that is still there.
START_TEST(test_create_leaves_no_threads) {
    create_probe p = {0};
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, create_on_fresh_thread, &p), 0);
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    ck_assert_ok(p.st);
    ck_assert_int_gt(p.before, 0);
    ck_assert_int_eq(p.after, p.before);
}
END_TEST

int main(void) {
    Suite *s = suite_create("engine");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 900);
    tcase_add_unchecked_fixture(tc, setup_all, teardown_all);
    tcase_add_test(tc, test_create_leaves_no_threads);
    tcase_add_test(tc, test_mixed_batch_equals_solo_runs);
    tcase_add_test(tc, test_preemption_keeps_outputs);
    tcase_add_test(tc, test_prefix_cache);
    tcase_add_test(tc, test_adapter_eviction);
    tcase_add_test(tc, test_cancel_remove_and_errors);
    tcase_add_test(tc, test_logprobs);
    tcase_add_test(tc, test_shutdown);
    tcase_add_test(tc, test_stop_token);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
