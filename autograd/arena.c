// autograd/arena.c: bump allocators by lifetime. A reset keeps the largest chunk so that a
// steady training loop stops allocating after its first step.
#include "autograd.h"

#include <string.h>

#define ARENA_ALIGN 64

struct ag_arena_chunk {
    ag_arena_chunk *next;
    size_t cap;  // usable bytes after the header
    size_t off;  // bytes used
    unsigned char *base;
};

void ag_arena_init(ag_arena *a, const char *name, size_t chunk_bytes) {
    memset(a, 0, sizeof *a);
    a->name = name ? name : "arena";
    a->chunk_bytes = chunk_bytes ? chunk_bytes : ((size_t)1 << 20);
}

// Chunks are not counted by the memory accounting (common/err.h): the bytes an arena hands
// out are, as they go (untouched chunk space costs nothing but address space).
static void chunk_free(ag_arena_chunk *ch) { molt_free_uncounted(ch); }

static ag_arena_chunk *chunk_new(size_t cap) {
    ag_arena_chunk *ch = molt_malloc_uncounted(sizeof *ch + cap + ARENA_ALIGN);
    if (!ch)
        return NULL;
    ch->next = NULL;
    ch->cap = cap;
    ch->off = 0;
    uintptr_t p = (uintptr_t)(ch + 1);
    ch->base = (unsigned char *)((p + ARENA_ALIGN - 1) & ~(uintptr_t)(ARENA_ALIGN - 1));
    return ch;
}

void *ag_arena_alloc(ag_arena *a, size_t bytes) {
    size_t need = (bytes + ARENA_ALIGN - 1) & ~(size_t)(ARENA_ALIGN - 1);
    if (need < bytes) {
        molt_err(MOLT_ENOMEM, "arena %s: request of %zu bytes overflows", a->name, bytes);
        return NULL;
    }
    ag_arena_chunk *ch = a->head;
    if (!ch || ch->cap - ch->off < need) {
        size_t cap = need > a->chunk_bytes ? need : a->chunk_bytes;
        ag_arena_chunk *nc = chunk_new(cap);
        if (!nc) {
            molt_err(MOLT_ENOMEM, "arena %s: out of memory allocating %zu bytes", a->name, cap);
            return NULL;
        }
        nc->next = a->head;
        a->head = nc;
        a->reserved += cap;
        ch = nc;
    }
    void *p = ch->base + ch->off;
    ch->off += need;
    a->used += need;
    molt_mem_adjust((long long)need);
    if (a->used > a->peak)
        a->peak = a->used;
    memset(p, 0, bytes);
    return p;
}

void ag_arena_reset(ag_arena *a) {
    molt_mem_adjust(-(long long)a->used);
    ag_arena_chunk *keep = NULL;
    for (ag_arena_chunk *ch = a->head; ch;) {
        ag_arena_chunk *next = ch->next;
        if (!keep || ch->cap > keep->cap) {
            if (keep)
                chunk_free(keep);
            keep = ch;
        } else {
            chunk_free(ch);
        }
        ch = next;
    }
    a->head = keep;
    a->reserved = 0;
    if (keep) {
        keep->next = NULL;
        keep->off = 0;
        a->reserved = keep->cap;
        // grow the default so the next step fits in one chunk
        if (a->peak > a->chunk_bytes)
            a->chunk_bytes = a->peak;
    }
    a->used = 0;
}

void ag_arena_free(ag_arena *a) {
    molt_mem_adjust(-(long long)a->used);
    for (ag_arena_chunk *ch = a->head; ch;) {
        ag_arena_chunk *next = ch->next;
        chunk_free(ch);
        ch = next;
    }
    a->head = NULL;
    a->used = a->reserved = 0;
}
