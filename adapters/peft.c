// adapters/peft.c: PEFT adapter directories (adapter_config.json with the keys of SPECS.md
// section 7, adapter_model.safetensors with PEFT's tensor names) both ways, and PEFT's
// tensor names, which molt's own adapter file (h5.c) uses too. Imports validate everything
// before anything is attached. Not here: molt's adapter file (h5.c), spec parsing and
// attaching (lora.c), merging (merge.c).
#include "internal.h"

#include "../common/fsio.h"

#include <errno.h>

#include <jansson.h>
#include <math.h>
#include <string.h>
#include <sys/stat.h>

#define PATH_CAP 4096

static const lora_unit *find_const(const lora_adapter *ad, const char *path) {
    for (int i = 0; i < ad->n_units; i++)
        if (!strcmp(ad->units[i].path, path))
            return &ad->units[i];
    return NULL;
}

void lora_peft_tensor_name(const lora_adapter *ad, const lora_unit *u, bool b, char *buf,
                           size_t cap) {
    const char *ab = b ? "lora_B" : "lora_A";
    if (u->group != LORA_GROUP_EXPERTS) {
        snprintf(buf, cap, "base_model.model.%s.%s.weight", u->path, ab);
        return;
    }
    // PEFT wraps the experts module once per parameter; the first wrapped (gate_up_proj, the
    // first parameter of the module) ends up as the inner base_layer when both are adapted
    int mod = (int)(strrchr(u->path, '.') - u->path);
    char sibling[LORA_NAME_MAX];
    snprintf(sibling, sizeof sibling, "%.*s.down_proj", mod, u->path);
    bool nested = !strcmp(u->path + mod + 1, "gate_up_proj") && find_const(ad, sibling);
    snprintf(buf, cap, "base_model.model.%.*s%s.%s.weight", mod, u->path,
             nested ? ".base_layer" : "", ab);
}

// ---------------------------------------------------------------------------------------
// Target lists: the shortest keys (by trailing components) that select exactly the adapted
// units among all of the model's units of the same kind, so PEFT selects the same modules.

static bool is_param_unit(const lora_unit *u) {
    return u->group == LORA_GROUP_EXPERTS || u->group == LORA_GROUP_ROUTER;
}

// Does key select unit v (PEFT: equal or ends with "." + key)?
static bool key_selects(const char *key, const lora_unit *v) {
    char k[LORA_NAME_MAX + 8];
    lora_peft_key(v, k, sizeof k);
    return lora_pattern_match(key, k);
}

// The target key of adapted unit u: at least `min_parts` trailing components of its PEFT
// key, more until no unadapted unit of the same kind is selected.
static void target_key(const lora_adapter *ad, const lora_unit *all, int n_all,
                       const lora_unit *u, char *out, size_t cap) {
    char k[LORA_NAME_MAX + 8];
    lora_peft_key(u, k, sizeof k);
    int min_parts = is_param_unit(u) ? 3 : 1, parts = 0;
    for (const char *p = k + strlen(k); p > k; p--) {
        if (p[-1] != '.')
            continue;
        if (++parts < min_parts)
            continue;
        bool exact = true;
        for (int i = 0; i < n_all && exact; i++)
            if (is_param_unit(&all[i]) == is_param_unit(u) && key_selects(p, &all[i]) &&
                !find_const(ad, all[i].path))
                exact = false;
        if (exact) {
            snprintf(out, cap, "%s", p);
            return;
        }
    }
    snprintf(out, cap, "%s", k);
}

static bool json_has_string(json_t *arr, const char *s) {
    size_t i;
    json_t *v;
    json_array_foreach(arr, i, v) {
        if (!strcmp(json_string_value(v), s))
            return true;
    }
    return false;
}

