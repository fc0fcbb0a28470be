"""The C row encoder against the Python one it stands in for, and its id stream across fork.

The writer tests elsewhere run through whichever encoder is built (C in CI, which checks it
was). These hold the C fast path to the Python reference row by row: the same rows accepted,
the same reasons for the rejected ones, the same bytes apart from the random part of the id
(repairs included: the C encoder hands every row that needs one to the Python encoder).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import UTC, datetime, timedelta, tzinfo
from enum import Enum
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditq import binary
from auditq.binary import Item, decode_row, item_id, origin_field
from auditq.entry import COLUMNS, MAX_METADATA_BYTES, MAX_NAME_CHARS, dump_metadata

from .helpers import run_python

needs_c = pytest.mark.skipif(
    not binary.ACCELERATED, reason="C encoder not in use (not built, or AUDITQ_NO_SPEEDUPS=1)"
)

UA = "Mozilla/5.0 (X11; Linux x86_64)"
ORIGIN = origin_field("worker@host-1")


def row(**fields: Any) -> tuple[Any, ...]:
    values: dict[str, Any] = dict.fromkeys(COLUMNS)
    values.update(occurred_at=time.time_ns(), action="doc.read", tenant_id="t1", user_agent=UA)
    values.update(fields)
    return tuple(values[name] for name in COLUMNS)


def both(rows: list[tuple[Any, ...]]) -> tuple[Any, Any]:
    """(Python result, C result), each as (items, bad, joined bytes); Python goes first so
    the caches the C path reads are warm, as they are on a writer that has been running."""
    results = []
    for encode in (binary._encode_chunk_python, binary.encode_chunk):
        items: list[Item] = []
        bad: list[tuple[Any, str]] = []
        joined = encode(rows, items, bad, ORIGIN)
        results.append((items, bad, joined))
    return results[0], results[1]


def without_id(data: bytes) -> bytes:
    return data[:6] + data[22:]


def stored_time(stamp: Any) -> bool:
    """Whether `stamp` is stored as given (else replaced by the time it is encoded)."""
    if type(stamp) is not int:
        return isinstance(stamp, datetime)
    micros = stamp // 1000 - 946_684_800_000_000  # PostgreSQL's epoch, and its range:
    return -211_813_488_000_000_000 <= micros < 9_223_371_331_200_000_000


def comparable(data: bytes, source: Any) -> bytes:
    """A tuple without its random id, and without its time when that is the encoding's."""
    data = without_id(data)
    if source is not None and len(source) > 1 and not stored_time(source[1]):
        data = data[:10] + data[18:]  # after the id is cut: 2 count, 4 len, then 4 len, 8 time
    return data


def check_same(rows: list[tuple[Any, ...]]) -> None:
    (py_items, py_bad, py_joined), (c_items, c_bad, c_joined) = both(rows)
    assert [(r, reason) for r, reason in c_bad] == [(r, reason) for r, reason in py_bad]
    assert [item[1] for item in c_items] == [item[1] for item in py_items]
    for (py_data, source), (c_data, _) in zip(py_items, c_items, strict=True):
        assert comparable(c_data, source) == comparable(py_data, source)
        if source is not None and not isinstance(source[0], uuid.UUID):
            ident = uuid.UUID(bytes=c_data[6:22])
            assert ident.version == 7 and ident.variant == uuid.RFC_4122
            stamp = source[1] if type(source[1]) is int else None
            if stamp is not None and 0 <= stamp < 2**63:
                assert ident.int >> 80 == stamp // 1_000_000
        else:
            assert c_data == py_data  # explicit ids are copied, not drawn
    assert c_joined == b"".join(item[0] for item in c_items)
    assert len(c_joined) == len(py_joined)
    # encode_block (no Item per row) encodes the same rows to the same tuples, C and Python.
    for encode_block in (binary.encode_block, binary._encode_block_python):
        kept: list[Any] = []
        block_bad: list[tuple[Any, str]] = []
        data = encode_block(rows, kept, block_bad, ORIGIN)
        assert block_bad == py_bad
        assert kept == [item[1] for item in py_items]
        items = binary.items_of_block(data, kept)
        assert [comparable(d, r) for d, r in items] == [comparable(d, r) for d, r in py_items]
        assert data == b"".join(d for d, _ in items)
        assert [r for _, r in items] == kept


