/* Guarded secure-memory allocator (see secmem.h). Linux only; a failed protection step is
 * recorded, never hidden, and the allocation still succeeds when the memory itself exists. */
#define _GNU_SOURCE
#include "secmem.h"
#include "compat.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#if NM_LIBC_HAS_GETRANDOM
#include <sys/random.h>
#endif
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_memfd_secret
#define SYS_memfd_secret 447
#endif
#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18
#endif
#ifndef MADV_DONTDUMP
#define MADV_DONTDUMP 16
#endif
#if !NM_LIBC_HAS_GETRANDOM && !defined(SYS_getrandom)
#if defined(__x86_64__)
#define SYS_getrandom 318
#elif defined(__aarch64__)
#define SYS_getrandom 278
#else
#error "SYS_getrandom unknown here: build against glibc >= 2.25 without NOMYO_PORTABLE_GLIBC"
#endif
#endif

#ifndef NOMYO_BUILD_VERSION
#error "NOMYO_BUILD_VERSION is set by the build from nomyo/_version.py (csrc/build_secmem.py)"
#endif

const char *nm_build_version(void)
{
    return NOMYO_BUILD_VERSION;
}

static size_t page_size(void)
{
    static size_t cached;
    if (cached == 0) {
        long p = sysconf(_SC_PAGESIZE);
        cached = p > 0 ? (size_t)p : 4096;
    }
    return cached;
}

int nm_fill_random(void *p, size_t n)
{
    unsigned char *out = p;
    while (n > 0) {
#if NM_LIBC_HAS_GETRANDOM
        ssize_t got = getrandom(out, n, 0);
#else
        ssize_t got = (ssize_t)syscall(SYS_getrandom, out, n, 0);
#endif
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        out += got;
        n -= (size_t)got;
    }
    return 0;
}

