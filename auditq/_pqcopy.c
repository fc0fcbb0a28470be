/* A whole COPY ... FROM STDIN driven through libpq with the GIL released (auditq.pqcopy).
 *
 * psycopg's copy.write() hands each piece of data to libpq and waits for the socket with the
 * GIL released, so every piece, the COPY's start, its end and its result each cost the writer
 * thread a re-acquisition of the GIL; behind busy Python threads each of those waits up to
 * the switch interval while the server idles. Here one call starts the COPY, puts every
 * piece, ends it and reads its results to the last one, on psycopg's own PGconn, without the
 * GIL; psycopg then finds the connection idle (or in its transaction) as after any command.
 *
 * libpq is the copy psycopg already loaded (psycopg[binary] bundles one, loaded RTLD_LOCAL):
 * found among the loaded objects at first use and opened with RTLD_NOLOAD, so building needs
 * no libpq headers and a process never loads a second libpq. The few prototypes are
 * declared here; their ABI has been stable since PostgreSQL 7.4.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <stdlib.h>
#include <errno.h>
#include <poll.h>

#include "_speedups.h"

#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#endif

typedef struct pg_conn PGconn;
typedef struct pg_result PGresult;

/* ExecStatusType and ConnStatusType values used here (libpq-fe.h). */
#define PGRES_COPY_IN 4
#define PGRES_BAD_RESPONSE 5
#define PGRES_NONFATAL_ERROR 6
#define PGRES_FATAL_ERROR 7
#define CONNECTION_BAD 1
/* PG_DIAG_* field codes copied into the error's diagnostics (psycopg's DiagnosticField). */
static const char diag_fields[] = "SVCMDHPpqWstcdnFLR";

typedef int (*send_query_fn)(PGconn *, const char *);
typedef int (*put_copy_data_fn)(PGconn *, const char *, int);
typedef int (*put_copy_end_fn)(PGconn *, const char *);
typedef int (*conn_int_fn)(PGconn *);
typedef PGresult *(*get_result_fn)(PGconn *);
typedef int (*result_status_fn)(const PGresult *);
typedef char *(*result_error_field_fn)(const PGresult *, int);
typedef char *(*result_error_message_fn)(const PGresult *);
typedef void (*clear_fn)(PGresult *);
typedef int (*const_conn_int_fn)(const PGconn *);
typedef char *(*error_message_fn)(const PGconn *);

static struct {
    send_query_fn send_query;
    put_copy_data_fn put_copy_data;
    put_copy_end_fn put_copy_end;
    conn_int_fn flush;
    conn_int_fn consume_input;
    conn_int_fn is_busy;
    get_result_fn get_result;
    result_status_fn result_status;
    result_error_field_fn result_error_field;
    result_error_message_fn result_error_message;
    clear_fn clear;
    const_conn_int_fn socket;
    const_conn_int_fn status;
    error_message_fn error_message;
} pq;

static int pq_loaded = 0;

#if defined(__linux__)
typedef struct {
    const char *prefix; /* only objects whose path starts with this (may be "") */
    char path[4096];
    int found;
} search_t;

static int visit(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    search_t *search = (search_t *)data;
    const char *name = info->dlpi_name;
    if (name == NULL || name[0] == '\0') {
        return 0;
    }
    const char *base = strrchr(name, '/');
    base = base == NULL ? name : base + 1;
    if (strncmp(base, "libpq", 5) != 0 || (base[5] != '.' && base[5] != '-')) {
        return 0;
    }
    /* Compared resolved: the loader may name it through "..", as psycopg_binary does. */
    char *real = realpath(name, NULL);
    if (real == NULL) {
        return 0;
    }
    if (strncmp(real, search->prefix, strlen(search->prefix)) == 0) {
        search->found++;
        if (search->found == 1 && strlen(real) < sizeof(search->path)) {
            strcpy(search->path, real);
        }
    }
    free(real);
    return 0;
}
#endif

PyDoc_STRVAR(pq_load_doc,
             "pq_load(prefix, /) -> str | None\n\n"
             "Bind the libpq already loaded in this process whose resolved path starts with\n"
             "`prefix` "
             "(\"\" for any); exactly one must match. Returns its path, or None when there is\n"
             "none, several, or a symbol is missing (the caller then keeps psycopg's path).");

