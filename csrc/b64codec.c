/* nomyo._b64: strict standard base64 for protocol packages (alphabet A-Za-z0-9+/, '=' padding,
 * no line breaks), several times faster than binascii.
 *
 * - encode: 12 bits -> 2 characters through a 4096-entry table of character pairs.
 * - decode: 2 characters -> 12 bits through a 65536-entry table; a pair with a character outside
 *   the alphabet maps to a flag bit that is OR-ed into an accumulator, so the hot loop has no
 *   branch per character. The text is an ASCII str (read in place) or a buffer.
 * - Acceptance is exactly that of CPython 3.11's base64.b64decode(text, validate=True): only
 *   alphabet characters followed by a run of '='; the data characters are not 1 more than a
 *   multiple of 4; 2 left over need exactly "==", 3 left over exactly "=", and after a complete
 *   last group any number of '=' is accepted (3.11 ignores them). Unused low bits of the last
 *   character need not be zero.
 * - decode_into decodes straight into the caller's buffer in the one pass that validates, as
 *   a separate validation pass would cost more than half the decoding. Offset, padding, length
 *   and size errors are found before anything is written; a character outside the alphabet is
 *   found while decoding, and then the range written so far is zeroed before ValueError is
 *   raised. Either way no decoded byte is left behind and nothing outside the range is touched.
 * - Large inputs are processed without the GIL: the input is pinned by its Py_buffer export (or
 *   is an immutable str held by the caller), and the output is a new bytes object nobody else
 *   sees yet or the caller's buffer, pinned by its export.
 * Error messages name the problem and a position, never the text itself.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#ifndef NOMYO_BUILD_VERSION
#error "NOMYO_BUILD_VERSION is set by the build from nomyo/_version.py (csrc/build_secmem.py)"
#endif
#define NOGIL_THRESHOLD (64 * 1024)  /* below this, releasing the GIL costs more than it saves */
/* Run `stmt` (which touches no Python object) without the GIL when `n` bytes make it worth it. */
#define WITHOUT_GIL_IF_LARGE(n, stmt)                                                      \
    do {                                                                                   \
        if ((n) < NOGIL_THRESHOLD) {                                                       \
            stmt;                                                                          \
        } else {                                                                           \
            Py_BEGIN_ALLOW_THREADS                                                         \
            stmt;                                                                          \
            Py_END_ALLOW_THREADS                                                           \
        }                                                                                  \
    } while (0)
#define BAD 0x8000u                  /* flag in the decode tables: not alphabet characters */

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define TO_BIG_ENDIAN64(v) __builtin_bswap64(v)
#elif defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define TO_BIG_ENDIAN64(v) (v)
#else
#error "unknown byte order"
#endif

static const char ALPHABET[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static char enc_pairs[4096][2];    /* 12 bits -> their two characters */
static uint16_t dec_char[256];     /* character -> its 6-bit value, or BAD */
static uint16_t dec_pair[65536];   /* two characters as one uint16 read from memory -> 12 bits */

static void
init_tables(void)
{
    for (int i = 0; i < 4096; i++) {
        enc_pairs[i][0] = ALPHABET[i >> 6];
        enc_pairs[i][1] = ALPHABET[i & 63];
    }
    for (int c = 0; c < 256; c++)
        dec_char[c] = BAD;
    for (uint16_t v = 0; v < 64; v++)
        dec_char[(unsigned char)ALPHABET[v]] = v;
    for (int a = 0; a < 256; a++) {
        for (int b = 0; b < 256; b++) {
            unsigned char pair[2] = {(unsigned char)a, (unsigned char)b};
            uint16_t index;
            memcpy(&index, pair, 2);  /* the index decode_block will compute, in host order */
            dec_pair[index] = ((dec_char[a] | dec_char[b]) & BAD)
                              ? BAD : (uint16_t)(dec_char[a] << 6 | dec_char[b]);
        }
    }
}

static inline uint64_t
load_be64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return TO_BIG_ENDIAN64(v);
}