@needs_c
def test_the_common_row_takes_the_fast_path_and_matches() -> None:
    rows = [
        row(
            actor_id=f"user-{n}",
            resource_type="document",
            resource_id=f"doc-{n}",
            outcome="success",
            ip="203.0.113.7",
            request_id=f"req-{n}",
            metadata=dump_metadata({"n": n, "path": "/api/ü"}),
        )
        for n in range(200)
    ]
    check_same(rows)
    items: list[Item] = []
    binary.encode_chunk(rows, items, [], ORIGIN)
    decoded = [decode_row(data) for data, _ in items]
    assert [d["request_id"] for d in decoded] == [r[11] for r in rows]
    assert {d["origin"] for d in decoded} == {"worker@host-1"}
    assert len({item_id(item) for item in items}) == len(rows)


@needs_c
def test_unusual_rows_are_handed_to_the_python_encoder() -> None:
    aware = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    rows = [
        row(occurred_at=aware),  # a datetime
        row(id=uuid.UUID("018f0000-0000-7000-8000-000000000001")),  # an explicit id
        row(actor_id=1234),  # an int id becomes text
        row(ip="2001:db8::1"),  # a cache miss on the address
        row(tenant_id="new-tenant-" + "x" * 20),  # a cache miss on the group
        row(request_id="r" * 300),  # too long: cut
        row(actor_id="a\x00b"),  # NUL: replaced
        row(resource_id="\ud800"),  # lone surrogate: replaced
        row(outcome="maybe"),  # an outcome of the caller's own
        row(ip="999.1.1.1"),  # not an address: NULL, kept
        row(action=""),  # empty action: rejected
        row(metadata=b"{}"),  # not text: kept as text in the flags
        (None, 1),  # malformed: rejected
        row(occurred_at=-5),  # before 1970: its id is made from the time it is encoded
        row(metadata="x" * (MAX_METADATA_BYTES + 1)),  # too big: summarised
        row(occurred_at=datetime(2026, 1, 2)),  # naive: taken as UTC
        row(id="not-a-uuid"),  # a new id, the value kept
    ]
    check_same(rows)
    (items, bad, _), _ = both(rows)
    rejected = {rows.index(r): why for r, why in bad}
    assert sorted(rejected) == [10, 12], rejected
    assert rejected[10] == "action: must be a non-empty string"
    assert rejected[12] == "malformed entry: 2 fields"
    kept_rows = [n for n in range(len(rows)) if n not in rejected]
    flags = {
        n: json.loads(decode_row(data)["metadata"] or "{}").get("_auditq")
        for n, (data, _) in zip(kept_rows, items, strict=True)
    }
    assert flags[5] == {"truncated": ["request_id"]}
    assert flags[6] == {"replaced": ["actor_id"]}
    assert flags[7] == {"replaced": ["resource_id"]}
    assert flags[8] is None
    assert flags[9] == {"invalid": ["ip"], "ip": "999.1.1.1"}
    assert flags[11] == {"invalid": ["metadata"], "metadata": "b'{}'"}
    assert flags[13] is None
    assert flags[14]["truncated"] == ["metadata"]
    assert flags[14]["metadata_bytes"] == MAX_METADATA_BYTES + 1
    assert flags[15] == {"assumed_utc": ["occurred_at"]}
    assert flags[16] == {"invalid": ["id"], "id": "not-a-uuid"}


