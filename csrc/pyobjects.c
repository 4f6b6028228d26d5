/* nomyo._pyobjects: the few things that need CPython's own object structures.
 *
 * - Region: the base type of SecureBuffer and SecureCell. It owns its memory (an nm_region
 *   from secmem.c, linked into this module), or, for a cell, an export of the buffer it
 *   lives in. It exports that memory through the buffer protocol (Python 3.11 cannot define
 *   that in Python), counts live exports, refuses exports once closed or after fork, and
 *   refits and releases the memory under the GIL. The memory goes in exactly two places:
 *   close() or releasebuffer when the last export of a closed region goes, and tp_dealloc
 *   (which only runs once no export is left: a view holds its exporter). No Python
 *   finaliser frees anything, so no collector order can unmap pages a view still sees.
 * - wipe_bytes_owned / wipe_str_owned: zero an immutable object that a third-party API
 *   forced on us, handed over in a one-element list, only when that was its one reference.
 * - json_quote_len / json_quote_into: JSON-escape a str straight into a secure buffer.
 * - decode_utf8: build a str from UTF-8 in a secure buffer in one exact allocation, so no
 *   partial copy is left behind in freed memory by a growing decoder.
 * - json_loads: parse JSON from a secure buffer with each str built the same way.
 * - json_spans / json_unescape_into: the same reader leaving string values where they are
 *   (their offsets instead of a str), and a string's unescaped text written into another
 *   secure buffer: the secure answer's views (nomyo/client/secure_answer.py).
 */
#define PY_SSIZE_T_CLEAN
#ifndef NOMYO_BUILD_VERSION
#error "NOMYO_BUILD_VERSION is set by the build from nomyo/_version.py (csrc/build_secmem.py)"
#endif
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "secmem.h"

typedef struct {
    PyObject_HEAD
    unsigned char *ptr;
    Py_ssize_t size;
    Py_ssize_t exports;
    int closed;
    int owns;          /* 1: `region` is this object's mapping; 0: a cell, see `hold` */
    pid_t pid;
    nm_region region;  /* owns: base is NULL once released */
    Py_buffer hold;    /* a cell: an export of the owning Region (obj NULL once released) */
} RegionObject;

static PyTypeObject RegionType;

/* A secmem result (0 or -errno) as a Python exception; 0 when there is none. */
static int
raise_errno(int rc, const char *what)
{
    if (rc == 0)
        return 0;
    int err = -rc;
    if (err == ENOMEM)
        PyErr_Format(PyExc_MemoryError, "%s: %s", what, strerror(err));
    else if (err == ENOSPC || err == EINVAL)
        PyErr_Format(PyExc_ValueError, "%s: %s", what, strerror(err));
    else {
        PyObject *args = Py_BuildValue("(is)", err, what);
        if (args != NULL) {
            PyErr_SetObject(PyExc_OSError, args);
            Py_DECREF(args);
        }
    }
    return -1;
}

/* Let go of the memory: a region of this process is checked, wiped and unmapped (secmem),
 * an inherited one in a forked child only unmapped as far as it is the child's; a cell is
 * wiped (its owner is still mapped: we hold it) and lets its owner go. Never while an
 * export is alive. Runs under the GIL, so no other thread is between its steps. */
static int
Region_release_memory(RegionObject *self)
{
    int rc = 0;
    if (self->exports > 0)
        return 0;
    if (self->owns) {
        if (self->region.base != NULL)
            rc = self->pid == getpid() ? nm_region_free(&self->region)
                                       : nm_region_unmap(&self->region);
    } else if (self->hold.obj != NULL) {
        if (self->pid == getpid())
            explicit_bzero(self->ptr, (size_t)self->size);
        PyBuffer_Release(&self->hold);
    }
    return rc;
}

/* Region(size, capacity, flags): a new guarded mapping (nm_region_alloc's NM_FLAG_*).
 * Region(size, owner=region): a cell of `size` bytes in `owner`'s mapping, just below its
 * data and canary, holding an export of the owner; None when there is no room. */
static PyObject *
Region_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"size", "capacity", "flags", "owner", NULL};
    Py_ssize_t size, capacity = 0;
    int flags = 0;
    PyObject *owner = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n|ni$O:Region", kwlist, &size, &capacity,
                                     &flags, &owner))
        return NULL;
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "Region needs a positive size");
        return NULL;
    }
    if (owner != NULL && owner != Py_None) {
        if (!PyObject_TypeCheck(owner, &RegionType) || !((RegionObject *)owner)->owns) {
            PyErr_SetString(PyExc_TypeError, "a cell's owner must be a Region with a mapping");
            return NULL;
        }
        Py_buffer hold;
        if (PyObject_GetBuffer(owner, &hold, PyBUF_WRITABLE) != 0)
            return NULL;  /* closed, or in a forked child */
        nm_region *o = &((RegionObject *)owner)->region;
        uintptr_t data = (uintptr_t)o->data, inner = (uintptr_t)o->inner;
        uintptr_t start = data - inner >= (uintptr_t)size + NM_CANARY_BYTES
                              ? (data - NM_CANARY_BYTES - (uintptr_t)size) & ~(uintptr_t)15
                              : 0;
        if (start < inner) {
            PyBuffer_Release(&hold);
            Py_RETURN_NONE;
        }
        RegionObject *self = (RegionObject *)type->tp_alloc(type, 0);
        if (self == NULL) {
            PyBuffer_Release(&hold);
            return NULL;
        }
        self->ptr = (unsigned char *)start;
        self->size = size;
        self->pid = getpid();
        self->hold = hold;
        return (PyObject *)self;
    }
    if (capacity < size) {
        PyErr_SetString(PyExc_ValueError, "Region capacity must be at least its size");
        return NULL;
    }
    nm_region region;
    int rc;
    Py_BEGIN_ALLOW_THREADS  /* nothing shares the mapping yet */
    rc = nm_region_alloc(&region, (size_t)size, (size_t)capacity, flags);
    Py_END_ALLOW_THREADS
    if (raise_errno(rc, "secure allocation failed"))
        return NULL;
    RegionObject *self = (RegionObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        nm_region_free(&region);
        return NULL;
    }
    self->region = region;
    self->owns = 1;
    self->ptr = region.data;
    self->size = size;
    self->pid = getpid();
    return (PyObject *)self;
}

/* Only reached with no export left (each holds a reference). A secret dropped unclosed is
 * wiped here too: a cell's bytes are not part of its owner's data, which a refit wipes. */
static void
Region_dealloc(RegionObject *self)
{
    PyObject_GC_UnTrack(self);
    if (!self->closed && self->pid == getpid())
        explicit_bzero(self->ptr, (size_t)self->size);
    self->closed = 1;
    (void)Region_release_memory(self);  /* nowhere to report an munmap error to */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A cell's hold is a reference to its owner that the collector must see, or a cycle
 * through it (a subclass instance pointing back at its cell) would never be collected.
 * There is no tp_clear: the hold keeps the owner mapped under the cell, so it goes only
 * with the cell; the collector breaks such a cycle at its other, clearable links. */
static int
Region_traverse(RegionObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->hold.obj);
    return 0;
}