// Fills target_modules / target_parameters and the rank/alpha patterns for units whose
// rank or alpha differ from the defaults (keyed by their target key when every adapted
// unit it selects agrees, else by the full key).
static molt_status build_targets(const lora_adapter *ad, json_t *tm, json_t *tp, json_t *rp,
                                 json_t *ap) {
    lora_unit *all;
    int n_all;
    MOLT_TRY(lora_list_units(ad->model, &all, &n_all));
    for (int i = 0; i < ad->n_units; i++) {
        const lora_unit *u = &ad->units[i];
        char key[LORA_NAME_MAX + 8];
        target_key(ad, all, n_all, u, key, sizeof key);
        json_t *arr = is_param_unit(u) ? tp : tm;
        if (!json_has_string(arr, key))
            json_array_append_new(arr, json_string(key));
        bool agree = true;
        for (int j = 0; j < ad->n_units; j++)
            if (key_selects(key, &ad->units[j]) &&
                (ad->units[j].r != u->r || ad->units[j].alpha != u->alpha))
                agree = false;
        if (!agree)
            lora_peft_key(u, key, sizeof key);
        if (u->r != ad->spec.r)
            json_object_set_new(rp, key, json_integer(u->r));
        if (u->alpha != ad->spec.alpha)
            json_object_set_new(ap, key, json_real(u->alpha));
    }
    molt_free(all);
    return MOLT_OK;
}

static json_t *config_json(const lora_adapter *ad, const char *base_model) {
    json_t *tm = json_array(), *tp = json_array(), *rp = json_object(), *ap = json_object();
    json_t *c = json_object();
    if (!tm || !tp || !rp || !ap || !c || build_targets(ad, tm, tp, rp, ap) != MOLT_OK) {
        json_decref(tm), json_decref(tp), json_decref(rp), json_decref(ap), json_decref(c);
        return NULL;
    }
    // PEFT refuses dropout on parameter targets; molt applies none there either
    double dropout = json_array_size(tp) ? 0.0 : ad->spec.dropout;
    json_object_set_new(c, "peft_type", json_string("LORA"));
    json_object_set_new(c, "task_type", json_string("CAUSAL_LM"));
    json_object_set_new(c, "r", json_integer(ad->spec.r));
    json_object_set_new(c, "lora_alpha", json_real(ad->spec.alpha));
    json_object_set_new(c, "lora_dropout", json_real(dropout));
    json_object_set_new(c, "target_modules", tm);
    json_object_set_new(c, "target_parameters", tp);
    json_object_set_new(c, "use_rslora", json_boolean(ad->spec.rslora));
    json_object_set_new(c, "use_dora", json_false());
    json_object_set_new(c, "bias", json_string("none"));
    json_object_set_new(c, "base_model_name_or_path",
                        base_model ? json_string(base_model) : json_null());
    json_object_set_new(c, "fan_in_fan_out", json_false());
    json_object_set_new(c, "modules_to_save", json_null());
    json_object_set_new(c, "rank_pattern", rp);
    json_object_set_new(c, "alpha_pattern", ap);
    return c;
}

// The adapter's tensors (F32, PEFT names) for st_write; names in `names` (2 per unit).
static st_tensor *tensor_list(const lora_adapter *ad, char (*names)[LORA_NAME_MAX + 64]) {
    st_tensor *t = molt_calloc((size_t)ad->n_units * 2 + 1, sizeof *t);
    if (!t)
        return NULL;
    for (int i = 0; i < 2 * ad->n_units; i++) {
        const lora_unit *u = &ad->units[i / 2];
        const ag_tensor *x = i % 2 ? u->b : u->a;
        lora_peft_tensor_name(ad, u, i % 2, names[i], sizeof names[i]);
        t[i] = (st_tensor){.name = names[i], .dtype = ST_F32, .ndim = 2,
                           .shape = {x->shape[0], x->shape[1]}, .data = x->data};
    }
    return t;
}

static molt_status write_tensors(const lora_adapter *ad, const char *path, const st_meta *meta,
                                 int n_meta) {
    char (*names)[LORA_NAME_MAX + 64] = molt_calloc((size_t)ad->n_units * 2 + 1,
                                                    sizeof *names);
    st_tensor *t = names ? tensor_list(ad, names) : NULL;
    molt_status st = t ? st_write(path, t, 2 * ad->n_units, meta, n_meta)
                       : molt_err(MOLT_ENOMEM, "adapter: out of memory");
    molt_free(t);
    molt_free(names);
    return st;
}

