"""Flask with auditq: wrap the WSGI app once; handlers log with the request's context.

    pip install ./auditq flask gunicorn    # from a checkout: no release yet
    AUDITQ_DSN=postgresql://app@db/app gunicorn --preload -w 4 examples.flask_app:app
    AUDITQ_DSN=postgresql://app@db/app flask --app examples.flask_app run      # development

`auditq.configure()` runs at import: with `--preload` that is in gunicorn's master, and each
forked worker starts with its own empty queue, connection and thread. Gunicorn workers exit
normally on SIGTERM, so auditq's exit hook writes what they accepted; the exit handlers cover
servers that end by the signal instead (`flask run`). See docs/flask.md.
"""

from __future__ import annotations

from flask import Flask, request

import auditq
import auditq.signals
from auditq.middleware import AuditWSGIMiddleware

auditq.configure()  # AUDITQ_DSN / DATABASE_URL and AUDITQ_* options
auditq.signals.install_exit_handlers()

app = Flask(__name__)
# Behind a proxy: trusted_proxies=["10.0.0.0/8"] (or AUDITQ_TRUSTED_PROXIES).
app.wsgi_app = AuditWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]


@app.before_request
def _exit_handlers_in_this_worker() -> None:
    # A pre-fork server resets signal handlers in each worker: install them there again
    # (once per process; a no-op in threads other than the main one).
    auditq.signals.ensure_installed()


@app.post("/documents/<doc_id>/share")
def share(doc_id: str) -> dict[str, str]:
    user = request.headers.get("X-User", "anonymous")
    with auditq.context(tenant_id="t-42", actor_id=user, actor_type="user"):
        auditq.log("document.share", resource_type="document", resource_id=doc_id)
    return {"shared": doc_id}


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}
