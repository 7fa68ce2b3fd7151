// data/cli_tokenize.c: PLACEHOLDER for molt tokenize and molt bench tokenize.
#include <stdio.h>
#include "data.h"
int data_cmd_tokenize(int argc, char **argv) { (void)argc; (void)argv; fprintf(stderr, "molt tokenize: not available yet\n"); return 2; }
int data_cmd_bench_tokenize(int argc, char **argv) { (void)argc; (void)argv; fprintf(stderr, "molt bench tokenize: not available yet\n"); return 2; }