static PyObject *pq_load(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *prefix;
    if (nargs != 1 || !PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "pq_load(prefix: str)");
        return NULL;
    }
    prefix = PyUnicode_AsUTF8(args[0]);
    if (prefix == NULL) {
        return NULL;
    }
#if defined(__linux__)
    search_t search;
    search.prefix = prefix;
    search.path[0] = '\0';
    search.found = 0;
    dl_iterate_phdr(visit, &search);
    if (search.found != 1) {
        Py_RETURN_NONE;
    }
    void *lib = dlopen(search.path, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (lib == NULL) {
        Py_RETURN_NONE;
    }
    void *syms[14];
    static const char *names[14] = {
        "PQsendQuery",     "PQputCopyData",      "PQputCopyEnd",         "PQflush",
        "PQconsumeInput",  "PQisBusy",           "PQgetResult",          "PQresultStatus",
        "PQresultErrorField", "PQresultErrorMessage", "PQclear",         "PQsocket",
        "PQstatus",        "PQerrorMessage",
    };
    for (int i = 0; i < 14; i++) {
        syms[i] = dlsym(lib, names[i]);
        if (syms[i] == NULL) {
            dlclose(lib);
            Py_RETURN_NONE;
        }
    }
    /* The handle stays open: the library is psycopg's and stays loaded anyway. */
    pq.send_query = (send_query_fn)syms[0];
    pq.put_copy_data = (put_copy_data_fn)syms[1];
    pq.put_copy_end = (put_copy_end_fn)syms[2];
    pq.flush = (conn_int_fn)syms[3];
    pq.consume_input = (conn_int_fn)syms[4];
    pq.is_busy = (conn_int_fn)syms[5];
    pq.get_result = (get_result_fn)syms[6];
    pq.result_status = (result_status_fn)syms[7];
    pq.result_error_field = (result_error_field_fn)syms[8];
    pq.result_error_message = (result_error_message_fn)syms[9];
    pq.clear = (clear_fn)syms[10];
    pq.socket = (const_conn_int_fn)syms[11];
    pq.status = (const_conn_int_fn)syms[12];
    pq.error_message = (error_message_fn)syms[13];
    pq_loaded = 1;
    return PyUnicode_DecodeFSDefault(search.path);
#else
    Py_RETURN_NONE;
#endif
}

/* Wait until the connection's socket is ready for `events` (or failed: libpq then reports
 * it). The slice bounds each poll() so that a descriptor closed under it is seen
 * (POLLNVAL) rather than waited on forever; a shutdown by the watchdog wakes it at once. */
static int wait_socket(PGconn *conn, short events) {
    int fd = pq.socket(conn);
    if (fd < 0) {
        return -1;
    }
    for (;;) {
        struct pollfd p = {fd, events, 0};
        int r = poll(&p, 1, 1000);
        if (r > 0) {
            return (p.revents & POLLNVAL) ? -1 : 0;
        }
        if (r < 0 && errno != EINTR) {
            return -1;
        }
    }
}

/* Send what libpq has buffered; 0 when all is sent, -1 on a failure. */
static int flush_all(PGconn *conn) {
    for (;;) {
        int r = pq.flush(conn);
        if (r <= 0) {
            return r;
        }
        if (wait_socket(conn, POLLIN | POLLOUT) < 0) {
            return -1;
        }
        /* The server may be sending (an error, notices) while we write: read it, or both
         * sides could block on full buffers. */
        if (!pq.consume_input(conn)) {
            return -1;
        }
    }
}

typedef struct {
    PGresult *error; /* the first error result, kept for its fields */
    int lost;        /* the connection failed (no result to speak of) */
    int end_sent;    /* the end of the data reached libpq */
    int copy_in;     /* the COPY is open (started, not yet ended) */
} outcome_t;

/* Read results until libpq has none left; keep the first error. */
static void read_results(PGconn *conn, outcome_t *out) {
    for (;;) {
        while (pq.is_busy(conn)) {
            if (wait_socket(conn, POLLIN) < 0 || !pq.consume_input(conn)) {
                out->lost = 1;
                break;
            }
        }
        PGresult *res = pq.get_result(conn);
        if (res == NULL) {
            return;
        }
        int status = pq.result_status(res);
        if (status == PGRES_COPY_IN) {
            /* Still in COPY: only if the end could not be sent. Never loop on it. */
            pq.clear(res);
            out->lost = 1;
            return;
        }
        if ((status == PGRES_FATAL_ERROR || status == PGRES_BAD_RESPONSE) && out->error == NULL) {
            out->error = res;
        } else {
            pq.clear(res);
        }
        if (out->lost && pq.status(conn) == CONNECTION_BAD && pq.is_busy(conn)) {
            return;
        }
    }
}

