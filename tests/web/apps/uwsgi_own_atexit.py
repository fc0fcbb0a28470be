"""The Flask app of the exit matrix under uWSGI, with the application's own `uwsgi.atexit`
set before auditq's setup: auditq must drain first, then call it. The hook writes, per
process, whether the default writer was already drained and shut down when it ran, next to
EXIT_MATRIX_MARKER."""

from __future__ import annotations

import os
from pathlib import Path

import uwsgi  # type: ignore[import-not-found]  # exists only inside uWSGI


def _own_hook() -> None:
    import auditq.default

    writer = auditq.default.current_writer()  # auditq's drain shuts it down and forgets it
    seen = "drained" if writer is None else f"open, {writer.stats().pending} pending"
    Path(f"{os.environ['EXIT_MATRIX_MARKER']}.{os.getpid()}").write_text(seen)


uwsgi.atexit = _own_hook

from tests.web.apps.exit_flask import app  # noqa: E402  (after the hook, as documented)

__all__ = ["app"]
