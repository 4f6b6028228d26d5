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

/* In a forked child: drop what the child inherited of the mapping, without touching it.
 * A MADV_DONTFORK middle is absent here: only the two guard pages came across, and the hole
 * between them belongs to the child, which may have mapped its own memory there since (a
 * malloc arena, say), so only the guards are unmapped. Otherwise the whole mapping came
 * across (wiped to zeros under MADV_WIPEONFORK, so the canary no longer matches). */
int nm_region_unmap(nm_region *r)
{
    if (r->base == NULL)
        return -EINVAL;
    int rc = 0;
    if (r->fork_protection == NM_FORK_DONTFORK) {
        size_t page = page_size();
        if (munmap(r->base, page) != 0 || munmap(r->inner + r->inner_len, page) != 0)
            rc = -errno;
    } else if (munmap(r->base, r->total) != 0) {
        rc = -errno;
    }
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

/* ---- Scrubbing what an operation on a secret leaves behind it (issue 12) ----
 *
 * Copying a secret (ours, or glibc's memmove inside CPython or OpenSSL) passes it through
 * vector registers, and the first call of a lazily bound symbol afterwards has the dynamic
 * linker's trampoline spill every vector register to the stack; the bytes then sit below the
 * live frames until something deeper overwrites them. nm_scrub clears the vector registers
 * first (so nothing spilled later carries the secret), then zeroes a bounded stretch of the
 * stack below its caller. It runs at the end of every operation that touched a secret. */

#include <pthread.h>

#define NM_SCRUB_STACK_MAX (256u * 1024u)  /* the most nm_scrub ever zeroes */
#define NM_SCRUB_MARGIN (8u * 1024u)       /* kept clear of the thread's stack limit */

static int vector_level(void)
{
    /* 0 unknown yet, 1 SSE only, 2 AVX (ymm), 3 AVX-512 (zmm and registers 16-31).
     * A benign race: every thread computes the same value. */
    static int level;
    if (level == 0) {
#if defined(__x86_64__)
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f"))
            level = 3;
        else if (__builtin_cpu_supports("avx"))
            level = 2;
        else
            level = 1;
#else
        level = 1;
#endif
    }
    return level;
}

/* Every vector register of the SysV ABI is caller-saved, so a called function may zero them
 * all; the clobbers tell the compiler, which then keeps nothing of its own in them. */
__attribute__((noinline)) static void clear_vector_registers(void)
{
#if defined(__x86_64__)
    int level = vector_level();
    if (level >= 2) {
        /* VZEROALL zeroes all of ymm0-15 (and zmm0-15 on AVX-512 hardware). */
        __asm__ __volatile__("vzeroall" ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5",
                             "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
                             "xmm13", "xmm14", "xmm15", "memory");
    } else {
        __asm__ __volatile__(
            "pxor %%xmm0, %%xmm0\n\tpxor %%xmm1, %%xmm1\n\tpxor %%xmm2, %%xmm2\n\t"
            "pxor %%xmm3, %%xmm3\n\tpxor %%xmm4, %%xmm4\n\tpxor %%xmm5, %%xmm5\n\t"
            "pxor %%xmm6, %%xmm6\n\tpxor %%xmm7, %%xmm7\n\tpxor %%xmm8, %%xmm8\n\t"
            "pxor %%xmm9, %%xmm9\n\tpxor %%xmm10, %%xmm10\n\tpxor %%xmm11, %%xmm11\n\t"
            "pxor %%xmm12, %%xmm12\n\tpxor %%xmm13, %%xmm13\n\tpxor %%xmm14, %%xmm14\n\t"
            "pxor %%xmm15, %%xmm15"
            ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
            "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory");
    }
    if (level >= 3) {
        /* zmm16-31 exist only with AVX-512 and VZEROALL leaves them alone. The compiler is
         * not building for AVX-512 here, so it never allocates them: no clobbers needed. */
        __asm__ __volatile__(
            "vpxord %%zmm16, %%zmm16, %%zmm16\n\tvpxord %%zmm17, %%zmm17, %%zmm17\n\t"
            "vpxord %%zmm18, %%zmm18, %%zmm18\n\tvpxord %%zmm19, %%zmm19, %%zmm19\n\t"
            "vpxord %%zmm20, %%zmm20, %%zmm20\n\tvpxord %%zmm21, %%zmm21, %%zmm21\n\t"
            "vpxord %%zmm22, %%zmm22, %%zmm22\n\tvpxord %%zmm23, %%zmm23, %%zmm23\n\t"
            "vpxord %%zmm24, %%zmm24, %%zmm24\n\tvpxord %%zmm25, %%zmm25, %%zmm25\n\t"
            "vpxord %%zmm26, %%zmm26, %%zmm26\n\tvpxord %%zmm27, %%zmm27, %%zmm27\n\t"
            "vpxord %%zmm28, %%zmm28, %%zmm28\n\tvpxord %%zmm29, %%zmm29, %%zmm29\n\t"
            "vpxord %%zmm30, %%zmm30, %%zmm30\n\tvpxord %%zmm31, %%zmm31, %%zmm31"
            ::: "memory");
    }
#elif defined(__aarch64__)
    /* v0-v7 and v16-v31 are caller-saved (v8-v15 only in their low halves, which the
     * ABI lets us not touch); zero them all the same way. */
    __asm__ __volatile__(
        "movi v0.16b, #0\n\tmovi v1.16b, #0\n\tmovi v2.16b, #0\n\tmovi v3.16b, #0\n\t"
        "movi v4.16b, #0\n\tmovi v5.16b, #0\n\tmovi v6.16b, #0\n\tmovi v7.16b, #0\n\t"
        "movi v16.16b, #0\n\tmovi v17.16b, #0\n\tmovi v18.16b, #0\n\tmovi v19.16b, #0\n\t"
        "movi v20.16b, #0\n\tmovi v21.16b, #0\n\tmovi v22.16b, #0\n\tmovi v23.16b, #0\n\t"
        "movi v24.16b, #0\n\tmovi v25.16b, #0\n\tmovi v26.16b, #0\n\tmovi v27.16b, #0\n\t"
        "movi v28.16b, #0\n\tmovi v29.16b, #0\n\tmovi v30.16b, #0\n\tmovi v31.16b, #0"
        ::: "v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "v16", "v17", "v18", "v19",
        "v20", "v21", "v22", "v23", "v24", "v25", "v26", "v27", "v28", "v29", "v30", "v31",
        "memory");
#endif
}

/* The lowest address this thread may use for its stack, found once per thread (for the main
 * thread glibc reads /proc/self/maps, so it is cached); 0 when it cannot be told. */
static uintptr_t stack_floor(void)
{
    static __thread uintptr_t floor;
    static __thread int known;
    if (!known) {
        pthread_attr_t attr;
        void *addr = NULL;
        size_t size = 0;
        if (pthread_getattr_np(pthread_self(), &attr) == 0) {
            if (pthread_attr_getstack(&attr, &addr, &size) == 0)
                floor = (uintptr_t)addr;
            pthread_attr_destroy(&attr);
        }
        known = 1;
    }
    return floor;
}

/* Zero `n` bytes of stack just below this frame. noinline, so the stretch really lies below
 * the caller's frame; alloca, so its size can follow the argument. */
__attribute__((noinline)) static void zero_stack_below(size_t n)
{
    unsigned char *area = __builtin_alloca(n);
    nm_wipe(area, n);
    /* Keep the frame (and so the wipe) from being optimised into a tail call. */
    __asm__ __volatile__("" : : "r"(area) : "memory");
}

size_t nm_scrub(size_t stack_bytes)
{
    clear_vector_registers();
    if (stack_bytes > NM_SCRUB_STACK_MAX)
        stack_bytes = NM_SCRUB_STACK_MAX;
    uintptr_t here = (uintptr_t)__builtin_frame_address(0);
    uintptr_t floor = stack_floor();
    if (floor != 0) {
        uintptr_t room = here > floor + NM_SCRUB_MARGIN ? here - floor - NM_SCRUB_MARGIN : 0;
        if (stack_bytes > room)
            stack_bytes = room;  /* a small thread stack: never run into its guard page */
    } else if (stack_bytes > 16u * 1024u) {
        stack_bytes = 16u * 1024u;  /* bounds unknown: stay within what any stack has */
    }
    stack_bytes &= ~(size_t)15;
    if (stack_bytes > 0)
        zero_stack_below(stack_bytes);
    /* The wipe itself ran through the vector registers; they hold zeros, but the call may
     * have been the first of a lazily bound explicit_bzero: clear them once more. */
    clear_vector_registers();
    return stack_bytes;
}

int nm_copy_scrub(void *dst, const void *src, size_t n, size_t stack_bytes)
{
    if (n > 0 && (dst == NULL || src == NULL))
        return -EINVAL;
    memcpy(dst, src, n);
    nm_scrub(stack_bytes);
    return 0;
}
