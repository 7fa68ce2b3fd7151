// infer/server/srv_internal.h: what the files of infer/server share: the server and request
// structs, error bodies, JSON helpers, the generation job (ids in, text and log-probabilities
// out, stop strings), the HTTP replies and the metrics. Not a public header: only
// infer/server/*.c include it.
#ifndef MOLT_INFER_SERVER_INTERNAL_H
#define MOLT_INFER_SERVER_INTERNAL_H

#include <jansson.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "../../data/data.h"
#include "../infer.h"
#include "server.h"

#define SRV_NAME_MAX 160
#define SRV_PATH_MAX 4096

// ---- growable byte buffer (json_util.c) -------------------------------------------------
typedef struct {
    char *p;
    size_t n, cap;
} srv_buf;
bool srv_buf_put(srv_buf *b, const void *s, size_t n); // false when out of memory
bool srv_buf_puts(srv_buf *b, const char *s);
void srv_buf_free(srv_buf *b);

// ---- errors (json_util.c) ---------------------------------------------------------------
// An OpenAI-style error: {"error": {"message", "type", "param", "code"}}.
typedef struct {
    int status;       // HTTP status, also "code"
    char param[96];   // "" = null
    char msg[1024];
} srv_error;
// Fills e and returns false, so validators can `return srv_fail(...)`.
bool srv_fail(srv_error *e, int status, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
const char *srv_status_type(int status); // "BadRequestError", "NotFoundError", ...
json_t *srv_error_json(const srv_error *e);

// ---- JSON (json_util.c) -----------------------------------------------------------------
// Parses a request body; invalid JSON is a 400 giving line, column and byte position.
bool srv_json_parse(const char *p, size_t n, json_t **out, srv_error *e);
// Optional fields: absent or null leaves *out at the default given; a wrong type or a value
// outside [lo, hi] is a 400 naming the field.
bool srv_get_bool(const json_t *o, const char *key, bool def, bool *out, srv_error *e);
bool srv_get_int(const json_t *o, const char *key, long long lo, long long hi, long long def,
                 long long *out, srv_error *e);
bool srv_get_num(const json_t *o, const char *key, double lo, double hi, double def,
                 double *out, srv_error *e);
bool srv_get_str(const json_t *o, const char *key, const char **out, srv_error *e);
// A JSON string of any bytes: invalid UTF-8 becomes U+FFFD (NULL only when out of memory).
json_t *srv_jstr(const char *s, size_t n);
size_t srv_utf8_chars(const char *s, size_t n); // code points (invalid bytes count one each)
// Log-probabilities as JSON numbers (-inf, which JSON lacks, becomes -9999 as in vLLM).
json_t *srv_jlp(double lp);

// ---- metrics (metrics.c) ----------------------------------------------------------------
#define SRV_HIST_BUCKETS 14
typedef struct {
    uint64_t count[SRV_HIST_BUCKETS + 1]; // per bucket (last: +Inf), not cumulative
    double sum;
    uint64_t n;
} srv_hist;

typedef struct {
    pthread_mutex_t mu;
    uint64_t by_status[600];
    uint64_t prompt_tokens, generated_tokens;
    srv_hist ttft, itl;
} srv_metrics;
void srv_metrics_init(srv_metrics *m);
void srv_metrics_destroy(srv_metrics *m);
void srv_metrics_request(srv_metrics *m, int status);
void srv_metrics_tokens(srv_metrics *m, long prompt, long generated);
void srv_metrics_ttft(srv_metrics *m, double seconds);
void srv_metrics_itl(srv_metrics *m, double seconds);

// ---- the server (http.c) ----------------------------------------------------------------
struct srv_server {
    eng_engine *eng;
    const tok_tokenizer *tok;
    chat_template *chat;
    srv_opts o;
    char *host, *api_key, *model_name, *model_path;
    char adapter_dir[SRV_PATH_MAX]; // realpath of o.adapter_dir ("" when none)
    struct MHD_Daemon *d;
    int listen_fd, port;
    srv_metrics m;
    pthread_mutex_t log_mu;
    atomic_int in_flight;   // requests received and not yet answered in full
    atomic_bool draining;   // srv_drain was called: 503 for new requests
    atomic_ullong next_id;
    long long created;      // start time (Unix seconds) for "created" fields
};

typedef struct srv_req srv_req;
typedef enum MHD_Result (*srv_handler)(srv_req *r, json_t *body);

// One HTTP request, from its headers to the end of its response.
struct srv_req {
    srv_server *s;
    struct MHD_Connection *conn;
    int fd;
    atomic_int refs;        // the connection and, while streaming, the stream
    char method[16], path[256], remote[64], id[48];
    srv_handler handler;
    bool json_body;         // the route takes a JSON body
    srv_buf body;
    bool body_over;         // more than max_body_bytes arrived
    bool replied;
    double t0;              // arrival (monotonic seconds)
    int status;
    bool stream, client_gone;
    char model[SRV_NAME_MAX];
    long prompt_tokens, completion_tokens;
};

double srv_now(void); // monotonic seconds
// Replies: each queues the response on r's connection (body stolen / copied).
enum MHD_Result srv_reply_json(srv_req *r, int status, json_t *body);
enum MHD_Result srv_reply_error(srv_req *r, const srv_error *e);
enum MHD_Result srv_reply_text(srv_req *r, int status, const char *ctype, const char *text,
                               size_t n);
// Streams text/event-stream: pump appends bytes to out and returns 1 (more follows), 0
// (that was the end) or -1 (stop now: the client is gone); it may block. done(ctx) runs once
// when the response is over (finished, failed or the connection closed).
typedef int (*srv_pump_fn)(void *ctx, srv_buf *out);
enum MHD_Result srv_reply_stream(srv_req *r, srv_pump_fn pump, void (*done)(void *ctx),
                                 void *ctx);
// True once the client has closed its end of the connection.
bool srv_client_gone(srv_req *r);
void srv_req_unref(srv_req *r);

// The model a request names: NULL or the base's name -> *adapter = NULL; a registered adapter
// -> its name; anything else is the 404 of an unknown model.
bool srv_resolve_model(srv_server *s, const json_t *body, const char **adapter,
                       const char **name, srv_error *e);
void srv_new_id(srv_server *s, const char *prefix, char *out, size_t cap);

// ---- generation (gen.c) -----------------------------------------------------------------
typedef struct {
    int32_t token;
    double lp;              // NAN: none (the first prompt token)
    int n_top;
    int32_t top_ids[ENG_MAX_LOGPROBS];
    double top_lps[ENG_MAX_LOGPROBS];
    size_t text_off;        // code points of the choice's text before this token
} srv_lp;

typedef struct {
    int index, prompt_idx;
    eng_req *q;
    bool done;
    const char *finish;     // "stop", "length"; NULL while running
    json_t *stop_reason;    // the stop string or id, or NULL (null)
    srv_error err;          // err.status != 0: the choice failed
    int n_gen;              // tokens counted for usage (up to a stop string)
    int n_cached;           // prompt tokens the engine took from its prefix cache
    srv_buf text;           // generated text (special tokens left out)
    size_t text_chars;      // code points of text
    size_t sent;            // bytes of text already streamed
    inf_utf8 u;             // bytes of an unfinished character
    srv_lp *lps;            // [n_lps] generated tokens
    size_t n_lps, cap_lps, lps_sent;
    srv_lp *plps;           // [n_prompt] prompt tokens (with prompt log-probabilities)
    int n_plps, plps_recv;
    double t_last;
    bool first_sent, finish_sent;
} srv_choice;

typedef struct {
    srv_server *s;
    eng_request rq;         // the request every choice submits (prompt set per choice)
    const char *adapter;
    int n;                  // choices per prompt
    int n_prompts;
    tok_ids *prompts;       // [n_prompts]
    int n_choices;
    srv_choice *c;          // [n_choices] choice i: prompt i / n
    char **stops;           // [n_stops] stop strings
    int n_stops;
    size_t max_stop;
    bool skip_special;
    bool want_prompt_lps;   // echo with logprobs
    double t_submit;
    char *piece;            // scratch for one token's bytes
} srv_job;

// Reads the fields completions and chat share (sampling, stop, stop_token_ids, n, seed,
// ignore_eos, skip_special_tokens) into j. max_tokens is the caller's.
bool srv_job_parse(srv_job *j, const json_t *body, srv_error *e);
// Checks prompt + max_tokens against the model's length and submits every choice.
bool srv_job_submit(srv_job *j, srv_error *e);
// Handles the events that are ready, waiting up to wait_ms for the first; returns how many.
int srv_job_pump(srv_job *j, int wait_ms);
bool srv_job_done(const srv_job *j);
// Bytes of choice c's text that may go out now (held back: what could begin a stop string).
size_t srv_choice_ready(const srv_job *j, const srv_choice *c);
// The token's text as shown in logprobs (special tokens by name).
json_t *srv_token_str(srv_job *j, int32_t id);
void srv_job_cancel(srv_job *j);
void srv_job_free(srv_job *j);
// usage: prompt tokens once per prompt, generated tokens of every choice.
json_t *srv_job_usage(const srv_job *j);
// Parks the first failure of any choice in *e; false when one failed.
bool srv_job_ok(const srv_job *j, srv_error *e);
// Runs a non-streamed job to its end, watching the client; false when the client left.
bool srv_job_wait(srv_job *j, srv_req *r);

// The prompt ids of a chat request (messages, tools, reasoning_effort, and vLLM's
// continue_final_message) through the Mistral v15 template (routes_chat.c).
bool srv_chat_ids(srv_server *s, const json_t *body, tok_ids *out, srv_error *e);
// The message of a finished chat choice: reasoning between a leading [THINK] and [/THINK]
// as reasoning_content, and with tools, [TOOL_CALLS]name[ARGS]json ... as tool_calls
// (*finish becomes "tool_calls"); the rest is content.
json_t *srv_chat_message(srv_job *j, const srv_choice *ch, bool tools, const char **finish);
// Ids of plain text: <s> (when add_bos and the tokenizer has one), then the text.
bool srv_text_ids(srv_server *s, const char *text, size_t n, bool add_bos, tok_ids *out,
                  srv_error *e);

// Server-sent events: "data: JSON\n\n" (j stolen).
bool srv_put_event(srv_buf *out, json_t *j);
// How a route shapes its stream: chunk writes choice ch's news (true when it wrote one),
// envelope wraps a choices array in the route's chunk object.
typedef struct {
    bool (*chunk)(void *ctx, srv_choice *ch, srv_buf *out);
    json_t *(*envelope)(void *ctx, json_t *choices);
    bool include_usage;
} srv_stream_fmt;
// The pump of a streamed job (srv_pump_fn's contract): chunks as choices progress, an error
// event then [DONE] when a choice fails, the usage event when asked for, then [DONE]; -1
// when the client is gone (the job is cancelled).
int srv_stream_pump(srv_job *j, srv_req *r, const srv_stream_fmt *f, void *ctx,
                    bool *error_sent, srv_buf *out);

// ---- routes -----------------------------------------------------------------------------
enum MHD_Result srv_route_completions(srv_req *r, json_t *body);   // routes_completions.c
enum MHD_Result srv_route_chat(srv_req *r, json_t *body);          // routes_chat.c
enum MHD_Result srv_route_health(srv_req *r, json_t *body);        // routes_admin.c
enum MHD_Result srv_route_models(srv_req *r, json_t *body);
enum MHD_Result srv_route_load(srv_req *r, json_t *body);
enum MHD_Result srv_route_unload(srv_req *r, json_t *body);
enum MHD_Result srv_route_tokenize(srv_req *r, json_t *body);      // routes_tokens.c
enum MHD_Result srv_route_detokenize(srv_req *r, json_t *body);
enum MHD_Result srv_route_tokenizer_info(srv_req *r, json_t *body);
enum MHD_Result srv_route_metrics(srv_req *r, json_t *body);       // metrics.c

#endif
