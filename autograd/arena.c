// autograd/arena.c: bump allocators by lifetime. A host arena's reset leaves one chunk: the
// largest, or, when the step spilled over several, a new one holding the whole of its
// high-water mark with its pages touched, so that a steady loop (training steps, serving
// steps) neither allocates nor faults pages in after its first step. A device
// arena is one block taken from its device's backend at init and never grows (the device
// allocator is slow and fragments; an op must never allocate); its tensor structs go to a
// host arena beside it.
#define _DEFAULT_SOURCE // madvise, MADV_HUGEPAGE
#include "backend.h"

#include <string.h>
#include <sys/mman.h>

#define ARENA_ALIGN 64
// Chunks of at least this many bytes ask for transparent huge pages (where the kernel has
// them): weights that every step streams (lm_head, expert stacks) then take a TLB entry per
// 2 MiB and the processor's prefetchers are not cut off at each 4 KiB page. A bump arena
// touches its chunk from the start, so at most the last huge page holds untouched bytes.
#define ARENA_HUGE_MIN ((size_t)8 << 20)
#define HUGE_PAGE ((uintptr_t)2 << 20)
#define DEVICE_ALIGN 256 // vector loads and cuBLAS's favourite alignment

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
    a->device = AG_CPU;
}

molt_status ag_arena_init_device(ag_arena *a, const char *name, ag_device dev, size_t bytes) {
    ag_arena_init(a, name, dev == AG_CPU ? bytes : 0);
    if (dev == AG_CPU)
        return MOLT_OK;
    const ag_backend *be = ag_backend_get("arena", dev);
    if (!be)
        return molt_err_wrap(MOLT_EDEVICE, "arena %s", a->name);
    ag_arena *meta = molt_malloc(sizeof *meta);
    if (!meta)
        return molt_err(MOLT_ENOMEM, "arena %s: out of memory", a->name);
    void *base = NULL;
    molt_status st = be->mem_alloc(&base, bytes);
    if (st != MOLT_OK) {
        molt_free(meta);
        return molt_err_wrap(st, "arena %s: taking %zu bytes on %s", a->name, bytes, be->name);
    }
    ag_arena_init(meta, a->name, (size_t)1 << 16);
    a->device = dev;
    a->dev_base = base;
    a->reserved = bytes;
    a->meta = meta;
    return MOLT_OK;
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
#ifdef MADV_HUGEPAGE
    if (cap >= ARENA_HUGE_MIN) { // advice only: nothing changes where the kernel declines
        uintptr_t lo = ((uintptr_t)ch->base + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
        uintptr_t hi = ((uintptr_t)ch->base + cap) & ~(HUGE_PAGE - 1);
        if (hi > lo)
            (void)madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
    }
#endif
    return ch;
}

static void *device_alloc(ag_arena *a, size_t bytes) {
    size_t need = (bytes + DEVICE_ALIGN - 1) & ~(size_t)(DEVICE_ALIGN - 1);
    if (need < bytes || need > a->reserved - a->used) {
        molt_err(MOLT_ENOMEM, "arena %s (%s): %zu bytes requested with %zu of %zu in use; a "
                 "device arena does not grow: give it more room", a->name,
                 ag_device_name(a->device), bytes, a->used, a->reserved);
        return NULL;
    }
    void *p = (unsigned char *)a->dev_base + a->used;
    const ag_backend *be = ag_backend_get("arena", a->device);
    if (!be || be->mem_zero(p, bytes) != MOLT_OK)
        return NULL;
    a->used += need;
    if (a->used > a->peak)
        a->peak = a->used;
    return p;
}

// `bytes` from the host arena a, not zeroed.
static void *host_alloc(ag_arena *a, size_t bytes) {
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
    return p;
}

void *ag_arena_alloc(ag_arena *a, size_t bytes) {
    if (a->device != AG_CPU)
        return device_alloc(a, bytes);
    void *p = host_alloc(a, bytes);
    if (p)
        memset(p, 0, bytes);
    return p;
}

void *ag_arena_alloc_uninit(ag_arena *a, size_t bytes) {
    return a->device != AG_CPU ? device_alloc(a, bytes) : host_alloc(a, bytes);
}

void *ag_arena_alloc_meta(ag_arena *a, size_t bytes) {
    return ag_arena_alloc(a->device != AG_CPU ? a->meta : a, bytes);
}

size_t ag_arena_mark(const ag_arena *a) { return a->used; }

void ag_arena_rewind(ag_arena *a, size_t mark) {
    MOLT_ASSERT(a->device != AG_CPU && mark <= a->used);
    a->used = mark;
}

void ag_arena_reset(ag_arena *a) {
    if (a->device != AG_CPU) {
        a->used = 0;
        ag_arena_reset(a->meta);
        return;
    }
    molt_mem_adjust(-(long long)a->used);
    // grow the default so the next step fits in one chunk
    if (a->head && a->peak > a->chunk_bytes)
        a->chunk_bytes = a->peak;
    // a step that spilled over chunks gets one of its high-water mark (no smaller than any
    // other, so it is the one kept below); without memory for it, the largest is kept
    ag_arena_chunk *fresh = a->head && a->head->next ? chunk_new(a->chunk_bytes) : NULL;
    if (fresh) {
        fresh->next = a->head;
        a->head = fresh;
    }
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
    }
    if (fresh) // its pages mapped now, once the old chunks are gone
        for (size_t off = 0; off < fresh->cap; off += 4096)
            fresh->base[off] = 0;
    a->used = 0;
}

void ag_arena_free(ag_arena *a) {
    if (a->device != AG_CPU) {
        const ag_backend *be = ag_backend_get("arena", a->device);
        if (be && a->dev_base)
            be->mem_free(a->dev_base);
        if (a->meta) {
            ag_arena_free(a->meta);
            molt_free(a->meta);
        }
        a->dev_base = NULL;
        a->meta = NULL;
        a->used = a->reserved = 0;
        return;
    }
    molt_mem_adjust(-(long long)a->used);
    for (ag_arena_chunk *ch = a->head; ch;) {
        ag_arena_chunk *next = ch->next;
        chunk_free(ch);
        ch = next;
    }
    a->head = NULL;
    a->used = a->reserved = 0;
}
