/*
 * auditq._speedups: the writer's row encoder, in C.
 *
 * Why C: the writer encodes every row while holding the GIL that callers need, on a
 * machine whose other core is busy being PostgreSQL. The pure-Python encoder in
 * binary.py costs ~4 us per row; this one does the common row in a fraction of that and
 * so leaves the GIL and the CPU to the callers and the server.
 *
 * Why it stays small: it only takes the fast path. A row is encoded here when it is the
 * shape `AuditWriter.log()` queues (a 13-tuple, no explicit id, an int timestamp, texts
 * as exact str) and its repeating fields and address are already in binary.py's caches. Anything
 * else (a cache miss on the group or the address, a datetime, an explicit id, a value of
 * another type, a value that must be repaired and flagged) goes to binary.encode_row, the
 * one place that knows every rule, every repair and every error message. The caches are
 * binary.py's own dicts, holding only exact str keys and values stored as given, so both
 * paths agree on what a cached field is, and a hit never needs a flag.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <pthread.h>
#include <unistd.h>

#include "_speedups.h"

/* A queued row's fields (entry.COLUMNS), and a COPY tuple's: those and the origin. */
#define ROW_FIELDS 13
#define FIELD_COUNT 14
/* entry.MAX_NAME_CHARS and entry.MAX_METADATA_BYTES: longer goes to binary.encode_row,
 * which cuts it (tests/test_encoder.py checks both encoders agree at the limits). */
#define MAX_NAME_CHARS 256
#define MAX_METADATA_BYTES (64 * 1024)
/* 2000-01-01T00:00:00Z in Unix microseconds: PostgreSQL's timestamp epoch. */
#define PG_EPOCH_US INT64_C(946684800000000)

/* Set by configure(): binary.py's caches and its complete (slow) encoder. */
static PyObject *groups_cache = NULL; /* (action, tenant, actor_type, resource_type, outcome, ua) -> fields */
static PyObject *ips_cache = NULL;    /* str -> inet field */
static PyObject *fallback = NULL;     /* binary.encode_row(row, origin) -> (bytes, int) */
static PyObject *urandom = NULL;      /* os.urandom, to seed the id generator */
static PyObject *scratch_key = NULL;  /* the group lookup key, refilled per row */

/* -- ids: xoshiro256** seeded from the OS, reseeded when the process id changes -------- */

/* Ids need uniqueness, not secrecy (see ids.py). A forked child must never repeat its
 * parent's stream, however it was forked: a pthread_atfork handler (which libc runs for
 * every fork(), with or without Python's fork hooks, as under uWSGI) asks for a reseed
 * before the next id, and the pid is compared once per chunk as well. */
static uint64_t rng[4];
static pid_t seeded_pid = -1;
static volatile int need_reseed = 1;
/* Forks this process has been through, counted in the child; Python reads it through the
 * read-only memoryview FORKS, which is cheaper on the caller's path than os.getpid(). */
static uint64_t fork_count = 0;

static void forked_child(void) {
    need_reseed = 1;
    fork_count++;
}

uint64_t auditq_fork_count(void) { return fork_count; }

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static inline uint64_t next_random(void) {
    uint64_t result = rotl(rng[1] * 5, 7) * 9;
    uint64_t t = rng[1] << 17;
    rng[2] ^= rng[0];
    rng[3] ^= rng[1];
    rng[1] ^= rng[2];
    rng[0] ^= rng[3];
    rng[2] ^= t;
    rng[3] = rotl(rng[3], 45);
    return result;
}

static int reseed(void) {
    PyObject *seed = PyObject_CallFunction(urandom, "n", (Py_ssize_t)sizeof(rng));
    if (seed == NULL) {
        return -1;
    }
    if (!PyBytes_Check(seed) || PyBytes_GET_SIZE(seed) != (Py_ssize_t)sizeof(rng)) {
        Py_DECREF(seed);
        PyErr_SetString(PyExc_RuntimeError, "os.urandom returned an unexpected value");
        return -1;
    }
    memcpy(rng, PyBytes_AS_STRING(seed), sizeof(rng));
    Py_DECREF(seed);
    if ((rng[0] | rng[1] | rng[2] | rng[3]) == 0) {
        rng[0] = 1; /* the one state xoshiro cannot leave */
    }
    seeded_pid = getpid();
    need_reseed = 0;
    return 0;
}

