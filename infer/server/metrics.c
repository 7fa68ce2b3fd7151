// infer/server/metrics.c: the server's counters and latency histograms, and GET /metrics in
// the Prometheus text format (version 0.0.4) with the engine's gauges from eng_get_stats.
// Not here: where the numbers are measured (http.c counts requests, gen.c tokens and
// latencies).
#include "srv_internal.h"

#include <stdarg.h>
#include <string.h>

// Upper bounds (seconds) shared by both histograms.
static const double bounds[SRV_HIST_BUCKETS] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                0.25,  0.5,    1.0,   2.5,  5.0,   10.0, 30.0};

void srv_metrics_init(srv_metrics *m) {
    memset(m, 0, sizeof *m);
    pthread_mutex_init(&m->mu, NULL);
}

void srv_metrics_destroy(srv_metrics *m) { pthread_mutex_destroy(&m->mu); }

void srv_metrics_request(srv_metrics *m, int status) {
    pthread_mutex_lock(&m->mu);
    m->by_status[status >= 0 && status < 600 ? status : 599]++;
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_tokens(srv_metrics *m, long prompt, long generated) {
    pthread_mutex_lock(&m->mu);
    m->prompt_tokens += (uint64_t)prompt;
    m->generated_tokens += (uint64_t)generated;
    pthread_mutex_unlock(&m->mu);
}

static void observe(srv_metrics *m, srv_hist *h, double v) {
    int b = 0;
    while (b < SRV_HIST_BUCKETS && v > bounds[b])
        b++;
    pthread_mutex_lock(&m->mu);
    h->count[b]++;
    h->sum += v;
    h->n++;
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_ttft(srv_metrics *m, double seconds) { observe(m, &m->ttft, seconds); }
void srv_metrics_itl(srv_metrics *m, double seconds) { observe(m, &m->itl, seconds); }

static bool put(srv_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool put(srv_buf *b, const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    return n >= 0 && srv_buf_put(b, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

static void put_hist(srv_buf *b, const char *name, const char *help, const srv_hist *h) {
    put(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i < SRV_HIST_BUCKETS; i++) {
        cum += h->count[i];
        put(b, "%s_bucket{le=\"%g\"} %llu\n", name, bounds[i], (unsigned long long)cum);
    }
    cum += h->count[SRV_HIST_BUCKETS];
    put(b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.9g\n%s_count %llu\n", name,
        (unsigned long long)cum, name, h->sum, name, (unsigned long long)h->n);
}

static void put_one(srv_buf *b, const char *name, const char *type, const char *help,
                    long long v) {
    put(b, "# HELP %s %s\n# TYPE %s %s\n%s %lld\n", name, help, name, type, name, v);
}

enum MHD_Result srv_route_metrics(srv_req *r, json_t *body) {
    (void)body;
    srv_server *s = r->s;
    eng_stats es;
    eng_get_stats(s->eng, &es);
    srv_metrics m;
    pthread_mutex_lock(&s->m.mu);
    memcpy(&m, &s->m, sizeof m);
    pthread_mutex_unlock(&s->m.mu);
    srv_buf b = {0};
    put(&b, "# HELP molt_requests_total HTTP requests answered, by status code.\n"
            "# TYPE molt_requests_total counter\n");
    for (int st = 0; st < 600; st++)
        if (m.by_status[st])
            put(&b, "molt_requests_total{status=\"%d\"} %llu\n", st,
                (unsigned long long)m.by_status[st]);
    put_one(&b, "molt_prompt_tokens_total", "counter", "Prompt tokens of answered requests.",
            (long long)m.prompt_tokens);
    put_one(&b, "molt_generation_tokens_total", "counter", "Tokens generated for requests.",
            (long long)m.generated_tokens);
    put_hist(&b, "molt_time_to_first_token_seconds", "From submission to the first token.",
             &m.ttft);
    put_hist(&b, "molt_inter_token_latency_seconds", "Between successive tokens of a sequence.",
             &m.itl);
    put_one(&b, "molt_num_requests_running", "gauge", "Sequences in the engine's batch.",
            es.running);
    put_one(&b, "molt_num_requests_waiting", "gauge", "Sequences queued (incl. preempted).",
            es.waiting);
    put_one(&b, "molt_kv_blocks_used", "gauge", "KV cache blocks in use.", es.kv_blocks_used);
    put_one(&b, "molt_kv_blocks_total", "gauge", "KV cache blocks in the pool.",
            es.kv_blocks_total);
    put_one(&b, "molt_kv_block_tokens", "gauge", "Tokens per KV cache block.", es.block_tokens);
    put_one(&b, "molt_adapters_registered", "gauge", "Adapters that requests may name.",
            es.adapters_registered);
    put_one(&b, "molt_adapters_loaded", "gauge", "Adapters resident in memory.",
            es.adapters_resident);
    put_one(&b, "molt_prefix_cache_hit_tokens_total", "counter",
            "Prompt tokens served from the prefix cache.", es.prefix_hit_tokens);
    put_one(&b, "molt_prefix_cache_query_tokens_total", "counter",
            "Prompt tokens looked up in the prefix cache.", es.prefix_query_tokens);
    put_one(&b, "molt_preemptions_total", "counter", "Sequences preempted for lack of blocks.",
            es.preemptions);
    put_one(&b, "molt_engine_steps_total", "counter", "Engine steps run.", es.steps);
    put_one(&b, "molt_engine_prompt_tokens_total", "counter", "Prompt tokens computed.",
            es.prompt_tokens);
    put_one(&b, "molt_engine_generated_tokens_total", "counter", "Tokens generated.",
            es.generated_tokens);
    put_one(&b, "molt_adapter_loads_total", "counter", "Adapter loads.", es.adapter_loads);
    put_one(&b, "molt_adapter_evictions_total", "counter", "Adapter evictions.",
            es.adapter_evictions);
    enum MHD_Result ret;
    if (!b.p) {
        srv_error e;
        srv_fail(&e, 500, NULL, "out of memory");
        ret = srv_reply_error(r, &e);
    } else {
        ret = srv_reply_text(r, 200, "text/plain; version=0.0.4; charset=utf-8", b.p, b.n);
    }
    srv_buf_free(&b);
    return ret;
}
