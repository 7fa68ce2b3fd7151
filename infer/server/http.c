// infer/server/http.c: the libmicrohttpd plumbing of the server: the listening socket, one
// thread per connection, the route table, authentication, the body limit, JSON and
// server-sent-event replies, the detection of a client that went away, the access log and
// the drain on shutdown. Not here: what any route does (routes_*.c, metrics.c).
#define _XOPEN_SOURCE 700 // realpath
#include "srv_internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

double srv_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void srv_opts_default(srv_opts *o) {
    *o = (srv_opts){.host = "127.0.0.1", .port = 8000, .max_body_bytes = 1 << 20,
                    .access_log = stderr, .max_connections = 1024};
}

void srv_new_id(srv_server *s, const char *prefix, char *out, size_t cap) {
    unsigned long long k = atomic_fetch_add(&s->next_id, 1);
    snprintf(out, cap, "%s-%llx%08llx", prefix, (unsigned long long)s->created, k);
}

// ---- routes -----------------------------------------------------------------------------
typedef struct {
    const char *method, *path;
    srv_handler fn;
    bool json_body, runtime_adapters;
} route;

static const route routes[] = {
    {"GET", "/health", srv_route_health, false, false},
    {"GET", "/v1/models", srv_route_models, false, false},
    {"POST", "/v1/completions", srv_route_completions, true, false},
    {"POST", "/v1/chat/completions", srv_route_chat, true, false},
    {"POST", "/tokenize", srv_route_tokenize, true, false},
    {"POST", "/detokenize", srv_route_detokenize, true, false},
    {"GET", "/tokenizer_info", srv_route_tokenizer_info, false, false},
    {"GET", "/metrics", srv_route_metrics, false, false},
    {"POST", "/v1/load_lora_adapter", srv_route_load, true, true},
    {"POST", "/v1/unload_lora_adapter", srv_route_unload, true, true},
};
#define N_ROUTES ((int)(sizeof routes / sizeof *routes))

// The route of (method, path); *status 404 (no such path) or 405 (other method) when none.
static const route *find_route(const srv_server *s, const char *method, const char *path,
                               int *status) {
    *status = 404;
    for (int i = 0; i < N_ROUTES; i++) {
        if (strcmp(routes[i].path, path) || (routes[i].runtime_adapters &&
                                             !s->o.allow_runtime_adapters))
            continue;
        if (!strcmp(routes[i].method, method) ||
            (!strcmp(method, "HEAD") && !strcmp(routes[i].method, "GET")))
            return &routes[i];
        *status = 405;
    }
    return NULL;
}

// ---- replies ----------------------------------------------------------------------------

static void add_common_headers(srv_req *r, struct MHD_Response *resp) {
    if (atomic_load(&r->s->draining))
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
}

enum MHD_Result srv_reply_text(srv_req *r, int status, const char *ctype, const char *text,
                               size_t n) {
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(n, (void *)text, MHD_RESPMEM_MUST_COPY);
    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    add_common_headers(r, resp);
    if (status == 401)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    enum MHD_Result ret = MHD_queue_response(r->conn, (unsigned)status, resp);
    MHD_destroy_response(resp);
    r->status = status;
    r->replied = true;
    return ret;
}

enum MHD_Result srv_reply_json(srv_req *r, int status, json_t *body) {
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    if (!text)
        return srv_reply_text(r, 500, "application/json",
                              "{\"error\":{\"message\":\"out of memory\",\"type\":"
                              "\"InternalServerError\",\"param\":null,\"code\":500}}", 86);
    enum MHD_Result ret = srv_reply_text(r, status, "application/json", text, strlen(text));
    free(text);
    return ret;
}

enum MHD_Result srv_reply_error(srv_req *r, const srv_error *e) {
    return srv_reply_json(r, e->status, srv_error_json(e));
}

