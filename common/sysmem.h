// common/sysmem.h: how much memory this process may still take, for refusing work that
// cannot fit before allocating it (Linux overcommits: a run far too large is otherwise
// killed by the kernel half-way instead of getting an error).
// Not here: estimating what a piece of work needs (its module).
#ifndef MOLT_COMMON_SYSMEM_H
#define MOLT_COMMON_SYSMEM_H

#include <stdint.h>

// MemAvailable plus free swap (/proc/meminfo), capped by the address-space limit
// (ulimit -v); 0 when unknown.
uint64_t molt_mem_available(void);

#endif
