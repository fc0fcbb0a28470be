/* What the C files of auditq._speedups share. */
#ifndef AUDITQ_SPEEDUPS_H
#define AUDITQ_SPEEDUPS_H

#include <Python.h>
#include <stdint.h>

/* Forks this process has been through (a pthread_atfork child handler counts them). */
uint64_t auditq_fork_count(void);

/* Adds the CallerPath type (_caller.c) to the module. */
int auditq_add_caller_path(PyObject *module);

/* Adds prefault_arenas(), prefault_installed() and prefaulted_arenas() (_prefault.c) to the
 * module. */
int auditq_add_prefault(PyObject *module);

/* Adds the hash-chain functions (_chain.c: chain_leaves, chain_stamp, chain_root, ...). */
int auditq_add_chain(PyObject *module);

/* Adds pq_load() and pq_copy() (_pqcopy.c: a whole COPY through libpq without the GIL). */
int auditq_add_pqcopy(PyObject *module);

#endif