bool srv_client_gone(srv_req *r) {
    if (r->client_gone)
        return true;
    if (r->fd < 0)
        return false;
    char c;
    ssize_t k = recv(r->fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (k == 0 || (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
        r->client_gone = true;
    return r->client_gone;
}

// ---- streaming --------------------------------------------------------------------------
typedef struct {
    srv_req *r;
    srv_pump_fn pump;
    void (*done)(void *ctx);
    void *ctx;
    srv_buf out;
    size_t off;
    bool finished;
} stream;

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    stream *st = cls;
    (void)pos;
    while (st->off == st->out.n) {
        if (st->finished)
            return MHD_CONTENT_READER_END_OF_STREAM;
        st->out.n = st->off = 0;
        int rc = st->pump(st->ctx, &st->out);
        if (rc < 0) {
            st->r->client_gone = true;
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
        if (rc == 0)
            st->finished = true;
    }
    size_t k = st->out.n - st->off < max ? st->out.n - st->off : max;
    memcpy(buf, st->out.p + st->off, k);
    st->off += k;
    return (ssize_t)k;
}

static void stream_free(void *cls) {
    stream *st = cls;
    st->done(st->ctx);
    srv_buf_free(&st->out);
    srv_req *r = st->r;
    molt_free(st);
    srv_req_unref(r);
}

enum MHD_Result srv_reply_stream(srv_req *r, srv_pump_fn pump, void (*done)(void *ctx),
                                 void *ctx) {
    stream *st = molt_calloc(1, sizeof *st);
    if (!st) {
        done(ctx);
        srv_error e;
        srv_fail(&e, 500, NULL, "out of memory");
        return srv_reply_error(r, &e);
    }
    *st = (stream){.r = r, .pump = pump, .done = done, .ctx = ctx};
    atomic_fetch_add(&r->refs, 1);
    struct MHD_Response *resp =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_read, st, stream_free);
    if (!resp) {
        stream_free(st);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    add_common_headers(r, resp);
    r->stream = true;
    r->status = 200;
    r->replied = true;
    enum MHD_Result ret = MHD_queue_response(r->conn, 200, resp);
    MHD_destroy_response(resp);
    return ret;
}

// ---- requests ---------------------------------------------------------------------------

static void access_log(srv_req *r) {
    FILE *f = r->s->o.access_log;
    if (!f)
        return;
    char ts[40];
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    struct tm tm;
    gmtime_r(&now.tv_sec, &tm);
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
    json_t *j = json_pack("{s:s+, s:s, s:s, s:s, s:i, s:f, s:b, s:b}", "time", ts, "Z",
                          "remote", r->remote, "method", r->method, "path", r->path, "status",
                          r->status, "duration_s", srv_now() - r->t0, "stream", r->stream,
                          "client_gone", r->client_gone);
    if (!j)
        return;
    if (*r->model)
        json_object_set_new(j, "model", srv_jstr(r->model, strlen(r->model)));
    if (*r->id)
        json_object_set_new(j, "id", json_string(r->id));
    if (r->prompt_tokens || r->completion_tokens) {
        json_object_set_new(j, "prompt_tokens", json_integer(r->prompt_tokens));
        json_object_set_new(j, "completion_tokens", json_integer(r->completion_tokens));
    }
    char *line = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (!line)
        return;
    pthread_mutex_lock(&r->s->log_mu);
    fprintf(f, "%s\n", line);
    fflush(f);
    pthread_mutex_unlock(&r->s->log_mu);
    free(line);
}

void srv_req_unref(srv_req *r) {
    if (atomic_fetch_sub(&r->refs, 1) != 1)
        return;
    srv_server *s = r->s;
    srv_metrics_request(&s->m, r->status);
    access_log(r);
    srv_buf_free(&r->body);
    molt_free(r);
    atomic_fetch_sub(&s->in_flight, 1);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    srv_req *r = *con_cls;
    (void)cls;
    (void)c;
    if (!r)
        return;
    if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK)
        r->client_gone = true;
    if (!r->status)
        r->status = 499; // closed before any response
    *con_cls = NULL;
    srv_req_unref(r);
}

// Constant-time comparison of the Authorization header with "Bearer KEY".
static bool authorized(const srv_server *s, struct MHD_Connection *c) {
    if (!s->api_key)
        return true;
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND,
                                                MHD_HTTP_HEADER_AUTHORIZATION);
    if (!h || strncmp(h, "Bearer ", 7))
        return false;
    h += 7;
    size_t hn = strlen(h), kn = strlen(s->api_key);
    unsigned char diff = (unsigned char)(hn != kn);
    for (size_t i = 0; i < kn; i++)
        diff |= (unsigned char)(s->api_key[i] ^ (i < hn ? h[i] : 0));
    return diff == 0;
}

static srv_req *req_new(srv_server *s, struct MHD_Connection *c, const char *url,
                        const char *method) {
    srv_req *r = molt_calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->s = s;
    r->conn = c;
    r->t0 = srv_now();
    atomic_init(&r->refs, 1);
    atomic_fetch_add(&s->in_flight, 1);
    snprintf(r->method, sizeof r->method, "%s", method);
    snprintf(r->path, sizeof r->path, "%s", url);
    const union MHD_ConnectionInfo *fi = MHD_get_connection_info(c,
                                                                 MHD_CONNECTION_INFO_CONNECTION_FD);
    r->fd = fi ? fi->connect_fd : -1;
    const union MHD_ConnectionInfo *ai = MHD_get_connection_info(c,
                                                                 MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    if (ai && ai->client_addr) {
        const struct sockaddr *sa = ai->client_addr;
        if (sa->sa_family == AF_INET)
            inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, r->remote,
                      sizeof r->remote);
        else if (sa->sa_family == AF_INET6)
            inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, r->remote,
                      sizeof r->remote);
    }
    return r;
}