static inline void
store_be64(unsigned char *p, uint64_t v)
{
    v = TO_BIG_ENDIAN64(v);
    memcpy(p, &v, 8);
}

/* ---- encoding ---- */

static inline void
encode_group(const unsigned char *in, char *out)
{
    uint32_t w = (uint32_t)in[0] << 16 | (uint32_t)in[1] << 8 | in[2];
    memcpy(out, enc_pairs[w >> 12], 2);
    memcpy(out + 2, enc_pairs[w & 0xfff], 2);
}

/* Six bytes, the top 48 bits of v, into eight characters. */
static inline void
encode_six(uint64_t v, char *out)
{
    memcpy(out, enc_pairs[v >> 52], 2);
    memcpy(out + 2, enc_pairs[(v >> 40) & 0xfff], 2);
    memcpy(out + 4, enc_pairs[(v >> 28) & 0xfff], 2);
    memcpy(out + 6, enc_pairs[(v >> 16) & 0xfff], 2);
}

/* Encode n bytes into 4 * ceil(n / 3) characters. Touches no Python object. The main loop
 * reads 8 bytes to use 6, so it stops while 2 spare input bytes remain. */
static void
encode_block(const unsigned char *in, Py_ssize_t n, char *out)
{
    Py_ssize_t i = 0;
    for (; i + 14 <= n; i += 12, out += 16) {
        encode_six(load_be64(in + i), out);
        encode_six(load_be64(in + i + 6), out + 8);
    }
    for (; i + 3 <= n; i += 3, out += 4)
        encode_group(in + i, out);
    if (n - i == 0)
        return;
    uint32_t w = (uint32_t)in[i] << 16 | (n - i == 2 ? (uint32_t)in[i + 1] << 8 : 0);
    memcpy(out, enc_pairs[w >> 12], 2);
    out[2] = n - i == 2 ? enc_pairs[w & 0xfff][0] : '=';
    out[3] = '=';
}

/* ---- decoding ---- */

static inline uint32_t
pair_at(const unsigned char *s)
{
    uint16_t index;
    memcpy(&index, s, 2);
    return dec_pair[index];
}

/* Decode d data characters (no padding, d % 4 != 1) into d / 4 * 3 + max(d % 4 - 1, 0) bytes,
 * writing nothing beyond them. Returns 0, or -1 if a character is outside the alphabet (the
 * output is then garbage). The main loop turns 8 characters into 6 bytes with one 8-byte
 * store, so it stops while the output has room for the 2 bytes the next store overwrites. */
static int
decode_block(const unsigned char *s, Py_ssize_t d, unsigned char *out)
{
    uint32_t bad = 0;
    Py_ssize_t quads = d / 4, q = 0;
    for (; q + 3 <= quads; q += 2, s += 8, out += 6) {
        uint64_t e0 = pair_at(s), e1 = pair_at(s + 2), e2 = pair_at(s + 4), e3 = pair_at(s + 6);
        bad |= (uint32_t)(e0 | e1 | e2 | e3);
        store_be64(out, e0 << 52 | e1 << 40 | e2 << 28 | e3 << 16);
    }
    for (; q < quads; q++, s += 4, out += 3) {
        uint32_t e0 = pair_at(s), e1 = pair_at(s + 2);
        bad |= e0 | e1;
        uint32_t w = e0 << 12 | e1;
        out[0] = (unsigned char)(w >> 16);
        out[1] = (unsigned char)(w >> 8);
        out[2] = (unsigned char)w;
    }
    if (d % 4 == 2) {
        uint32_t e0 = pair_at(s);
        bad |= e0;
        out[0] = (unsigned char)(e0 >> 4);
    } else if (d % 4 == 3) {
        uint32_t e0 = pair_at(s), e1 = dec_char[s[2]];
        bad |= e0 | e1;
        uint32_t w = e0 << 6 | e1;
        out[0] = (unsigned char)(w >> 10);
        out[1] = (unsigned char)(w >> 2);
    }
    return (bad & BAD) ? -1 : 0;
}