/* -- output buffer ------------------------------------------------------------------------ */

static inline char *put_i16(char *p, int16_t v) {
    p[0] = (char)((v >> 8) & 0xff);
    p[1] = (char)(v & 0xff);
    return p + 2;
}

static inline char *put_u32(char *p, uint32_t v) {
    p[0] = (char)(v >> 24);
    p[1] = (char)(v >> 16);
    p[2] = (char)(v >> 8);
    p[3] = (char)v;
    return p + 4;
}

static inline char *put_u64(char *p, uint64_t v) {
    p = put_u32(p, (uint32_t)(v >> 32));
    return put_u32(p, (uint32_t)v);
}

static const char NULL_FIELD[4] = {'\xff', '\xff', '\xff', '\xff'};

/* One variable field of a row: either borrowed bytes already length prefixed (a cached
 * field, or NULL_FIELD for SQL null), or raw text that still needs its length prefix. */
typedef struct {
    const char *data;
    Py_ssize_t size;
    int prefixed;    /* 1: data includes its length prefix (or is NULL_FIELD) */
    PyObject *owner; /* a temporary UTF-8 copy to release once written, or NULL */
} Field;

/* Outcome of trying the fast path on one value. */
enum { FAST_OK = 0, FAST_NO = 1, FAST_ERROR = -1 };

static inline void set_null(Field *out) {
    out->data = NULL_FIELD;
    out->size = 4;
    out->prefixed = 1;
}

/* The UTF-8 form of an exact str. An ASCII str is its own UTF-8 and is read in place;
 * any other is encoded into a temporary (`owner`), not with PyUnicode_AsUTF8AndSize,
 * which would keep a UTF-8 copy inside the str for as long as the queued row lives.
 * FAST_NO for a str UTF-8 cannot encode (lone surrogates): the slow path names it. */
static int utf8_of(PyObject *value, Field *out) {
    if (PyUnicode_IS_ASCII(value)) {
        out->data = (const char *)PyUnicode_DATA(value);
        out->size = PyUnicode_GET_LENGTH(value);
        return FAST_OK;
    }
    PyObject *encoded = PyUnicode_AsUTF8String(value);
    if (encoded == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
            return FAST_ERROR;
        }
        PyErr_Clear();
        return FAST_NO;
    }
    out->owner = encoded;
    out->data = PyBytes_AS_STRING(encoded);
    out->size = PyBytes_GET_SIZE(encoded);
    return FAST_OK;
}

/* A text field (actor_id, resource_id, request_id), checked here: a length test and a NUL
 * scan of its UTF-8 form cost no more than a cache lookup would. Too long, NUL, not
 * encodable, or not an exact str (a subclass may compare and hash as it likes): FAST_NO,
 * and binary.encode_row repairs and flags it. */
static int checked_text(PyObject *value, Field *out) {
    if (value == Py_None) {
        set_null(out);
        return FAST_OK;
    }
    if (!PyUnicode_CheckExact(value) || PyUnicode_GET_LENGTH(value) > MAX_NAME_CHARS) {
        return FAST_NO;
    }
    int rc = utf8_of(value, out);
    if (rc != FAST_OK) {
        return rc;
    }
    if (memchr(out->data, 0, (size_t)out->size) != NULL) {
        return FAST_NO;
    }
    out->prefixed = 0;
    return FAST_OK;
}

static inline Py_ssize_t field_size(const Field *f) { return f->prefixed ? f->size : 4 + f->size; }

static inline char *put_field(char *p, const Field *f) {
    if (!f->prefixed) {
        p = put_u32(p, (uint32_t)f->size);
    }
    memcpy(p, f->data, (size_t)f->size);
    return p + f->size;
}