/* One random key per process, drawn on first use; 0 only if the kernel CSPRNG failed. */
static uint64_t canary_key(void)
{
    static uint64_t key;
    uint64_t k = __atomic_load_n(&key, __ATOMIC_ACQUIRE);
    if (k != 0)
        return k;
    if (nm_fill_random(&k, sizeof(k)) != 0)
        return 0;
    k |= 1;
    uint64_t expected = 0;
    if (!__atomic_compare_exchange_n(&key, &expected, k, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        k = expected;
    return k;
}

/* Map the accessible pages from a memfd_secret file over the middle of the reservation.
 * The kernel removes these pages from its direct map and locks them (counted in VmLck). */
static int map_secret(nm_region *r)
{
    int fd = (int)syscall(SYS_memfd_secret, 0x80000 /* O_CLOEXEC */);
    if (fd < 0)
        return errno;
    int err = 0;
    if (ftruncate(fd, (off_t)r->inner_len) != 0) {
        err = errno;
    } else if (mmap(r->inner, r->inner_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
                    fd, 0) == MAP_FAILED) {
        err = errno;
        /* MAP_FIXED may have replaced the reservation before failing: restore the guard. */
        mmap(r->inner, r->inner_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    }
    close(fd);
    return err;
}

static void protect_mmap_pages(nm_region *r, int flags)
{
    if (flags & NM_FLAG_NO_LOCK)
        return;
    if (mlock(r->inner, r->inner_len) == 0)
        r->locked = 1;
    else
        r->lock_errno = errno;
}

/* Place `size` bytes of data against the trailing guard page, with a fresh canary before
 * them: distinct per placement without a syscall, the process key mixed with the address
 * (splitmix64 finaliser). Returns 0, or -errno when the kernel CSPRNG failed. */
static int place_data(nm_region *r, size_t size)
{
    uint64_t key = canary_key();
    if (key == 0)
        return errno ? -errno : -EIO;
    r->size = size;
    r->data = r->inner + r->inner_len - size;
    uint64_t z = key ^ (uint64_t)(uintptr_t)r->data;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    r->canary = z ^ (z >> 31);
    memcpy(r->data - NM_CANARY_BYTES, &r->canary, NM_CANARY_BYTES);
    return 0;
}

/* A damaged canary means something wrote before the buffer: the process is in an unknown
 * state, so it stops (SIGABRT), after wiping the region. */
static void check_canary(nm_region *r)
{
    if (memcmp(r->data - NM_CANARY_BYTES, &r->canary, NM_CANARY_BYTES) == 0)
        return;
    nm_wipe(r->inner, r->inner_len);
    static const char msg[] = "nomyo: secure buffer canary overwritten; aborting\n";
    ssize_t ignored = write(2, msg, sizeof(msg) - 1);
    (void)ignored;
    abort();
}

int nm_region_alloc(nm_region *r, size_t size, size_t capacity, int flags)
{
    size_t page = page_size();
    memset(r, 0, sizeof(*r));
    if (size == 0 || capacity < size || capacity > ((size_t)1 << 40))
        return -EINVAL;
    r->inner_len = (capacity + NM_CANARY_BYTES + page - 1) / page * page;
    r->total = r->inner_len + 2 * page;

    /* One reservation with no access; the middle pages are opened below, the outer page on
     * each side stays PROT_NONE as a guard. The mapping is ours alone: no Python object
     * shares these pages, so locks of different buffers never interfere. */
    r->base = mmap(NULL, r->total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r->base == MAP_FAILED) {
        r->base = NULL;
        return -errno;
    }
    r->inner = r->base + page;

    int secret_err = -1;
    if (!(flags & (NM_FLAG_FORCE_MMAP | NM_FLAG_NO_LOCK))) {
        secret_err = map_secret(r);
        if (secret_err == 0) {
            r->allocator = NM_ALLOC_MEMFD_SECRET;
            r->locked = 1;
        } else {
            r->secret_errno = secret_err;
        }
    }
    if (secret_err != 0) {
        if (mprotect(r->inner, r->inner_len, PROT_READ | PROT_WRITE) != 0) {
            int err = errno;
            munmap(r->base, r->total);
            memset(r, 0, sizeof(*r));
            return -err;
        }
        r->allocator = NM_ALLOC_MMAP;
        protect_mmap_pages(r, flags);
        if (r->secret_errno == EAGAIN || r->secret_errno == ENOMEM || r->secret_errno == EPERM)
            r->lock_errno = r->lock_errno ? r->lock_errno : r->secret_errno;
    }

    /* The kernel marks memfd_secret mappings VM_DONTDUMP itself (smaps shows "lo dd"), so
     * only the mmap path needs the call; the gcore test checks both paths. */
    if (r->allocator == NM_ALLOC_MEMFD_SECRET ||
        madvise(r->inner, r->inner_len, MADV_DONTDUMP) == 0)
        r->dump_excluded = 1;
    else
        r->dump_errno = errno;

    /* A shared (memfd_secret) mapping cannot be wiped on fork; it is left out of the child. */
    if (r->allocator == NM_ALLOC_MMAP && madvise(r->inner, r->inner_len, MADV_WIPEONFORK) == 0) {
        r->fork_protection = NM_FORK_WIPE;
    } else if (madvise(r->inner, r->inner_len, MADV_DONTFORK) == 0) {
        r->fork_protection = NM_FORK_DONTFORK;
    } else {
        r->fork_errno = errno;
    }

    int rc = place_data(r, size);
    if (rc != 0) {
        munmap(r->base, r->total);
        memset(r, 0, sizeof(*r));
    }
    return rc;
}

/* Reuse the region for a new secret of `size` bytes (at most its capacity): the canary is
 * checked and the old secret wiped before the data moves against the trailing guard again.
 * Mapping and unmapping are most of a secure allocation's cost (memfd_secret takes every
 * page out of the kernel's direct map and back), so one exchange reuses its regions. */
int nm_region_refit(nm_region *r, size_t size)
{
    if (r->base == NULL)
        return -EINVAL;
    if (size == 0 || size > r->inner_len - NM_CANARY_BYTES)
        return -ENOSPC;
    check_canary(r);
    nm_wipe(r->data - NM_CANARY_BYTES, r->size + NM_CANARY_BYTES);
    return place_data(r, size);
}

/* Wipe, check the canary, unlock and unmap. */
int nm_region_free(nm_region *r)
{
    if (r->base == NULL)
        return -EINVAL;
    check_canary(r);
    nm_wipe(r->inner, r->inner_len);
    int err = 0;
    if (r->locked && r->allocator == NM_ALLOC_MMAP && munlock(r->inner, r->inner_len) != 0)
        err = errno;
    if (munmap(r->base, r->total) != 0 && err == 0)
        err = errno;
    nm_wipe(&r->canary, sizeof(r->canary));
    r->base = NULL;
    r->data = NULL;
    r->inner = NULL;
    r->locked = 0;
    return -err;
}

/* In a forked child: drop the mapping without touching it (it may be absent, or wiped so
 * that the canary no longer matches). */
int nm_region_unmap(nm_region *r)
{
    if (r->base == NULL)
        return -EINVAL;
    int rc = munmap(r->base, r->total) == 0 ? 0 : -errno;
    r->base = NULL;
    r->data = NULL;
    r->inner = NULL;
    r->locked = 0;
    return rc;
}

int nm_get_dumpable(void)
{
    int v = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
    return v < 0 ? -errno : v;
}

int nm_set_dumpable(int value)
{
    return prctl(PR_SET_DUMPABLE, value ? 1 : 0, 0, 0, 0) == 0 ? 0 : -errno;
}
