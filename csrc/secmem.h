/* secmem: the guarded secure-memory allocator of nomyo, and the process calls Python lacks.
 *
 * Everything a call does is recorded in its result or in the region struct; nothing is
 * ignored, so the Python layer can report protection truthfully.
 * The block between the cdef markers is read verbatim by build_secmem.py (cffi cdef).
 */
#ifndef NOMYO_SECMEM_H
#define NOMYO_SECMEM_H

#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
#define NM_ALLOC_MMAP 1
#define NM_ALLOC_MEMFD_SECRET 2

#define NM_CANARY_BYTES 8      /* canary stored just before the data */

#define NM_FLAG_FORCE_MMAP 1   /* never try memfd_secret */
#define NM_FLAG_NO_LOCK 2      /* do not mlock (secure memory disabled by the caller) */

#define NM_FORK_NONE 0
#define NM_FORK_WIPE 1         /* MADV_WIPEONFORK: the child sees zeros */
#define NM_FORK_DONTFORK 2     /* MADV_DONTFORK: the mapping is absent in the child */

typedef struct nm_region {
    unsigned char *data;   /* caller's bytes, placed against the trailing guard page */
    size_t size;           /* caller-visible size */
    unsigned char *base;   /* start of the whole mapping (leading guard page) */
    size_t total;          /* bytes mapped, guards included */
    unsigned char *inner;  /* first accessible page */
    size_t inner_len;      /* accessible bytes, whole pages */
    int allocator;         /* NM_ALLOC_* */
    int locked;            /* 1 when the pages are locked in RAM */
    int lock_errno;        /* errno of the failed lock attempt, 0 if none failed */
    int secret_errno;      /* errno of the failed memfd_secret attempt, 0 if none failed */
    int dump_excluded;     /* 1 when MADV_DONTDUMP succeeded */
    int dump_errno;
    int fork_protection;   /* NM_FORK_* */
    int fork_errno;
    uint64_t canary;       /* random value stored just before data, checked at free */
} nm_region;

/* capacity >= size: bytes a later nm_region_refit may grow the data to */
int nm_region_alloc(nm_region *r, size_t size, size_t capacity, int flags);
int nm_region_refit(nm_region *r, size_t size);
int nm_region_free(nm_region *r);
int nm_region_unmap(nm_region *r);
int nm_fill_random(void *p, size_t n);
int nm_get_dumpable(void);
int nm_set_dumpable(int value);
const char *nm_build_version(void);  /* the nomyo version this was built for */
/* Clear the vector registers and zero up to stack_bytes of stack below the caller (clamped to
 * 256 KiB and to the thread's stack); the number of stack bytes actually zeroed. */
size_t nm_scrub(size_t stack_bytes);
/* memcpy(dst, src, n), then nm_scrub(stack_bytes): a secret's copy that leaves no residue. */
int nm_copy_scrub(void *dst, const void *src, size_t n, size_t stack_bytes);
/* Point the GOT slots for free and realloc of the loaded shared object at `path` (matched
 * by canonical path) at nm_wiping_free / nm_wiping_realloc, so every block that object
 * releases is zeroed first (freewipe.c); safe to call again. The number of slots pointing at
 * the wrappers, -ENOENT when the object is not loaded, -ENOSYS when it has no free slot,
 * -ENOTSUP on an architecture it does not know, or -errno of a failed realpath or mprotect. */
int nm_wipe_frees_of(const char *path);
void nm_wiping_free(void *p);
void *nm_wiping_realloc(void *p, size_t n);
/* cdef-end */

#endif