/* An Item, (bytes, row). `untrack`: take it out of the garbage collector's sight, which
 * is safe when the row holds only str, int and None (no cycle can pass through it) and
 * spares each chunk's thousand items from triggering and lengthening collections. */
static PyObject *new_item(PyObject *data, PyObject *row, int untrack) {
    PyObject *item = PyTuple_Pack(2, data, row);
    if (item != NULL && untrack) {
        PyObject_GC_UnTrack(item);
    }
    return item;
}

/* Make room for `size` more bytes at *used in a growing bytes buffer (doubling). */
static int reserve(PyObject **buffer, Py_ssize_t used, Py_ssize_t size) {
    Py_ssize_t need = used + size;
    Py_ssize_t have = PyBytes_GET_SIZE(*buffer);
    if (need > have) {
        Py_ssize_t grown = have * 2 > need ? have * 2 : need;
        if (_PyBytes_Resize(buffer, grown) < 0) {
            return -1;
        }
    }
    return 0;
}

/* Append `size` bytes to the chunk the COPY will send, growing it as needed. */
static int append_chunk(PyObject **chunk, Py_ssize_t *used, const char *data, Py_ssize_t size) {
    if (reserve(chunk, *used, size) < 0) {
        return -1;
    }
    memcpy(PyBytes_AS_STRING(*chunk) + *used, data, (size_t)size);
    *used += size;
    return 0;
}

/* The repeating fields' cached encoding, or NULL with FAST_NO/FAST_ERROR in *rc. Only
 * exact str or None are looked up: hashing and comparing them runs no Python code, so no
 * other thread can run during the lookup (and reuse the scratch key). */
static PyObject *cached_group(PyObject **f, int *rc) {
    static const int group_fields[6] = {2, 3, 5, 6, 8, 10};
    for (int i = 0; i < 6; i++) {
        PyObject *value = f[group_fields[i]];
        if (value != Py_None && !PyUnicode_CheckExact(value)) {
            *rc = FAST_NO;
            return NULL;
        }
    }
#if PY_VERSION_HEX >= 0x030E0000
    /* 3.14 caches a tuple's hash in the tuple: a refilled scratch key would keep its
     * first hash, so build the key per row. */
    PyObject *key = PyTuple_Pack(6, f[2], f[3], f[5], f[6], f[8], f[10]);
    if (key == NULL) {
        *rc = FAST_ERROR;
        return NULL;
    }
    PyObject *group = PyDict_GetItemWithError(groups_cache, key);
    Py_DECREF(key);
#else
    /* Earlier versions hash a tuple afresh each time, so one scratch key, refilled per
     * row, saves an allocation (a lookup keeps no reference to its key). */
    for (int i = 0; i < 6; i++) {
        PyObject *old = PyTuple_GET_ITEM(scratch_key, i);
        PyTuple_SET_ITEM(scratch_key, i, Py_NewRef(f[group_fields[i]]));
        Py_DECREF(old);
    }
    PyObject *group = PyDict_GetItemWithError(groups_cache, scratch_key);
#endif
    if (group == NULL || !PyBytes_Check(group)) {
        *rc = PyErr_Occurred() ? FAST_ERROR : FAST_NO;
        return NULL;
    }
    return group;
}

/*
 * Encode one row on the fast path, writing its tuple into *chunk at *used. With `item`
 * not NULL it also builds the row's own bytes and sets *item to a new (bytes, row) tuple;
 * without (encode_block), the chunk is all there is. Returns FAST_OK, FAST_NO when the row
 * needs binary.encode_row, FAST_ERROR on a Python error.
 */