class Folded(str):
    """A case-insensitive str (its own __eq__ and __hash__): equal to a cached "admin"."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self.casefold() == other.casefold()

    def __hash__(self) -> int:
        return hash(self.casefold())


names = st.one_of(
    st.none(),
    st.sampled_from(["a", "tenant-1", "ünïcode", "x" * 256, "x" * 257, "a\x00", ""]),
    st.text(max_size=12),
    st.integers(-5, 5),
    st.booleans(),
    st.sampled_from([Folded("A"), Folded("Tenant-1")]),
)


@needs_c
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["doc.read", "doc.write", "", "ä" * 257, "a\x00"]),
            names,
            names,
            names,
            st.sampled_from([None, "success", "denied", "nope", "o" * 65, Folded("Denied")]),
            st.sampled_from([None, "10.0.0.1", "::1", "bad", "fe80::1%eth0", Folded("::1")]),
            st.one_of(st.none(), st.text(max_size=8), st.just("r" * 300)),
            st.one_of(
                st.none(),
                st.just("{}"),
                st.just('{"k":"ü"}'),
                st.just('{"_auditq":1}'),
                st.just('{"k":"' + "m" * MAX_METADATA_BYTES + '"}'),
                st.just('{"k":"' + "m" * (MAX_METADATA_BYTES - 8) + '"}'),  # at the limit
                st.just('{"k":"' + "m" * (MAX_METADATA_BYTES - 7) + '"}'),  # one past it
                st.builds(dump_metadata, st.just({"nul": "\x00"})),
            ),
            st.sampled_from([time.time_ns(), 0, -1, 2**63, 2**64, 10**30]),
        ),
        max_size=30,
    )
)
def test_c_and_python_agree_on_any_row(cases: list[tuple[Any, ...]]) -> None:
    rows = [
        row(
            action=action,
            tenant_id=tenant,
            actor_id=actor,
            resource_id=resource,
            outcome=outcome,
            ip=ip,
            request_id=request,
            metadata=metadata,
            occurred_at=stamp,
        )
        for action, tenant, actor, resource, outcome, ip, request, metadata, stamp in cases
    ]
    check_same(rows * 2)  # the second copy meets warm caches


@needs_c
def test_a_group_cached_for_text_is_not_hit_by_another_type() -> None:
    # 1 == True: a group cached under the text "1" must not encode the int 1 or True.
    text = row(tenant_id="1")
    number = row(tenant_id=1)
    boolean = row(tenant_id=True)
    check_same([text, number, boolean])
    _, (items, bad, _) = both([text, number, boolean])
    assert bad == []
    shown = [decode_row(data) for data, _ in items]
    assert [d["tenant_id"] for d in shown] == ["1", "1", None]
    assert json.loads(shown[2]["metadata"]) == {
        "_auditq": {"invalid": ["tenant_id"], "tenant_id": "True"}
    }


@needs_c
def test_a_forked_child_draws_other_ids_than_its_parent() -> None:
    rows = [row(request_id=str(n)) for n in range(50)]
    binary.encode_chunk(rows, [], [])  # seeded in the parent, before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        items: list[Item] = []
        binary.encode_chunk(rows, items, [])
        os.write(write, b"".join(data[6:22] for data, _ in items))
        os._exit(0)
    os.close(write)
    items = []
    binary.encode_chunk(rows, items, [])
    child = b""
    while chunk := os.read(read, 65536):
        child += chunk
    os.close(read)
    os.waitpid(pid, 0)
    parent_ids = {data[6:22] for data, _ in items}
    child_ids = {child[i : i + 16] for i in range(0, len(child), 16)}
    assert len(child_ids) == len(rows)
    assert not parent_ids & child_ids


def test_pure_python_mode_is_there_and_agrees() -> None:
    result = run_python(
        """
        import os, time
        os.environ["AUDITQ_NO_SPEEDUPS"] = "1"
        from auditq import binary
        assert not binary.ACCELERATED
        items, bad = [], []
        row = (None, time.time_ns(), "a", "t", None, None, None, None, None, None, None, None, None)
        data = binary.encode_chunk([row, row[:3]], items, bad)
        assert len(items) == 1 and len(bad) == 1 and data == items[0][0]
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- a caller's value that misbehaves (issue 14, items 5, 6 and 16) ------------------------

ENCODERS = pytest.mark.parametrize(
    "encode",
    [binary._encode_chunk_python, binary.encode_chunk],
    ids=["python", "built"],  # "built": C when the extension is in use
)


