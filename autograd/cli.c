// autograd/cli.c: PLACEHOLDER for molt info and molt bench ops.
#include <stdio.h>
#include "autograd.h"
int ag_cmd_bench_ops(int argc, char **argv) { (void)argc; (void)argv; fprintf(stderr, "molt bench ops: not available yet\n"); return 2; }
