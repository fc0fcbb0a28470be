"""An event is never lost for its content (issue 12, section 1): a value the table cannot hold
as given is stored repaired, and the row says what was repaired in `metadata._auditq`.

Each case goes through a real writer into a real table (docs/fields.md is the table these
check), with whichever encoder is built; tests/test_encoder.py holds the C encoder to the
Python one on the same rows.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditq import DeadLetter, InvalidEntry, binary
from auditq.binary import _with_flags
from auditq.connection import DsnSource
from auditq.dsn import Dsn
from auditq.entry import (
    MAX_KEPT_CHARS,
    MAX_METADATA_BYTES,
    MAX_METADATA_PREFIX_CHARS,
    MAX_NAME_CHARS,
    MAX_OUTCOME_CHARS,
    MAX_USER_AGENT_CHARS,
    RepairedJSON,
    dump_metadata,
)
from auditq.sink import Sink
from auditq.watchdog import Watchdog

from .conftest import Table, WriterFactory

COLUMNS = (
    "action, tenant_id, actor_id, actor_type, resource_type, resource_id, outcome, ip, "
    "user_agent, request_id, metadata, occurred_at, id"
)
NAMES = [name.strip() for name in COLUMNS.split(",")]


class Opaque:
    def __repr__(self) -> str:
        return "Opaque(7)"


class Unshowable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def stored(table: Table) -> dict[str, dict[str, Any]]:
    """Rows by their resource_type (each case's tag)."""
    found = table.query(f"SELECT {COLUMNS} FROM {{table}}")
    rows = [dict(zip(NAMES, row, strict=True)) for row in found]
    return {row["resource_type"]: row for row in rows}


def flags_of(row: dict[str, Any]) -> Any:
    return (row["metadata"] or {}).get("_auditq")


NAIVE = datetime(2024, 5, 6, 7, 8, 9, 123456)
IDENT = uuid.UUID("018f0000-0000-7000-8000-0000000000aa")

#: tag -> (fields logged, column to look at, value stored there, flags in metadata._auditq)
CASES: dict[str, tuple[dict[str, Any], str, Any, Any]] = {
    "outcome-denied": ({"outcome": "denied"}, "outcome", "denied", None),
    "outcome-error": ({"outcome": "error"}, "outcome", "error", None),
    "outcome-own": ({"outcome": "rate_limited"}, "outcome", "rate_limited", None),
    "outcome-long": (
        {"outcome": "o" * (MAX_OUTCOME_CHARS + 5)},
        "outcome",
        "o" * MAX_OUTCOME_CHARS,
        {"truncated": ["outcome"]},
    ),
    "long-agent": (
        {"user_agent": "🦊" * (MAX_USER_AGENT_CHARS + 1)},
        "user_agent",
        "🦊" * MAX_USER_AGENT_CHARS,  # cut between characters, never inside one
        {"truncated": ["user_agent"]},
    ),
    "long-resource": (
        {"resource_id": "é" * (MAX_NAME_CHARS * 2)},
        "resource_id",
        "é" * MAX_NAME_CHARS,
        {"truncated": ["resource_id"]},
    ),
    "nul": ({"actor_id": "ali\x00ce"}, "actor_id", "ali\ufffdce", {"replaced": ["actor_id"]}),
    "nul-agent": ({"user_agent": "x\x00"}, "user_agent", "x\ufffd", {"replaced": ["user_agent"]}),
    "surrogate": (
        {"request_id": "bad \udc80 text"},
        "request_id",
        "bad \ufffd text",
        {"replaced": ["request_id"]},
    ),
    "ip": ({"ip": "999.1.1.1"}, "ip", None, {"invalid": ["ip"], "ip": "999.1.1.1"}),
    "ip-word": ({"ip": "localhost"}, "ip", None, {"invalid": ["ip"], "ip": "localhost"}),
    "ip-scoped": ({"ip": "fe80::1%eth0"}, "ip", None, {"invalid": ["ip"], "ip": "fe80::1%eth0"}),
    "ip-object-scoped": (
        {"ip": ipaddress.IPv6Address("fe80::1%eth0")},
        "ip",
        None,
        {"invalid": ["ip"], "ip": "fe80::1%eth0"},
    ),
    "ip-long": (
        {"ip": "1" * 5000 + "\x00"},
        "ip",
        None,
        {"invalid": ["ip"], "ip": "1" * MAX_KEPT_CHARS},
    ),
    "ip-type": ({"ip": 1234}, "ip", None, {"invalid": ["ip"], "ip": "1234"}),
    "id-type": (
        {"resource_id": ["a", "list"]},
        "resource_id",
        None,
        {"invalid": ["resource_id"], "resource_id": "['a', 'list']"},
    ),
    "id-object": (
        {"actor_id": Opaque()},
        "actor_id",
        None,
        {"invalid": ["actor_id"], "actor_id": "Opaque(7)"},
    ),
    "id-unshowable": (
        {"actor_id": Unshowable()},
        "actor_id",
        None,
        {"invalid": ["actor_id"], "actor_id": "<Unshowable object>"},
    ),
    "id-bool": (
        {"tenant_id": True},
        "tenant_id",
        None,
        {"invalid": ["tenant_id"], "tenant_id": "True"},
    ),
    "id-int": ({"actor_id": 42}, "actor_id", "42", None),
    "id-uuid": ({"resource_id": IDENT}, "resource_id", str(IDENT), None),
    "naive": (
        {"occurred_at": NAIVE},
        "occurred_at",
        NAIVE.replace(tzinfo=UTC),
        {"assumed_utc": ["occurred_at"]},
    ),
    "time-text": (
        {"occurred_at": "2024-01-01"},
        "occurred_at",
        "now",
        {"invalid": ["occurred_at"], "occurred_at": "2024-01-01"},
    ),
    "entry-id": ({"id": "not-a-uuid"}, "id", "new", {"invalid": ["id"], "id": "not-a-uuid"}),
    "metadata-nul": (
        {"metadata": {"k": "a\x00b"}},
        "metadata",
        {"k": "a\ufffdb", "_auditq": {"replaced": ["metadata"]}},
        {"replaced": ["metadata"]},
    ),
    "metadata-nan": (
        {"metadata": {"k": float("nan"), "j": [float("-inf"), 1.5]}},
        "metadata",
        {"k": None, "j": [None, 1.5], "_auditq": {"replaced": ["metadata"]}},
        {"replaced": ["metadata"]},
    ),
    "metadata-object": (
        {"metadata": {"o": Opaque(), "n": {"deep": {Opaque()}}}},
        "metadata",
        {"o": "Opaque(7)", "n": {"deep": ["Opaque(7)"]}, "_auditq": {"replaced": ["metadata"]}},
        {"replaced": ["metadata"]},
    ),
    "metadata-keys": (
        {"metadata": {1: "one", None: "none", (1, 2): "pair"}},
        "metadata",
        {"1": "one", "null": "none", "(1, 2)": "pair", "_auditq": {"replaced": ["metadata"]}},
        {"replaced": ["metadata"]},
    ),
    "metadata-list": (
        {"metadata": ["not", "a", "mapping"]},
        "metadata",
        {"_auditq": {"invalid": ["metadata"], "metadata": "['not', 'a', 'mapping']"}},
        {"invalid": ["metadata"], "metadata": "['not', 'a', 'mapping']"},
    ),
    "metadata-text": (
        {"metadata": "a string"},
        "metadata",
        {"_auditq": {"invalid": ["metadata"], "metadata": "a string"}},
        {"invalid": ["metadata"], "metadata": "a string"},
    ),
}


def test_a_bad_field_is_stored_repaired_and_flagged(
    table: Table, make_writer: WriterFactory
) -> None:
    letters: list[DeadLetter] = []
    writer = make_writer(batch_size=1000, flush_interval=60, on_dead_letter=letters.append)
    before = datetime.now(UTC)
    for tag, (fields, _, _, _) in CASES.items():
        assert writer.log("repair.test", resource_type=tag, **fields) is True
    assert writer.flush(timeout=30)
    after = datetime.now(UTC)
    assert letters == []
    stats = writer.stats()
    assert (stats.written, stats.dead_lettered, stats.rejected) == (len(CASES), 0, 0)
    rows = stored(table)
    assert set(rows) == set(CASES)
    for tag, (_, column, value, flags) in CASES.items():
        row = rows[tag]
        assert flags_of(row) == flags, tag
        if value == "now":
            assert before <= row[column] <= after, tag
        elif value == "new":
            assert row[column].version == 7, tag
        elif column == "metadata":
            assert row[column] == value, tag
        else:
            assert row[column] == value, (tag, row[column])


@pytest.mark.parametrize("tag", list(CASES))
def test_strict_refuses_exactly_what_would_be_repaired(
    tag: str, table: Table, make_writer: WriterFactory
) -> None:
    # Strict mode agrees with the limits: it raises for each value a writer that is not
    # strict would flag, and takes each value that writer stores as given.
    fields, _, _, flags = CASES[tag]
    writer = make_writer(strict=True, flush_interval=60)
    if flags is None:
        assert writer.log("strict.test", **fields)
    else:
        with pytest.raises(InvalidEntry):
            writer.log("strict.test", **fields)
    assert writer.close(timeout=30)


def test_oversized_metadata_is_summarised(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(flush_interval=60)
    big = {"blob": "ü" * MAX_METADATA_BYTES}
    size = len(json.dumps(big, ensure_ascii=False, separators=(",", ":")).encode())
    assert writer.log("meta.big", metadata=big, user_agent="u" * (MAX_USER_AGENT_CHARS + 1))
    assert writer.flush(timeout=30)
    ((metadata, agent),) = table.query("SELECT metadata, user_agent FROM {table}")
    flags = metadata.pop("_auditq")
    assert metadata == {}
    assert flags["truncated"] == ["user_agent", "metadata"]  # the writer's flag merged in
    assert flags["metadata_bytes"] == size
    assert flags["metadata_prefix"] == '{"blob":"' + "ü" * (MAX_METADATA_PREFIX_CHARS - 9)
    assert agent == "u" * MAX_USER_AGENT_CHARS
    assert writer.stats().dead_lettered == 0


def test_flags_of_the_call_and_of_the_writer_are_one_object(
    table: Table, make_writer: WriterFactory
) -> None:
    # dump_metadata repaired the metadata at the call (NUL), the writer cut a field and
    # dropped an address: one _auditq object says all of it.
    writer = make_writer(flush_interval=60)
    assert writer.log(
        "merge", metadata={"k": "\x00", "_auditq": "mine"}, tenant_id="t" * 300, ip="nope"
    )
    assert writer.flush(timeout=30)
    ((metadata,),) = table.query("SELECT metadata FROM {table}")
    assert metadata == {
        "k": "\ufffd",
        "_auditq": {
            "truncated": ["tenant_id"],
            "replaced": ["metadata"],
            "invalid": ["ip"],
            "ip": "nope",
        },
    }


def test_merging_flags_keeps_large_integers_exact(table: Table, make_writer: WriterFactory) -> None:
    # Metadata repaired at the call (NUL) holding an integer past 64 bits, and a flag of the
    # writer's to merge into it: the integer must not pass through a float.
    writer = make_writer(flush_interval=60)
    assert writer.log("big.merge", metadata={"n": 2**70 + 1, "s": "\x00"}, actor_id="a" * 300)
    assert writer.flush(timeout=30)
    assert table.query("SELECT metadata FROM {table}") == [
        (
            {
                "n": 2**70 + 1,
                "s": "\ufffd",
                "_auditq": {"truncated": ["actor_id"], "replaced": ["metadata"]},
            },
        )
    ]


def test_a_callers_own_auditq_key_loses_to_the_writers(
    table: Table, make_writer: WriterFactory
) -> None:
    writer = make_writer(flush_interval=60)
    forged = {"_auditq": {"truncated": []}, "x": 1}
    assert writer.log("own.kept", metadata=forged)  # nothing to flag: stored as given
    assert writer.log("own.replaced", metadata=forged, actor_id="a\x00")
    assert writer.flush(timeout=30)
    rows = dict(table.query("SELECT action, metadata FROM {table}"))
    assert rows["own.kept"] == forged
    assert rows["own.replaced"] == {"x": 1, "_auditq": {"replaced": ["actor_id"]}}


def test_what_stays_rejected_at_the_call(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(flush_interval=60)
    assert writer.log("") is False  # no action: not an event at all
    assert writer.log("ok", metadata=["fine"]) is True
    assert writer.flush(timeout=30)
    assert writer.stats().rejected == 1
    assert table.count() == 1


# -- the splice: the writer's key added to the caller's JSON without parsing it ------------

# Text without NUL: metadata with one is repaired at the call (a RepairedJSON, merged rather
# than spliced; tested below).
texts = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | texts.filter(lambda t: len(t) < 7),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(texts.filter(lambda t: len(t) < 5), inner, max_size=3)
    ),
    max_leaves=8,
)
metadata_objects = st.dictionaries(
    st.sampled_from(["_auditq", "a", "}", "{", '"', "\\", "é", ""])
    | texts.filter(lambda t: len(t) < 5),
    json_values,
    max_size=4,
)
flag_lists = st.lists(
    st.tuples(
        st.sampled_from(["truncated", "replaced", "invalid", "assumed_utc"]),
        st.sampled_from(["action", "ip", "user_agent", "metadata", "occurred_at"]),
        st.none() | st.text(max_size=5).map(lambda t: t.replace("\x00", "")),
    ),
    min_size=1,
    max_size=4,
)


@pytest.fixture(scope="module")
def jsonb(pg_dsn: str) -> Any:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield lambda text: conn.execute("SELECT %s::text::jsonb", (text,)).fetchone()[0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metadata_objects, flag_lists, st.sampled_from(["", " ", "\n "]))
def test_flags_spliced_into_any_metadata_are_valid_json_and_win(
    jsonb: Any, metadata: dict[str, Any], flags: list[Any], padding: str
) -> None:
    text = dump_metadata(metadata)
    spliced = _with_flags(text + padding if type(text) is str else text, flags)
    ours = binary._flags_object(flags)
    expected = {k: v for k, v in metadata.items() if k != "_auditq"} | {"_auditq": ours}
    assert json.loads(spliced) == expected  # Python keeps the last of duplicate keys...
    assert jsonb(spliced) == expected  # ...and so does jsonb
    assert spliced.startswith(text.rstrip()[:-1])  # the caller's JSON, untouched


def test_repaired_metadata_is_merged_not_spliced() -> None:
    repaired = dump_metadata({"k": "\x00"})
    assert isinstance(repaired, RepairedJSON)
    merged = _with_flags(repaired, [("truncated", "action", None), ("replaced", "ip", None)])
    assert json.loads(merged) == {
        "k": "\ufffd",
        "_auditq": {"truncated": ["action"], "replaced": ["ip", "metadata"]},
    }
    assert merged.count("_auditq") == 1


# -- origin --------------------------------------------------------------------------------


class Ledger:
    def __init__(self) -> None:
        self.committed_rows = 0
        self.dead_rows: list[str] = []

    def committed(self, count: int) -> None:
        self.committed_rows += count

    def dead(self, items: Any, reason: str) -> None:
        self.dead_rows.extend(reason for _ in items)

    def retrying(self, error: str) -> None:
        pass

    def rejected_rows(self, rows: Any) -> None:
        self.dead_rows.extend(reason for _, reason in rows)


def _row(n: int, **fields: Any) -> tuple[Any, ...]:
    values: dict[str, Any] = {"resource_id": "ok", **fields}
    return (None, time.time_ns(), "origin.test", "t", None, None, "doc",
            values["resource_id"], None, None, None, str(n), None)  # fmt: skip


def test_every_row_carries_the_writers_origin(table: Table) -> None:
    # Through the first attempt (encode_block), and through a split after the server refused
    # one row (Items cut apart and sent again): the origin is in every tuple's bytes.
    table.execute("ALTER TABLE {table} ADD CONSTRAINT no_poison CHECK (resource_id <> 'poison')")
    ledger = Ledger()
    source, watchdog = DsnSource(Dsn(table.dsn)), Watchdog("test-watchdog")
    try:
        sink = Sink(
            source,
            schema=table.schema,
            table=table.name,
            ledger=ledger,
            abort=threading.Event(),
            watchdog=watchdog,
            dsn=None,
            write_timeout=30.0,
            retry_backoff_max=0.1,
            origin="billing@host-7",
        )
        assert sink.deliver_rows([_row(n) for n in range(5)]).items == []
        mixed = [_row(n, resource_id="poison" if n == 7 else "ok") for n in range(5, 10)]
        assert sink.deliver_rows(mixed).items == []
        items, bad = sink.make_items([_row(10)])
        assert bad == [] and binary.decode_row(items[0][0])["origin"] == "billing@host-7"
    finally:
        source.close()
        watchdog.close()
    assert ledger.committed_rows == 9 and len(ledger.dead_rows) == 1
    assert table.query("SELECT DISTINCT origin FROM {table}") == [("billing@host-7",)]


def test_a_sink_refuses_an_origin_it_could_not_store(table: Table) -> None:
    with pytest.raises(ValueError, match="origin"):
        Sink(
            DsnSource(Dsn(table.dsn)),
            schema=table.schema,
            table=table.name,
            ledger=Ledger(),
            abort=threading.Event(),
            watchdog=Watchdog("unused"),
            dsn=None,
            write_timeout=1.0,
            retry_backoff_max=0.1,
            origin="o" * (MAX_NAME_CHARS + 1),
        )


def test_a_spool_left_before_origin_replays_with_a_null_one(table: Table, tmp_path: Any) -> None:
    # Tuples spooled by a version without the origin column have 13 fields: COPY into
    # today's 14 columns would refuse each of them (and dead-letter it).
    from auditq.spool import Spool, read_records

    rows = [_row(n) for n in range(3)]
    items: list[Any] = []
    binary._encode_chunk_python(rows, items, [])  # origin NULL: its 4 bytes end each tuple
    old = [b"\x00\x0d" + data[2:-4] for data, _ in items]
    spool = Spool(tmp_path, fsync="always")
    spool.append(old)
    spool.close()
    (segment,) = tmp_path.glob("seg-*")
    (record,) = read_records(segment, 0, None)
    assert record.rows == [data for data, _ in items]
    ledger = Ledger()
    source, watchdog = DsnSource(Dsn(table.dsn)), Watchdog("test-watchdog")
    try:
        sink = Sink(
            source,
            schema=table.schema,
            table=table.name,
            ledger=ledger,
            abort=threading.Event(),
            watchdog=watchdog,
            dsn=None,
            write_timeout=30.0,
            retry_backoff_max=0.1,
            origin="new@host",
        )
        assert sink.deliver([(data, None) for data in record.rows], mode="replay").items == []
    finally:
        source.close()
        watchdog.close()
    assert (ledger.committed_rows, ledger.dead_rows) == (3, [])
    assert sorted(table.query("SELECT request_id, origin FROM {table}")) == [
        ("0", None),
        ("1", None),
        ("2", None),
    ]