static int encode_fast(PyObject *row, PyObject *origin, PyObject **item, PyObject **chunk,
                       Py_ssize_t *used) {
    if (!PyTuple_CheckExact(row) || PyTuple_GET_SIZE(row) != ROW_FIELDS) {
        return FAST_NO;
    }
    PyObject **f = &PyTuple_GET_ITEM(row, 0);
    if (f[0] != Py_None || !PyLong_CheckExact(f[1])) {
        return FAST_NO;
    }
    int overflow = 0;
    long long ns = PyLong_AsLongLongAndOverflow(f[1], &overflow);
    if (overflow || ns < 0) {
        if (ns == -1 && PyErr_Occurred()) {
            PyErr_Clear();
        }
        return FAST_NO;
    }
    /* Before any borrowed pointer into the caches is taken: reseeding calls os.urandom,
     * which may let another thread run (and clear a full cache). */
    if (need_reseed && reseed() < 0) {
        return FAST_ERROR;
    }
    int rc = FAST_OK;
    PyObject *group = cached_group(f, &rc);
    if (group == NULL) {
        return rc;
    }

    Field actor = {0}, resource = {0}, ip = {0}, request = {0}, meta = {0};
    if ((rc = checked_text(f[4], &actor)) != FAST_OK ||
        (rc = checked_text(f[7], &resource)) != FAST_OK ||
        (rc = checked_text(f[11], &request)) != FAST_OK) {
        goto done;
    }
    if (f[9] == Py_None) {
        set_null(&ip);
    } else {
        PyObject *hit = PyUnicode_CheckExact(f[9]) ? PyDict_GetItemWithError(ips_cache, f[9]) : NULL;
        if (hit == NULL || !PyBytes_Check(hit)) {
            rc = PyErr_Occurred() ? FAST_ERROR : FAST_NO; /* a miss: the slow path parses it */
            goto done;
        }
        ip.data = PyBytes_AS_STRING(hit);
        ip.size = PyBytes_GET_SIZE(hit);
        ip.prefixed = 1;
    }
    Py_ssize_t meta_size = 4; /* NULL */
    if (f[12] != Py_None) {
        if (!PyUnicode_CheckExact(f[12])) {
            rc = FAST_NO;
            goto done;
        }
        if ((rc = utf8_of(f[12], &meta)) != FAST_OK) {
            goto done;
        }
        if (meta.size > MAX_METADATA_BYTES) {
            rc = FAST_NO; /* replaced by a summary, flagged, in binary.encode_row */
            goto done;
        }
        meta_size = 4 + 1 + meta.size; /* length, jsonb version byte, text */
    }

    /* UUIDv7: 48 bits of Unix ms, version 7, 12 random bits | variant, 62 random bits. */
    uint64_t ms = (uint64_t)ns / 1000000u;
    uint64_t high = (ms << 16) | 0x7000u | (next_random() >> 52);
    uint64_t low = UINT64_C(0x8000000000000000) | (next_random() >> 2);
    int64_t micros = (int64_t)(ns / 1000) - PG_EPOCH_US;

    Py_ssize_t group_size = PyBytes_GET_SIZE(group);
    Py_ssize_t origin_size = PyBytes_GET_SIZE(origin);
    Py_ssize_t size = 2 + 4 + 16 + 4 + 8 + group_size + field_size(&actor) +
                      field_size(&resource) + field_size(&ip) + field_size(&request) + meta_size +
                      origin_size;
    if (reserve(chunk, *used, size) < 0) {
        rc = FAST_ERROR;
        goto done;
    }
    char *start = PyBytes_AS_STRING(*chunk) + *used;
    char *p = start;
    p = put_i16(p, FIELD_COUNT);
    p = put_u32(p, 16);
    p = put_u64(p, high);
    p = put_u64(p, low);
    p = put_u32(p, 8);
    p = put_u64(p, (uint64_t)micros);
    memcpy(p, PyBytes_AS_STRING(group), (size_t)group_size);
    p += group_size;
    p = put_field(p, &actor);
    p = put_field(p, &resource);
    p = put_field(p, &ip);
    p = put_field(p, &request);
    if (meta.data == NULL) {
        memcpy(p, NULL_FIELD, 4);
        p += 4;
    } else {
        p = put_u32(p, (uint32_t)(meta.size + 1));
        *p++ = 1;
        memcpy(p, meta.data, (size_t)meta.size);
        p += meta.size;
    }
    memcpy(p, PyBytes_AS_STRING(origin), (size_t)origin_size);
    p += origin_size;
    assert(p - start == size);

    if (item != NULL) {
        PyObject *data = PyBytes_FromStringAndSize(start, size);
        /* The fast path admits only str, int and None in the row: safe to untrack. */
        *item = data == NULL ? NULL : new_item(data, row, 1);
        Py_XDECREF(data);
        if (*item == NULL) {
            rc = FAST_ERROR;
            goto done;
        }
    }
    *used += size;
done:
    Py_XDECREF(actor.owner);
    Py_XDECREF(resource.owner);
    Py_XDECREF(request.owner);
    Py_XDECREF(meta.owner);
    return rc;
}

