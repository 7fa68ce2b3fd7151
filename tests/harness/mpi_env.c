// tests/harness/mpi_env.c: starting programs as several MPI ranks (see mpi_env.h).
#include "mpi_env.h"

#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "autograd/comm/comm.h"
#include "harness.h"

bool mpi_env_is_rank(void) { return ag_comm_launched_size() > 1; }

bool mpi_env_available(void) {
    const char *l = getenv("MOLT_MPIEXEC");
    return l && *l && access(l, X_OK) == 0;
}

const char *mpi_env_self(void) {
    static char path[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", path, sizeof path - 1);
    path[n > 0 ? n : 0] = 0;
    return path;
}

int mpi_env_launch(int np, char *const *argv, char *const *env, const char *log_path) {
    if (!mpi_env_available())
        return 77;
    const char *launcher = getenv("MOLT_MPIEXEC");
    char nps[16];
    snprintf(nps, sizeof nps, "%d", np);
    int n = 0;
    while (argv[n])
        n++;
    char **args = calloc((size_t)n + 8, sizeof *args);
    if (!args)
        return -1;
    int k = 0;
    args[k++] = (char *)launcher;
    args[k++] = "--oversubscribe";
    args[k++] = "-np";
    args[k++] = nps;
    for (int i = 0; i < n; i++)
        args[k++] = argv[i];
    args[k] = NULL;
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        free(args);
        return -1;
    }
    if (pid == 0) {
        setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
        setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
        setenv("OMPI_MCA_mpi_yield_when_idle", "1", 1);
        setenv("OMP_NUM_THREADS", "1", 1);
        setenv("CK_FORK", "no", 1);
        const char *src = getenv("MOLT_SOURCE_DIR");
        if (src && getenv("MOLT_SANITIZED")) {
            char supp[PATH_MAX];
            snprintf(supp, sizeof supp, "suppressions=%s/tests/harness/lsan_mpi.supp:"
                     "print_suppressions=0", src);
            setenv("LSAN_OPTIONS", supp, 1);
        }
        for (int i = 0; env && env[i]; i++) {
            char kv[4096];
            snprintf(kv, sizeof kv, "%s", env[i]);
            char *eq = strchr(kv, '=');
            if (eq) {
                *eq = 0;
                setenv(kv, eq + 1, 1);
            }
        }
        if (log_path) {
            int fd = open(log_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd >= 0) {
                dup2(fd, 1);
                dup2(fd, 2);
                close(fd);
            }
        }
        execv(launcher, args);
        _exit(127);
    }
    free(args);
    int status = 0;
    if (waitpid(pid, &status, 0) < 0)
        return -1;
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

void mpi_env_run_self(const char *name, int np) {
    if (!mpi_env_available()) {
        fprintf(stderr, "%s: no MPI launcher (MOLT_MPIEXEC): %d ranks not run\n", name, np);
        return;
    }
    char *argv[] = {(char *)mpi_env_self(), NULL};
    int rc = mpi_env_launch(np, argv, NULL, NULL);
    ck_assert_msg(rc == 0, "%d ranks: the launcher exited with %d", np, rc);
}
