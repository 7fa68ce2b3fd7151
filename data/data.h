// data/data.h: the public API of molt's data module: tokenizers, chat templates, datasets,
// packing and the resumable cursor. Depends on nothing of ours but common/.
#ifndef MOLT_DATA_H
#define MOLT_DATA_H

#include "../common/err.h"
#include "tokenizer.h"

// Command-line entry points (called from molt.c); each returns the process exit status.
int data_cmd_tokenize(int argc, char **argv);       // molt tokenize
int data_cmd_data(int argc, char **argv);           // molt data inspect|render
int data_cmd_bench_tokenize(int argc, char **argv); // molt bench tokenize

#endif