/* Why a row failed binary.encode_row, as text: str(exc), or its type's name if empty. */
static PyObject *reason_of(PyObject *exc) {
    PyObject *text = PyObject_Str(exc);
    if (text != NULL && PyUnicode_GET_LENGTH(text) > 0) {
        return text;
    }
    Py_XDECREF(text);
    PyErr_Clear();
    PyObject *name = PyObject_GetAttrString((PyObject *)Py_TYPE(exc), "__name__");
    if (name != NULL && PyUnicode_Check(name)) {
        return name;
    }
    Py_XDECREF(name);
    PyErr_Clear();
    return PyUnicode_FromString(Py_TYPE(exc)->tp_name);
}

/* A row off the fast path: binary.encode_row, whose errors make the row a reject. Any
 * error: encode_row turns whatever a caller's value raises (SystemExit and
 * KeyboardInterrupt too) into EncodeError, and nothing may escape into the writer
 * thread, which would die of it. */
static int encode_slow(PyObject *row, PyObject *origin, PyObject *items, PyObject *bad,
                       PyObject **chunk, Py_ssize_t *used, int *kept) {
    *kept = 0;
    PyObject *args[2] = {row, origin};
    PyObject *result = PyObject_Vectorcall(fallback, args, 2, NULL);
    if (result == NULL) {
        PyObject *type, *exc, *tb;
        PyErr_Fetch(&type, &exc, &tb);
        PyErr_NormalizeException(&type, &exc, &tb);
        PyObject *reason = exc != NULL ? reason_of(exc) : PyUnicode_FromString("error");
        Py_XDECREF(type);
        Py_XDECREF(exc);
        Py_XDECREF(tb);
        if (reason == NULL) {
            return -1;
        }
        PyObject *reject = PyTuple_Pack(2, row, reason);
        Py_DECREF(reason);
        if (reject == NULL) {
            return -1;
        }
        int rc = PyList_Append(bad, reject);
        Py_DECREF(reject);
        return rc;
    }
    if (!PyTuple_Check(result) || PyTuple_GET_SIZE(result) != 2 ||
        !PyBytes_Check(PyTuple_GET_ITEM(result, 0))) {
        Py_DECREF(result);
        PyErr_SetString(PyExc_TypeError, "encode_row must return (bytes, int)");
        return -1;
    }
    PyObject *data = PyTuple_GET_ITEM(result, 0);
    if (append_chunk(chunk, used, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data)) < 0) {
        Py_DECREF(result);
        return -1;
    }
    *kept = 1;
    if (items == NULL) {
        Py_DECREF(result);
        return 0;
    }
    /* The row may hold anything here (that is why it left the fast path): keep the item
     * tracked, so a cycle through one of its values can still be collected. */
    PyObject *item = new_item(data, row, 0);
    Py_DECREF(result);
    if (item == NULL) {
        return -1;
    }
    int rc = PyList_Append(items, item);
    Py_DECREF(item);
    return rc;
}

/*
 * The loop both entry points share. With `items` (encode_chunk): an Item per good row.
 * With `kept` (encode_block): each good row appended to `kept`, no per-row object (the
 * tuples can be cut apart again with binary.split_rows). Returns the chunk.
 */