// First call of a request (headers only): route, drain, auth and size checks.
static enum MHD_Result on_headers(srv_req *r) {
    srv_server *s = r->s;
    srv_error e = {0};
    int status;
    const route *rt = find_route(s, r->method, r->path, &status);
    if (atomic_load(&s->draining)) {
        srv_fail(&e, 503, NULL, "the server is shutting down");
        return srv_reply_error(r, &e);
    }
    if (!rt) {
        if (status == 405)
            srv_fail(&e, 405, NULL, "method %s is not allowed on %s", r->method, r->path);
        else
            srv_fail(&e, 404, NULL, "no route %s %s", r->method, r->path);
        return srv_reply_error(r, &e);
    }
    if (strcmp(rt->path, "/health") && !authorized(s, r->conn)) {
        srv_fail(&e, 401, NULL, "a valid API key is required: Authorization: Bearer KEY");
        return srv_reply_error(r, &e);
    }
    const char *cl = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND,
                                                 MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (cl && strtoull(cl, NULL, 10) > s->o.max_body_bytes) {
        srv_fail(&e, 413, NULL, "the request body has %s bytes, more than the limit of %zu",
                 cl, s->o.max_body_bytes);
        return srv_reply_error(r, &e);
    }
    r->handler = rt->fn;
    r->json_body = rt->json_body;
    return MHD_YES;
}

