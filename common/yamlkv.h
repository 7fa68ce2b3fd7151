// common/yamlkv.h: reads a YAML configuration file made of nested mappings whose leaves are
// scalars or lists of scalars (read with libyaml), and hands every leaf to a callback under
// its dotted key ("model.path"), with "FILE:LINE" for messages. What the keys mean, their
// types and defaults belong to the caller (train/config.c, infer/server/cli_serve.c).
//
// Not here: anchors or nested lists as values (a list item that is not a scalar is an error),
// writing YAML.
#ifndef MOLT_COMMON_YAMLKV_H
#define MOLT_COMMON_YAMLKV_H

#include "err.h"

typedef enum {
    YKV_SCALAR,     // key: value (value "" for an empty value)
    YKV_LIST_BEGIN, // key: [ ... ] or a block list follows; value is NULL
    YKV_LIST_ITEM,  // one item of the list begun last, in order
} ykv_event;

// Called once per leaf; `where` is "FILE:LINE" of the value (of the key for LIST_BEGIN).
// A non-OK status stops the walk and is returned by ykv_load.
typedef molt_status (*ykv_fn)(void *user, ykv_event ev, const char *key, const char *value,
                              const char *where);

// Walks the file in document order. Errors (MOLT_EIO for a file that cannot be opened,
// MOLT_EARG for a directory, YAML syntax, a key repeated in one mapping, and structure: a top level that is not a mapping, keys that
// are not plain scalars, list items that are not scalars) are reported as
// "config FILE:LINE: ...". An empty file has no leaves.
molt_status ykv_load(const char *path, ykv_fn fn, void *user);

#endif
