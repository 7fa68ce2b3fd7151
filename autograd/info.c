// autograd/info.c: `molt info`: version, build features and the devices visible.
#define _DEFAULT_SOURCE // realpath
#include "autograd.h"

#include "../common/datadir.h"
#include "../common/opt.h"
#include "../common/version.h"
#include "comm/comm.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef MOLT_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif

static void print_cuda(void) {
#ifdef MOLT_HAVE_CUDA
    int rt = 0, cublas = 0;
    molt_cuda_runtime_version(&rt);
    printf("  CUDA:      compiled in (%s), runtime %d.%d (linked statically)\n",
           MOLT_CUDA_ARCH_LIST, rt / 1000, (rt % 1000) / 10);
    if (molt_cuda_cublas_version(&cublas) == 0)
        printf("  cuBLAS:    compiled in, loaded on first use, %d.%d.%d\n", cublas / 10000,
               (cublas % 10000) / 100, cublas % 100);
    else
        printf("  cuBLAS:    compiled in, but libcublas.so could not be loaded\n");
    // cuDNN and NCCL: only their presence is read (attention and collectives on the GPU are
    // not built yet)
    int cudnn = molt_cuda_cudnn_version(), nccl = molt_cuda_nccl_version();
    if (cudnn)
        printf("  cuDNN:     %d.%d.%d found, not used yet\n", cudnn / 10000,
               (cudnn % 10000) / 100, cudnn % 100);
    else
        printf("  cuDNN:     not found (not used yet)\n");
    if (nccl)
        printf("  NCCL:      %d.%d.%d found, not used yet\n", nccl / 10000, (nccl % 10000) / 100,
               nccl % 100);
    else
        printf("  NCCL:      not found (not used yet)\n");
#else
    printf("  CUDA:      no (built without nvcc)\n  cuBLAS:    no\n  cuDNN:     no\n"
           "  NCCL:      no\n");
#endif
}

int ag_cmd_info(int argc, char **argv) {
    const molt_opt opts[] = {MOLT_OPT_END};
    int rc = molt_opts_parse("molt info", "usage: molt info\n\nPrints the version, the features "
                             "compiled into this build and the devices visible.\n", opts, argc,
                             argv, 1, NULL);
    if (rc)
        return rc < 0 ? 0 : rc;
    printf("molt %s\n", molt_version_string());
    printf("build:\n");
    printf("  BLAS:      %s\n", ag_blas_describe());
    printf("  OpenMP:    yes, %d threads\n", omp_get_max_threads());
    print_cuda();
    if (ag_comm_have_mpi())
        printf("  MPI:       compiled in (collectives: mpi for host tensors%s); %d process%s "
               "launched\n", ag_comm_have_nccl() ? ", nccl for device tensors" : "",
               ag_comm_launched_size(), ag_comm_launched_size() == 1 ? "" : "es");
    else
        printf("  MPI:       no (libopenmpi-dev not found at build time: one process only)\n");
    char presets[MOLT_DATA_PATH_MAX];
    if (molt_data_find("models/tiny.json", presets, sizeof presets) == MOLT_OK) {
        *strrchr(presets, '/') = 0; // .../models
        *strrchr(presets, '/') = 0;
        char *real = realpath(presets, NULL);
        printf("data:        %s (model presets, tokenizers, example configs)\n",
               real ? real : presets);
        free(real); // from realpath
    } else {
        printf("data:        not found (set MOLT_DATA_DIR)\n");
    }
    printf("devices:\n");
    printf("  cpu:       %d threads\n", omp_get_num_procs());
    ag_device_info info;
    ag_device_query(&info);
    if (!info.cuda_compiled)
        printf("  cuda:      none (built without CUDA)\n");
    else if (info.cuda_devices == 0)
        printf("  cuda:      none visible (%s)\n", info.cuda_error[0] ? info.cuda_error : "0");
    for (int i = 0; i < info.cuda_devices; i++) {
        char d[256];
        if (ag_cuda_describe(i, d, sizeof d) == MOLT_OK)
            printf("  cuda:%d:    %s\n", i, d);
        else
            printf("  cuda:%d:    %s\n", i, molt_err_msg());
    }
    return 0;
}
