// infer/eval/metrics.c: the text metrics of the generate task: exact match, contains and
// token F1 under the normalization options, regex match (PCRE2), JSON validity and JSON
// field equality (jansson); and the parser of metric specs ("exact_match:case+space",
// "regex=^[0-9]+$", "json_field=answer.value"). Definitions are in eval.h.
//
// Not here: producing predictions or choosing the reference (the runner), statistics.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "internal.h"

#include <jansson.h>
#include <pcre2.h>
#include <string.h>

static const char *const kind_names[EV_TM_COUNT] = {
    "exact_match", "contains", "regex", "token_f1", "json_valid", "json_field",
};

static bool is_space(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

static bool is_punct(char c) { return c && strchr("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", c); }

static bool is_article(const char *w, size_t n) {
    return (n == 1 && w[0] == 'a') || (n == 2 && !memcmp(w, "an", 2)) ||
           (n == 3 && !memcmp(w, "the", 3));
}

molt_status ev_normalize(const char *s, unsigned flags, char **out) {
    size_t n = strlen(s);
    char *t = molt_malloc(n + 1);
    if (!t)
        return molt_err(MOLT_ENOMEM, "normalize: out of memory (%zu bytes)", n);
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if ((flags & EV_NORM_CASE) && c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        if (!((flags & EV_NORM_PUNCT) && is_punct(c)))
            t[m++] = c;
    }
    t[m] = 0;
    if (flags & EV_NORM_ARTICLES) { // each article word becomes one space, as in SQuAD
        size_t w = 0;
        for (size_t i = 0; i < m;) {
            if (is_space(t[i])) {
                t[w++] = t[i++];
                continue;
            }
            size_t j = i;
            while (j < m && !is_space(t[j]))
                j++;
            if (is_article(t + i, j - i))
                t[w++] = ' ';
            else {
                memmove(t + w, t + i, j - i);
                w += j - i;
            }
            i = j;
        }
        m = w;
        t[m] = 0;
    }
    if (flags & EV_NORM_SPACE) {
        size_t w = 0;
        bool gap = false;
        for (size_t i = 0; i < m; i++) {
            if (is_space(t[i])) {
                gap = w > 0;
                continue;
            }
            if (gap)
                t[w++] = ' ';
            gap = false;
            t[w++] = t[i];
        }
        m = w;
        t[m] = 0;
    }
    *out = t;
    return MOLT_OK;
}

// ---- spec parsing ----------------------------------------------------------------------

static molt_status parse_opts(const char *spec, const char *o, size_t n, unsigned *norm) {
    static const struct {
        const char *name;
        unsigned flags;
    } opts[] = {{"case", EV_NORM_CASE},         {"punct", EV_NORM_PUNCT},
                {"articles", EV_NORM_ARTICLES}, {"space", EV_NORM_SPACE},
                {"squad", EV_NORM_SQUAD},       {"none", 0}};
    *norm = 0;
    for (size_t i = 0;;) { // every +-separated part, empty ones included
        size_t j = i;
        while (j < n && o[j] != '+')
            j++;
        bool found = false;
        for (size_t k = 0; k < sizeof opts / sizeof *opts; k++)
            if (strlen(opts[k].name) == j - i && !memcmp(opts[k].name, o + i, j - i)) {
                *norm |= opts[k].flags;
                found = true;
            }
        if (!found)
            return molt_err(MOLT_EARG, "metric '%s': unknown option '%.*s' (expected case, "
                            "punct, articles, space, squad or none, joined by +)", spec,
                            (int)(j - i), o + i);
        if (j >= n)
            break;
        i = j + 1;
    }
    return MOLT_OK;
}

// Checks a dotted JSON path: no empty part.
static molt_status check_path(const char *spec, const char *p) {
    size_t n = strlen(p);
    if (n == 0 || p[0] == '.' || p[n - 1] == '.' || strstr(p, ".."))
        return molt_err(MOLT_EARG, "metric '%s': the JSON path '%s' has an empty part", spec, p);
    return MOLT_OK;
}

static molt_status compile_regex(ev_text_metric *m, const char *spec) {
    int code;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)m->arg, PCRE2_ZERO_TERMINATED, PCRE2_UTF, &code,
                                   &off, NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        return molt_err(MOLT_EARG, "metric '%s': invalid regex '%s': %s at offset %zu", spec,
                        m->arg, (const char *)msg, (size_t)off);
    }
    m->re = re;
    m->md = pcre2_match_data_create_from_pattern(re, NULL);
    if (!m->md)
        return molt_err(MOLT_ENOMEM, "metric '%s': out of memory", spec);
    return MOLT_OK;
}

