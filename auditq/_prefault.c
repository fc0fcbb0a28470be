/* Fresh interpreter memory taken in one system call instead of a page fault per page.

Why: while the server is stopped the writer's queue only grows, so every few `log()` calls
touch a page the process has never used. Each first touch is a minor page fault, and on the
virtual machines this runs on one costs ~5 us (the host backs the page too), which put the
frozen-server p99 of `log()` at 6-12 us against ~1.5 us for the same calls on a drained queue
(benchmarks/queue_growth.py). pymalloc takes its memory from the OS in 1 MiB arenas; this
wraps the arena allocator so that each new arena is populated at once with
madvise(MADV_POPULATE_WRITE) (Linux 5.14+), ~1.4 us a page inside the kernel: the cost moves
from 1 call in ~15 to 1 call in ~3,500, which pays ~0.35 ms once.

The hook is process-wide (pymalloc has one arena allocator) and chains to the allocator it
replaced, so arenas are still mapped and unmapped by it; it changes when pages are faulted
in, not which memory is used. An arena that is never filled costs its whole 1 MiB of RSS
instead of the pages touched. Installed at most once, never removed. */
#include "_speedups.h"

#include <errno.h>
#include <sys/mman.h>

static PyObjectArenaAllocator previous;
static int installed = 0;
static int populate_works = 1;          /* cleared when the kernel refuses (EINVAL: < 5.14) */
static unsigned long long populated = 0; /* arenas populated, for tests and diagnostics */

#ifdef MADV_POPULATE_WRITE
static void *prefault_alloc(void *ctx, size_t size) {
    (void)ctx;
    void *arena = previous.alloc(previous.ctx, size);
    if (arena != NULL && populate_works) {
        if (madvise(arena, size, MADV_POPULATE_WRITE) == 0) {
            populated++;
        } else if (errno == EINVAL || errno == ENOSYS) {
            populate_works = 0; /* an older kernel: stop asking */
        }
        /* Other errors (ENOMEM under memory pressure) leave the pages to fault in as usual. */
    }
    return arena;
}

static void prefault_free(void *ctx, void *arena, size_t size) {
    (void)ctx;
    previous.free(previous.ctx, arena, size);
}
#endif

PyDoc_STRVAR(prefault_arenas_doc,
             "prefault_arenas() -> bool\n\n"
             "Populate each new pymalloc arena in one madvise() call (process-wide, once). "
             "False where the platform has no MADV_POPULATE_WRITE.");

PyObject *auditq_prefault_arenas(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
#ifdef MADV_POPULATE_WRITE
    if (!installed) {
        PyObjectArenaAllocator mine = {NULL, prefault_alloc, prefault_free};
        PyObject_GetArenaAllocator(&previous);
        PyObject_SetArenaAllocator(&mine);
        installed = 1;
    }
    return PyBool_FromLong(populate_works);
#else
    Py_RETURN_FALSE;
#endif
}

PyDoc_STRVAR(prefaulted_arenas_doc,
             "prefaulted_arenas() -> int\n\nArenas populated so far by prefault_arenas()'s hook.");

PyObject *auditq_prefaulted_arenas(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    return PyLong_FromUnsignedLongLong(populated);
}

static PyMethodDef prefault_methods[] = {
    {"prefault_arenas", auditq_prefault_arenas, METH_NOARGS, prefault_arenas_doc},
    {"prefaulted_arenas", auditq_prefaulted_arenas, METH_NOARGS, prefaulted_arenas_doc},
    {NULL, NULL, 0, NULL},
};

int auditq_add_prefault(PyObject *module) {
    return PyModule_AddFunctions(module, prefault_methods);
}
