/* Fresh interpreter memory taken in one system call instead of a page fault per page.

Why: while the server is stopped the writer's queue only grows, so every few `log()` calls
touch a page the process has never used. Each first touch is a minor page fault, which on
virtual machines is dear (the host backs the page too) and shows in `log()`'s tail latency
(benchmarks/queue_growth.py and benchmarks/README.md have the figures). pymalloc takes its
memory from the OS in arenas (1 MiB on 64-bit 3.10+); this wraps the arena allocator so that
each new arena is populated at once with madvise(MADV_POPULATE_WRITE) (Linux 5.14+): one call
in a few thousand pays for a whole arena instead of one in a few dozen paying for a page.

The hook is process-wide (pymalloc has one arena allocator) and chains to the allocator it
replaced, so arenas are still mapped and unmapped by it; it changes when pages are faulted
in, not which memory is used. An arena that is never filled costs its whole 1 MiB of RSS
instead of the pages touched. Because it changes the whole process, nothing in auditq installs
it unasked: an application opts in with `auditq.prefault_memory()` (auditq/memory.py).
Installed at most once, never removed. The interpreter's own smaller blocks that share this
allocator (16 KiB frame-stack chunks) are left alone.

"At most once" is a flag of its own, not a look at the allocator in place: another library may
have chained its own hook on top of this one since. Installing again would then put this hook
above that one, whose predecessor is this hook: each would call the other until the stack ran
out.

Counters and flags are atomics: from 3.12 isolated subinterpreters each have their own GIL
but share this allocator, so two threads can be in the hook at once. */
#include "_speedups.h"

#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__linux__) && !defined(MADV_POPULATE_WRITE)
#define MADV_POPULATE_WRITE 23 /* the kernel's value; glibc headers before 2.35 lack it */
#endif

/* Only blocks this large are populated: pymalloc arenas (256 KiB or 1 MiB by build). */
#define PREFAULT_MIN_BYTES (256 * 1024)

static PyObjectArenaAllocator previous;
static int hooked = 0;                   /* the hook is in the chain (never taken out) */
static int populate_works = 0;           /* set by the install probe, cleared on refusal */
static unsigned long long populated = 0; /* arenas populated, for tests and diagnostics */

#ifdef MADV_POPULATE_WRITE
static int installed = 0; /* the first install has run, whatever it found (never cleared) */

static void *prefault_alloc(void *ctx, size_t size) {
    (void)ctx;
    void *arena = previous.alloc(previous.ctx, size);
    if (arena != NULL && size >= PREFAULT_MIN_BYTES &&
        __atomic_load_n(&populate_works, __ATOMIC_RELAXED)) {
        int saved = errno; /* the interpreter's caller may look at errno after allocating */
        if (madvise(arena, size, MADV_POPULATE_WRITE) == 0) {
            __atomic_fetch_add(&populated, 1, __ATOMIC_RELAXED);
        } else if (errno == EINVAL || errno == ENOSYS || errno == EPERM) {
            /* A kernel without it, or a seccomp filter that forbids it: stop asking. */
            __atomic_store_n(&populate_works, 0, __ATOMIC_RELAXED);
        }
        /* Other errors (ENOMEM under memory pressure) leave the pages to fault in as usual. */
        errno = saved;
    }
    return arena;
}

static void prefault_free(void *ctx, void *arena, size_t size) {
    (void)ctx;
    previous.free(previous.ctx, arena, size);
}

/* Whether this kernel populates on request: tried once on a page of our own. */
static int populate_supported(void) {
    long page = sysconf(_SC_PAGESIZE);
    size_t size = page > 0 ? (size_t)page : 4096;
    void *probe = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (probe == MAP_FAILED) {
        return 0;
    }
    int works = madvise(probe, size, MADV_POPULATE_WRITE) == 0;
    munmap(probe, size);
    return works;
}
#endif

PyDoc_STRVAR(prefault_arenas_doc,
             "prefault_arenas() -> bool\n\n"
             "Populate each new pymalloc arena in one madvise() call (process-wide, once). "
             "False, and nothing installed, where the kernel or platform cannot.");

PyObject *auditq_prefault_arenas(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
#ifdef MADV_POPULATE_WRITE
    /* Installed already (by this process, or before a re-initialisation that kept it)? The
       flag, not the allocator on top, says so: see the note at the top of this file. The
       callers hold the GIL; the compare-and-swap keeps two subinterpreters from both
       installing. */
    int expected = 0;
    if (!__atomic_compare_exchange_n(&installed, &expected, 1, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE)) {
        return PyBool_FromLong(__atomic_load_n(&populate_works, __ATOMIC_ACQUIRE));
    }
    if (!populate_supported()) {
        /* Nothing installed, and the answer will not change in this process: the flag stays
           set so the probe is not repeated, and later calls report False. */
        Py_RETURN_FALSE;
    }
    PyObjectArenaAllocator current;
    PyObject_GetArenaAllocator(&current);
    previous = current;
    __atomic_store_n(&populate_works, 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE); /* `previous` before the hook that reads it */
    PyObjectArenaAllocator mine = {NULL, prefault_alloc, prefault_free};
    PyObject_SetArenaAllocator(&mine);
    __atomic_store_n(&hooked, 1, __ATOMIC_RELEASE);
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

PyDoc_STRVAR(prefault_installed_doc,
             "prefault_installed() -> bool\n\n"
             "Whether prefault_arenas() put its hook in the arena allocator chain of this "
             "process (it is never taken out).");

PyObject *auditq_prefault_installed(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    return PyBool_FromLong(__atomic_load_n(&hooked, __ATOMIC_ACQUIRE));
}

PyDoc_STRVAR(prefaulted_arenas_doc,
             "prefaulted_arenas() -> int\n\nArenas populated so far by prefault_arenas()'s hook.");

PyObject *auditq_prefaulted_arenas(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&populated, __ATOMIC_RELAXED));
}

static PyMethodDef prefault_methods[] = {
    {"prefault_arenas", auditq_prefault_arenas, METH_NOARGS, prefault_arenas_doc},
    {"prefaulted_arenas", auditq_prefaulted_arenas, METH_NOARGS, prefaulted_arenas_doc},
    {"prefault_installed", auditq_prefault_installed, METH_NOARGS, prefault_installed_doc},
    {NULL, NULL, 0, NULL},
};

int auditq_add_prefault(PyObject *module) {
    return PyModule_AddFunctions(module, prefault_methods);
}
