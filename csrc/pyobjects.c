/* nomyo._pyobjects: the few things that need CPython's own object structures.
 *
 * - Region: the base type of SecureBuffer. It exports a fixed memory region through the
 *   buffer protocol (Python 3.11 cannot define that in Python), counts live exports so the
 *   region is never unmapped under a view, refuses exports once closed or after fork, and
 *   asks its Python class to wipe and release it when the last view of a closed one goes.
 * - wipe_bytes_owned / wipe_str_owned: zero an immutable object that a third-party API
 *   forced on us, handed over in a one-element list, only when that was its one reference.
 * - json_quote_len / json_quote_into: JSON-escape a str straight into a secure buffer.
 * - decode_utf8: build a str from UTF-8 in a secure buffer in one exact allocation, so no
 *   partial copy is left behind in freed memory by a growing decoder.
 * Memory management itself is in secmem.c (cffi); nothing here allocates secret memory.
 */
#define PY_SSIZE_T_CLEAN
#ifndef NOMYO_BUILD_VERSION
#error "NOMYO_BUILD_VERSION is set by the build from nomyo/_version.py (csrc/build_secmem.py)"
#endif
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    PyObject_HEAD
    unsigned char *ptr;
    Py_ssize_t size;
    Py_ssize_t exports;
    int closed;
    pid_t pid;
} RegionObject;

static PyObject *
Region_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    unsigned long long address;
    Py_ssize_t size;
    (void)kwds;
    if (!PyArg_ParseTuple(args, "Kn:Region", &address, &size))
        return NULL;
    if (address == 0 || size <= 0) {
        PyErr_SetString(PyExc_ValueError, "Region needs a non-null address and a positive size");
        return NULL;
    }
    RegionObject *self = (RegionObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->ptr = (unsigned char *)(uintptr_t)address;
    self->size = size;
    self->pid = getpid();
    return (PyObject *)self;
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

/* close() ran while a view was alive, and the last one is now gone. What was written through
 * it after the wipe (a base64 decode_into of another thread, without the GIL) is still in the
 * region: the Python class (_last_view_released) wipes it again and releases the memory, as
 * only it knows whether that memory is still mapped (a garbage cycle may have unmapped it).
 * This runs inside PyBuffer_Release, often on an error path: a pending exception is kept
 * aside, and one raised here is reported as unraisable. */
static void
Region_last_export_gone(RegionObject *self)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *pending = PyErr_GetRaisedException();
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
#endif
    PyObject *result = PyObject_CallMethod((PyObject *)self, "_last_view_released", NULL);
    if (result == NULL)
        PyErr_WriteUnraisable((PyObject *)self);
    Py_XDECREF(result);
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(pending);
#else
    PyErr_Restore(type, value, traceback);
#endif
}

