// common/sysmem.c: the memory a process may still take (see sysmem.h).
#include "sysmem.h"

#include <stdio.h>
#include <sys/resource.h>

uint64_t molt_mem_available(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f)
        return 0;
    char line[256];
    unsigned long long kb, avail = 0, swap = 0;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1)
            avail = kb;
        else if (sscanf(line, "SwapFree: %llu kB", &kb) == 1)
            swap = kb;
    }
    fclose(f);
    uint64_t bytes = (uint64_t)(avail + swap) * 1024;
    struct rlimit rl;
    if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        (uint64_t)rl.rlim_cur < bytes)
        bytes = (uint64_t)rl.rlim_cur;
    return bytes;
}