molt_status lora_export_peft(const lora_adapter *ad, const char *dir, const char *base_model) {
    char path[PATH_CAP];
    if (mkdir(dir, 0777) != 0) {
        struct stat sb;
        if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
            return molt_err(MOLT_EIO, "export: cannot create directory %s: %s", dir,
                            strerror(errno));
    }
    json_t *c = config_json(ad, base_model);
    if (!c)
        return molt_err(MOLT_ENOMEM, "export: cannot build adapter_config.json");
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    char *text = json_dumps(c, JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(17));
    json_decref(c);
    if (!text)
        return molt_err(MOLT_ENOMEM, "export: cannot build adapter_config.json");
    molt_status st = molt_write_atomic(path, text, strlen(text));
    free(text); // from jansson
    MOLT_TRY(st);
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    st_meta meta = {"format", "pt"};
    return write_tensors(ad, path, &meta, 1);
}

// ---------------------------------------------------------------------------------------
// Reading tensors into an attached (zero-initialized) adapter

// Unit u's A (k 0) or B from t (the full matrix; a shard of routed experts keeps its part).
static molt_status fill_tensor(const st_tensor *t, const lora_adapter *ad, const lora_unit *u,
                               int k, const char *file) {
    int64_t full[2];
    lora_unit_full_shape(ad, u, k, full);
    if (t->ndim != 2 || t->shape[0] != full[0] || t->shape[1] != full[1]) {
        char have[24 * ST_MAX_DIMS + 4] = "[";
        size_t at = 1;
        for (int d = 0; d < t->ndim && at < sizeof have; d++) // every dim, however many
            at += (size_t)snprintf(have + at, sizeof have - at, "%s%lld", d ? ", " : "",
                                   (long long)t->shape[d]);
        if (at < sizeof have)
            snprintf(have + at, sizeof have - at, "]");
        return molt_err(MOLT_EFORMAT, "%s: tensor %s has shape %s, expected [%lld, %lld] f32",
                        file, t->name, have, (long long)full[0], (long long)full[1]);
    }
    ag_arena tmp;
    ag_arena_init(&tmp, "adapter load", 1 << 16);
    ag_tensor *x;
    molt_status st = st_to_f32(t, 1.0, &tmp, &x);
    if (st == MOLT_OK)
        lora_shard_from_full(ad, u, k, x->data, (k ? u->b : u->a)->data);
    ag_arena_free(&tmp);
    return st == MOLT_OK ? MOLT_OK : molt_err_wrap(st, "%s: tensor %s", file, t->name);
}

static molt_status read_tensors(lora_adapter *ad, const st_reader *r, const char *file) {
    int n = st_count(r), used = 0;
    for (int i = 0; i < ad->n_units; i++)
        for (int k = 0; k < 2; k++) {
            lora_unit *u = &ad->units[i];
            char name[LORA_NAME_MAX + 64];
            lora_peft_tensor_name(ad, u, k, name, sizeof name);
            const st_tensor *t = st_find(r, name);
            if (!t)
                return molt_err(MOLT_EFORMAT, "%s: missing tensor %s (target %s)", file, name,
                                u->path);
            MOLT_TRY(fill_tensor(t, ad, u, k, file));
            used++;
        }
    if (used == n)
        return MOLT_OK;
    for (int i = 0; i < n; i++) {
        const char *name = st_at(r, i)->name;
        bool known = false;
        for (int j = 0; j < ad->n_units && !known; j++)
            for (int k = 0; k < 2 && !known; k++) {
                char want[LORA_NAME_MAX + 64];
                lora_peft_tensor_name(ad, &ad->units[j], k, want, sizeof want);
                known = !strcmp(want, name);
            }
        if (!known)
            return molt_err(MOLT_EFORMAT, "%s: unknown tensor %s (no adapted module of the model "
                            "has this name)", file, name);
    }
    return molt_err(MOLT_EINTERNAL, "%s: tensor count mismatch", file);
}

// Attaches with zero init, then fills A and B from r; keeps spec's init setting.
static molt_status attach_and_fill(mdl_model *m, const lora_spec *spec, const st_reader *r,
                                   const char *file, lora_wire wire, lora_adapter *out) {
    lora_spec zs = *spec;
    zs.init = LORA_INIT_ZERO;
    MOLT_TRY(lora_attach(m, &zs, wire, out));
    out->spec.init = spec->init;
    molt_status st = read_tensors(out, r, file);
    if (st == MOLT_OK)
        st = lora_check_finite(out, file);
    if (st != MOLT_OK)
        lora_detach(out);
    return st;
}

