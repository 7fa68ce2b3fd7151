// infer/server/server.h: the public API of molt's HTTP server (`srv_`): an OpenAI-compatible
// API (vLLM-compatible where vLLM has the same route) over a serving engine
// (infer/engine/engine.h), and the `molt serve` command.
//
// HTTP threads (libmicrohttpd, one thread per connection) parse and validate requests, turn
// text into ids (tokenizer, chat template), submit to the engine, turn ids back into text
// as complete UTF-8 characters, match stop strings, and stream server-sent events. The
// engine's own thread does the model work.
//
// Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
// POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /metrics, and with
// allow_runtime_adapters POST /v1/load_lora_adapter and /v1/unload_lora_adapter.
//
// Not here: the model, the scheduler, the KV cache and the adapter pool (the engine).
#ifndef MOLT_INFER_SERVER_H
#define MOLT_INFER_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "../../common/err.h"
#include "../engine/engine.h"

typedef struct {
    const char *host;            // address to bind (default "127.0.0.1")
    int port;                    // 0 = an ephemeral port (srv_port tells which)
    const char *api_key;         // NULL or "": no authentication
    const char *model_name;      // the base's name in "model" fields (required)
    const char *model_path;      // the base's directory ("root" in /v1/models)
    const char *adapter_dir;     // runtime adapters must resolve inside it (NULL: none)
    bool allow_runtime_adapters; // the load/unload routes exist
    size_t max_body_bytes;       // request bodies above are 413 (default 1 MiB)
    FILE *access_log;            // one JSON line per request (default stderr; NULL: none)
    int max_connections;         // simultaneous connections (default 1024)
} srv_opts;
void srv_opts_default(srv_opts *o);

typedef struct srv_server srv_server;

// Binds host:port and starts answering requests over e (which must outlive the server and
// be started). Errors: the address cannot be resolved or bound (MOLT_EIO naming it),
// adapter_dir does not exist (MOLT_EARG).
molt_status srv_start(eng_engine *e, const srv_opts *o, srv_server **out);
int srv_port(const srv_server *s); // the bound port
// Stops accepting connections (requests on open connections get 503), and waits up to
// grace_s seconds for the requests in flight to finish. Returns how many are still
// running. Call eng_shutdown next (it ends what is left), then srv_free.
int srv_drain(srv_server *s, double grace_s);
// Stops the HTTP threads (waiting for their handlers to return) and frees the server.
void srv_free(srv_server *s);

// molt serve: options, config file, start-up lines, signals. Returns the exit status.
int srv_cmd_serve(int argc, char **argv);

#endif
