// common/yamlkv.c: the YAML walk of yamlkv.h: libyaml loads the document, the mapping tree
// is walked depth first and each leaf goes to the caller's callback under its dotted key.
// Not here: the meaning of any key.
#include "yamlkv.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <yaml.h>

#define YKV_WHERE_MAX 1100

static void where_str(char *buf, size_t cap, const char *path, const yaml_node_t *n) {
    snprintf(buf, cap, "%s:%d", path, (int)n->start_mark.line + 1);
}

// The line of an earlier key of map equal to the key of pair p, or 0 (YAML forbids
// duplicate keys; libyaml does not check).
static int earlier_duplicate(yaml_document_t *doc, yaml_node_t *map, yaml_node_pair_t *p) {
    yaml_node_t *kn = yaml_document_get_node(doc, p->key);
    for (yaml_node_pair_t *q = map->data.mapping.pairs.start; q < p; q++) {
        yaml_node_t *qn = yaml_document_get_node(doc, q->key);
        if (qn->type == YAML_SCALAR_NODE && kn->type == YAML_SCALAR_NODE &&
            !strcmp((const char *)qn->data.scalar.value, (const char *)kn->data.scalar.value))
            return (int)qn->start_mark.line + 1;
    }
    return 0;
}

static molt_status walk_map(yaml_document_t *doc, yaml_node_t *map, const char *prefix,
                            const char *path, ykv_fn fn, void *user) {
    char where[YKV_WHERE_MAX];
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top;
         p++) {
        yaml_node_t *kn = yaml_document_get_node(doc, p->key);
        yaml_node_t *vn = yaml_document_get_node(doc, p->value);
        where_str(where, sizeof where, path, kn);
        if (kn->type != YAML_SCALAR_NODE)
            return molt_err(MOLT_EARG, "config %s: keys must be plain words", where);
        char key[256];
        int kl = snprintf(key, sizeof key, "%s%s%s", prefix, *prefix ? "." : "",
                          (const char *)kn->data.scalar.value);
        if (kl < 0 || (size_t)kl >= sizeof key)
            return molt_err(MOLT_EARG, "config %s: key '%s...' is too long", where, prefix);
        int dup = earlier_duplicate(doc, map, p);
        if (dup)
            return molt_err(MOLT_EARG, "config %s: key '%s' appears twice (first at line %d)",
                            where, key, dup);
        if (vn->type == YAML_MAPPING_NODE) {
            MOLT_TRY(walk_map(doc, vn, key, path, fn, user));
            continue;
        }
        if (vn->type == YAML_SCALAR_NODE) {
            where_str(where, sizeof where, path, vn);
            MOLT_TRY(fn(user, YKV_SCALAR, key, (const char *)vn->data.scalar.value, where));
            continue;
        }
        MOLT_TRY(fn(user, YKV_LIST_BEGIN, key, NULL, where));
        for (yaml_node_item_t *it = vn->data.sequence.items.start;
             it < vn->data.sequence.items.top; it++) {
            yaml_node_t *in = yaml_document_get_node(doc, *it);
            where_str(where, sizeof where, path, in);
            if (in->type != YAML_SCALAR_NODE)
                return molt_err(MOLT_EARG, "config %s: key '%s': list items must be scalars",
                                where, key);
            MOLT_TRY(fn(user, YKV_LIST_ITEM, key, (const char *)in->data.scalar.value, where));
        }
    }
    return MOLT_OK;
}

molt_status ykv_load(const char *path, ykv_fn fn, void *user) {
    struct stat sb;
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode))
        return molt_err(MOLT_EARG, "config %s is a directory (give the YAML file)", path);
    FILE *f = fopen(path, "rb");
    if (!f)
        return molt_err(MOLT_EIO, "config %s: cannot open: %s", path, strerror(errno));
    yaml_parser_t parser;
    yaml_document_t doc;
    yaml_parser_initialize(&parser);
    yaml_parser_set_input_file(&parser, f);
    molt_status st = MOLT_OK;
    if (!yaml_parser_load(&parser, &doc)) {
        st = molt_err(MOLT_EARG, "config %s:%d: YAML error: %s", path,
                      (int)parser.problem_mark.line + 1,
                      parser.problem ? parser.problem : "unknown");
        yaml_parser_delete(&parser);
        fclose(f);
        return st;
    }
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (root && root->type != YAML_MAPPING_NODE)
        st = molt_err(MOLT_EARG, "config %s:%d: the top level must be a mapping of keys",
                      path, (int)root->start_mark.line + 1);
    else if (root)
        st = walk_map(&doc, root, "", path, fn, user);
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    fclose(f);
    return st;
}
