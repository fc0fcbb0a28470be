/*
 * The caller's path of AuditWriter.log(), in C, for the common call.
 *
 * Why: log() is what every caller pays on every event. In Python its keyword binding, the
 * attribute reads and the tuple build dominate it; here the same steps cost a fraction of
 * that (benchmarks/README.md), which is both the caller's latency and GIL time the writer
 * thread gets back.
 *
 * Why it stays small: it takes the calls the Python log() takes without its slow paths
 * (one positional str action, known keywords, not in a forked child) and does its steps
 * in its order, queueing the very same 13-tuple. It is made from the writer's buffer (its
 * deque, max_queue and wake-up count, fixed for the buffer's life) and the callbacks it is
 * handed: `refuse()`, `reject(reason)` and `start()`, which count and report as the Python
 * log() does, and a gate object whose `closed` and `started` attributes it reads per call.
 * It calls the same Python code for everything with rules of its own: otel.with_trace and
 * entry.dump_metadata for the metadata. Any other call (wrong arguments, an invalid action,
 * a forked child) goes to the Python log(). A strict writer does not use it at all.
 * Any other call, including every call that ends in a refusal or an error, goes to the
 * Python log() unchanged, which keeps every rule and every message in one place.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "_speedups.h"

enum {
    K_TENANT_ID,
    K_ACTOR_ID,
    K_ACTOR_TYPE,
    K_RESOURCE_TYPE,
    K_RESOURCE_ID,
    K_OUTCOME,
    K_IP,
    K_USER_AGENT,
    K_REQUEST_ID,
    K_METADATA,
    K_OCCURRED_AT,
    K_ID,
    KEYWORDS
};

static const char *const keyword_names[KEYWORDS] = {
    "tenant_id", "actor_id",   "actor_type", "resource_type", "resource_id", "outcome",
    "ip",        "user_agent", "request_id", "metadata",      "occurred_at", "id",
};

static PyObject *keywords[KEYWORDS]; /* interned, so a call's names match by identity */
static PyObject *str_closed, *str_started, *str_enabled, *str_with_trace;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *slow;    /* the writer's Python log() (bound): every call this does not take */
    PyObject *gate;    /* its `closed` and `started` attributes, read per call */
    PyObject *refuse;  /* refuse(): a full queue or a closed writer (counts the call) */
    PyObject *reject;  /* reject(reason, action): metadata that does not serialise */
    PyObject *start;   /* start(): the first call starts the writer thread */
    PyObject *queue;   /* the writer's deque */
    PyObject *append;  /* its bound append */
    PyObject *wake;    /* the writer's wake-up: its Event's bound set */
    PyObject *dump;    /* entry.dump_metadata */
    PyObject *context; /* context.current, the ContextVar of bound fields */
    PyObject *otel;    /* the otel module: its `enabled` is read per call */
    Py_ssize_t max_queue;
    Py_ssize_t wake_every;
    uint64_t forks; /* the fork count when made: another count means a forked child */
} CallerPath;

static int keyword_index(PyObject *name) {
    for (int k = 0; k < KEYWORDS; k++) {
        if (name == keywords[k]) {
            return k;
        }
    }
    for (int k = 0; k < KEYWORDS; k++) { /* a name built at run time, not interned */
        if (PyUnicode_Check(name) && PyUnicode_Compare(name, keywords[k]) == 0) {
            return k;
        }
    }
    return -1;
}

/* 1 when attribute `name` of `obj` is true, 0 when false, -1 on error. */
static int attribute_true(PyObject *obj, PyObject *name) {
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) {
        return -1;
    }
    int truth = value == Py_True ? 1 : value == Py_False || value == Py_None ? 0 : PyObject_IsTrue(value);
    Py_DECREF(value);
    return truth;
}

/* str() of the exception being raised, which it clears; NULL with an error set. */
static PyObject *raised_message(void) {
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
    PyObject *message = PyObject_Str(exc);
    Py_DECREF(exc);
    return message;
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    PyObject *message = value == NULL ? PyUnicode_FromString("") : PyObject_Str(value);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return message;
#endif
}