static molt_status parse(ev_text_metric *m, const char *spec) {
    size_t nl = strcspn(spec, ":=");
    int kind = -1;
    for (int k = 0; k < EV_TM_COUNT; k++)
        if (strlen(kind_names[k]) == nl && !memcmp(kind_names[k], spec, nl))
            kind = k;
    if (kind < 0)
        return molt_err(MOLT_EARG, "unknown metric '%.*s' in '%s' (expected exact_match, "
                        "contains, regex=PATTERN, token_f1, json_valid or json_field=PATH)",
                        (int)nl, spec, spec);
    m->kind = (ev_text_metric_kind)kind;
    const char *p = spec + nl;
    if (*p == ':') {
        if (kind != EV_TM_EXACT && kind != EV_TM_CONTAINS && kind != EV_TM_TOKEN_F1)
            return molt_err(MOLT_EARG, "metric '%s': %s takes no normalization options", spec,
                            kind_names[kind]);
        size_t no = strcspn(p + 1, "=");
        MOLT_TRY(parse_opts(spec, p + 1, no, &m->norm));
        p += 1 + no;
    }
    bool wants_arg = kind == EV_TM_REGEX || kind == EV_TM_JSON_FIELD;
    if (*p == '=' && !wants_arg)
        return molt_err(MOLT_EARG, "metric '%s': %s takes no '=' argument", spec,
                        kind_names[kind]);
    if (wants_arg && (*p != '=' || !p[1]))
        return molt_err(MOLT_EARG, "metric '%s': %s needs %s", spec, kind_names[kind],
                        kind == EV_TM_REGEX ? "a pattern (regex=PATTERN)"
                                            : "a field path (json_field=PATH)");
    m->name = molt_strdup(spec);
    if (wants_arg)
        m->arg = molt_strdup(p + 1);
    if (!m->name || (wants_arg && !m->arg))
        return molt_err(MOLT_ENOMEM, "metric '%s': out of memory", spec);
    if (kind == EV_TM_REGEX)
        return compile_regex(m, spec);
    if (kind == EV_TM_JSON_FIELD)
        return check_path(spec, m->arg);
    return MOLT_OK;
}

molt_status ev_text_metric_parse(ev_text_metric *m, const char *spec) {
    memset(m, 0, sizeof *m);
    molt_status st = parse(m, spec);
    if (st != MOLT_OK)
        ev_text_metric_free(m);
    return st;
}

void ev_text_metric_free(ev_text_metric *m) {
    pcre2_match_data_free(m->md);
    pcre2_code_free(m->re);
    molt_free(m->name);
    molt_free(m->arg);
    memset(m, 0, sizeof *m);
}

ev_metric_def ev_text_metric_def(const ev_text_metric *m) {
    ev_metric_def d = {.name = m->name, .binary = m->kind != EV_TM_TOKEN_F1,
                       .lower_is_better = false};
    return d;
}

// ---- evaluation ------------------------------------------------------------------------

typedef struct {
    const char *s;
    size_t n;
} tok_span;

static int cmp_span(const void *a, const void *b) {
    const tok_span *x = a, *y = b;
    size_t n = x->n < y->n ? x->n : y->n;
    int c = memcmp(x->s, y->s, n);
    return c ? c : (x->n > y->n) - (x->n < y->n);
}

// Whitespace-separated tokens of s, sorted; *out is molt_malloc'ed (NULL when none).
static molt_status split_sorted(const char *s, tok_span **out, size_t *n) {
    size_t cap = 0, k = 0;
    for (const char *p = s; *p;) {
        while (*p && is_space(*p))
            p++;
        if (!*p)
            break;
        cap++;
        while (*p && !is_space(*p))
            p++;
    }
    *out = NULL;
    *n = 0;
    if (!cap)
        return MOLT_OK;
    tok_span *t = molt_malloc(sizeof *t * cap);
    if (!t)
        return molt_err(MOLT_ENOMEM, "token_f1: out of memory");
    for (const char *p = s; *p;) {
        while (*p && is_space(*p))
            p++;
        if (!*p)
            break;
        const char *b = p;
        while (*p && !is_space(*p))
            p++;
        t[k++] = (tok_span){b, (size_t)(p - b)};
    }
    qsort(t, k, sizeof *t, cmp_span);
    *out = t;
    *n = k;
    return MOLT_OK;
}

