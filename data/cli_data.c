// data/cli_data.c: PLACEHOLDER for molt data inspect|render.
#include <stdio.h>
#include "data.h"
int data_cmd_data(int argc, char **argv) { (void)argc; (void)argv; fprintf(stderr, "molt data: not available yet\n"); return 2; }
