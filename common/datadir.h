// common/datadir.h: where molt finds the files it ships (model presets models/*.json,
// tokenizers tokenizers/*.json, example training configs train/ and their data data/),
// from any working directory. The roots, in order:
//   1. the installation prefix: <dir of the molt binary>/../share/molt
//   2. $MOLT_DATA_DIR
//   3. beside the build tree: $MOLT_SOURCE_DIR/configs, the source tree the binary was
//      built from (<source>/configs), and configs/ next to or above the binary
//   4. ./configs
// ($MOLT_PRESET_DIR, naming a models folder itself, is still honoured after 2.)
// Not here: what the files mean (model/ reads presets, data/ tokenizers).
#ifndef MOLT_COMMON_DATADIR_H
#define MOLT_COMMON_DATADIR_H

#include <stddef.h>

#include "err.h"

#define MOLT_DATA_PATH_MAX 4096
#define MOLT_DATA_ROOTS_MAX 10

// The candidate roots, in order (existing or not); returns how many.
int molt_data_roots(char roots[][MOLT_DATA_PATH_MAX], int max);
// The first root holding rel ("models/tiny.json"): its path into out. MOLT_EIO listing the
// places looked at when none does.
molt_status molt_data_find(const char *rel, char *out, size_t cap);

#endif
