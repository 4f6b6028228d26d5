/* Which libc calls the native helper references, decided at build time.
 *
 * A wheel runs on every Linux whose glibc is at least the newest symbol version it links.
 * explicit_bzero and getrandom are glibc 2.25, which alone would confine a wheel to
 * manylinux_2_26. So they are used only where the libc we compile against has them and the
 * build did not ask for the old baseline (NM_PORTABLE_GLIBC, set by setup.py when
 * NOMYO_PORTABLE_GLIBC=1, for manylinux2014 wheels: glibc 2.17). Otherwise nm_wipe is a
 * memset the compiler must keep, and random bytes come from the getrandom system call
 * directly (Linux 3.17); neither needs a newer glibc, and both protect exactly as well.
 */
#ifndef NOMYO_COMPAT_H
#define NOMYO_COMPAT_H

#include <stddef.h>
#include <string.h>  /* defines __GLIBC__ and __GLIBC_MINOR__ on glibc */

#if !defined(NM_PORTABLE_GLIBC) && defined(__GLIBC__) && \
    (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 25))
#define NM_LIBC_HAS_EXPLICIT_BZERO 1
#define NM_LIBC_HAS_GETRANDOM 1
#else
#define NM_LIBC_HAS_EXPLICIT_BZERO 0
#define NM_LIBC_HAS_GETRANDOM 0
#endif

/* glibc 2.34 moved the pthread calls into libc under new symbol versions (GLIBC_2.32/2.34),
 * which a build against a new glibc would bind. The old baseline binds their original x86-64
 * versions instead, which every glibc since 2.2.5 provides (in libpthread before 2.34, which
 * every CPython process has loaded; libc keeps them as compatibility versions after). */
#if defined(NM_PORTABLE_GLIBC) && defined(__x86_64__) && defined(__GLIBC__)
__asm__(".symver pthread_getattr_np,pthread_getattr_np@GLIBC_2.2.5");
__asm__(".symver pthread_attr_getstack,pthread_attr_getstack@GLIBC_2.2.5");
#endif

/* Zero n bytes at p; never removed as a dead store, whatever is (not) read afterwards. */
__attribute__((visibility("hidden"))) void nm_wipe(void *p, size_t n);

#endif
