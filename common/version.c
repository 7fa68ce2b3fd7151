// common/version.c: the version strings of common/version.h. MOLT_VERSION comes from
// CMakeLists.txt, MOLT_GIT_COMMIT from the generated molt_git_version.h.
#include "version.h"

#include "molt_git_version.h"

#ifndef MOLT_VERSION
#define MOLT_VERSION "unknown"
#endif

const char *molt_version(void) { return MOLT_VERSION; }

const char *molt_git_commit(void) { return MOLT_GIT_COMMIT; }

const char *molt_version_string(void) {
    return MOLT_VERSION " (git " MOLT_GIT_COMMIT ")";
}