static int
Region_usable(RegionObject *self)
{
    if (self->closed) {
        PyErr_SetString(PyExc_ValueError, "secure buffer is closed");
        return 0;
    }
    if (self->pid != getpid()) {
        PyErr_SetString(PyExc_ValueError,
                        "secure buffer belongs to the parent process (not inherited across fork)");
        return 0;
    }
    return 1;
}

static int
Region_getbuffer(RegionObject *self, Py_buffer *view, int flags)
{
    if (!Region_usable(self))
        return -1;
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->ptr, self->size, 0, flags) != 0)
        return -1;
    self->exports++;
    return 0;
}

/* When the last view of a closed region goes: close() ran while it was alive, and what was
 * written through it after the wipe (a base64 decode_into of another thread, without the
 * GIL) is wiped now with the rest, and the memory released, instead of at finalisation. */
static void
Region_releasebuffer(RegionObject *self, Py_buffer *view)
{
    (void)view;
    if (--self->exports == 0 && self->closed)
        (void)Region_release_memory(self);  /* no exception may be raised from here */
}

static PyBufferProcs Region_as_buffer = {
    (getbufferproc)Region_getbuffer,
    (releasebufferproc)Region_releasebuffer,
};

/* Zero the region while holding the GIL, so no close() can unmap it meanwhile. */
static PyObject *
Region_wipe(RegionObject *self, PyObject *unused)
{
    (void)unused;
    if (!Region_usable(self))
        return NULL;
    explicit_bzero(self->ptr, (size_t)self->size);
    Py_RETURN_NONE;
}

/* Wipe and mark closed, and release the memory now unless a view is alive (then the last
 * one releases it). One step under the GIL: no refit, export or second close in between. */
static PyObject *
Region_close(RegionObject *self, PyObject *unused)
{
    (void)unused;
    if (self->closed) {
        PyErr_SetString(PyExc_ValueError, "secure buffer is already closed");
        return NULL;
    }
    if (self->pid == getpid())
        explicit_bzero(self->ptr, (size_t)self->size);
    self->closed = 1;
    if (raise_errno(Region_release_memory(self), "secure free failed"))
        return NULL;
    Py_RETURN_NONE;
}

/* Reuse the mapping for a new secret of `size` bytes: secmem checks the canary, wipes the
 * old data and places the new against the trailing guard. Under the GIL, with the export
 * check, so no view and no close() can come between the check and the move. */
static PyObject *
Region_refit(RegionObject *self, PyObject *arg)
{
    Py_ssize_t size = PyLong_AsSsize_t(arg);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (!Region_usable(self))
        return NULL;
    if (!self->owns) {
        PyErr_SetString(PyExc_TypeError, "only a Region with its own mapping can be refit");
        return NULL;
    }
    if (self->exports > 0) {
        PyErr_SetString(PyExc_BufferError, "cannot refit a secure buffer while views of it exist");
        return NULL;
    }
    if (size <= 0 || (size_t)size > self->region.inner_len - NM_CANARY_BYTES) {
        PyErr_Format(PyExc_ValueError, "refit to %zd bytes exceeds the capacity of %zu", size,
                     self->region.inner_len - NM_CANARY_BYTES);
        return NULL;
    }
    if (raise_errno(nm_region_refit(&self->region, (size_t)size), "secure refit failed"))
        return NULL;
    self->ptr = self->region.data;
    self->size = size;
    Py_RETURN_NONE;
}

/* The owning region: this one, or the one a cell lives in (NULL once a cell let it go). */
static RegionObject *
Region_mapping(RegionObject *self)
{
    return self->owns ? self : (RegionObject *)self->hold.obj;
}

static PyObject *
Region_get_locked(RegionObject *self, void *closure)
{
    (void)closure;
    RegionObject *m = Region_mapping(self);
    return PyBool_FromLong(!self->closed && m != NULL && m->region.base != NULL &&
                           m->region.locked);
}

static PyObject *
Region_get_dump_excluded(RegionObject *self, void *closure)
{
    (void)closure;
    RegionObject *m = Region_mapping(self);
    return PyBool_FromLong(m != NULL && m->region.dump_excluded);
}

static PyObject *
Region_get_lock_errno(RegionObject *self, void *closure)
{
    (void)closure;
    RegionObject *m = Region_mapping(self);
    return PyLong_FromLong(m != NULL ? m->region.lock_errno : 0);
}

static PyObject *
Region_get_allocator(RegionObject *self, void *closure)
{
    (void)closure;
    RegionObject *m = Region_mapping(self);
    if (m == NULL)
        Py_RETURN_NONE;
    return PyUnicode_FromString(m->region.allocator == NM_ALLOC_MEMFD_SECRET ? "memfd_secret"
                                                                            : "mmap");
}

static PyObject *
Region_get_fork_protection(RegionObject *self, void *closure)
{
    (void)closure;
    RegionObject *m = Region_mapping(self);
    int p = m != NULL ? m->region.fork_protection : NM_FORK_NONE;
    if (p == NM_FORK_WIPE)
        return PyUnicode_FromString("wipeonfork");
    if (p == NM_FORK_DONTFORK)
        return PyUnicode_FromString("dontfork");
    Py_RETURN_NONE;
}

static PyObject *
Region_get_address(RegionObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromVoidPtr(self->ptr);
}

static PyObject *
Region_get_capacity(RegionObject *self, void *closure)
{
    (void)closure;
    if (!self->owns)
        return PyLong_FromSsize_t(self->size);
    return PyLong_FromSize_t(self->region.inner_len - NM_CANARY_BYTES);
}

static PyObject *
Region_get_mapped(RegionObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->owns ? self->region.base != NULL : self->hold.obj != NULL);
}

static PyObject *
Region_get_exports(RegionObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->exports);
}

static PyObject *
Region_get_closed(RegionObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->closed);
}

static PyObject *
Region_get_foreign(RegionObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->pid != getpid());
}

static Py_ssize_t
Region_length(RegionObject *self)
{
    return self->size;
}

static PySequenceMethods Region_as_sequence = {
    .sq_length = (lenfunc)Region_length,
};