static PyObject *encode_rows(PyObject *rows_arg, PyObject *origin, PyObject *items, PyObject *kept,
                             PyObject *bad) {
    if (fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "auditq._speedups is not configured");
        return NULL;
    }
    /* A tuple copy: the slow path runs Python code, which could shrink a list under us. */
    PyObject *rows = PySequence_Tuple(rows_arg);
    if (rows == NULL) {
        return NULL;
    }
    if (seeded_pid != getpid()) {
        need_reseed = 1;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(rows), used = 0;
    /* Room for a typical chunk; a larger one grows by doubling. */
    PyObject *chunk = PyBytes_FromStringAndSize(NULL, (count < 1000 ? count : 1000) * 512 + 64);
    if (chunk == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *row = PyTuple_GET_ITEM(rows, i);
        PyObject *item = NULL;
        int rc = encode_fast(row, origin, items != NULL ? &item : NULL, &chunk, &used);
        int keep = rc == FAST_OK;
        if (rc == FAST_NO) {
            rc = encode_slow(row, origin, items, bad, &chunk, &used, &keep);
        } else if (rc == FAST_OK && items != NULL) {
            rc = PyList_Append(items, item);
            Py_DECREF(item);
        }
        if (rc < 0 || (keep && kept != NULL && PyList_Append(kept, row) < 0)) {
            goto error;
        }
    }
    Py_DECREF(rows);
    if (_PyBytes_Resize(&chunk, used) < 0) {
        return NULL;
    }
    return chunk;
error:
    Py_DECREF(rows);
    Py_XDECREF(chunk);
    return NULL;
}

/* The origin argument: the writer's pre-encoded field (binary.origin_field), appended to
 * every tuple as it is; absent, a NULL field. Checked to be one whole field, so a wrong
 * value cannot make a stream PostgreSQL would misread. */
static PyObject *null_origin = NULL;

static PyObject *origin_arg(PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 4) {
        return null_origin;
    }
    PyObject *origin = args[3];
    if (!PyBytes_CheckExact(origin) || PyBytes_GET_SIZE(origin) < 4) {
        PyErr_SetString(PyExc_TypeError, "origin must be an encoded field (binary.origin_field)");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(origin);
    int32_t length = (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
                               ((uint32_t)p[2] << 8) | (uint32_t)p[3]);
    if (length < -1 || (length == -1 ? 0 : length) != PyBytes_GET_SIZE(origin) - 4) {
        PyErr_SetString(PyExc_ValueError, "origin must be one encoded field (binary.origin_field)");
        return NULL;
    }
    return origin;
}

PyDoc_STRVAR(encode_chunk_doc,
             "encode_chunk(rows, items, bad, origin=NULL) -> bytes\n\n"
             "Encode `rows`, append an Item (bytes, row) to `items` for each good row and\n"
             "(row, reason) to `bad` for each rejected one; return the good rows' tuples\n"
             "joined, ready for one COPY write. `origin`: the writer's encoded origin field.");

static PyObject *encode_chunk(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 3 || nargs > 4 || !PyList_CheckExact(args[1]) || !PyList_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "encode_chunk(rows, items: list, bad: list, origin: bytes = NULL)");
        return NULL;
    }
    PyObject *origin = origin_arg(args, nargs);
    return origin == NULL ? NULL : encode_rows(args[0], origin, args[1], NULL, args[2]);
}

PyDoc_STRVAR(encode_block_doc,
             "encode_block(rows, kept, bad, origin=NULL) -> bytes\n\n"
             "encode_chunk without a per-row object: append each good row to `kept` and\n"
             "(row, reason) to `bad` for each rejected one; return the good rows' tuples joined.");

static PyObject *encode_block(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 3 || nargs > 4 || !PyList_CheckExact(args[1]) || !PyList_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "encode_block(rows, kept: list, bad: list, origin: bytes = NULL)");
        return NULL;
    }
    PyObject *origin = origin_arg(args, nargs);
    return origin == NULL ? NULL : encode_rows(args[0], origin, NULL, args[1], args[2]);
}

PyDoc_STRVAR(configure_doc,
             "configure(groups, ips, fallback, urandom) -> None\n\n"
             "binary.py's caches (dicts it owns and fills), its complete encoder, and the\n"
             "OS random source used to seed ids.");