/* Start the COPY: send `query`, wait for its first result. */
static void start_copy(PGconn *conn, const char *query, outcome_t *out) {
    if (!pq.send_query(conn, query) || flush_all(conn) < 0) {
        out->lost = 1;
        return;
    }
    while (pq.is_busy(conn)) {
        if (wait_socket(conn, POLLIN) < 0 || !pq.consume_input(conn)) {
            out->lost = 1;
            return;
        }
    }
    PGresult *res = pq.get_result(conn);
    if (res == NULL) {
        out->lost = 1;
        return;
    }
    if (pq.result_status(res) == PGRES_COPY_IN) {
        pq.clear(res);
        out->copy_in = 1;
        return;
    }
    /* Refused (no table, no grant, ...): keep the error and read to the end. */
    if (pq.result_status(res) == PGRES_FATAL_ERROR || pq.result_status(res) == PGRES_BAD_RESPONSE) {
        out->error = res;
    } else {
        pq.clear(res);
        out->lost = 1;
    }
    read_results(conn, out);
}

/* Put each piece; on a refusal (the server's error arrived, or the connection failed) stop
 * and read the results. */
static void put_pieces(PGconn *conn, const char **data, const Py_ssize_t *sizes, Py_ssize_t n,
                       outcome_t *out) {
    for (Py_ssize_t i = 0; i < n; i++) {
        for (;;) {
            int r = pq.put_copy_data(conn, data[i], (int)sizes[i]);
            if (r == 1) {
                break;
            }
            if (r < 0 || wait_socket(conn, POLLOUT) < 0 || flush_all(conn) < 0) {
                out->copy_in = 0;
                read_results(conn, out);
                return;
            }
        }
        if (flush_all(conn) < 0) {
            out->copy_in = 0;
            read_results(conn, out);
            return;
        }
    }
}

/* Put one piece after sending everything buffered, without flushing it. */
static void put_last(PGconn *conn, const char *data, Py_ssize_t size, outcome_t *out) {
    if (flush_all(conn) < 0) {
        out->copy_in = 0;
        read_results(conn, out);
        return;
    }
    for (;;) {
        int r = pq.put_copy_data(conn, data, (int)size);
        if (r == 1) {
            return;
        }
        if (r < 0 || wait_socket(conn, POLLOUT) < 0 || flush_all(conn) < 0) {
            out->copy_in = 0;
            read_results(conn, out);
            return;
        }
    }
}

static void end_copy(PGconn *conn, const char *abort_message, outcome_t *out) {
    for (;;) {
        int r = pq.put_copy_end(conn, abort_message);
        if (r == 1) {
            break;
        }
        if (r < 0 || wait_socket(conn, POLLOUT) < 0 || flush_all(conn) < 0) {
            out->copy_in = 0;
            read_results(conn, out);
            return;
        }
    }
    out->end_sent = 1;
    out->copy_in = 0;
    if (flush_all(conn) < 0) {
        out->lost = 1;
    }
    read_results(conn, out);
}

/* The pieces must be bytes of at most INT_MAX bytes each (PQputCopyData's length). */
static int collect(PyObject *pieces, const char ***data, Py_ssize_t **sizes, Py_ssize_t *n) {
    *n = PyTuple_GET_SIZE(pieces);
    *data = PyMem_Malloc(sizeof(char *) * (size_t)(*n + 1));
    *sizes = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(*n + 1));
    if (*data == NULL || *sizes == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        PyObject *piece = PyTuple_GET_ITEM(pieces, i);
        if (!PyBytes_Check(piece) || PyBytes_GET_SIZE(piece) > 0x7fffffff) {
            PyErr_SetString(PyExc_TypeError, "copy pieces must be bytes under 2 GiB");
            return -1;
        }
        (*data)[i] = PyBytes_AS_STRING(piece);
        (*sizes)[i] = PyBytes_GET_SIZE(piece);
    }
    return 0;
}

