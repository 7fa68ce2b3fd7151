// infer/server/routes_admin.c: GET /health, GET /v1/models, the runtime adapter routes
// POST /v1/load_lora_adapter and /v1/unload_lora_adapter (path confinement to
// --adapter-dir, vLLM's statuses and messages), and the lookup of a request's "model".
// Not here: loading an adapter (the engine's eng_adapter_add).
#define _XOPEN_SOURCE 700 // realpath
#include "srv_internal.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

bool srv_resolve_model(srv_server *s, const json_t *body, const char **adapter,
                       const char **name, srv_error *e) {
    const char *m;
    *adapter = NULL;
    *name = s->model_name;
    if (!srv_get_str(body, "model", &m, e))
        return false;
    if (!m || !strcmp(m, s->model_name))
        return true;
    if (!eng_adapter_exists(s->eng, m))
        return srv_fail(e, 404, "model", "The model `%s` does not exist.", m);
    *adapter = *name = m;
    return true;
}

// 200 while the engine takes requests; 503 once it has stopped (or is draining).
enum MHD_Result srv_route_health(srv_req *r, json_t *body) {
    (void)body;
    if (!eng_healthy(r->s->eng))
        return srv_reply_text(r, 503, "text/plain", "engine stopped\n", 15);
    return srv_reply_text(r, 200, "text/plain", "", 0);
}

static json_t *model_card(srv_server *s, const char *id, const char *root, const char *parent) {
    return json_pack("{s:s, s:s, s:I, s:s, s:s, s:o, s:i, s:[]}", "id", id, "object", "model",
                     "created", (json_int_t)s->created, "owned_by", "molt", "root", root,
                     "parent", parent ? json_string(parent) : json_null(), "max_model_len",
                     eng_max_model_len(s->eng), "permission");
}

enum MHD_Result srv_route_models(srv_req *r, json_t *body) {
    (void)body;
    srv_server *s = r->s;
    int n = eng_adapter_list(s->eng, NULL, 0);
    eng_adapter_info *info = molt_calloc((size_t)(n > 0 ? n : 1), sizeof *info);
    json_t *data = json_array();
    if (!info || !data) {
        molt_free(info);
        json_decref(data);
        srv_error e;
        srv_fail(&e, 500, NULL, "out of memory");
        return srv_reply_error(r, &e);
    }
    n = eng_adapter_list(s->eng, info, n);
    json_array_append_new(data, model_card(s, s->model_name, s->model_path, NULL));
    for (int i = 0; i < n; i++)
        json_array_append_new(data, model_card(s, info[i].name, info[i].path, s->model_name));
    molt_free(info);
    return srv_reply_json(r, 200, json_pack("{s:s, s:o}", "object", "list", "data", data));
}

// A required non-empty string field.
static bool need_str(const json_t *body, const char *key, const char **out, srv_error *e) {
    if (!srv_get_str(body, key, out, e))
        return false;
    if (!*out || !**out)
        return srv_fail(e, 400, key, "field '%s' is required", key);
    return true;
}

// Resolves lora_path (relative paths are taken under the adapter directory) and checks that
// it lies inside that directory once symbolic links are followed.
static bool confine(srv_server *s, const char *path, char *real, srv_error *e) {
    if (!*s->adapter_dir)
        return srv_fail(e, 403, "lora_path", "runtime adapters need --adapter-dir: no path is "
                        "allowed");
    char joined[SRV_PATH_MAX];
    int k = path[0] == '/' ? snprintf(joined, sizeof joined, "%s", path)
                           : snprintf(joined, sizeof joined, "%s/%s", s->adapter_dir, path);
    if (k < 0 || (size_t)k >= sizeof joined)
        return srv_fail(e, 400, "lora_path", "field 'lora_path' is too long");
    size_t dn = strlen(s->adapter_dir);
    if (!realpath(joined, real)) {
        int err = errno;
        // A path that does not exist says nothing about the directory unless it names it.
        if (err == ENOENT && !strncmp(joined, s->adapter_dir, dn) && joined[dn] == '/' &&
            !strstr(joined + dn, "/../") && !strstr(joined + dn, "/./"))
            return srv_fail(e, 404, "lora_path", "no adapter at '%s'", path);
        return srv_fail(e, 403, "lora_path", "'%s' is not inside the adapter directory", path);
    }
    if (strncmp(real, s->adapter_dir, dn) || (real[dn] != '/' && dn != 1) || !real[dn])
        return srv_fail(e, 403, "lora_path", "'%s' is not inside the adapter directory", path);
    return true;
}

enum MHD_Result srv_route_load(srv_req *r, json_t *body) {
    srv_server *s = r->s;
    srv_error e = {0};
    const char *name, *path;
    char real[PATH_MAX];
    if (!need_str(body, "lora_name", &name, &e) || !need_str(body, "lora_path", &path, &e))
        return srv_reply_error(r, &e);
    snprintf(r->model, sizeof r->model, "%s", name);
    if (!strcmp(name, s->model_name) || eng_adapter_exists(s->eng, name)) {
        srv_fail(&e, 400, "lora_name", "The lora adapter '%s' has already been loaded.", name);
        return srv_reply_error(r, &e);
    }
    if (!confine(s, path, real, &e))
        return srv_reply_error(r, &e);
    molt_status st = eng_adapter_add(s->eng, name, real);
    if (st != MOLT_OK) {
        int status = st == MOLT_EIO ? 404 : st == MOLT_EARG || st == MOLT_EFORMAT ? 400 : 500;
        srv_fail(&e, status, st == MOLT_EARG ? "lora_name" : "lora_path", "%s", molt_err_msg());
        return srv_reply_error(r, &e);
    }
    char msg[SRV_NAME_MAX + 64];
    int n = snprintf(msg, sizeof msg, "Success: LoRA adapter '%s' added successfully.", name);
    return srv_reply_text(r, 200, "text/plain; charset=utf-8", msg, (size_t)n);
}

enum MHD_Result srv_route_unload(srv_req *r, json_t *body) {
    srv_server *s = r->s;
    srv_error e = {0};
    const char *name;
    if (!need_str(body, "lora_name", &name, &e))
        return srv_reply_error(r, &e);
    snprintf(r->model, sizeof r->model, "%s", name);
    if (eng_adapter_remove(s->eng, name) != MOLT_OK) {
        srv_fail(&e, 404, "lora_name", "The lora adapter '%s' cannot be found.", name);
        return srv_reply_error(r, &e);
    }
    char msg[SRV_NAME_MAX + 64];
    int n = snprintf(msg, sizeof msg, "Success: LoRA adapter '%s' removed successfully.", name);
    return srv_reply_text(r, 200, "text/plain; charset=utf-8", msg, (size_t)n);
}