static void
Region_releasebuffer(RegionObject *self, Py_buffer *view)
{
    (void)view;
    if (--self->exports == 0 && self->closed)
        Region_last_export_gone(self);
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

/* Zero a closed region again; only for a subclass that knows its memory is still mapped. */
static PyObject *
Region_wipe_closed(RegionObject *self, PyObject *unused)
{
    (void)unused;
    if (!self->closed || self->pid != getpid()) {
        PyErr_SetString(PyExc_ValueError, "_wipe_closed needs a closed region of this process");
        return NULL;
    }
    explicit_bzero(self->ptr, (size_t)self->size);
    Py_RETURN_NONE;
}

/* The default when the last view of a closed region goes: nothing (subclasses release). */
static PyObject *
Region_last_view_released(RegionObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    Py_RETURN_NONE;
}

/* Wipe and mark closed in one step under the GIL. Returns the number of live exports
 * (the caller unmaps only when it is 0), or -1 when it was already closed. */
static PyObject *
Region_detach(RegionObject *self, PyObject *unused)
{
    (void)unused;
    if (self->closed)
        return PyLong_FromLong(-1);
    if (self->pid == getpid())
        explicit_bzero(self->ptr, (size_t)self->size);
    self->closed = 1;
    return PyLong_FromSsize_t(self->exports);
}

/* Point the region at new data after secmem moved it (nm_region_refit); refused while any
 * view of the old placement is alive, so no view ever outlives what it looked at. */
static PyObject *
Region_refit(RegionObject *self, PyObject *args)
{
    unsigned long long address;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "Kn:_refit", &address, &size))
        return NULL;
    if (!Region_usable(self))
        return NULL;
    if (address == 0 || size <= 0) {
        PyErr_SetString(PyExc_ValueError, "Region needs a non-null address and a positive size");
        return NULL;
    }
    if (self->exports > 0) {
        PyErr_SetString(PyExc_BufferError, "cannot refit a secure buffer while views of it exist");
        return NULL;
    }
    self->ptr = (unsigned char *)(uintptr_t)address;
    self->size = size;
    Py_RETURN_NONE;
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
    {"_detach", (PyCFunction)Region_detach, METH_NOARGS,
     "Wipe and close; return live exports, or -1 if already closed."},
    {"_refit", (PyCFunction)Region_refit, METH_VARARGS,
     "Point at data moved by nm_region_refit (no live views allowed)."},
    {"_wipe_closed", (PyCFunction)Region_wipe_closed, METH_NOARGS,
     "Zero a closed region again (its memory must still be mapped)."},
    {"_last_view_released", (PyCFunction)Region_last_view_released, METH_NOARGS,
     "Called when the last view of a closed region is released; subclasses release it."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Region_getset[] = {
    {"closed", (getter)Region_get_closed, NULL, "True once closed.", NULL},
    {"_exports", (getter)Region_get_exports, NULL, "Live buffer exports.", NULL},
    {"_foreign", (getter)Region_get_foreign, NULL, "True in a forked child.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RegionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nomyo._pyobjects.Region",
    .tp_basicsize = sizeof(RegionObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "A memory region exported through the buffer protocol (SecureBuffer's base).",
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

static PyObject *
wipe_str_owned(PyObject *module, PyObject *box)
{
    (void)module;
    PyObject *obj = take_handed_over(box, &PyUnicode_Type, "wipe_str_owned");
    if (obj == NULL)
        return NULL;
    if (!PyUnicode_IS_COMPACT(obj)) { /* only the deprecated Py_UNICODE APIs make these */
        Py_DECREF(obj);
        PyErr_SetString(WipeRefused, "refusing to wipe a legacy (non-compact) str; "
                                     "it was not zeroed");
        return NULL;
    }
    /* Before 3.12 the intern table's references are not counted: an interned str can
     * show a count of 1, so interning is checked on its own. */
    if (Py_REFCNT(obj) != 1 || PyUnicode_CHECK_INTERNED(obj))
        return not_wiped(obj, PyUnicode_CHECK_INTERNED(obj)
                                  ? "the str is interned (shared by identity)"
                                  : "the str is still referenced elsewhere");
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
    Py_RETURN_TRUE;
}

/* ---- JSON string escaping straight into a buffer ---- */

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
        const Py_UCS1 *p = data;
        for (Py_ssize_t i = 0; i < n; i++)
            total += latin1_json_len[p[i]];
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
    } else if (c < 0x80) {
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

/* Latin-1 strings (the common case): copy runs that need no escaping in one memcpy. */
static unsigned char *
write_latin1(unsigned char *o, const Py_UCS1 *p, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    while (i < n) {
        Py_ssize_t run = i;
        while (run < n && latin1_json_len[p[run]] == 1)
            run++;
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

static PyMethodDef module_methods[] = {
    {"wipe_bytes_owned", wipe_bytes_owned, METH_O,
     "Take the bytes out of a one-element list and zero it if that was its only reference."},
    {"wipe_str_owned", wipe_str_owned, METH_O,
     "Take the str out of a one-element list and zero it if that was its only reference."},
    {"json_quote_len", json_quote_len, METH_O, "Length of the JSON string form, UTF-8."},
    {"json_quote_into", json_quote_into, METH_VARARGS, "Write the JSON string form into a buffer."},
    {"decode_utf8", decode_utf8, METH_O, "Strict UTF-8 to str in one exact allocation."},
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