static PyObject *configure(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyDict_CheckExact(args[0]) || !PyDict_CheckExact(args[1]) ||
        !PyCallable_Check(args[2]) || !PyCallable_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "configure(groups: dict, ips: dict, fallback, urandom)");
        return NULL;
    }
    Py_XSETREF(groups_cache, Py_NewRef(args[0]));
    Py_XSETREF(ips_cache, Py_NewRef(args[1]));
    Py_XSETREF(fallback, Py_NewRef(args[2]));
    Py_XSETREF(urandom, Py_NewRef(args[3]));
    need_reseed = 1;
    Py_RETURN_NONE;
}


PyDoc_STRVAR(occurred_span_doc,
             "occurred_span(data) -> (first, last) | None\n\n"
             "The earliest and the latest occurred_at (microseconds since 2000-01-01 UTC) of\n"
             "the COPY tuples in `data`; None when it holds none or is not well-formed.");

static PyObject *occurred_span(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *p = view.buf, *end = p + view.len;
    long long first = LLONG_MAX, last = LLONG_MIN;
    int rows = 0, ok = 1;
    while (ok && p < end) {
        if (end - p < 2) {
            ok = 0;
            break;
        }
        int fields = (int16_t)(((unsigned)p[0] << 8) | p[1]);
        p += 2;
        if (fields < 2) {
            ok = 0;
            break;
        }
        for (int f = 0; f < fields; f++) {
            if (end - p < 4) {
                ok = 0;
                break;
            }
            int32_t len = (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
                                    ((uint32_t)p[2] << 8) | (uint32_t)p[3]);
            p += 4;
            if (len < 0) {
                ok = f != 1; /* occurred_at is never NULL */
                if (!ok) {
                    break;
                }
                continue;
            }
            if (end - p < len || (f == 1 && len != 8)) {
                ok = 0;
                break;
            }
            if (f == 1) {
                uint64_t u = 0;
                for (int b = 0; b < 8; b++) {
                    u = (u << 8) | p[b];
                }
                long long micros = (long long)(int64_t)u;
                first = micros < first ? micros : first;
                last = micros > last ? micros : last;
            }
            p += len;
        }
        rows++;
    }
    PyBuffer_Release(&view);
    if (!ok || rows == 0) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(LL)", first, last);
}

static PyMethodDef methods[] = {
    {"encode_chunk", (PyCFunction)(void (*)(void))encode_chunk, METH_FASTCALL, encode_chunk_doc},
    {"encode_block", (PyCFunction)(void (*)(void))encode_block, METH_FASTCALL, encode_block_doc},
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL, configure_doc},
    {"occurred_span", occurred_span, METH_O, occurred_span_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "auditq._speedups",
    "The writer's row encoder for the common row (see binary.py for the rules).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    static int atfork_registered = 0;
    if (!atfork_registered) {
        if (pthread_atfork(NULL, NULL, forked_child) != 0) {
            PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
            return NULL;
        }
        atfork_registered = 1;
    }
    if (scratch_key == NULL) {
        scratch_key = PyTuple_Pack(6, Py_None, Py_None, Py_None, Py_None, Py_None, Py_None);
        if (scratch_key == NULL) {
            return NULL;
        }
        PyObject_GC_UnTrack(scratch_key); /* only ever holds the current row's values */
    }
    if (null_origin == NULL) {
        null_origin = PyBytes_FromStringAndSize(NULL_FIELD, 4);
        if (null_origin == NULL) {
            return NULL;
        }
    }
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL) {
        return NULL;
    }
    if (auditq_add_caller_path(mod) < 0 || auditq_add_prefault(mod) < 0 ||
        auditq_add_chain(mod) < 0 ||
        auditq_add_pqcopy(mod) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    PyObject *forks = PyMemoryView_FromMemory((char *)&fork_count, sizeof(fork_count), PyBUF_READ);
    if (forks == NULL || PyModule_AddObject(mod, "FORKS", forks) < 0) {
        Py_XDECREF(forks);
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
