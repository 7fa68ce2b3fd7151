// common/version.h: which molt this is: the release version (CMake's project version) and
// the git commit the binary was built from, recorded by the build (cmake/git_version.cmake
// runs `git describe` at every build and regenerates the value only when it changes).
// Not here: build features (autograd's `molt info`).
#ifndef MOLT_COMMON_VERSION_H
#define MOLT_COMMON_VERSION_H

// The release version, "0.1.0".
const char *molt_version(void);
// The commit: `git describe --always --dirty --abbrev=12` of the source tree at build time
// ("4eb363da1b2c", "4eb363da1b2c-dirty" with uncommitted changes), or "unknown" when the
// tree was not a git checkout or git was missing.
const char *molt_git_commit(void);
// "0.1.0 (git 4eb363da1b2c)": what `molt --version` and `molt info` print after "molt ".
const char *molt_version_string(void);

#endif
