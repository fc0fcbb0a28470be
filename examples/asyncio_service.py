"""An asyncio service with auditq: configuration from the environment (or a .env file), a
readiness check at start, redaction on the writer thread, and flushing off the event loop.

    AUDITQ_DSN=postgresql://app@db/app python examples/asyncio_service.py [--env-file .env]

It checks the database first (exit 1 with what is missing, one line each), then runs 50
concurrent "requests", each logging one login event whose password-ish metadata is masked
before it is written, flushes with `await auditq.aflush()`, shuts down with
`await auditq.ashutdown()`, and prints its stats as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import auditq
from auditq.hooks import mask


async def handle(n: int) -> None:
    """One request: the context binds who and where; the entry's secret is masked later."""
    with auditq.context(tenant_id="t-1", actor_id=f"u-{n}", request_id=f"req-{n}"):
        await asyncio.sleep(0)  # the request's real work would be here
        auditq.log("user.login", outcome="success", metadata={"password": "hunter2", "n": n})


async def main(env_file: str | None) -> int:
    writer = auditq.configure(
        env_file=env_file, before_write=mask(metadata_keys=["password", "token"])
    )
    assert isinstance(writer, auditq.AuditWriter)
    ready = await asyncio.to_thread(writer.check)  # connects: off the event loop
    if not ready.ok:
        for line in ready.lines():
            print(line, file=sys.stderr)
        await auditq.ashutdown(timeout=1)
        return 1
    await asyncio.gather(*(handle(n) for n in range(50)))
    flushed = await auditq.aflush(timeout=10)
    stats = writer.stats()
    clean = await auditq.ashutdown(timeout=10)
    print(json.dumps({"flushed": flushed, "clean": clean, "written": stats.written}))
    return 0 if flushed and clean and stats.written == 50 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-file", help="a .env file with AUDITQ_* settings")
    sys.exit(asyncio.run(main(parser.parse_args().env_file)))