/* The Python log(), with the same arguments. */
static PyObject *slow_call(CallerPath *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    return PyObject_Vectorcall(self->slow, args, (size_t)nargs, kwnames);
}

static PyObject *caller_path_call(PyObject *callable, PyObject *const *args, size_t nargsf,
                                  PyObject *kwnames) {
    CallerPath *self = (CallerPath *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *kw[KEYWORDS] = {NULL};
    if (self->slow == NULL) { /* cleared by the garbage collector: never called then */
        PyErr_SetString(PyExc_ReferenceError, "this writer's log() was cleared");
        return NULL;
    }
    if (nargs != 1) {
        return slow_call(self, args, nargs, kwnames);
    }
    PyObject *action = args[0];
    if (!PyUnicode_CheckExact(action) || PyUnicode_GET_LENGTH(action) == 0) {
        return slow_call(self, args, nargs, kwnames);
    }
    if (kwnames != NULL) {
        Py_ssize_t count = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < count; i++) {
            int k = keyword_index(PyTuple_GET_ITEM(kwnames, i));
            if (k < 0 || kw[k] != NULL) {
                return slow_call(self, args, nargs, kwnames);
            }
            kw[k] = args[nargs + i];
        }
    }
    if (auditq_fork_count() != self->forks) {
        return slow_call(self, args, nargs, kwnames);
    }
    /* From here on, the steps of the Python log() in its order. */
    int traced = attribute_true(self->otel, str_enabled);
    if (traced < 0) {
        return NULL;
    }
    PyObject *bound = NULL;
    if (PyContextVar_Get(self->context, NULL, &bound) < 0) {
        return NULL;
    }
    if (bound != NULL && bound != Py_None) {
        if (!PyTuple_CheckExact(bound) || PyTuple_GET_SIZE(bound) != 6) {
            Py_DECREF(bound);
            return slow_call(self, args, nargs, kwnames);
        }
        /* The order of context.Bound, as the Python log() applies it. */
        static const int from_context[6] = {K_TENANT_ID, K_ACTOR_ID,  K_ACTOR_TYPE,
                                            K_REQUEST_ID, K_IP, K_USER_AGENT};
        for (int i = 0; i < 6; i++) {
            int k = from_context[i];
            if (kw[k] == NULL || kw[k] == Py_None) {
                kw[k] = PyTuple_GET_ITEM(bound, i); /* borrowed: `bound` is held below */
            }
        }
    }
    /* OpenTelemetry installed: the active span's ids join the metadata. */
    PyObject *given = Py_NewRef(kw[K_METADATA] != NULL ? kw[K_METADATA] : Py_None);
    if (traced) {
        PyObject *with_trace = PyObject_GetAttr(self->otel, str_with_trace);
        Py_SETREF(given, with_trace == NULL ? NULL : PyObject_CallOneArg(with_trace, given));
        Py_XDECREF(with_trace);
        if (given == NULL) {
            Py_XDECREF(bound);
            return NULL;
        }
    }
    /* The queue bound and the closed flag, read after with_trace (which may run a caller's
     * Mapping code), as log() reads them; a refusal is counted by refuse(). */
    int closed = attribute_true(self->gate, str_closed);
    Py_ssize_t size = closed < 0 ? -1 : PyObject_Length(self->queue);
    if (size < 0) {
        Py_DECREF(given);
        Py_XDECREF(bound);
        return NULL;
    }
    if (closed || size >= self->max_queue) {
        Py_DECREF(given);
        Py_XDECREF(bound);
        return PyObject_CallNoArgs(self->refuse);
    }
    PyObject *metadata = NULL;
    if (given != Py_None) {
        metadata = PyObject_CallOneArg(self->dump, given);
        if (metadata == NULL) {
            Py_DECREF(given);
            Py_XDECREF(bound);
            if (!PyErr_ExceptionMatches(PyExc_ValueError)) {
                return NULL;
            }
            /* Rejected with the reason, by reject() (it counts it). */
            PyObject *reason = raised_message();
            if (reason == NULL) {
                return NULL;
            }
            PyObject *result = PyObject_CallFunctionObjArgs(self->reject, reason, action, NULL);
            Py_DECREF(reason);
            return result;
        }
    }
    Py_DECREF(given);
    PyObject *stamp;
    if (kw[K_OCCURRED_AT] != NULL && kw[K_OCCURRED_AT] != Py_None) {
        stamp = Py_NewRef(kw[K_OCCURRED_AT]);
    } else {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now); /* what time.time_ns() reads */
        stamp = PyLong_FromLongLong((long long)now.tv_sec * 1000000000LL + now.tv_nsec);
    }
    PyObject *row = stamp == NULL ? NULL : PyTuple_New(13);
    if (row == NULL) {
        Py_XDECREF(stamp);
        Py_XDECREF(metadata);
        Py_XDECREF(bound);
        return NULL;
    }
    /* The Row layout of entry.py: (id, occurred_at, action, tenant_id, actor_id,
     * actor_type, resource_type, resource_id, outcome, ip, user_agent, request_id,
     * metadata). */
    static const int order[9] = {K_TENANT_ID,  K_ACTOR_ID, K_ACTOR_TYPE,  K_RESOURCE_TYPE,
                                 K_RESOURCE_ID, K_OUTCOME,  K_IP,          K_USER_AGENT,
                                 K_REQUEST_ID};
    PyTuple_SET_ITEM(row, 0, Py_NewRef(kw[K_ID] != NULL ? kw[K_ID] : Py_None));
    PyTuple_SET_ITEM(row, 1, stamp);
    PyTuple_SET_ITEM(row, 2, Py_NewRef(action));
    for (int i = 0; i < 9; i++) {
        PyObject *value = kw[order[i]];
        PyTuple_SET_ITEM(row, 3 + i, Py_NewRef(value != NULL ? value : Py_None));
    }
    PyTuple_SET_ITEM(row, 12, metadata != NULL ? metadata : Py_NewRef(Py_None));
    Py_XDECREF(bound);
    PyObject *done = PyObject_CallOneArg(self->append, row);
    Py_DECREF(row);
    if (done == NULL) {
        return NULL;
    }
    Py_DECREF(done);
    if ((size + 1) % self->wake_every == 0) {
        done = PyObject_CallNoArgs(self->wake);
        if (done == NULL) {
            return NULL;
        }
        Py_DECREF(done);
    }
    int started = attribute_true(self->gate, str_started);
    if (started < 0) {
        return NULL;
    }
    if (!started) { /* the first call starts the writer thread */
        done = PyObject_CallNoArgs(self->start);
        if (done == NULL) {
            return NULL;
        }
        Py_DECREF(done);
    }
    Py_RETURN_TRUE;
}

