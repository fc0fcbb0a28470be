"""The handlers of `auditq keygen`, `auditq checkpoint` and `auditq verify`.

Exit status: 0 clean (or done), 1 damage found (or the database failed), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from .config import dsn_from_env
from .dsn import Dsn


def add_integrity_commands(commands: Any) -> None:
    keygen = commands.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing checkpoints",
        description="Writes NAME.key (private, 0600: keep it on the checkpointer's host only) "
        "and NAME.pub (the verifier key auditors use).",
    )
    keygen.add_argument("name", help="the key's name, e.g. audit.example.com/checkpoints")
    keygen.add_argument("--out", default=".", help="directory for the two files (.)")
    keygen.set_defaults(dsn=None, schema=None, table=None)
    checkpoint = commands.add_parser(
        "checkpoint",
        help="sign the heads of every stream; store the note in the database",
        description="Run as its own role (SELECT on the digests, INSERT on the checkpoints), "
        "from cron or a sidecar: the interval is how long a cut tail can go unnoticed.",
    )
    verify = commands.add_parser(
        "verify",
        help="recompute every chained row and batch and name the damage",
        description="Exit status: 0 clean, 1 damage found, 2 bad usage. See "
        "docs/tamper-evidence.md for the findings and the --json fields.",
    )
    check_export = commands.add_parser(
        "verify-export",
        help="check an `auditq export --proofs` file offline (no database)",
        description="Checks the checkpoint's signature, the digests up to its signed heads, "
        "and each row's bytes and inclusion path. Exit status: 0 nothing damaged (rows past "
        "the checkpoint are UNANCHORED notices), 1 damage found, 2 bad usage.",
    )
    check_export.add_argument("file", help="the export (- for stdin)")
    check_export.add_argument(
        "--public-key", action="append", required=True, help="verifier key file (repeatable)"
    )
    check_export.add_argument("--json", action="store_true", help="one JSON object per line")
    check_export.set_defaults(dsn=None, schema=None, table=None)
    for sub in (checkpoint, verify):
        sub.add_argument("--dsn", help="PostgreSQL connection string")
        sub.add_argument("--schema", help="schema (default: $AUDITQ_SCHEMA or public)")
        sub.add_argument("--table", help="table (default: $AUDITQ_TABLE or audit_logs)")
        sub.add_argument(
            "--checkpoint-dir",
            help="directory of checkpoint notes kept outside the database (written by "
            "checkpoint, compared by verify)",
        )
    checkpoint.add_argument("--key", required=True, help="the private key file from keygen")
    checkpoint.add_argument("--origin", help="the note's origin line (auditq/<schema>.<table>)")
    verify.add_argument("--since", help="a checkpoint number, or a time (ISO 8601)")
    verify.add_argument("--tenant", help="only the batches holding this tenant's rows")
    verify.add_argument(
        "--public-key", action="append", default=[], help="verifier key file (repeatable)"
    )
    verify.add_argument("--json", action="store_true", help="one JSON object per line")
    verify.add_argument("--jobs", default="1", help="processes (1)")
    verify.add_argument(
        "--allow-unchained",
        action="store_true",
        help="count rows written without the chain after it began, do not call them EXTRA "
        "(during a rolling upgrade)",
    )


def _fail(command: str, message: str, status: int = 2) -> int:
    print(f"auditq {command}: {message}", file=sys.stderr)
    return status


def run_integrity(args: argparse.Namespace, env: dict[str, object], schema: str) -> int:
    if args.command == "keygen":
        return _keygen(args)
    if args.command == "verify-export":
        return _verify_export(args)
    table = args.table or str(env.get("table") or "audit_logs")
    dsn = args.dsn or dsn_from_env()
    if not dsn:
        return _fail(args.command, "no database: pass --dsn or set AUDITQ_DSN / DATABASE_URL")
    if args.command == "checkpoint":
        return _checkpoint(args, Dsn(dsn), schema, table)
    return _verify(args, Dsn(dsn), schema, table)


def _keygen(args: argparse.Namespace) -> int:
    from .checkpoint import KeyFileError, MissingExtra, keygen, write_private

    try:
        key = keygen(args.name)
    except (KeyFileError, MissingExtra) as exc:
        return _fail("keygen", str(exc))
    safe = args.name.replace("/", "_")
    out = Path(args.out)
    private, public = out / f"{safe}.key", out / f"{safe}.pub"
    try:
        write_private(private, key.text())
        public.write_text(key.verifier().text() + "\n")
    except FileExistsError:
        return _fail("keygen", f"{private} exists; refusing to overwrite a signer key")
    except OSError as exc:
        return _fail("keygen", str(exc), 1)
    print(f"auditq keygen: {private} (private, 0600) and {public}")
    return 0


def _checkpoint(args: argparse.Namespace, dsn: Dsn, schema: str, table: str) -> int:
    from .checkpoint import Inconsistent, KeyFileError, MissingExtra, make_checkpoint, read_signer

    try:
        key = read_signer(Path(args.key))
    except (OSError, KeyFileError, MissingExtra, ValueError) as exc:
        return _fail("checkpoint", f"key: {exc}")
    directory = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    try:
        with psycopg.connect(dsn.secret_value) as conn:
            point = make_checkpoint(
                conn, schema, table, key, origin=args.origin, directory=directory
            )
    except Inconsistent as exc:
        return _fail("checkpoint", f"refusing to sign: {exc}", 1)
    except psycopg.errors.UndefinedTable as exc:
        return _fail("checkpoint", f"{schema}.{table} is not chained: {dsn.scrub(str(exc))}")
    except psycopg.Error as exc:
        return _fail("checkpoint", dsn.scrub(str(exc)), 1)
    print(f"auditq checkpoint: {point.number} signs {len(point.heads)} stream heads")
    return 0


def _verify(args: argparse.Namespace, dsn: Dsn, schema: str, table: str) -> int:
    from .checkpoint import KeyFileError, MissingExtra, read_verifier
    from .verify import Finding, Options, UsageError, verify

    try:
        jobs = int(args.jobs)
        if jobs < 1:
            raise ValueError
    except ValueError:
        return _fail("verify", f"--jobs must be a whole number of at least 1, not {args.jobs!r}")
    since_checkpoint = since_time = None
    if args.since:
        if args.since.isdigit():
            since_checkpoint = int(args.since)
        else:
            try:
                since_time = datetime.fromisoformat(args.since)
            except ValueError:
                return _fail(
                    "verify", f"--since: not a checkpoint number or a time: {args.since!r}"
                )
            if since_time.tzinfo is None:
                since_time = since_time.replace(tzinfo=UTC)
    try:
        keys = tuple(read_verifier(Path(p)) for p in args.public_key)
        if keys:
            from .checkpoint import crypto_module

            crypto_module()
    except (OSError, KeyFileError, MissingExtra) as exc:
        return _fail("verify", f"public key: {exc}")
    opts = Options(
        dsn=dsn.secret_value,
        schema=schema,
        table=table,
        keys=keys,
        external=Path(args.checkpoint_dir) if args.checkpoint_dir else None,
        since_checkpoint=since_checkpoint,
        since_time=since_time,
        tenant=args.tenant,
        jobs=jobs,
        allow_unchained=args.allow_unchained,
    )

    def show(finding: Finding) -> None:
        if args.json:
            print(json.dumps(finding.json()), flush=False)
        else:
            print(finding.line())

    try:
        summary = verify(opts, show)
    except UsageError as exc:
        return _fail("verify", str(exc))
    except psycopg.errors.UndefinedTable as exc:
        return _fail("verify", f"{schema}.{table} is not chained: {dsn.scrub(str(exc))}")
    except psycopg.Error as exc:
        return _fail("verify", dsn.scrub(str(exc)), 1)
    out: dict[str, Any] = summary.json()
    if args.json:
        print(json.dumps(out))
    else:
        state = "DAMAGED" if summary.damaged else "clean"
        counts = ", ".join(f"{k} {v}" for k, v in out["findings"].items()) or "no findings"
        print(
            f"auditq verify: {state}: {summary.rows} rows in {summary.digests} batches of "
            f"{summary.streams} streams, {summary.checkpoints} checkpoints "
            f"({'signatures checked' if keys else 'signatures NOT checked: pass --public-key'}); "
            f"{counts}; {summary.unchained_rows} unchained rows"
        )
    return 1 if summary.damaged else 0


def _verify_export(args: argparse.Namespace) -> int:
    from .checkpoint import KeyFileError, MissingExtra, crypto_module, read_verifier
    from .proofs import verify_export
    from .verify import Finding

    try:
        keys = tuple(read_verifier(Path(p)) for p in args.public_key)
        crypto_module()
    except (OSError, KeyFileError, MissingExtra) as exc:
        return _fail("verify-export", f"public key: {exc}")

    def show(finding: Finding) -> None:
        print(json.dumps(finding.json()) if args.json else finding.line())

    try:
        if args.file == "-":
            summary = verify_export(sys.stdin.buffer, keys, show)
        else:
            with open(args.file, "rb") as source:
                summary = verify_export(source, keys, show)
    except OSError as exc:
        return _fail("verify-export", str(exc))
    except (ValueError, KeyError, TypeError) as exc:
        return _fail("verify-export", f"not an auditq proofs export: {exc}")
    out = summary.json()
    if args.json:
        print(json.dumps(out))
    else:
        counts = ", ".join(f"{k} {v}" for k, v in out["findings"].items()) or "no findings"
        state = "DAMAGED" if summary.damaged else "clean"
        print(
            f"auditq verify-export: {state}: {summary.proven} of {summary.rows} rows proven "
            f"against the signed checkpoint, {summary.digests} digests; {counts}"
        )
    return 1 if summary.damaged else 0
