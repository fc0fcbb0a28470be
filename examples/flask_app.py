"""Flask with auditq: wrap the WSGI app once; handlers log with the request's context.

    pip install auditq flask gunicorn
    AUDITQ_DSN=postgresql://app@db/app gunicorn --preload -w 4 examples.flask_app:app
    AUDITQ_DSN=postgresql://app@db/app flask --app examples.flask_app run      # development

`auditq.configure()` runs at import: with `--preload` that is in gunicorn's master, and each
forked worker starts with its own empty queue, connection and thread. Gunicorn workers exit
normally on SIGTERM, so auditq's exit hook writes what they accepted.
"""

from __future__ import annotations

from flask import Flask, request

import auditq
from auditq.middleware import AuditWSGIMiddleware

auditq.configure()  # AUDITQ_DSN / DATABASE_URL and AUDITQ_* options

app = Flask(__name__)
# Behind a proxy: trusted_proxies=["10.0.0.0/8"] (or AUDITQ_TRUSTED_PROXIES).
app.wsgi_app = AuditWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]


@app.post("/documents/<doc_id>/share")
def share(doc_id: str) -> dict[str, str]:
    user = request.headers.get("X-User", "anonymous")
    with auditq.context(tenant_id="t-42", actor_id=user, actor_type="user"):
        auditq.log("document.share", resource_type="document", resource_id=doc_id)
    return {"shared": doc_id}


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}