static molt_status token_f1(const char *pred, const char *ref, double *v) {
    tok_span *a, *b;
    size_t na, nb;
    MOLT_TRY(split_sorted(pred, &a, &na));
    molt_status st = split_sorted(ref, &b, &nb);
    if (st != MOLT_OK) {
        molt_free(a);
        return st;
    }
    size_t common = 0;
    for (size_t i = 0, j = 0; i < na && j < nb;) { // multiset intersection of sorted lists
        int c = cmp_span(a + i, b + j);
        common += c == 0;
        i += c <= 0;
        j += c >= 0;
    }
    if (na == 0 || nb == 0)
        *v = na == nb;
    else if (common == 0)
        *v = 0;
    else {
        double prec = (double)common / (double)na, rec = (double)common / (double)nb;
        *v = 2 * prec * rec / (prec + rec);
    }
    molt_free(a);
    molt_free(b);
    return MOLT_OK;
}

// The value at the dotted path, or NULL.
static json_t *json_at(json_t *v, const char *path) {
    char part[256];
    for (const char *p = path; v;) {
        size_t n = strcspn(p, ".");
        if (n >= sizeof part)
            return NULL;
        memcpy(part, p, n);
        part[n] = 0;
        if (json_is_object(v))
            v = json_object_get(v, part);
        else if (json_is_array(v) && n > 0 && strspn(part, "0123456789") == n && n < 10)
            v = json_array_get(v, (size_t)strtoul(part, NULL, 10));
        else
            return NULL;
        if (!p[n])
            return v;
        p += n + 1;
    }
    return NULL;
}

static molt_status json_field(const ev_text_metric *m, const char *pred, const char *ref,
                              double *v) {
    json_error_t e;
    json_t *r = json_loads(ref, JSON_DECODE_ANY, &e);
    if (!r)
        return molt_err(MOLT_EFORMAT, "metric '%s': the reference is not JSON (line %d, "
                        "column %d: %s)", m->name, e.line, e.column, e.text);
    json_t *want = json_at(r, m->arg);
    if (!want) {
        json_decref(r);
        return molt_err(MOLT_EFORMAT, "metric '%s': the reference has no field %s", m->name,
                        m->arg);
    }
    json_t *p = json_loads(pred, JSON_DECODE_ANY, &e);
    json_t *got = p ? json_at(p, m->arg) : NULL;
    *v = got && json_equal(got, want);
    json_decref(p);
    json_decref(r);
    return MOLT_OK;
}

static molt_status regex_match(const ev_text_metric *m, const char *pred, double *v) {
    int rc = pcre2_match(m->re, (PCRE2_SPTR)pred, strlen(pred), 0, 0, m->md, NULL);
    if (rc >= 0 || rc == PCRE2_ERROR_NOMATCH) {
        *v = rc >= 0;
        return MOLT_OK;
    }
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(rc, msg, sizeof msg);
    if (rc <= PCRE2_ERROR_UTF8_ERR1 && rc >= PCRE2_ERROR_UTF8_ERR21)
        return molt_err(MOLT_EFORMAT, "metric '%s': the prediction is not valid UTF-8 at byte "
                        "%zu (%s)", m->name, (size_t)pcre2_get_startchar(m->md),
                        (const char *)msg);
    return molt_err(MOLT_EFORMAT, "metric '%s': matching failed: %s", m->name,
                    (const char *)msg);
}

molt_status ev_text_metric_eval(const ev_text_metric *m, const char *pred, const char *ref,
                                double *value) {
    *value = 0;
    if (m->kind == EV_TM_REGEX)
        return regex_match(m, pred, value);
    if (m->kind == EV_TM_JSON_VALID) {
        json_error_t e;
        json_t *j = json_loads(pred, JSON_DECODE_ANY, &e);
        *value = j != NULL;
        json_decref(j);
        return MOLT_OK;
    }
    if (m->kind == EV_TM_JSON_FIELD)
        return json_field(m, pred, ref, value);
    char *np = NULL, *nr = NULL;
    molt_status st = ev_normalize(pred, m->norm, &np);
    if (st == MOLT_OK)
        st = ev_normalize(ref, m->norm, &nr);
    if (st == MOLT_OK) {
        if (m->kind == EV_TM_EXACT)
            *value = strcmp(np, nr) == 0;
        else if (m->kind == EV_TM_CONTAINS)
            *value = strstr(np, nr) != NULL;
        else
            st = token_f1(np, nr, value);
    }
    molt_free(np);
    molt_free(nr);
    return st;
}
