"""Who may do what to the audit table: an owner nobody logs in as, an INSERT-only writer, and
a reader that sees one tenant at a time under row-level security.

* owner (NOLOGIN): owns the table, its partitions, the bookkeeping tables and the
  partition function. Only a member of it (or a superuser) can drop guards, partitions or
  policies; `auditq retention` runs as it.
* writer: INSERT (on the table and on each partition, where `auditq.routes` copies a
  month's batch directly), plus what the idempotent replay needs: SELECT (the replay creates a
  TEMP staging table `LIKE` the audit table, which PostgreSQL allows only with SELECT, and
  reads back the inserted ids with RETURNING), TEMP on the database, and EXECUTE on the
  partition function. It has BYPASSRLS: PostgreSQL refuses `COPY FROM` into a table with
  row-level security for any role subject to it (SQLSTATE 0A000), and COPY is the fast path.
  BYPASSRLS is a role attribute, not inherited through membership: the application must
  connect as the writer role itself (or `SET ROLE` to it, e.g. `options=-c role=...`).
* reader: SELECT, filtered by the policy `auditq_tenant_read` to the rows whose tenant_id
  equals the session setting `auditq.tenant` (no rows when it is unset or empty), and
  SELECT on the chain's digests, checkpoints and retention records (a tenant's proofs).
* checkpointer (the hash chain, docs/tamper-evidence.md): SELECT on the digests, SELECT
  and INSERT on the checkpoints; nothing on the audit table. `auditq checkpoint` runs as it,
  with the signer key, away from the application's hosts.
* verifier: SELECT on the table (every tenant, by the policy `auditq_verify_read`) and on
  the chain tables; `auditq verify` runs as it.
The writer also gets INSERT and SELECT on the digests (a batch's digest is inserted in its
transaction; a replay reads it back). The chain tables belong to the owner, like the
table; their own triggers refuse UPDATE, DELETE and TRUNCATE.

UPDATE, DELETE, TRUNCATE, REFERENCES and TRIGGER are revoked from every other grantee.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import sql

from . import chain_schema, guards, partitions
from .tables import RETENTION_TABLE, VERSION_TABLE, lock, qualified, regclass_text

#: The session setting the reader's policy compares tenant_id with.
TENANT_SETTING: Final = "auditq.tenant"
POLICY: Final = "auditq_tenant_read"
#: The verifier's policy: it reads every tenant's rows (verify recomputes them all).
VERIFY_POLICY: Final = "auditq_verify_read"
_REVOKED: Final = ("UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


class RoleError(ValueError):
    """A role exists with rights auditq will not take over; the message is one line."""


@dataclass(frozen=True)
class RoleNames:
    """The roles `apply` creates; `checkpointer` and `verifier` are the chain's, left out
    (None) by callers that name only the first three."""

    owner: str
    writer: str
    reader: str
    checkpointer: str | None = None
    verifier: str | None = None

    @classmethod
    def with_prefix(cls, prefix: str = "auditq") -> RoleNames:
        return cls(
            f"{prefix}_owner",
            f"{prefix}_writer",
            f"{prefix}_reader",
            f"{prefix}_checkpointer",
            f"{prefix}_verifier",
        )

    def kinds(self) -> list[tuple[str, str]]:
        """(kind, name) of each role asked for, owner first."""
        named = [
            ("owner", self.owner),
            ("writer", self.writer),
            ("reader", self.reader),
            ("checkpointer", self.checkpointer),
            ("verifier", self.verifier),
        ]
        return [(kind, name) for kind, name in named if name]


def _role(conn: psycopg.Connection[Any], name: str) -> dict[str, bool] | None:
    row = conn.execute(
        """SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls,
                  rolcanlogin
           FROM pg_roles WHERE rolname = %s""",
        (name,),
    ).fetchone()
    if row is None:
        return None
    keys = ("superuser", "createrole", "createdb", "replication", "bypassrls", "login")
    return dict(zip(keys, map(bool, row), strict=True))


def _is_member(conn: psycopg.Connection[Any], role: str, of: str) -> bool:
    row = conn.execute(
        "SELECT pg_has_role(%s, oid, 'MEMBER') FROM pg_roles WHERE rolname = %s", (role, of)
    ).fetchone()
    return bool(row and row[0])


def check_existing(
    conn: psycopg.Connection[Any], schema: str, table: str, names: RoleNames
) -> None:
    """Raise `RoleError` if a role of `names` exists with rights beyond its job."""
    kinds = names.kinds()
    if len({name for _, name in kinds}) != len(kinds):
        raise RoleError(
            f"the {', '.join(kind for kind, _ in kinds)} roles must all be different roles"
        )
    for kind, name in kinds:
        found = _role(conn, name)
        if found is None:
            continue
        extra = [
            attr for attr in ("superuser", "createrole", "createdb", "replication") if found[attr]
        ]
        if kind == "owner" and found["login"]:
            extra.append("login")
        if kind != "writer" and found["bypassrls"]:
            extra.append("bypassrls")
        if extra:
            raise RoleError(
                f"role {name} exists with {', '.join(extra).upper()}: auditq will not use it "
                f"as the {kind} role; choose another name or remove those rights"
            )
        if (
            kind != "owner"
            and _role(conn, names.owner) is not None
            and _is_member(conn, name, names.owner)
        ):
            raise RoleError(
                f"role {name} exists and is a member of the owner role {names.owner}: "
                f"it could drop the guards; revoke that membership"
            )
        if kind in ("reader", "checkpointer", "verifier"):
            row = conn.execute(
                "SELECT has_table_privilege(%s, to_regclass(%s), 'INSERT')",
                (name, regclass_text(schema, table)),
            ).fetchone()
            if row and row[0]:
                raise RoleError(
                    f"role {name} exists with INSERT on {schema}.{table}: it cannot be the "
                    f"{kind} role; revoke INSERT or choose another name"
                )
    for kind, name in kinds[1:]:
        row = conn.execute(
            """SELECT pg_has_role(%s, n.nspowner, 'MEMBER')
               FROM pg_namespace n JOIN pg_roles r ON r.rolname = %s WHERE n.nspname = %s""",
            (name, name, schema),
        ).fetchone()
        if row and row[0]:
            raise RoleError(
                f"role {name} owns (or is a member of the owner of) schema {schema}, so it "
                f"could drop the audit table: it cannot be the {kind} role"
            )


def _create_roles(conn: psycopg.Connection[Any], names: RoleNames) -> None:
    lock(conn, "roles")
    # NOLOGIN all: a login (with a password) is the operator's decision for the writer,
    # the reader, the checkpointer and the verifier, never for the owner.
    if _role(conn, names.owner) is None:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(names.owner)))
    if _role(conn, names.writer) is None:
        conn.execute(
            sql.SQL("CREATE ROLE {} NOLOGIN BYPASSRLS").format(sql.Identifier(names.writer))
        )
    for name in (names.reader, names.checkpointer, names.verifier):
        if name and _role(conn, name) is None:
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(name)))
    writer = _role(conn, names.writer)
    if writer is not None and not writer["bypassrls"]:
        conn.execute(sql.SQL("ALTER ROLE {} BYPASSRLS").format(sql.Identifier(names.writer)))


def _grantees(conn: psycopg.Connection[Any], relid: int) -> list[str]:
    """Roles (and PUBLIC, as "") holding any privilege on `relid`, other than its owner."""
    rows = conn.execute(
        """SELECT DISTINCT coalesce(r.rolname, '')
           FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
           LEFT JOIN pg_roles r ON r.oid = a.grantee
           WHERE c.oid = %s AND a.grantee <> c.relowner""",
        (relid,),
    ).fetchall()
    return [str(row[0]) for row in rows]


def _grantee(name: str) -> sql.Composable:
    return sql.SQL("PUBLIC") if name == "" else sql.Identifier(name)


_relations = guards.tree


def revoke_changes(conn: psycopg.Connection[Any], schema: str, table: str) -> None:
    """No grantee but the owner keeps UPDATE/DELETE/TRUNCATE/REFERENCES/TRIGGER; partitions
    keep no grants at all (their rows are read through the parent, whose grants and
    row-level security apply: a SELECT on a partition would bypass the policy). `apply`
    then gives the writer INSERT on each partition, for `auditq.routes`."""
    for relid, rel_schema, rel_name, is_root in _relations(conn, schema, table):
        target = qualified(rel_schema, rel_name)
        for grantee in _grantees(conn, relid):
            privileges = sql.SQL(", ".join(_REVOKED) if is_root else "ALL")
            conn.execute(
                sql.SQL("REVOKE {} ON {} FROM {}").format(privileges, target, _grantee(grantee))
            )


def set_owner(conn: psycopg.Connection[Any], schema: str, table: str, owner: str) -> None:
    role = sql.Identifier(owner)
    for _, rel_schema, rel_name, _ in _relations(conn, schema, table):
        conn.execute(
            sql.SQL("ALTER TABLE {} OWNER TO {}").format(qualified(rel_schema, rel_name), role)
        )


def _drop_policy(conn: psycopg.Connection[Any], schema: str, table: str, name: str) -> None:
    exists = conn.execute(
        "SELECT 1 FROM pg_policy WHERE polrelid = %s::regclass AND polname = %s",
        (regclass_text(schema, table), name),
    ).fetchone()
    if exists:
        conn.execute(
            sql.SQL("DROP POLICY {} ON {}").format(sql.Identifier(name), qualified(schema, table))
        )


def apply_rls(
    conn: psycopg.Connection[Any],
    schema: str,
    table: str,
    reader: str,
    verifier: str | None = None,
) -> None:
    """Row-level security on the table, with the reader's tenant policy and the verifier's
    every-row policy (idempotent)."""
    target = qualified(schema, table)
    conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(target))
    _drop_policy(conn, schema, table, POLICY)
    if verifier:
        _drop_policy(conn, schema, table, VERIFY_POLICY)
        conn.execute(
            sql.SQL("CREATE POLICY {} ON {} AS PERMISSIVE FOR SELECT TO {} USING (true)").format(
                sql.Identifier(VERIFY_POLICY), target, sql.Identifier(verifier)
            )
        )
    conn.execute(
        sql.SQL(
            "CREATE POLICY {} ON {} AS PERMISSIVE FOR SELECT TO {} "
            "USING (tenant_id = nullif(current_setting({}, true), ''))"
        ).format(
            sql.Identifier(POLICY), target, sql.Identifier(reader), sql.Literal(TENANT_SETTING)
        )
    )


def apply(conn: psycopg.Connection[Any], schema: str, table: str, names: RoleNames) -> None:
    """Create the roles (idempotently) and give the table to them; in the caller's
    transaction. Raises `RoleError` before changing anything if a role has other rights."""
    check_existing(conn, schema, table, names)
    _create_roles(conn, names)
    owner, writer, reader = (sql.Identifier(n) for n in (names.owner, names.writer, names.reader))
    s = sql.Identifier(schema)
    target = qualified(schema, table)
    # The owner creates months (the partition function runs as it) in this schema.
    conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA {} TO {}").format(s, owner))
    set_owner(conn, schema, table, names.owner)
    for meta in (VERSION_TABLE, RETENTION_TABLE):
        set_owner(conn, schema, meta, names.owner)
        revoke_changes(conn, schema, meta)
        conn.execute(sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(qualified(schema, meta)))
    # The functions run as their owner (the partition one is SECURITY DEFINER).
    conn.execute(sql.SQL("ALTER FUNCTION {}.auditq_refuse_change() OWNER TO {}").format(s, owner))
    partitioned = partitions.is_partitioned(conn, schema, table)
    function = sql.SQL("{}.{}(text, timestamptz)").format(s, sql.Identifier(partitions.FUNCTION))
    if partitioned:
        partitions.install_function(conn, schema)
        conn.execute(sql.SQL("ALTER FUNCTION {} OWNER TO {}").format(function, owner))
        conn.execute(sql.SQL("REVOKE ALL ON FUNCTION {} FROM PUBLIC").format(function))
    revoke_changes(conn, schema, table)
    conn.execute(sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(target))
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}, {}").format(s, writer, reader))
    conn.execute(sql.SQL("GRANT INSERT, SELECT ON {} TO {}").format(target, writer))
    for _, part_schema, part_name, is_root in _relations(conn, schema, table):
        if not is_root:  # the writer copies a month's batch straight into it: INSERT only
            conn.execute(
                sql.SQL("GRANT INSERT ON {} TO {}").format(
                    qualified(part_schema, part_name), writer
                )
            )
    conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(target, reader))
    conn.execute(
        sql.SQL("GRANT SELECT ON {} TO {}, {}").format(
            qualified(schema, VERSION_TABLE), writer, reader
        )
    )
    conn.execute(
        sql.SQL("GRANT SELECT ON {} TO {}").format(qualified(schema, RETENTION_TABLE), reader)
    )
    database = conn.execute("SELECT current_database()").fetchone()
    assert database is not None
    conn.execute(
        sql.SQL("GRANT TEMPORARY ON DATABASE {} TO {}").format(sql.Identifier(database[0]), writer)
    )
    if partitioned:
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(function, writer))
    _apply_chain(conn, schema, table, names)
    if names.verifier:
        conn.execute(
            sql.SQL("GRANT SELECT ON {} TO {}").format(
                qualified(schema, VERSION_TABLE), sql.Identifier(names.verifier)
            )
        )
    apply_rls(conn, schema, table, names.reader, names.verifier)


def _apply_chain(conn: psycopg.Connection[Any], schema: str, table: str, names: RoleNames) -> None:
    """The chain tables (made here if `init-db` did not: the grants need them) go to the
    owner; the writer inserts digests, the checkpointer signs, the reader and the verifier
    read (chain_schema.grant_statements)."""
    chain_schema.create_chain_tables(conn, schema, table)
    owner = sql.Identifier(names.owner)
    for name in chain_schema.chain_tables(table):
        set_owner(conn, schema, name, names.owner)
        revoke_changes(conn, schema, name)
        conn.execute(sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(qualified(schema, name)))
    conn.execute(
        sql.SQL("ALTER FUNCTION {}() OWNER TO {}").format(
            qualified(schema, chain_schema.guard_function(table)), owner
        )
    )
    statements = chain_schema.grant_statements(
        schema,
        table,
        writer=names.writer,
        checkpointer=names.checkpointer,
        verifier=names.verifier,
    )
    statements += chain_schema.grant_statements(schema, table, verifier=names.reader)
    for statement in statements:
        conn.execute(statement)