static PyMethodDef Region_methods[] = {
    {"wipe", (PyCFunction)Region_wipe, METH_NOARGS, "Zero the whole buffer."},
    {"_close", (PyCFunction)Region_close, METH_NOARGS,
     "Wipe and close; release now, or when the last view goes."},
    {"_refit", (PyCFunction)Region_refit, METH_O,
     "Wipe and place `size` bytes against the trailing guard (no live views allowed)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Region_getset[] = {
    {"closed", (getter)Region_get_closed, NULL, "True once closed.", NULL},
    {"locked", (getter)Region_get_locked, NULL, "Pages locked in RAM (False once closed).",
     NULL},
    {"dump_excluded", (getter)Region_get_dump_excluded, NULL, "Excluded from core dumps.",
     NULL},
    {"lock_errno", (getter)Region_get_lock_errno, NULL, "errno of a failed lock, or 0.", NULL},
    {"allocator", (getter)Region_get_allocator, NULL, "'memfd_secret' or 'mmap'.", NULL},
    {"fork_protection", (getter)Region_get_fork_protection, NULL,
     "'wipeonfork', 'dontfork' or None.", NULL},
    {"address", (getter)Region_get_address, NULL, "Address of the first data byte.", NULL},
    {"capacity", (getter)Region_get_capacity, NULL,
     "The largest size a refit accepts (the pages less the canary).", NULL},
    {"_mapped", (getter)Region_get_mapped, NULL, "True until the memory is released.", NULL},
    {"_exports", (getter)Region_get_exports, NULL, "Live buffer exports.", NULL},
    {"_foreign", (getter)Region_get_foreign, NULL, "True in a forked child.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RegionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nomyo._pyobjects.Region",
    .tp_basicsize = sizeof(RegionObject),
    .tp_dealloc = (destructor)Region_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Region_traverse,
    .tp_free = PyObject_GC_Del,
    .tp_doc = "Guarded secret memory exported through the buffer protocol (SecureBuffer's base).",
    .tp_new = Region_new,
    .tp_as_buffer = &Region_as_buffer,
    .tp_as_sequence = &Region_as_sequence,
    .tp_methods = Region_methods,
    .tp_getset = Region_getset,
};

/* ---- wiping immutable objects ---- */

/* nomyo.errors.WipeRefusedError, looked up at import. */
static PyObject *WipeRefused;

/* The caller hands the object over in a one-element list and has deleted its own names
 * for it first (`box = [data]; del data; wipe_bytes_owned(box)`). The list is emptied
 * here, so from then on the reference this function holds must be the only one: no count
 * of the caller's references has to be guessed, and any other holder (a global, a cache,
 * a container, a frame's f_locals) shows as a count above 1. Returns a new reference, or
 * NULL with TypeError (the list untouched) when it is not a list of one `type` object. */
static PyObject *
take_handed_over(PyObject *box, PyTypeObject *type, const char *fname)
{
    if (!PyList_CheckExact(box) || PyList_GET_SIZE(box) != 1) {
        PyErr_Format(PyExc_TypeError, "%s needs a list holding exactly one %s object",
                     fname, type->tp_name);
        return NULL;
    }
    PyObject *obj = PyList_GET_ITEM(box, 0);
    if (Py_TYPE(obj) != type) {
        PyErr_Format(PyExc_TypeError, "%s needs a list holding one %s object, not '%.100s'",
                     fname, type->tp_name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    Py_INCREF(obj);
    if (PyList_SetSlice(box, 0, 1, NULL) < 0) {
        Py_DECREF(obj);
        return NULL;
    }
    return obj;
}

/* Whether obj holds at most one byte or one Latin-1 character. The interpreter keeps shared
 * objects for every such value (one table of each; 3.11 has static copies besides, 3.12+
 * makes them immortal), so one more copy of such a value reveals nothing, and the shared
 * ones must never be written: when not ours alone, it is left as it is, without refusing. */
static int
is_one_char_value(PyObject *obj)
{
    if (PyBytes_CheckExact(obj))
        return PyBytes_GET_SIZE(obj) <= 1;
    Py_ssize_t n = PyUnicode_GET_LENGTH(obj);
    return n == 0 || (n == 1 && PyUnicode_READ_CHAR(obj, 0) <= 0xFF);
}

/* The outcome for an object we hold but may not write: False for a one-character value,
 * WipeRefusedError otherwise. Drops our reference either way; nothing is put back. */
static PyObject *
not_wiped(PyObject *obj, const char *why)
{
    int short_value = is_one_char_value(obj);
    Py_DECREF(obj);
    if (short_value)
        Py_RETURN_FALSE;
    PyErr_Format(WipeRefused, "refusing to wipe: %s; it was not zeroed", why);
    return NULL;
}

static PyObject *
wipe_bytes_owned(PyObject *module, PyObject *box)
{
    (void)module;
    PyObject *obj = take_handed_over(box, &PyBytes_Type, "wipe_bytes_owned");
    if (obj == NULL)
        return NULL;
    if (Py_REFCNT(obj) != 1)
        return not_wiped(obj, "the bytes object is still referenced elsewhere");
    explicit_bzero(PyBytes_AS_STRING(obj), (size_t)PyBytes_GET_SIZE(obj));
    /* A cached hash is a function of the secret: forget it too. The field is deprecated
     * since 3.11 but still there and still filled by hash() on every version we build for. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    ((PyBytesObject *)obj)->ob_shash = -1;
#pragma GCC diagnostic pop
    Py_DECREF(obj); /* the last reference: freed, already zeroed */
    Py_RETURN_TRUE;
}

/* Why `obj` (a str we hold) may not be written, or NULL when it is ours alone. Before 3.12
 * the intern table's references are not counted: an interned str can show a count of 1, so
 * interning is checked on its own. */
static const char *
str_not_ours(PyObject *obj)
{
    if (!PyUnicode_IS_COMPACT(obj)) /* only the deprecated Py_UNICODE APIs make these */
        return "a legacy (non-compact) str";
    if (PyUnicode_CHECK_INTERNED(obj))
        return "the str is interned (shared by identity)";
    if (Py_REFCNT(obj) != 1)
        return "the str is still referenced elsewhere";
    return NULL;
}

/* Zero a str we alone hold (its text, cached UTF-8 and wchar_t forms, hash), then drop it. */
static void
zero_str_and_release(PyObject *obj)
{
    explicit_bzero(PyUnicode_DATA(obj),
                   (size_t)PyUnicode_GET_LENGTH(obj) * PyUnicode_KIND(obj));
    if (!PyUnicode_IS_COMPACT_ASCII(obj)) { /* the cached UTF-8 form, if any */
        PyCompactUnicodeObject *c = (PyCompactUnicodeObject *)obj;
        if (c->utf8 != NULL && c->utf8_length > 0)
            explicit_bzero(c->utf8, (size_t)c->utf8_length);
    }
#if PY_VERSION_HEX < 0x030C0000
    /* The cached wchar_t form (PyUnicode_AsUnicode & co.), when it is not the data itself. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    wchar_t *wstr = ((PyASCIIObject *)obj)->wstr;
    if (wstr != NULL && (void *)wstr != PyUnicode_DATA(obj)) {
        Py_ssize_t wlen = PyUnicode_IS_COMPACT_ASCII(obj)
                              ? PyUnicode_GET_LENGTH(obj)
                              : ((PyCompactUnicodeObject *)obj)->wstr_length;
        explicit_bzero(wstr, (size_t)wlen * sizeof(wchar_t));
    }
#pragma GCC diagnostic pop
#endif
    ((PyASCIIObject *)obj)->hash = -1;
    Py_DECREF(obj); /* the last reference: freed, already zeroed */
}

static PyObject *
wipe_str_owned(PyObject *module, PyObject *box)
{
    (void)module;
    PyObject *obj = take_handed_over(box, &PyUnicode_Type, "wipe_str_owned");
    if (obj == NULL)
        return NULL;
    const char *why = str_not_ours(obj);
    if (why != NULL) {
        if (!PyUnicode_IS_COMPACT(obj)) { /* never passed off as a short shared value */
            Py_DECREF(obj);
            PyErr_Format(WipeRefused, "refusing to wipe: %s; it was not zeroed", why);
            return NULL;
        }
        return not_wiped(obj, why);
    }
    zero_str_and_release(obj);
    Py_RETURN_TRUE;
}

/* wipe_str_owned without the refusal: a str someone else holds is left as it is and False
 * returned, with no exception to raise and catch (what wiping a whole tree, whose keys are
 * mostly shared, spends most of its time on). */
static PyObject *
wipe_str_if_owned(PyObject *module, PyObject *box)
{
    (void)module;
    PyObject *obj = take_handed_over(box, &PyUnicode_Type, "wipe_str_if_owned");
    if (obj == NULL)
        return NULL;
    if (str_not_ours(obj) != NULL) {
        Py_DECREF(obj);
        Py_RETURN_FALSE;
    }
    zero_str_and_release(obj);
    Py_RETURN_TRUE;
}

/* ---- JSON string escaping straight into a buffer ---- */

/* Plain string bytes: printable ASCII other than '"' and '\\', each its own character. Long
 * texts are mostly runs of them; taking a run eight bytes at a time makes reading an 8 MiB
 * answer faster than json.loads instead of four times slower, and writing one too. */
static inline int
is_plain(unsigned char b)
{
    return b >= 0x20 && b < 0x80 && b != '"' && b != '\\';
}

/* Nonzero when the word holds a byte that is not plain (exact: no borrow can hide one). */
static inline uint64_t
word_stops(uint64_t x)
{
    const uint64_t ones = 0x0101010101010101ULL;
    uint64_t quote = x ^ (ones * '"'), slash = x ^ (ones * '\\');
    /* a high bit in any term marks a byte >= 0x80, < 0x20, '"' or '\\' */
    return (x | (x - ones * 0x20) | ((quote - ones) & ~quote) | ((slash - ones) & ~slash))
           & (ones * 0x80);
}

/* Length of the run of plain bytes at p (before end). */
static Py_ssize_t
plain_run(const unsigned char *p, const unsigned char *end)
{
    const unsigned char *q = p;
    while (end - q >= 8) {
        uint64_t x;
        memcpy(&x, q, 8);
        if (word_stops(x))
            break;
        q += 8;
    }
    while (q < end && is_plain(*q))
        q++;
    return q - p;
}

/* Copy the run of plain bytes at p (before end), at most `room` of them, into out, widened
 * to TYPE. Each byte is read once: what was checked is what is copied, even while another
 * thread rewrites the input (the empty asm keeps the compiler from reading it again). */
#define DEFINE_PLAIN_COPY(NAME, TYPE)                                                  \
    static Py_ssize_t                                                                  \
    NAME(const unsigned char *p, const unsigned char *end, TYPE *out, Py_ssize_t room)  \
    {                                                                                  \
        Py_ssize_t n = 0;                                                              \
        while (sizeof(TYPE) == 1 && end - (p + n) >= 8 && room - n >= 8) {             \
            uint64_t x;                                                                \
            memcpy(&x, p + n, 8);                                                      \
            __asm__("" : "+r"(x));                                                     \
            if (word_stops(x))                                                         \
                break;                                                                 \
            memcpy(out + n, &x, 8);                                                    \
            n += 8;                                                                    \
        }                                                                              \
        while (p + n < end && n < room) {                                              \
            unsigned char b = p[n];                                                    \
            __asm__("" : "+r"(b));                                                     \
            if (!is_plain(b))                                                          \
                break;                                                                 \
            out[n++] = (TYPE)b;                                                        \
        }                                                                              \
        return n;                                                                      \
    }
DEFINE_PLAIN_COPY(plain_copy_ucs1, Py_UCS1)
DEFINE_PLAIN_COPY(plain_copy_ucs2, Py_UCS2)
DEFINE_PLAIN_COPY(plain_copy_ucs4, Py_UCS4)
#undef DEFINE_PLAIN_COPY

/* Bytes each Latin-1 code point takes in the JSON form (UTF-8, escaped as json.dumps does
 * with ensure_ascii=False); 1 means "copy as is". */
static unsigned char latin1_json_len[256];

static void
init_tables(void)
{
    for (int c = 0; c < 256; c++)
        latin1_json_len[c] = c < 0x20 ? 6 : (c < 0x80 ? 1 : 2);
    latin1_json_len['"'] = latin1_json_len['\\'] = 2;
    latin1_json_len['\n'] = latin1_json_len['\r'] = latin1_json_len['\t'] = 2;
    latin1_json_len['\b'] = latin1_json_len['\f'] = 2;
}

/* Surrogate code points (lone, or a pair stored as two code points) have no UTF-8 form; the
 * fallback's str.encode refuses them, so this writer does too, with the same error
 * (nomyo/memory/secure_json.py words it for both), instead of writing \uXXXX escapes that
 * a reader would turn into another string (a pair) or that no UTF-8 text can hold. */
#define SURROGATES_REFUSED \
    "JSON strings must not contain surrogates (U+D800 to U+DFFF): they have no UTF-8 form"

static Py_ssize_t
escaped_char_len(Py_UCS4 c)
{
    if (c < 0x100)
        return latin1_json_len[c];
    if (c < 0x800)
        return 2;
    if (c >= 0xD800 && c <= 0xDFFF)
        return -1;
    if (c < 0x10000)
        return 3;
    return 4;
}

/* Length of the quoted UTF-8 form, or -1 with ValueError for a surrogate. */
static Py_ssize_t
quoted_len(PyObject *s)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(s), total = 2;
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    if (kind == PyUnicode_1BYTE_KIND) {
        const Py_UCS1 *p = data, *end = p + n;
        while (p < end) {
            Py_ssize_t run = plain_run(p, end);  /* plain bytes are the ones of length 1 */
            total += run;
            p += run;
            if (p < end)
                total += latin1_json_len[*p++];
        }
        return total;
    }
#define ADD_ESCAPED_LENGTHS(TYPE)                                             \
    do {                                                                      \
        const TYPE *p = data;                                                 \
        for (Py_ssize_t i = 0; i < n; i++) {                                  \
            Py_ssize_t len = escaped_char_len(p[i]);                          \
            if (len < 0)                                                      \
                goto surrogate;                                               \
            total += len;                                                     \
        }                                                                     \
    } while (0)
    if (kind == PyUnicode_2BYTE_KIND)
        ADD_ESCAPED_LENGTHS(Py_UCS2);
    else
        ADD_ESCAPED_LENGTHS(Py_UCS4);
#undef ADD_ESCAPED_LENGTHS
    return total;
surrogate:
    PyErr_SetString(PyExc_ValueError, SURROGATES_REFUSED);
    return -1;
}

static PyObject *
json_quote_len(PyObject *module, PyObject *s)
{
    (void)module;
    if (!PyUnicode_Check(s)) {
        PyErr_SetString(PyExc_TypeError, "json_quote_len needs a str");
        return NULL;
    }
    Py_ssize_t n = quoted_len(s);
    return n < 0 ? NULL : PyLong_FromSsize_t(n);
}

/* The UTF-8 form of c (never a surrogate: the callers refuse those). */
static unsigned char *
write_utf8(unsigned char *o, Py_UCS4 c)
{
    if (c < 0x80) {
        *o++ = (unsigned char)c;
    } else if (c < 0x800) {
        *o++ = (unsigned char)(0xC0 | (c >> 6));
        *o++ = (unsigned char)(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
        *o++ = (unsigned char)(0xE0 | (c >> 12));
        *o++ = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
        *o++ = (unsigned char)(0x80 | (c & 0x3F));
    } else {
        *o++ = (unsigned char)(0xF0 | (c >> 18));
        *o++ = (unsigned char)(0x80 | ((c >> 12) & 0x3F));
        *o++ = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
        *o++ = (unsigned char)(0x80 | (c & 0x3F));
    }
    return o;
}

static unsigned char *
write_escaped(unsigned char *o, Py_UCS4 c)
{
    static const char hex[] = "0123456789abcdef";
    switch (c) {
    case '"': *o++ = '\\'; *o++ = '"'; return o;
    case '\\': *o++ = '\\'; *o++ = '\\'; return o;
    case '\n': *o++ = '\\'; *o++ = 'n'; return o;
    case '\r': *o++ = '\\'; *o++ = 'r'; return o;
    case '\t': *o++ = '\\'; *o++ = 't'; return o;
    case '\b': *o++ = '\\'; *o++ = 'b'; return o;
    case '\f': *o++ = '\\'; *o++ = 'f'; return o;
    default: break;
    }
    if (c < 0x20) { /* surrogates never get here: quoted_len refused them */
        *o++ = '\\'; *o++ = 'u';
        *o++ = hex[(c >> 12) & 0xF]; *o++ = hex[(c >> 8) & 0xF];
        *o++ = hex[(c >> 4) & 0xF]; *o++ = hex[c & 0xF];
        return o;
    }
    return write_utf8(o, c);
}

/* Latin-1 strings (the common case): copy runs that need no escaping in one memcpy. */
static unsigned char *
write_latin1(unsigned char *o, const Py_UCS1 *p, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    while (i < n) {
        Py_ssize_t run = i + plain_run(p + i, p + n);
        memcpy(o, p + i, (size_t)(run - i));
        o += run - i;
        if (run < n)
            o = write_escaped(o, p[run++]);
        i = run;
    }
    return o;
}

/* json_quote_into(s, buffer, offset) -> new offset: writes "escaped s" as UTF-8. */
static PyObject *
json_quote_into(PyObject *module, PyObject *args)
{
    PyObject *s;
    Py_buffer out;
    Py_ssize_t offset;
    (void)module;
    if (!PyArg_ParseTuple(args, "Uw*n:json_quote_into", &s, &out, &offset))
        return NULL;
    Py_ssize_t need = quoted_len(s);
    if (need < 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    if (offset < 0 || offset > out.len || out.len - offset < need) {
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "json_quote_into: buffer too small");
        return NULL;
    }
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    unsigned char *o = (unsigned char *)out.buf + offset;
    *o++ = '"';
    if (kind == PyUnicode_1BYTE_KIND) {
        o = write_latin1(o, data, n);
    } else {
        for (Py_ssize_t i = 0; i < n; i++)
            o = write_escaped(o, PyUnicode_READ(kind, data, i));
    }
    *o++ = '"';
    Py_ssize_t end = o - (unsigned char *)out.buf;
    PyBuffer_Release(&out);
    return PyLong_FromSsize_t(end);
}

/* ---- exact UTF-8 decoding ---- */

/* Decode one strict UTF-8 sequence at p (< end); returns its length or 0 if invalid. */
static int
utf8_next(const unsigned char *p, const unsigned char *end, Py_UCS4 *cp)
{
    unsigned char b = p[0];
    int len;
    Py_UCS4 c, min;
    if (b < 0x80) { *cp = b; return 1; }
    else if ((b & 0xE0) == 0xC0) { len = 2; c = b & 0x1F; min = 0x80; }
    else if ((b & 0xF0) == 0xE0) { len = 3; c = b & 0x0F; min = 0x800; }
    else if ((b & 0xF8) == 0xF0) { len = 4; c = b & 0x07; min = 0x10000; }
    else return 0;
    if (end - p < len)
        return 0;
    for (int i = 1; i < len; i++) {
        if ((p[i] & 0xC0) != 0x80)
            return 0;
        c = (c << 6) | (p[i] & 0x3F);
    }
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
        return 0;
    *cp = c;
    return len;
}

/* Length of the leading pure-ASCII run, 8 bytes at a time. */
static Py_ssize_t
ascii_prefix(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        if (w & 0x8080808080808080ULL)
            break;
    }
    while (i < n && p[i] < 0x80)
        i++;
    return i;
}

/* The second pass: write the `count` characters the first pass found into the new str. The
 * buffer may be written meanwhile by code that does not hold the GIL (a base64 decode_into
 * of another thread), so every step is bounded by `end` and checked against what the first
 * pass saw (valid UTF-8, no character above maxchar, the same largest character, exactly
 * `end` reached); a difference sets *changed instead of reading past the buffer. */
#define DECODE_INTO(TYPE)                                                         \
    do {                                                                          \
        TYPE *dst = (TYPE *)PyUnicode_DATA(s);                                    \
        Py_UCS4 seen = 0;                                                         \
        for (Py_ssize_t i = 0; i < count; i++) {                                  \
            int k = p < end ? utf8_next(p, end, &c) : 0;                          \
            if (k == 0 || c > maxchar) {                                          \
                changed = 1;                                                      \
                break;                                                            \
            }                                                                     \
            if (c < 0x80 ? seen < 0x7F : c > seen)                                \
                seen = c < 0x80 ? 0x7F : c;                                       \
            dst[i] = (TYPE)c;                                                     \
            p += k;                                                               \
        }                                                                         \
        if (p != end || seen != maxchar)                                          \
            changed = 1;                                                          \
    } while (0)

static PyObject *
decode_utf8(PyObject *module, PyObject *arg)
{
    Py_buffer in;
    (void)module;
    if (PyObject_GetBuffer(arg, &in, PyBUF_SIMPLE) != 0)
        return NULL;
    const unsigned char *start = in.buf, *p = start, *end = start + in.len;
    Py_ssize_t count = 0;
    Py_UCS4 maxchar = 0, c;
    while (p < end) {
        Py_ssize_t run = ascii_prefix(p, end - p);
        if (run > 0) {
            maxchar = maxchar < 0x7F ? 0x7F : maxchar;
            count += run;
            p += run;
            continue;
        }
        int k = utf8_next(p, end, &c);
        if (k == 0) {
            Py_ssize_t pos = p - start;
            PyBuffer_Release(&in);
            PyErr_Format(PyExc_ValueError, "invalid UTF-8 at byte %zd", pos);
            return NULL;
        }
        if (c > maxchar)
            maxchar = c;
        count++;
        p += k;
    }
    PyObject *s = PyUnicode_New(count, maxchar);
    if (s == NULL) {
        PyBuffer_Release(&in);
        return NULL;
    }
    int changed = 0;
    p = start;
    if (maxchar < 0x80) {
        /* count == in.len here; the copy, not the buffer, is checked (it may change again) */
        memcpy(PyUnicode_DATA(s), start, (size_t)count);
        changed = ascii_prefix(PyUnicode_DATA(s), count) != count;
    } else if (maxchar < 0x100) {
        DECODE_INTO(Py_UCS1);
    } else if (maxchar < 0x10000) {
        DECODE_INTO(Py_UCS2);
    } else {
        DECODE_INTO(Py_UCS4);
    }
    PyBuffer_Release(&in);
    if (changed) {
        /* what was copied so far is part of the secret: zero it before the str is freed */
        explicit_bzero(PyUnicode_DATA(s), (size_t)count * PyUnicode_KIND(s));
        Py_DECREF(s);
        PyErr_SetString(PyExc_RuntimeError, "buffer changed while it was being decoded");
        return NULL;
    }
    return s;
}

/* ---- JSON reading ----
 *
 * json_loads parses a UTF-8 JSON document in a buffer the way json.loads does for what
 * nomyo accepts (strict: no control characters in strings, no NaN or infinities, duplicate
 * keys keep the last value at the first key's place), and builds each str once at its exact
 * size: a first pass over a string measures it, a second writes it, bounded and checked as
 * decode_utf8's. No intermediate text buffer exists; a number's text is copied to a stack
 * array for CPython's converters and zeroed after. The GIL is held throughout; the buffer
 * may still be written by GIL-free code of another thread, which the checks catch. On any
 * error the strings built so far are zeroed before they are freed. */

#define JSON_MAX_DEPTH 256     /* = secure_json.MAX_DEPTH: containers deeper are refused */
#define JSON_NUMBER_MAX 4400   /* longest number text (int() refuses > 4300 digits anyway) */

typedef struct {
    const unsigned char *start, *p, *end;
    int spans;  /* json_spans: string values become (start, end, size), see json_span */
} jreader;

/* Zero the strings of a partly built value that nothing else references, then drop it. */
static void
json_discard(PyObject *o)
{
    if (o == NULL)
        return;
    if (Py_REFCNT(o) == 1) {
        if (PyUnicode_CheckExact(o)) {
            explicit_bzero(PyUnicode_DATA(o),
                           (size_t)PyUnicode_GET_LENGTH(o) * PyUnicode_KIND(o));
        } else if (PyList_CheckExact(o)) {
            for (Py_ssize_t i = 0; i < PyList_GET_SIZE(o); i++) {
                PyObject *item = PyList_GET_ITEM(o, i);
                Py_INCREF(Py_None);
                PyList_SET_ITEM(o, i, Py_None);
                json_discard(item);
            }
        } else if (PyDict_CheckExact(o)) {
            PyObject *items = PyDict_Items(o);
            PyDict_Clear(o);  /* the items list now holds the only references */
            json_discard(items);
            if (items != NULL) {
                Py_DECREF(o);
                return;
            }
        } else if (PyTuple_CheckExact(o)) {  /* the dict's (key, value) pairs */
            for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(o); i++) {
                PyObject *item = PyTuple_GET_ITEM(o, i);
                Py_INCREF(Py_None);
                PyTuple_SET_ITEM(o, i, Py_None);
                json_discard(item);
            }
        }
    }
    Py_DECREF(o);
}

static PyObject *
json_error(const jreader *r, PyObject *type, const char *what)
{
    if (!PyErr_Occurred())
        PyErr_Format(type, "%s at byte %zd", what, r->p - r->start);
    return NULL;
}

static void
json_skip_ws(jreader *r)
{
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
        r->p++;
}

static int
hex4(const unsigned char *p, const unsigned char *end, Py_UCS4 *out)
{
    Py_UCS4 c = 0;
    if (end - p < 4)
        return 0;
    for (int i = 0; i < 4; i++) {
        unsigned char d = p[i];
        c <<= 4;
        if (d >= '0' && d <= '9') c |= (Py_UCS4)(d - '0');
        else if (d >= 'a' && d <= 'f') c |= (Py_UCS4)(d - 'a' + 10);
        else if (d >= 'A' && d <= 'F') c |= (Py_UCS4)(d - 'A' + 10);
        else return 0;
    }
    *out = c;
    return 1;
}


/* One character of a string body at *pp: 1 and the character, 0 at the closing quote (which
 * *pp then follows), -1 with a static message in *what. An escaped high surrogate followed by
 * an escaped low one is joined, a lone one kept, as json.loads does. */
static int
json_str_next(const unsigned char **pp, const unsigned char *end, Py_UCS4 *c, const char **what)
{
    const unsigned char *p = *pp;
    if (p >= end) {
        *what = "Unterminated string";
        return -1;
    }
    unsigned char b = *p;
    if (b == '"') {
        *pp = p + 1;
        return 0;
    }
    if (b < 0x20) {
        *what = "Invalid control character in string";
        return -1;
    }
    if (b >= 0x80) {
        int k = utf8_next(p, end, c);
        if (k == 0) {
            *what = "invalid UTF-8 in string";
            return -1;
        }
        *pp = p + k;
        return 1;
    }
    if (b != '\\') {
        *c = b;
        *pp = p + 1;
        return 1;
    }
    if (end - p < 2) {
        *what = "Unterminated string";
        return -1;
    }
    switch (p[1]) {
    case '"': *c = '"'; break;
    case '\\': *c = '\\'; break;
    case '/': *c = '/'; break;
    case 'b': *c = '\b'; break;
    case 'f': *c = '\f'; break;
    case 'n': *c = '\n'; break;
    case 'r': *c = '\r'; break;
    case 't': *c = '\t'; break;
    case 'u': {
        Py_UCS4 lo;
        if (!hex4(p + 2, end, c)) {
            *what = "Invalid \\uXXXX escape";
            return -1;
        }
        p += 6;
        if (*c >= 0xD800 && *c <= 0xDBFF && end - p >= 6 && p[0] == '\\' && p[1] == 'u') {
            if (!hex4(p + 2, end, &lo)) {
                *what = "Invalid \\uXXXX escape";
                return -1;
            }
            if (lo >= 0xDC00 && lo <= 0xDFFF) {
                *c = 0x10000 + ((*c - 0xD800) << 10) + (lo - 0xDC00);
                p += 6;
            }
        }
        *pp = p;
        return 1;
    }
    default:
        *what = "Invalid \\escape";
        return -1;
    }
    *pp = p + 2;
    return 1;
}

/* The second pass: a plain run counts as PLAIN_MAX in `seen`, as in the first pass. */
#define JSON_STR_INTO(TYPE, COPY)                                                 \
    do {                                                                          \
        TYPE *dst = (TYPE *)PyUnicode_DATA(s);                                    \
        for (Py_ssize_t i = 0;; i++) {                                            \
            Py_ssize_t run = COPY(q, r->end, dst + i, count - i);                 \
            if (run > 0) {                                                        \
                i += run;                                                         \
                q += run;                                                         \
                if (seen < PLAIN_MAX)                                             \
                    seen = PLAIN_MAX;                                             \
            }                                                                     \
            int k = json_str_next(&q, r->end, &c, &what);                         \
            if (k == 0 && i == count)                                             \
                break;                                                            \
            if (k != 1 || i >= count || c > maxchar) {                            \
                changed = 1;                                                      \
                break;                                                            \
            }                                                                     \
            if (c > seen)                                                         \
                seen = c;                                                         \
            dst[i] = (TYPE)c;                                                     \
        }                                                                         \
    } while (0)

/* What a plain run adds to a string's largest character: any ASCII value makes the same
 * (ASCII) str, so the passes need not find the run's exact maximum, only agree on it. */
#define PLAIN_MAX 0x7F

/* The string whose opening quote is at r->p. */
static PyObject *
json_string(jreader *r)
{
    const unsigned char *body = r->p + 1, *q = body;
    const char *what = NULL;
    Py_ssize_t count = 0;
    Py_UCS4 maxchar = 0, c = 0, seen = 0;
    int k;
    for (;;) {
        Py_ssize_t run = plain_run(q, r->end);
        if (run > 0) {
            count += run;
            q += run;
            if (maxchar < PLAIN_MAX)
                maxchar = PLAIN_MAX;
        }
        if ((k = json_str_next(&q, r->end, &c, &what)) != 1)
            break;
        count++;
        if (c > maxchar)
            maxchar = c;
    }
    if (k < 0) {
        r->p = q;
        return json_error(r, PyExc_ValueError, what);
    }
    const unsigned char *after = q;
    PyObject *s = PyUnicode_New(count, maxchar);
    if (s == NULL)
        return NULL;
    int changed = 0;
    q = body;
    switch (PyUnicode_KIND(s)) {
    case PyUnicode_1BYTE_KIND: JSON_STR_INTO(Py_UCS1, plain_copy_ucs1); break;
    case PyUnicode_2BYTE_KIND: JSON_STR_INTO(Py_UCS2, plain_copy_ucs2); break;
    default: JSON_STR_INTO(Py_UCS4, plain_copy_ucs4); break;
    }
    /* the kind PyUnicode_New chose must be the canonical one: the same largest character */
    if (changed || q != after || seen != maxchar) {
        json_discard(s);
        PyErr_SetString(PyExc_RuntimeError, "buffer changed while it was being decoded");
        return NULL;
    }
    r->p = after;
    return s;
}

/* json_spans mode: the string value whose opening quote is at r->p, as (start, end, size):
 * the byte offsets of its body between the quotes, and the UTF-8 length of its text once
 * unescaped (a lone surrogate counted as its 3-byte form; json_unescape_into refuses it).
 * No str is built: the text stays where it is, in the caller's buffer. */
static PyObject *
json_span(jreader *r)
{
    const unsigned char *body = r->p + 1, *q = body;
    const char *what = NULL;
    Py_ssize_t size = 0;
    Py_UCS4 c = 0;
    int k;
    for (;;) {
        Py_ssize_t run = plain_run(q, r->end);
        size += run;
        q += run;
        if ((k = json_str_next(&q, r->end, &c, &what)) != 1)
            break;
        size += c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
    }
    r->p = q;
    if (k < 0)
        return json_error(r, PyExc_ValueError, what);
    return Py_BuildValue("(nnn)", body - r->start, q - 1 - r->start, size);
}

static PyObject *
json_number(jreader *r)
{
    const unsigned char *p = r->p, *end = r->end, *first = r->p;
    int is_float = 0;
    if (p < end && *p == '-')
        p++;
    if (p >= end || *p < '0' || *p > '9')
        return json_error(r, PyExc_ValueError, "Expecting value");
    if (*p == '0')
        p++;
    else
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    if (end - p >= 2 && p[0] == '.' && p[1] >= '0' && p[1] <= '9') {
        is_float = 1;
        p += 2;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        const unsigned char *e = p + 1;
        if (e < end && (*e == '+' || *e == '-'))
            e++;
        if (e < end && *e >= '0' && *e <= '9') {
            is_float = 1;
            while (e < end && *e >= '0' && *e <= '9')
                e++;
            p = e;
        }
    }
    Py_ssize_t len = p - first;
    if (!is_float && len <= 18) {  /* fits an int64 with its sign */
        int neg = *first == '-';
        long long v = 0;
        for (const unsigned char *d = first + neg; d < p; d++)
            v = v * 10 + (*d - '0');
        r->p = p;
        return PyLong_FromLongLong(neg ? -v : v);
    }
    if (len > JSON_NUMBER_MAX)
        return json_error(r, PyExc_OverflowError, "number out of range (too many digits)");
    char text[JSON_NUMBER_MAX + 1];
    memcpy(text, first, (size_t)len);
    text[len] = '\0';
    PyObject *result = NULL;
    if (is_float) {
        double d = PyOS_string_to_double(text, NULL, NULL);
        if (!(d == -1.0 && PyErr_Occurred())) {
            if (Py_IS_INFINITY(d))
                json_error(r, PyExc_OverflowError, "number out of range");
            else
                result = PyFloat_FromDouble(d);
        }
    } else {
        result = PyLong_FromString(text, NULL, 10);
    }
    explicit_bzero(text, (size_t)len);
    r->p = p;
    return result;
}

static int
json_literal(jreader *r, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(r->end - r->p) >= n && memcmp(r->p, word, n) == 0) {
        r->p += n;
        return 1;
    }
    return 0;
}

static PyObject *json_value(jreader *r, int depth);

static PyObject *
json_container(jreader *r, int depth)
{
    int is_object = *r->p == '{';
    unsigned char close = is_object ? '}' : ']';
    if (depth > JSON_MAX_DEPTH)
        return json_error(r, PyExc_RecursionError, "nested too deeply");
    PyObject *out = is_object ? PyDict_New() : PyList_New(0);
    if (out == NULL)
        return NULL;
    r->p++;
    json_skip_ws(r);
    if (r->p < r->end && *r->p == close) {
        r->p++;
        return out;
    }
    for (;;) {
        PyObject *key = NULL, *item;
        if (is_object) {
            if (r->p >= r->end || *r->p != '"') {
                json_error(r, PyExc_ValueError,
                           "Expecting property name enclosed in double quotes");
                goto fail;
            }
            key = json_string(r);
            if (key == NULL)
                goto fail;
            json_skip_ws(r);
            if (r->p >= r->end || *r->p != ':') {
                json_error(r, PyExc_ValueError, "Expecting ':' delimiter");
                json_discard(key);
                goto fail;
            }
            r->p++;
        }
        item = json_value(r, depth + 1);
        if (item == NULL) {
            json_discard(key);
            goto fail;
        }
        int rc;
        if (is_object) {
            /* a duplicate key: the last value wins (as json.loads), the earlier is zeroed */
            PyObject *old = PyDict_GetItemWithError(out, key);
            Py_XINCREF(old);
            rc = old == NULL && PyErr_Occurred() ? -1 : PyDict_SetItem(out, key, item);
            json_discard(old);
        } else {
            rc = PyList_Append(out, item);
        }
        json_discard(key);   /* zeroed only if the dict kept an equal earlier key instead */
        json_discard(item);  /* the container's reference remains */
        if (rc != 0)
            goto fail;
        json_skip_ws(r);
        if (r->p < r->end && *r->p == ',') {
            r->p++;
            json_skip_ws(r);
            continue;
        }
        if (r->p < r->end && *r->p == close) {
            r->p++;
            return out;
        }
        json_error(r, PyExc_ValueError, "Expecting ',' delimiter");
        goto fail;
    }
fail:
    json_discard(out);
    return NULL;
}

static PyObject *
json_value(jreader *r, int depth)
{
    json_skip_ws(r);
    if (r->p >= r->end)
        return json_error(r, PyExc_ValueError, "Expecting value");
    const unsigned char *at = r->p;
    switch (*r->p) {
    case '{':
    case '[':
        return json_container(r, depth);
    case '"':
        return r->spans ? json_span(r) : json_string(r);
    case 't':
        if (json_literal(r, "true"))
            Py_RETURN_TRUE;
        break;
    case 'f':
        if (json_literal(r, "false"))
            Py_RETURN_FALSE;
        break;
    case 'n':
        if (json_literal(r, "null"))
            Py_RETURN_NONE;
        break;
    case 'N':
    case 'I':
    case '-':
        if (json_literal(r, "NaN") || json_literal(r, "Infinity")
            || json_literal(r, "-Infinity")) {
            r->p = at;
            return json_error(r, PyExc_ValueError, "NaN and infinity are not valid JSON");
        }
        return json_number(r);
    default:
        return json_number(r);
    }
    return json_error(r, PyExc_ValueError, "Expecting value");
}

static PyObject *
json_parse(PyObject *arg, int spans)
{
    Py_buffer in;
    if (PyObject_GetBuffer(arg, &in, PyBUF_SIMPLE) != 0)
        return NULL;
    jreader r = {in.buf, in.buf, (const unsigned char *)in.buf + in.len, spans};
    PyObject *value = json_value(&r, 0);
    if (value != NULL) {
        json_skip_ws(&r);
        if (r.p != r.end) {
            json_discard(value);
            value = json_error(&r, PyExc_ValueError, "Extra data");
        }
    }
    PyBuffer_Release(&in);
    return value;
}

/* json_loads(buffer): the document's value. ValueError for malformed JSON, OverflowError
 * for a number out of range, RecursionError for nesting beyond JSON_MAX_DEPTH, RuntimeError
 * when the buffer changed under the parse; no message quotes the document. */
static PyObject *
json_loads(PyObject *module, PyObject *arg)
{
    (void)module;
    return json_parse(arg, 0);
}

/* json_spans(buffer): json_loads's value with every string value (not the object keys) as
 * a (start, end, size) tuple, see json_span; the same checks and errors. */
static PyObject *
json_spans(PyObject *module, PyObject *arg)
{
    (void)module;
    return json_parse(arg, 1);
}

/* json_unescape_into(buffer, start, end, out) -> bytes written: the UTF-8 text of the JSON
 * string body at buffer[start:end] (a span of json_spans), unescaped, written to the start
 * of out. ValueError for a span that is not a string body, for an out too small, and
 * (SURROGATES_REFUSED) for a lone surrogate escape, which has no UTF-8 form; RuntimeError
 * when the buffer changed since it was parsed. On any error what was written is zeroed. */
static PyObject *
json_unescape_into(PyObject *module, PyObject *args)
{
    Py_buffer in, out;
    Py_ssize_t start, end;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*nnw*:json_unescape_into", &in, &start, &end, &out))
        return NULL;
    const unsigned char *base = in.buf;
    unsigned char *o = out.buf, *o_end = o + out.len;
    const char *what = NULL, *error = NULL;
    PyObject *type = PyExc_ValueError;
    if (start < 1 || end < start || end >= in.len || base[start - 1] != '"') {
        error = "json_unescape_into: not a string span of this buffer";
    } else {
        const unsigned char *q = base + start;
        Py_UCS4 c = 0;
        int k = 0;
        for (;;) {
            Py_ssize_t run = plain_copy_ucs1(q, base + in.len, o, o_end - o);
            o += run;
            q += run;
            if ((k = json_str_next(&q, base + in.len, &c, &what)) != 1)
                break;
            Py_ssize_t n = c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
            if (c >= 0xD800 && c <= 0xDFFF) {
                error = SURROGATES_REFUSED;
                break;
            }
            if (o_end - o < n) {
                error = "json_unescape_into: buffer too small";
                break;
            }
            o = write_utf8(o, c);
        }
        if (error == NULL && (k < 0 || q != base + end + 1)) {
            type = PyExc_RuntimeError;
            error = "buffer changed since it was parsed";
        }
    }
    Py_ssize_t written = o - (unsigned char *)out.buf;
    if (error != NULL)
        explicit_bzero(out.buf, (size_t)written);
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    if (error != NULL) {
        PyErr_SetString(type, error);
        return NULL;
    }
    return PyLong_FromSsize_t(written);
}

static PyMethodDef module_methods[] = {
    {"wipe_bytes_owned", wipe_bytes_owned, METH_O,
     "Take the bytes out of a one-element list and zero it if that was its only reference."},
    {"wipe_str_owned", wipe_str_owned, METH_O,
     "Take the str out of a one-element list and zero it if that was its only reference."},
    {"wipe_str_if_owned", wipe_str_if_owned, METH_O,
     "wipe_str_owned returning False instead of refusing a str held elsewhere."},
    {"json_quote_len", json_quote_len, METH_O, "Length of the JSON string form, UTF-8."},
    {"json_quote_into", json_quote_into, METH_VARARGS, "Write the JSON string form into a buffer."},
    {"decode_utf8", decode_utf8, METH_O, "Strict UTF-8 to str in one exact allocation."},
    {"json_loads", json_loads, METH_O, "Parse JSON from a buffer, each str built once."},
    {"json_spans", json_spans, METH_O, "Parse JSON, string values as (start, end, size)."},
    {"json_unescape_into", json_unescape_into, METH_VARARGS,
     "Write a string span's unescaped UTF-8 text into a buffer."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "nomyo._pyobjects",
    "CPython-object helpers of nomyo's secure memory.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__pyobjects(void)
{
    init_tables();
    if (WipeRefused == NULL) {
        PyObject *errors = PyImport_ImportModule("nomyo.errors");
        if (errors == NULL)
            return NULL;
        WipeRefused = PyObject_GetAttrString(errors, "WipeRefusedError");
        Py_DECREF(errors);
        if (WipeRefused == NULL)
            return NULL;
    }
    if (PyType_Ready(&RegionType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    if (PyModule_AddStringConstant(m, "BUILD_VERSION", NOMYO_BUILD_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&RegionType);
    if (PyModule_AddObject(m, "Region", (PyObject *)&RegionType) < 0) {
        Py_DECREF(&RegionType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
