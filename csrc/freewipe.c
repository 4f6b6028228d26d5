/* freewipe: make another shared object's free() zero each block before it is released.
 *
 * cryptography's extension (_rust.abi3.so) builds an RSA decrypt's result (the AES key) in a
 * malloc'd buffer it frees unwiped, and no API lets us hand it our own buffer. Its calls to
 * free and realloc go through its GOT (GLOB_DAT and JUMP_SLOT relocations against libc's
 * symbols); nm_wipe_frees_of points those slots of that one object at the wrappers below,
 * so every block it releases is zeroed first, whatever the allocator's caching does. Nothing
 * else in the process changes: no allocator setting, no other object's slots. Not covered: a
 * copy of free's address the object took before the patch, and, in an object without
 * BIND_NOW, a lazy PLT resolution racing the patch (cryptography's wheels are BIND_NOW).
 * The object is matched by its canonical path (realpath). x86-64 and AArch64 (ELF RELA);
 * elsewhere it reports -ENOTSUP and patches nothing.
 */
#define _GNU_SOURCE
#include "secmem.h"

#include <errno.h>
#include <link.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "compat.h"

#if defined(__x86_64__)
#define NM_R_GLOB_DAT R_X86_64_GLOB_DAT
#define NM_R_JUMP_SLOT R_X86_64_JUMP_SLOT
#elif defined(__aarch64__)
#define NM_R_GLOB_DAT R_AARCH64_GLOB_DAT
#define NM_R_JUMP_SLOT R_AARCH64_JUMP_SLOT
#endif

void nm_wiping_free(void *p)
{
    if (p != NULL) {
        nm_wipe(p, malloc_usable_size(p));
        free(p);
    }
}

/* realloc that never releases an unwiped block: a shrink of at most half stays in place (the
 * tail is wiped when the block is freed), anything else moves and wipes the old block. */
void *nm_wiping_realloc(void *p, size_t n)
{
    if (p == NULL)
        return malloc(n);
    if (n == 0) {  /* glibc's realloc(p, 0) frees p and returns NULL */
        nm_wiping_free(p);
        return NULL;
    }
    size_t have = malloc_usable_size(p);
    if (n <= have && n >= have / 2)
        return p;
    void *q = malloc(n);
    if (q == NULL)
        return NULL;  /* p is untouched, as realloc leaves it */
    memcpy(q, p, n < have ? n : have);
    nm_wiping_free(p);
    return q;
}

#ifdef NM_R_JUMP_SLOT

struct target {
    const char *path;  /* canonical (realpath) */
    int found;
    int result;        /* slots pointing at the wrappers, or -errno */
};

/* The pages the loader made read-only after relocation: PT_GNU_RELRO with both ends rounded
 * down to the page, as glibc's _dl_protect_relro and musl do. A last partial page stays
 * writable (it holds .data), so a slot there is stored without mprotect. */
struct relro {
    uintptr_t start, end;
};

/* Point one GOT slot at fn; a read-only RELRO page is writable only for the store. */
static int patch_slot(void **slot, void *fn, struct relro ro, uintptr_t page)
{
    if (*slot == fn)
        return 0;
    void *start = (void *)((uintptr_t)slot & ~(page - 1));
    int protect = (uintptr_t)slot >= ro.start && (uintptr_t)slot < ro.end;
    if (protect && mprotect(start, page, PROT_READ | PROT_WRITE) != 0)
        return -errno;
    __atomic_store_n(slot, fn, __ATOMIC_SEQ_CST);
    if (protect && mprotect(start, page, PROT_READ) != 0)
        return -errno;
    return 0;
}

/* A dynamic-section address: glibc relocates them in place, other loaders may not. */
static uintptr_t dyn_ptr(const ElfW(Dyn) *d, uintptr_t base)
{
    uintptr_t p = (uintptr_t)d->d_un.d_ptr;
    return p < base ? p + base : p;
}

/* Patch the free and realloc slots of one relocation table; *frees counts the free slots.
 * The slots pointing at the wrappers afterwards, or -errno. */
