// tests/harness/mpi_env.h: running a test program again as several MPI ranks. A test that
// checks collectives or parallel training runs its single-process cases as usual, then starts
// itself (or the molt binary) under the launcher CMake found (MOLT_MPIEXEC) with 2 or 4 ranks,
// oversubscribed on this small machine: as root OpenMPI needs its allow-run-as-root
// variables, waiting ranks yield their core (mpi_yield_when_idle), each rank runs one OpenMP
// thread, and Check does not fork (CK_FORK=no: forking an MPI process is not allowed).
// Under the sanitizers the ranks look for leaks before MPI_Finalize (comm_mpi.c), and
// LeakSanitizer is told to ignore what the MPI libraries keep (tests/harness/lsan_mpi.supp).
#ifndef MOLT_TEST_MPI_ENV_H
#define MOLT_TEST_MPI_ENV_H

#include <stdbool.h>

// True when this process is one of several ranks started by a launcher.
bool mpi_env_is_rank(void);
// True when a launcher is known (MOLT_MPIEXEC set and executable).
bool mpi_env_available(void);
// The path of the running executable.
const char *mpi_env_self(void);
// Runs argv (argv[0] is the program; NULL-terminated) as np ranks, with extra environment
// "NAME=VALUE" strings env[0..] (NULL-terminated, may be NULL); stdout and stderr go to
// log_path when it is not NULL. Returns the launcher's exit status, 77 when no launcher is
// known, -1 when it could not be started.
int mpi_env_launch(int np, char *const *argv, char *const *env, const char *log_path);
// Inside a Check test: runs this program again as np ranks (they run its multi-rank suite)
// and fails the test unless the launcher exits 0; without a launcher it says so on stderr,
// naming the program `name`, and returns.
void mpi_env_run_self(const char *name, int np);

#endif