class Raises:
    """A value whose text form raises what it is given (str() falls back on repr())."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __repr__(self) -> str:
        raise self.exc


class Mute(Exception):
    """An exception that cannot say what it is."""

    def __str__(self) -> str:
        raise RuntimeError("no words")


class Stopping(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta:
        raise SystemExit(1)


class Shouting(Enum):
    LOUD = "loud"

    @property
    def value(self) -> str:  # type: ignore[override]
        raise KeyboardInterrupt


@ENCODERS
@pytest.mark.parametrize(
    "fields",
    [
        {"id": Raises(SystemExit(3))},
        {"id": Raises(KeyboardInterrupt())},
        {"id": Raises(GeneratorExit())},
        {"id": Raises(Mute())},
        {"actor_type": Shouting.LOUD},
        {"occurred_at": datetime(2026, 1, 1, tzinfo=Stopping())},
    ],
    ids=["SystemExit", "KeyboardInterrupt", "GeneratorExit", "mute", "enum-value", "tzinfo"],
)
def test_a_value_whose_own_code_raises_rejects_only_its_row(
    encode: Any, fields: dict[str, Any]
) -> None:
    # Nothing a caller's value raises may escape into the writer thread, which dies of it
    # (SystemExit, KeyboardInterrupt) or jams its batch (an exception whose __str__ raises).
    rows = [row(request_id="before"), row(**fields), row(request_id="after")]
    items: list[Item] = []
    bad: list[tuple[Any, str]] = []
    encode(rows, items, bad, ORIGIN)
    assert [decode_row(data)["request_id"] for data, _ in items] == ["before", "after"]
    assert len(bad) == 1 and bad[0][0] is rows[1]
    assert bad[0][1].startswith("a value's own code failed while it was encoded: ")


@ENCODERS
def test_only_exact_str_values_use_the_caches(encode: Any) -> None:
    # A case-insensitive str subclass equals the cached "admin": it must still be stored as
    # the caller wrote it, whatever the caches hold (a hit is trusted without a check).
    rows = [
        row(actor_type="admin", tenant_id="acme", ip="10.0.0.1", actor_id="root"),
        row(
            actor_type=Folded("ADMIN"),
            tenant_id=Folded("ACME"),
            ip=Folded("10.0.0.1"),
            actor_id=Folded("ROOT"),
            outcome=Folded("Denied"),
        ),
    ]
    items: list[Item] = []
    bad: list[tuple[Any, str]] = []
    for _ in range(2):  # the second round meets the caches the first one filled
        items.clear()
        encode(rows, items, bad, ORIGIN)
        assert bad == []
        second = decode_row(items[1][0])
        assert (second["actor_type"], second["tenant_id"], second["actor_id"]) == (
            "ADMIN",
            "ACME",
            "ROOT",
        )
        assert (second["outcome"], second["ip"]) == ("Denied", "10.0.0.1")
        assert type(rows[1][5]) is Folded  # the queued row is left as it was


def test_decode_row_shows_what_does_not_decode_as_hex() -> None:
    # Spool replay reports rejected rows through decode_row: it must never raise.
    items: list[Item] = []
    binary._encode_chunk_python([row(ip="10.1.2.3", request_id="r")], items, [], ORIGIN)
    good = items[0][0]
    assert decode_row(good)["origin"] == "worker@host-1"
    ip_at = good.index(b"\x00\x00\x00\x08\x02\x20\x00\x04")
    broken_ip = good[: ip_at + 4] + b"\x09" + good[ip_at + 5 :]  # family 9
    shown = decode_row(broken_ip)
    assert shown["ip"] == "\\x092000040a010203"
    assert shown["request_id"] == "r"
    short_id = b"\x00\x02" + b"\x00\x00\x00\x03abc" + b"\x00\x00\x00\x01z"
    assert decode_row(short_id) == {"id": "\\x616263", "occurred_at": "\\x7a"}
    cut = decode_row(good[:40])
    assert cut["id"] == decode_row(good)["id"] and "undecoded" in cut
    assert decode_row(b"") == {"undecoded": "\\x"}
    assert decode_row(b"\x7f") == {"undecoded": "\\x7f"}
    assert decode_row(b"\xff\xff\x00") == {"undecoded": "\\x00"}  # negative field count


def test_origin_is_one_field_made_once() -> None:
    assert origin_field(None) == binary.NULL
    assert origin_field("api@web-1") == b"\x00\x00\x00\x09api@web-1"
    for bad_origin in ["x" * (MAX_NAME_CHARS + 1), "a\x00b", "\udc80"]:
        with pytest.raises(ValueError, match="origin"):
            origin_field(bad_origin)
    with pytest.raises(ValueError, match="origin must be text"):
        origin_field(42)  # type: ignore[arg-type]
    items: list[Item] = []
    binary.encode_chunk([row()], items, [])  # without an origin: NULL
    assert decode_row(items[0][0])["origin"] is None
    assert items[0][0].endswith(binary.NULL)
    assert binary.describe_row(row(), origin="api@web-1")["origin"] == "api@web-1"
    assert "origin" not in binary.describe_row(row())


@needs_c
@pytest.mark.parametrize("origin", [b"", b"\x00\x00\x00\x05abc", "text", b"\xff\xff\xff\xfe"])
def test_the_c_encoder_refuses_an_origin_that_is_not_one_field(origin: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="origin"):
        binary.encode_chunk([row()], [], [], origin)


def test_a_tuple_spooled_before_origin_gets_a_null_one() -> None:
    items: list[Item] = []
    binary._encode_chunk_python([row(request_id="old")], items, [], ORIGIN)
    current = items[0][0]
    old = b"\x00\x0d" + current[2 : -len(ORIGIN)]  # 13 fields, as spooled before
    upgraded = binary.upgrade_row(old)
    assert binary.upgrade_row(current) is current
    assert decode_row(upgraded) == {**decode_row(current), "origin": None}