static PyObject *caller_path_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *slow, *queue, *wake, *gate, *refuse, *reject, *start, *dump, *context, *otel;
    Py_ssize_t max_queue, wake_every;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "CallerPath takes positional arguments only");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOnn:CallerPath", &slow, &queue, &wake, &gate, &refuse,
                          &reject, &start, &dump, &context, &otel, &max_queue, &wake_every)) {
        return NULL;
    }
    if (!PyContextVar_CheckExact(context) || wake_every < 1) {
        PyErr_SetString(PyExc_TypeError, "CallerPath: context must be a ContextVar, wake_every >= 1");
        return NULL;
    }
    PyObject *append = PyObject_GetAttrString(queue, "append");
    if (append == NULL) {
        return NULL;
    }
    CallerPath *self = (CallerPath *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(append);
        return NULL;
    }
    self->vectorcall = caller_path_call;
    self->slow = Py_NewRef(slow);
    self->gate = Py_NewRef(gate);
    self->refuse = Py_NewRef(refuse);
    self->reject = Py_NewRef(reject);
    self->start = Py_NewRef(start);
    self->queue = Py_NewRef(queue);
    self->append = append;
    self->wake = Py_NewRef(wake);
    self->dump = Py_NewRef(dump);
    self->context = Py_NewRef(context);
    self->otel = Py_NewRef(otel);
    self->max_queue = max_queue;
    self->wake_every = wake_every;
    self->forks = auditq_fork_count();
    return (PyObject *)self;
}