static PyObject *error_fields(PGresult *res) {
    PyObject *fields = PyDict_New();
    if (fields == NULL) {
        return NULL;
    }
    for (const char *code = diag_fields; *code; code++) {
        const char *value = pq.result_error_field(res, *code);
        if (value == NULL) {
            continue;
        }
        PyObject *key = PyLong_FromLong(*code);
        PyObject *bytes = PyBytes_FromString(value);
        if (key == NULL || bytes == NULL || PyDict_SetItem(fields, key, bytes) < 0) {
            Py_XDECREF(key);
            Py_XDECREF(bytes);
            Py_DECREF(fields);
            return NULL;
        }
        Py_DECREF(key);
        Py_DECREF(bytes);
    }
    return fields;
}

/* The PGconn behind `arg` (psycopg's `pgconn_ptr`), or NULL with an exception set. */
static PGconn *conn_arg(PyObject *arg) {
    if (!pq_loaded) {
        PyErr_SetString(PyExc_RuntimeError, "libpq is not bound (pq_load first)");
        return NULL;
    }
    PGconn *conn = (PGconn *)PyLong_AsVoidPtr(arg);
    if (conn == NULL && !PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError, "null PGconn");
    }
    return conn;
}

/* The error tuple (fields, message, lost) for `out`, a new reference (NULL with an
 * exception set): the server's error result if there was one (cleared here), else
 * libpq's message for the connection. */
static PyObject *error_tuple(PGconn *conn, outcome_t *out) {
    PyObject *fields;
    const char *message;
    if (out->error != NULL) {
        fields = error_fields(out->error);
        message = pq.result_error_message(out->error);
    } else {
        Py_INCREF(Py_None);
        fields = Py_None;
        message = pq.error_message(conn);
    }
    int lost = out->lost || pq.status(conn) == CONNECTION_BAD;
    PyObject *error = fields == NULL ? NULL
                                     : Py_BuildValue("(Ny#O)", fields, message ? message : "",
                                                     (Py_ssize_t)(message ? strlen(message) : 0),
                                                     lost ? Py_True : Py_False);
    if (out->error != NULL) {
        pq.clear(out->error);
        out->error = NULL;
    }
    return error;
}

PyDoc_STRVAR(pq_copy_doc,
             "pq_copy(pgconn_ptr, query, pieces, end, /) -> tuple\n\n"
             "On the PGconn at `pgconn_ptr` (psycopg's `pgconn.pgconn_ptr`, no command in\n"
             "progress, or a COPY this function left open): send `query` (bytes, a COPY ...\n"
             "FROM STDIN) unless it is None, put each bytes of the tuple `pieces`, and if `end`\n"
             "end the data (if `end` is bytes: abort the COPY with that message, putting no\n"
             "pieces) and read every result, all with the GIL released. Returns\n"
             "(copy_open, end_sent, error) where error is None, or (fields, message, lost):\n"
             "the server's error fields (a dict of PG_DIAG codes to bytes) or None, libpq's\n"
             "message, and whether the connection failed.");

static PyObject *pq_copy(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4 || !PyTuple_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "pq_copy(pgconn_ptr, query, pieces: tuple, end)");
        return NULL;
    }
    PGconn *conn = conn_arg(args[0]);
    if (conn == NULL) {
        return NULL;
    }
    const char *query = NULL;
    if (args[1] != Py_None) {
        if (!PyBytes_Check(args[1])) {
            PyErr_SetString(PyExc_TypeError, "query must be bytes or None");
            return NULL;
        }
        query = PyBytes_AS_STRING(args[1]);
    }
    /* bytes: end the COPY with this error message (the server then aborts it). */
    const char *abort_message = PyBytes_Check(args[3]) ? PyBytes_AS_STRING(args[3]) : NULL;
    int end = abort_message != NULL ? 1 : PyObject_IsTrue(args[3]);
    if (end < 0) {
        return NULL;
    }
    /* The tuple holds every piece for the duration; bytes never move or change. */
    PyObject *pieces = args[2];
    const char **data = NULL;
    Py_ssize_t *sizes = NULL;
    Py_ssize_t n = 0;
    if (collect(pieces, &data, &sizes, &n) < 0) {
        PyMem_Free(data);
        PyMem_Free(sizes);
        return NULL;
    }
    outcome_t out = {NULL, 0, 0, query == NULL};
    Py_BEGIN_ALLOW_THREADS
    if (query != NULL) {
        start_copy(conn, query, &out);
    }
    if (out.copy_in && !out.lost && out.error == NULL && abort_message == NULL) {
        /* With the end, the last piece is not flushed on its own: it leaves with the end
         * of the data in one send, after everything before it (as psycopg's exit sends
         * the trailer and CopyDone). */
        Py_ssize_t body = end && n > 0 ? n - 1 : n;
        put_pieces(conn, data, sizes, body, &out);
        if (body < n && out.copy_in && !out.lost && out.error == NULL) {
            put_last(conn, data[body], sizes[body], &out);
        }
    }
    if (end && out.copy_in && !out.lost && out.error == NULL) {
        end_copy(conn, abort_message, &out);
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(data);
    PyMem_Free(sizes);

    PyObject *error;
    if (out.error != NULL || out.lost || pq.status(conn) == CONNECTION_BAD) {
        error = error_tuple(conn, &out);
        if (error == NULL) {
            return NULL;
        }
    } else {
        Py_INCREF(Py_None);
        error = Py_None;
    }
    return Py_BuildValue("(OON)", out.copy_in ? Py_True : Py_False,
                         out.end_sent ? Py_True : Py_False, error);
}