static inline unsigned char
outside_alphabet(unsigned char c)
{
    return ((unsigned char)(c - 'A') >= 26) & ((unsigned char)(c - 'a') >= 26)
           & ((unsigned char)(c - '0') >= 10) & (c != '+') & (c != '/');
}

/* Check that the first d characters are all in the alphabet, without writing anything. Range
 * tests over fixed blocks of 64, which compilers vectorize: a fraction of the decoding cost. */
static int
check_alphabet(const unsigned char *s, Py_ssize_t d)
{
    unsigned char bad = 0;
    Py_ssize_t i = 0;
    for (; i + 64 <= d; i += 64)
        for (int j = 0; j < 64; j++)
            bad |= outside_alphabet(s[i + j]);
    for (; i < d; i++)
        bad |= outside_alphabet(s[i]);
    return bad ? -1 : 0;
}

/* The padding and length rules, read from the trailing run of '='. Sets *data (characters
 * before the run) and *decoded (output length); returns -1 when the layout is invalid. Whether
 * the data characters are all in the alphabet is checked separately. */
static int
layout(const unsigned char *s, Py_ssize_t n, Py_ssize_t *data, Py_ssize_t *decoded)
{
    Py_ssize_t d = n;
    while (d > 0 && s[d - 1] == '=')
        d--;
    Py_ssize_t pads = n - d, left = d % 4;
    if (n > 0 && d == 0)
        return -1;
    if (left == 1 || (left == 2 && pads != 2) || (left == 3 && pads != 1))
        return -1;
    *data = d;
    *decoded = d / 4 * 3 + (left ? left - 1 : 0);
    return 0;
}

static int
in_alphabet(Py_UCS4 c)
{
    return c < 256 && !(dec_char[c] & BAD);
}

/* Raise the ValueError for an invalid text (kind/data as PyUnicode_KIND/PyUnicode_DATA; bytes
 * are kind 1). The first applicable rule wins, in this order: a character outside the
 * alphabet and '='; '=' first; a data character after '='; a bad count of data characters; a
 * bad count of '='. nomyo/_b64_fallback.py explains errors in the same order and words. */
static void
explain(int kind, const void *text, Py_ssize_t n)
{
    Py_ssize_t first_pad = -1, after_pad = -1, data = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, text, i);
        if (c == '=') {
            if (first_pad < 0)
                first_pad = i;
        } else if (!in_alphabet(c)) {
            PyErr_Format(PyExc_ValueError, "invalid base64 character at position %zd", i);
            return;
        } else {
            if (first_pad >= 0 && after_pad < 0)
                after_pad = i;
            data++;
        }
    }
    if (first_pad == 0)
        PyErr_SetString(PyExc_ValueError, "incorrect base64 padding: '=' at the start");
    else if (after_pad >= 0)
        PyErr_Format(PyExc_ValueError,
                     "incorrect base64 padding: data character after '=' at position %zd",
                     after_pad);
    else if (data % 4 == 1)
        PyErr_Format(PyExc_ValueError,
                     "invalid base64 length: the number of data characters (%zd) is 1 more "
                     "than a multiple of 4",
                     data);
    else if (data % 4 != 0)
        PyErr_Format(PyExc_ValueError,
                     "incorrect base64 padding: %zd '=' where the last group needs %zd",
                     n - data, 4 - data % 4);
    else  /* only if the text changed while it was being decoded (another thread) */
        PyErr_SetString(PyExc_ValueError, "base64 text changed while it was being decoded");
}

/* ---- argument handling ---- */

/* Borrow obj's memory as one C-contiguous block. An object that is not such a buffer is a
 * TypeError; other exporter errors (e.g. a closed secure buffer) pass through unchanged. */