static enum MHD_Result dispatch(srv_req *r) {
    srv_error e = {0};
    if (r->body_over) {
        srv_fail(&e, 413, NULL, "the request body is over the limit of %zu bytes",
                 r->s->o.max_body_bytes);
        return srv_reply_error(r, &e);
    }
    if (!r->json_body)
        return r->handler(r, NULL);
    json_t *body;
    if (!srv_json_parse(r->body.p, r->body.n, &body, &e))
        return srv_reply_error(r, &e);
    if (!json_is_object(body)) {
        json_decref(body);
        srv_fail(&e, 400, NULL, "the request body must be a JSON object");
        return srv_reply_error(r, &e);
    }
    enum MHD_Result ret = r->handler(r, body);
    json_decref(body);
    return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version,
                                  const char *upload, size_t *upload_size, void **con_cls) {
    srv_server *s = cls;
    srv_req *r = *con_cls;
    (void)version;
    if (!r) {
        r = req_new(s, c, url, method);
        if (!r)
            return MHD_NO;
        *con_cls = r;
        return on_headers(r);
    }
    if (*upload_size) {
        if (!r->replied && !r->body_over) {
            if (r->body.n + *upload_size > s->o.max_body_bytes)
                r->body_over = true;
            else if (!srv_buf_put(&r->body, upload, *upload_size))
                return MHD_NO;
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (r->replied)
        return MHD_YES;
    return dispatch(r);
}

// ---- the daemon -------------------------------------------------------------------------

static molt_status bind_socket(srv_server *s) {
    char port[16];
    snprintf(port, sizeof port, "%d", s->o.port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *ai;
    int rc = getaddrinfo(s->host, port, &hints, &ai);
    if (rc)
        return molt_err(MOLT_EIO, "serve: cannot resolve host '%s': %s", s->host,
                        gai_strerror(rc));
    int fd = -1, err = 0;
    for (struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, a->ai_addr, a->ai_addrlen) || listen(fd, 512)) {
            err = errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(ai);
    if (fd < 0)
        return molt_err(MOLT_EIO, "serve: cannot listen on %s:%d: %s", s->host, s->o.port,
                        strerror(err));
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    getsockname(fd, (struct sockaddr *)&ss, &sl);
    s->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                             : ((struct sockaddr_in *)&ss)->sin_port);
    s->listen_fd = fd;
    return MOLT_OK;
}

static char *dup_or_null(const char *v) { return v && *v ? molt_strdup(v) : NULL; }

molt_status srv_start(eng_engine *e, const srv_opts *o, srv_server **out) {
    *out = NULL;
    if (!o->model_name || !*o->model_name)
        return molt_err(MOLT_EARG, "serve: the served model needs a name");
    srv_server *s = molt_calloc(1, sizeof *s);
    if (!s)
        return molt_err(MOLT_ENOMEM, "serve: out of memory");
    s->eng = e;
    s->o = *o;
    s->tok = eng_tokenizer(e);
    s->listen_fd = -1;
    s->created = (long long)time(NULL);
    srv_metrics_init(&s->m);
    pthread_mutex_init(&s->log_mu, NULL);
    s->host = molt_strdup(o->host ? o->host : "127.0.0.1");
    s->api_key = dup_or_null(o->api_key);
    s->model_name = molt_strdup(o->model_name);
    s->model_path = molt_strdup(o->model_path ? o->model_path : o->model_name);
    molt_status st = s->host && s->model_name && s->model_path
                         ? MOLT_OK : molt_err(MOLT_ENOMEM, "serve: out of memory");
    if (st == MOLT_OK && o->adapter_dir && *o->adapter_dir &&
        !realpath(o->adapter_dir, s->adapter_dir))
        st = molt_err(MOLT_EARG, "serve: --adapter-dir %s: %s", o->adapter_dir,
                      strerror(errno));
    if (st == MOLT_OK)
        st = chat_template_new(s->tok, NULL, &s->chat);
    if (st == MOLT_OK)
        st = bind_socket(s);
    if (st == MOLT_OK) {
        unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
                         MHD_USE_POLL | MHD_USE_ITC;
        s->d = MHD_start_daemon(flags, 0, NULL, NULL, on_request, s, MHD_OPTION_LISTEN_SOCKET,
                                s->listen_fd, MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
                                MHD_OPTION_CONNECTION_LIMIT, (unsigned)o->max_connections,
                                MHD_OPTION_CONNECTION_TIMEOUT, 600u, MHD_OPTION_END);
        if (!s->d)
            st = molt_err(MOLT_EIO, "serve: cannot start the HTTP server on %s:%d", s->host,
                          s->port);
        else
            s->listen_fd = -1; // the daemon owns it now
    }
    if (st != MOLT_OK) {
        srv_free(s);
        return st;
    }
    *out = s;
    return MOLT_OK;
}

int srv_port(const srv_server *s) { return s->port; }

int srv_drain(srv_server *s, double grace_s) {
    atomic_store(&s->draining, true);
    if (s->d) {
        MHD_socket fd = MHD_quiesce_daemon(s->d);
        if (fd != MHD_INVALID_SOCKET)
            close(fd);
        s->listen_fd = -1;
    }
    double end = srv_now() + grace_s;
    while (atomic_load(&s->in_flight) > 0 && srv_now() < end) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return atomic_load(&s->in_flight);
}

void srv_free(srv_server *s) {
    if (!s)
        return;
    if (s->d)
        MHD_stop_daemon(s->d);
    if (s->listen_fd >= 0)
        close(s->listen_fd);
    chat_template_free(s->chat);
    srv_metrics_destroy(&s->m);
    pthread_mutex_destroy(&s->log_mu);
    molt_free(s->host);
    molt_free(s->api_key);
    molt_free(s->model_name);
    molt_free(s->model_path);
    molt_free(s);
}