PyDoc_STRVAR(pq_put_doc,
             "pq_put(pgconn_ptr, piece, drain, /) -> tuple\n\n"
             "Put `piece` (bytes) into the COPY a pq_copy() call left open and send what the\n"
             "socket takes now, holding the GIL (nothing here waits). With `drain`, release the\n"
             "GIL and wait until everything buffered is sent. Returns (unsent, error): whether\n"
             "libpq still buffers data, and None or pq_copy()'s error tuple (the COPY is then\n"
             "over and its results read).");

static PyObject *pq_put(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3 || !PyBytes_Check(args[1]) || PyBytes_GET_SIZE(args[1]) > 0x7fffffff) {
        PyErr_SetString(PyExc_TypeError, "pq_put(pgconn_ptr, piece: bytes, drain: bool)");
        return NULL;
    }
    PGconn *conn = conn_arg(args[0]);
    if (conn == NULL) {
        return NULL;
    }
    int drain = PyObject_IsTrue(args[2]);
    if (drain < 0) {
        return NULL;
    }
    const char *data = PyBytes_AS_STRING(args[1]);
    int size = (int)PyBytes_GET_SIZE(args[1]);
    outcome_t out = {NULL, 0, 0, 1};
    int unsent = 0;
    /* In nonblocking mode libpq may refuse data it cannot buffer (0: seen with libpq 18
     * behind a full socket); a refusal or a failure (-1) takes the waiting path below,
     * without the GIL. */
    int r = pq.put_copy_data(conn, data, size);
    if (r == 1 && !drain) {
        unsent = pq.flush(conn);
        if (unsent >= 0) {
            return Py_BuildValue("(OO)", unsent ? Py_True : Py_False, Py_None);
        }
    }
    Py_BEGIN_ALLOW_THREADS
    if (r == 0) {
        const char *piece = data;
        Py_ssize_t piece_size = size;
        put_pieces(conn, &piece, &piece_size, 1, &out);
    } else if (r < 0 || unsent < 0) {
        out.copy_in = 0;
        read_results(conn, &out);
    } else if (flush_all(conn) < 0) {
        out.copy_in = 0;
        read_results(conn, &out);
    }
    Py_END_ALLOW_THREADS
    if (out.copy_in && out.error == NULL && !out.lost) {
        return Py_BuildValue("(OO)", Py_False, Py_None);
    }
    PyObject *error = error_tuple(conn, &out);
    if (error == NULL) {
        return NULL;
    }
    return Py_BuildValue("(ON)", Py_False, error);
}

static PyMethodDef pqcopy_methods[] = {
    {"pq_load", (PyCFunction)(void (*)(void))pq_load, METH_FASTCALL, pq_load_doc},
    {"pq_copy", (PyCFunction)(void (*)(void))pq_copy, METH_FASTCALL, pq_copy_doc},
    {"pq_put", (PyCFunction)(void (*)(void))pq_put, METH_FASTCALL, pq_put_doc},
    {NULL, NULL, 0, NULL},
};

int auditq_add_pqcopy(PyObject *module) {
    return PyModule_AddFunctions(module, pqcopy_methods);
}