// ---------------------------------------------------------------------------------------
// adapter_config.json

static molt_status cfg_err(const char *file, const char *key, const char *what) {
    return molt_err(MOLT_EFORMAT, "%s: key \"%s\" %s", file, key, what);
}

static molt_status cfg_unsupported(const char *file, const char *key, const char *what) {
    return molt_err(MOLT_EUNSUPPORTED, "%s: key \"%s\" %s is not supported", file, key, what);
}

static bool is_null_or_empty(json_t *v) {
    return !v || json_is_null(v) || (json_is_array(v) && json_array_size(v) == 0) ||
           (json_is_object(v) && json_object_size(v) == 0);
}

static molt_status read_patterns(json_t *obj, const char *file, const char *key,
                                 lora_pattern *p, int *n, bool integer) {
    if (!obj || json_is_null(obj))
        return MOLT_OK;
    if (!json_is_object(obj))
        return cfg_err(file, key, "must be an object");
    const char *k;
    json_t *v;
    json_object_foreach(obj, k, v) {
        if (!json_is_number(v) || (integer && !json_is_integer(v)) || json_number_value(v) <= 0)
            return molt_err(MOLT_EFORMAT, "%s: %s[\"%s\"] must be a positive %s", file, key, k,
                            integer ? "integer" : "number");
        if (*n == LORA_MAX_PATTERNS || strlen(k) >= LORA_NAME_MAX)
            return cfg_unsupported(file, key, "with this many or this long keys");
        snprintf(p[*n].key, LORA_NAME_MAX, "%s", k);
        p[(*n)++].value = json_number_value(v);
    }
    return MOLT_OK;
}

static molt_status read_targets(json_t *arr, const char *file, const char *key, bool params,
                                lora_spec *s) {
    if (!arr || json_is_null(arr))
        return MOLT_OK;
    if (json_is_string(arr))
        return cfg_unsupported(file, key, "as a regular expression string");
    if (!json_is_array(arr))
        return cfg_err(file, key, "must be a list of strings");
    size_t i;
    json_t *v;
    json_array_foreach(arr, i, v) {
        const char *t = json_string_value(v);
        if (!t)
            return cfg_err(file, key, "must be a list of strings");
        size_t n = strlen(t);
        // the router is adapted through its weight parameter; molt names the module
        if (params && n > 7 && !strcmp(t + n - 7, ".weight"))
            n -= 7;
        if (s->n_targets == LORA_MAX_TARGETS || n == 0 || n >= LORA_NAME_MAX)
            return cfg_unsupported(file, key, "with this many or this long entries");
        snprintf(s->targets[s->n_targets++], LORA_NAME_MAX, "%.*s", (int)n, t);
    }
    return MOLT_OK;
}

static molt_status check_options(json_t *c, const char *file) {
    json_t *v = json_object_get(c, "peft_type");
    if (!json_is_string(v) || strcmp(json_string_value(v), "LORA"))
        return cfg_unsupported(file, "peft_type", "other than \"LORA\"");
    if (json_is_true(json_object_get(c, "use_dora")))
        return cfg_unsupported(file, "use_dora", "true (DoRA)");
    v = json_object_get(c, "bias");
    if (v && !(json_is_string(v) && !strcmp(json_string_value(v), "none")))
        return cfg_unsupported(file, "bias", "other than \"none\"");
    if (!is_null_or_empty(json_object_get(c, "modules_to_save")))
        return cfg_unsupported(file, "modules_to_save", "(fully trained modules)");
    if (json_is_true(json_object_get(c, "fan_in_fan_out")))
        return cfg_unsupported(file, "fan_in_fan_out", "true");
    if (json_is_true(json_object_get(c, "lora_bias")))
        return cfg_unsupported(file, "lora_bias", "true");
    if (!is_null_or_empty(json_object_get(c, "layers_to_transform")))
        return cfg_unsupported(file, "layers_to_transform", "(layer subsets)");
    if (!is_null_or_empty(json_object_get(c, "exclude_modules")))
        return cfg_unsupported(file, "exclude_modules", "");
    return MOLT_OK;
}