static int
get_contiguous(PyObject *obj, Py_buffer *view, int flags, const char *what)
{
    if (PyObject_CheckBuffer(obj) && PyObject_GetBuffer(obj, view, flags) == 0)
        return 0;
    if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_BufferError))
        return -1;
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError, "%s, not '%.100s'", what, Py_TYPE(obj)->tp_name);
    return -1;
}

/* Base64 text as ASCII characters: an ASCII str read in place, or a buffer. */
typedef struct {
    const unsigned char *s;
    Py_ssize_t n;
    Py_buffer view;
    int has_view;
} Text;

static int
text_open(PyObject *obj, Text *t)
{
    t->has_view = 0;
    if (PyUnicode_Check(obj)) {
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(obj) < 0)
            return -1;
#endif
        if (!PyUnicode_IS_ASCII(obj)) {  /* never valid: explain() finds the position */
            explain(PyUnicode_KIND(obj), PyUnicode_DATA(obj), PyUnicode_GET_LENGTH(obj));
            return -1;
        }
        t->s = PyUnicode_DATA(obj);
        t->n = PyUnicode_GET_LENGTH(obj);
        return 0;
    }
    if (get_contiguous(obj, &t->view, PyBUF_SIMPLE,
                       "text must be an ASCII str or a C-contiguous bytes-like object") < 0)
        return -1;
    t->has_view = 1;
    t->s = t->view.buf;
    t->n = t->view.len;
    return 0;
}

static void
text_close(Text *t)
{
    if (t->has_view)
        PyBuffer_Release(&t->view);
}

/* Whether two memory ranges share a byte. */
static int
overlaps(const void *a, Py_ssize_t alen, const void *b, Py_ssize_t blen)
{
    uintptr_t a0 = (uintptr_t)a, b0 = (uintptr_t)b;
    return alen > 0 && blen > 0 && a0 < b0 + (uintptr_t)blen && b0 < a0 + (uintptr_t)alen;
}

/* Decode the text's data characters into target (room for `decoded` bytes), without the GIL
 * when the text is large. If a character is outside the alphabet, raises ValueError and zeroes
 * target, so no partly decoded data is left. A target that aliases the text is decoded aside
 * first, as decoding would read what it wrote; that temporary is wiped before it is freed. */
