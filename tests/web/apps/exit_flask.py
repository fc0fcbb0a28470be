"""The Flask app of the exit matrix, set up as docs/flask.md shows (configure at import, the
WSGI middleware, auditq's exit handlers for servers that end by the signal)."""

from __future__ import annotations

from flask import Flask

import auditq
import auditq.signals
from auditq.middleware import AuditWSGIMiddleware

auditq.configure()
auditq.signals.install_exit_handlers()

app = Flask(__name__)
app.wsgi_app = AuditWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]


@app.before_request
def _exit_handlers() -> None:
    # A pre-fork server resets signal handlers in each worker: install them there again.
    auditq.signals.ensure_installed()


@app.get("/hit/<rid>")
def hit(rid: str) -> tuple[str, int]:
    accepted = auditq.log("test.hit", resource_type="path", resource_id=rid)
    return "ok", 200 if accepted else 503


@app.get("/health")
def health() -> str:
    return "ok"