static int caller_path_traverse(CallerPath *self, visitproc visit, void *arg) {
    Py_VISIT(self->slow);
    Py_VISIT(self->gate);
    Py_VISIT(self->refuse);
    Py_VISIT(self->reject);
    Py_VISIT(self->start);
    Py_VISIT(self->queue);
    Py_VISIT(self->append);
    Py_VISIT(self->wake);
    Py_VISIT(self->dump);
    Py_VISIT(self->context);
    Py_VISIT(self->otel);
    return 0;
}

static int caller_path_clear(CallerPath *self) {
    Py_CLEAR(self->slow);
    Py_CLEAR(self->gate);
    Py_CLEAR(self->refuse);
    Py_CLEAR(self->reject);
    Py_CLEAR(self->start);
    Py_CLEAR(self->queue);
    Py_CLEAR(self->append);
    Py_CLEAR(self->wake);
    Py_CLEAR(self->dump);
    Py_CLEAR(self->context);
    Py_CLEAR(self->otel);
    return 0;
}

static void caller_path_dealloc(CallerPath *self) {
    PyObject_GC_UnTrack(self);
    caller_path_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* What this stands in for, so `inspect.signature(writer.log)` (which follows __wrapped__)
 * and `help(writer.log)` (which reads __doc__) show the Python log()'s fields. */
static PyObject *caller_path_wrapped(CallerPath *self, void *closure) {
    return Py_NewRef(self->slow != NULL ? self->slow : Py_None);
}

static PyObject *caller_path_docstring(CallerPath *self, void *closure) {
    if (self->slow == NULL) {
        Py_RETURN_NONE;
    }
    return PyObject_GetAttrString(self->slow, "__doc__");
}

static PyGetSetDef caller_path_getset[] = {
    {"__wrapped__", (getter)caller_path_wrapped, NULL, NULL, NULL},
    {"__doc__", (getter)caller_path_docstring, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CallerPathType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "auditq._speedups.CallerPath",
    .tp_basicsize = sizeof(CallerPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_getset = caller_path_getset,
    .tp_new = caller_path_new,
    .tp_traverse = (traverseproc)caller_path_traverse,
    .tp_clear = (inquiry)caller_path_clear,
    .tp_dealloc = (destructor)caller_path_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(CallerPath, vectorcall),
};

int auditq_add_caller_path(PyObject *module) {
    for (int k = 0; k < KEYWORDS; k++) {
        if (keywords[k] == NULL && (keywords[k] = PyUnicode_InternFromString(keyword_names[k])) == NULL) {
            return -1;
        }
    }
    if ((str_closed == NULL && (str_closed = PyUnicode_InternFromString("closed")) == NULL) ||
        (str_started == NULL && (str_started = PyUnicode_InternFromString("started")) == NULL) ||
        (str_enabled == NULL && (str_enabled = PyUnicode_InternFromString("enabled")) == NULL) ||
        (str_with_trace == NULL &&
         (str_with_trace = PyUnicode_InternFromString("with_trace")) == NULL)) {
        return -1;
    }
    if (PyType_Ready(&CallerPathType) < 0) {
        return -1;
    }
    Py_INCREF(&CallerPathType);
    if (PyModule_AddObject(module, "CallerPath", (PyObject *)&CallerPathType) < 0) {
        Py_DECREF(&CallerPathType);
        return -1;
    }
    return 0;
}
