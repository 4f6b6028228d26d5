/* nm_wipe (see compat.h): explicit_bzero where the libc has it and the build allows it,
 * otherwise memset followed by a compiler barrier that claims to read the memory, so the
 * stores cannot be dropped (the same construction glibc uses inside explicit_bzero).
 *
 * setup.py may compile an extension with -Dexplicit_bzero=nm_wipe to route its calls here;
 * this file must still see the real name, and must never call itself. */
#undef explicit_bzero
#include "compat.h"

void nm_wipe(void *p, size_t n)
{
#if NM_LIBC_HAS_EXPLICIT_BZERO
    explicit_bzero(p, n);
#else
    memset(p, 0, n);
    __asm__ __volatile__("" : : "r"(p) : "memory");
#endif
}