static molt_status spec_from_config(json_t *c, const char *file, lora_spec *s) {
    lora_spec_default(s);
    s->init = LORA_INIT_ZERO;
    MOLT_TRY(check_options(c, file));
    json_t *r = json_object_get(c, "r"), *a = json_object_get(c, "lora_alpha");
    if (!json_is_integer(r) || json_integer_value(r) < 1 || json_integer_value(r) > 1 << 20)
        return cfg_err(file, "r", "must be a positive integer");
    if (!json_is_number(a))
        return cfg_err(file, "lora_alpha", "must be a number");
    s->r = (int)json_integer_value(r);
    s->alpha = json_number_value(a);
    json_t *d = json_object_get(c, "lora_dropout");
    if (d && !json_is_null(d)) {
        if (!json_is_number(d) || json_number_value(d) < 0 || json_number_value(d) >= 1)
            return cfg_err(file, "lora_dropout", "must be a number in [0, 1)");
        s->dropout = json_number_value(d);
    }
    json_t *rs = json_object_get(c, "use_rslora");
    if (rs && !json_is_boolean(rs))
        return cfg_err(file, "use_rslora", "must be true or false");
    s->rslora = json_is_true(rs);
    MOLT_TRY(read_targets(json_object_get(c, "target_modules"), file, "target_modules", false, s));
    MOLT_TRY(read_targets(json_object_get(c, "target_parameters"), file, "target_parameters",
                          true, s));
    if (s->n_targets == 0)
        return cfg_err(file, "target_modules", "and target_parameters select nothing");
    MOLT_TRY(read_patterns(json_object_get(c, "rank_pattern"), file, "rank_pattern",
                           s->rank_pattern, &s->n_rank_pattern, true));
    return read_patterns(json_object_get(c, "alpha_pattern"), file, "alpha_pattern",
                         s->alpha_pattern, &s->n_alpha_pattern, false);
}

molt_status lora_import_peft(mdl_model *m, const char *dir, lora_wire wire,
                             lora_adapter *out) {
    memset(out, 0, sizeof *out);
    char cpath[PATH_CAP], tpath[PATH_CAP];
    snprintf(cpath, sizeof cpath, "%s/adapter_config.json", dir);
    snprintf(tpath, sizeof tpath, "%s/adapter_model.safetensors", dir);
    json_error_t je;
    json_t *c = json_load_file(cpath, 0, &je);
    if (!c)
        return molt_err(MOLT_EFORMAT, "%s: line %d: %s", cpath, je.line, je.text);
    lora_spec spec;
    molt_status st = json_is_object(c) ? spec_from_config(c, cpath, &spec)
                                       : molt_err(MOLT_EFORMAT, "%s: not a JSON object", cpath);
    json_decref(c);
    MOLT_TRY(st);
    struct stat sb;
    if (stat(tpath, &sb) != 0)
        return molt_err(MOLT_EIO, "%s: missing (adapter_model.bin pickles are not read)", tpath);
    st_reader *r;
    MOLT_TRY(st_open(tpath, &r));
    st = attach_and_fill(m, &spec, r, tpath, wire, out);
    st_close(r);
    return st;
}

molt_status lora_check_finite(const lora_adapter *ad, const char *file) {
    for (int i = 0; i < 2 * ad->n_units; i++) {
        const lora_unit *u = &ad->units[i / 2];
        const ag_tensor *x = i % 2 ? u->b : u->a;
        const float *v = x->data;
        for (int64_t k = 0; k < x->numel; k++)
            if (!isfinite(v[k])) {
                char name[LORA_NAME_MAX + 64];
                lora_peft_tensor_name(ad, u, i % 2, name, sizeof name);
                return molt_err(MOLT_EFORMAT, "%s: tensor %s holds a non-finite value (%g at "
                                "element %lld): refusing an adapter that would turn every "
                                "output into NaN", file, name, (double)v[k], (long long)k);
            }
    }
    return MOLT_OK;
}
