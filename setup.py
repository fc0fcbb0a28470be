"""The C extension (row encoder and caller path), built when a compiler is there; without
one auditq installs and runs in pure Python (`optional=True` turns a failed build into a
warning)."""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "auditq._speedups",
            sources=[
                "auditq/_speedups.c",
                "auditq/_caller.c",
                "auditq/_prefault.c",
                "auditq/_chain.c",
                "auditq/_pqcopy.c",
            ],
            depends=["auditq/_speedups.h"],
            # dlopen/dlsym find libcrypto's SHA256 (_chain.c) and psycopg's libpq (_pqcopy.c)
            libraries=["dl"] if sys.platform.startswith("linux") else [],
            optional=True,
            extra_compile_args=["-O2"],
        )
    ]
)