static int
decode_to(const Text *t, Py_ssize_t data, Py_ssize_t decoded, unsigned char *target)
{
    int rc;
    if (overlaps(t->s, t->n, target, decoded)) {
        unsigned char *tmp = PyMem_Malloc((size_t)decoded);
        if (tmp == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        rc = decode_block(t->s, data, tmp);
        if (rc == 0)
            memcpy(target, tmp, (size_t)decoded);
        explicit_bzero(tmp, (size_t)decoded);  /* decoded data: never freed as it is */
        PyMem_Free(tmp);
    } else {
        WITHOUT_GIL_IF_LARGE(data, rc = decode_block(t->s, data, target));
    }
    if (rc < 0) {
        explain(PyUnicode_1BYTE_KIND, t->s, t->n);  /* before zeroing: target may alias it */
        memset(target, 0, (size_t)decoded);
    }
    return rc;
}

/* ---- module functions ---- */

PyDoc_STRVAR(encode_doc,
"encode($module, data, /)\n--\n\n"
"Standard base64 of a C-contiguous buffer, '=' padded, no newline (= base64.b64encode).");

static PyObject *
encode(PyObject *module, PyObject *obj)
{
    Py_buffer in;
    (void)module;
    if (get_contiguous(obj, &in, PyBUF_SIMPLE,
                       "data must be a C-contiguous bytes-like object") < 0)
        return NULL;
    if (in.len > PY_SSIZE_T_MAX / 4 * 3) {
        PyBuffer_Release(&in);
        return PyErr_NoMemory();
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, (in.len + 2) / 3 * 4);
    if (result != NULL) {
        char *out = PyBytes_AS_STRING(result);
        WITHOUT_GIL_IF_LARGE(in.len, encode_block(in.buf, in.len, out));
    }
    PyBuffer_Release(&in);
    return result;
}

PyDoc_STRVAR(decode_doc,
"decode($module, text, /)\n--\n\n"
"Decode strict base64 (= base64.b64decode(text, validate=True)); ValueError if invalid.");

static PyObject *
decode(PyObject *module, PyObject *obj)
{
    Text t;
    Py_ssize_t data, decoded;
    (void)module;
    if (text_open(obj, &t) < 0)
        return NULL;
    PyObject *result = NULL;
    if (layout(t.s, t.n, &data, &decoded) < 0) {  /* the alphabet is checked while decoding */
        explain(PyUnicode_1BYTE_KIND, t.s, t.n);
    } else if ((result = PyBytes_FromStringAndSize(NULL, decoded)) != NULL
               && decode_to(&t, data, decoded, (unsigned char *)PyBytes_AS_STRING(result)) < 0) {
        Py_CLEAR(result);
    }
    text_close(&t);
    return result;
}

PyDoc_STRVAR(decode_into_doc,
"decode_into($module, text, out, offset, /)\n--\n\n"
"Decode strict base64 into out[offset:] and return the end offset. On ValueError no\n"
"decoded byte is left in out: offset, padding, length and size errors are found before\n"
"writing; a character outside the alphabet, while writing, and the range is zeroed.");

static PyObject *
decode_into(PyObject *module, PyObject *args)
{
    PyObject *text_obj, *out_obj, *offset_obj, *index;
    Text t;
    Py_buffer out;
    Py_ssize_t offset, data, decoded;
    (void)module;
    if (!PyArg_ParseTuple(args, "OOO:decode_into", &text_obj, &out_obj, &offset_obj))
        return NULL;
    if ((index = PyNumber_Index(offset_obj)) == NULL)
        return NULL;
    /* An offset beyond Py_ssize_t is out of range like any other: ValueError, as in Python. */
    offset = PyLong_AsSsize_t(index);
    if (offset == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            Py_DECREF(index);
            return NULL;
        }
        PyErr_Clear();
    }
    if (text_open(text_obj, &t) < 0) {
        Py_DECREF(index);
        return NULL;
    }
    if (get_contiguous(out_obj, &out, PyBUF_WRITABLE,
                       "out must be a writable C-contiguous bytes-like object") < 0) {
        text_close(&t);
        Py_DECREF(index);
        return NULL;
    }
    PyObject *result = NULL;
    if (offset < 0 || offset > out.len) {  /* an overflowed offset reads as -1 here */
        PyErr_Format(PyExc_ValueError, "offset %S is outside the output buffer (length %zd)",
                     index, out.len);
    } else if (layout(t.s, t.n, &data, &decoded) < 0) {
        explain(PyUnicode_1BYTE_KIND, t.s, t.n);
    } else if (decoded > out.len - offset) {
        PyErr_Format(PyExc_ValueError,
                     "output buffer too small: %zd bytes decoded, %zd available at offset %zd",
                     decoded, out.len - offset, offset);
    } else if (decode_to(&t, data, decoded, (unsigned char *)out.buf + offset) == 0) {
        result = PyLong_FromSsize_t(offset + decoded);
    }
    PyBuffer_Release(&out);
    text_close(&t);
    Py_DECREF(index);
    return result;
}

static PyMethodDef module_methods[] = {
    {"encode", encode, METH_O, encode_doc},
    {"decode", decode, METH_O, decode_doc},
    {"decode_into", decode_into, METH_VARARGS, decode_into_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "nomyo._b64",
    "Strict standard base64, encoded and decoded natively.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__b64(void)
{
    init_tables();
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    if (PyModule_AddStringConstant(m, "BUILD_VERSION", NOMYO_BUILD_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