static int patch_table(const ElfW(Rela) *rela, size_t bytes, const ElfW(Sym) *symtab,
                       const char *strtab, uintptr_t base, struct relro ro, uintptr_t page,
                       int *frees)
{
    int patched = 0;
    for (size_t i = 0; rela != NULL && i < bytes / sizeof(*rela); i++) {
        unsigned long type = ELF64_R_TYPE(rela[i].r_info);
        if (type != NM_R_GLOB_DAT && type != NM_R_JUMP_SLOT)
            continue;
        const char *name = strtab + symtab[ELF64_R_SYM(rela[i].r_info)].st_name;
        void *fn = strcmp(name, "free") == 0 ? (void *)nm_wiping_free
                   : strcmp(name, "realloc") == 0 ? (void *)nm_wiping_realloc : NULL;
        if (fn == NULL)
            continue;
        int rc = patch_slot((void **)(base + rela[i].r_offset), fn, ro, page);
        if (rc < 0)
            return rc;
        patched++;
        *frees += fn == (void *)nm_wiping_free;
    }
    return patched;
}

static int patch_object(const struct dl_phdr_info *info)
{
    uintptr_t base = (uintptr_t)info->dlpi_addr, page = (uintptr_t)sysconf(_SC_PAGESIZE);
    struct relro ro = {0, 0};
    const ElfW(Dyn) *dyn = NULL;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type == PT_DYNAMIC)
            dyn = (const ElfW(Dyn) *)(base + ph->p_vaddr);
        else if (ph->p_type == PT_GNU_RELRO) {
            ro.start = (base + ph->p_vaddr) & ~(page - 1);
            ro.end = (base + ph->p_vaddr + ph->p_memsz) & ~(page - 1);
        }
    }
    if (dyn == NULL)
        return -ENOEXEC;
    const ElfW(Sym) *symtab = NULL;
    const char *strtab = NULL;
    const ElfW(Rela) *rela = NULL, *jmprel = NULL;
    size_t rela_bytes = 0, jmprel_bytes = 0;
    long pltrel = DT_RELA;
    for (const ElfW(Dyn) *d = dyn; d->d_tag != DT_NULL; d++) {
        switch (d->d_tag) {
        case DT_SYMTAB: symtab = (const ElfW(Sym) *)dyn_ptr(d, base); break;
        case DT_STRTAB: strtab = (const char *)dyn_ptr(d, base); break;
        case DT_RELA: rela = (const ElfW(Rela) *)dyn_ptr(d, base); break;
        case DT_RELASZ: rela_bytes = d->d_un.d_val; break;
        case DT_JMPREL: jmprel = (const ElfW(Rela) *)dyn_ptr(d, base); break;
        case DT_PLTRELSZ: jmprel_bytes = d->d_un.d_val; break;
        case DT_PLTREL: pltrel = (long)d->d_un.d_val; break;
        default: break;
        }
    }
    if (symtab == NULL || strtab == NULL || pltrel != DT_RELA)
        return -ENOEXEC;
    int frees = 0;
    int a = patch_table(rela, rela_bytes, symtab, strtab, base, ro, page, &frees);
    if (a < 0)
        return a;
    int b = patch_table(jmprel, jmprel_bytes, symtab, strtab, base, ro, page, &frees);
    if (b < 0)
        return b;
    /* no free slot: the object frees some other way (a static allocator, a pointer in data),
     * so nothing it frees would be wiped */
    return frees > 0 ? a + b : -ENOSYS;
}

static int visit(struct dl_phdr_info *info, size_t size, void *arg)
{
    (void)size;
    struct target *t = arg;
    if (info->dlpi_name == NULL || info->dlpi_name[0] == '\0')
        return 0;
    char *name = realpath(info->dlpi_name, NULL);
    int same = name != NULL && strcmp(name, t->path) == 0;
    free(name);
    if (!same)
        return 0;
    t->found = 1;
    t->result = patch_object(info);
    return 1;
}

static pthread_mutex_t patch_lock = PTHREAD_MUTEX_INITIALIZER;

int nm_wipe_frees_of(const char *path)
{
    /* realpath rather than stat: glibc's stat is a GLIBC_2.33 symbol, past the portable
     * wheels' 2.17 baseline (compat.h) */
    char *canonical = realpath(path, NULL);
    if (canonical == NULL)
        return -errno;
    struct target t = {canonical, 0, 0};
    pthread_mutex_lock(&patch_lock);  /* two callers must not interleave their mprotects */
    dl_iterate_phdr(visit, &t);
    pthread_mutex_unlock(&patch_lock);
    free(canonical);
    return t.found ? t.result : -ENOENT;
}

#else

int nm_wipe_frees_of(const char *path)
{
    (void)path;
    return -ENOTSUP;
}

#endif
