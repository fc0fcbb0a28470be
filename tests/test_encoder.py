"""The C row encoder against the Python one it stands in for, and its id stream across fork.

The writer tests elsewhere run through whichever encoder is built (C in CI, which checks it
was). These hold the C fast path to the Python reference row by row: the same rows accepted,
the same reasons for the rejected ones, the same bytes apart from the random part of the id.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditq import binary
from auditq.binary import Item, decode_row, item_id
from auditq.entry import COLUMNS, dump_metadata

from .helpers import run_python

needs_c = pytest.mark.skipif(
    not binary.ACCELERATED, reason="C encoder not in use (not built, or AUDITQ_NO_SPEEDUPS=1)"
)

UA = "Mozilla/5.0 (X11; Linux x86_64)"


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
        joined = encode(rows, items, bad)
        results.append((items, bad, joined))
    return results[0], results[1]


def without_id(data: bytes) -> bytes:
    return data[:6] + data[22:]


def check_same(rows: list[tuple[Any, ...]]) -> None:
    (py_items, py_bad, py_joined), (c_items, c_bad, c_joined) = both(rows)
    assert [(r, reason) for r, reason in c_bad] == [(r, reason) for r, reason in py_bad]
    assert [item[1] for item in c_items] == [item[1] for item in py_items]
    for (py_data, source), (c_data, _) in zip(py_items, c_items, strict=True):
        assert without_id(c_data) == without_id(py_data)
        if source is not None and source[0] is None:
            ident = uuid.UUID(bytes=c_data[6:22])
            assert ident.version == 7 and ident.variant == uuid.RFC_4122
            stamp = source[1] if type(source[1]) is int else None
            if stamp is not None:
                assert ident.int >> 80 == stamp // 1_000_000
        else:
            assert c_data == py_data  # explicit ids are copied, not drawn
    assert c_joined == b"".join(item[0] for item in c_items)
    assert len(c_joined) == len(py_joined)
    # encode_block (no Item per row) encodes the same rows to the same tuples, C and Python.
    for encode_block in (binary.encode_block, binary._encode_block_python):
        kept: list[Any] = []
        block_bad: list[tuple[Any, str]] = []
        data = encode_block(rows, kept, block_bad)
        assert block_bad == py_bad
        assert kept == [item[1] for item in py_items]
        items = binary.items_of_block(data, kept)
        assert [without_id(d) for d, _ in items] == [without_id(d) for d, _ in py_items]
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
    binary.encode_chunk(rows, items, [])
    assert [decode_row(data)["request_id"] for data, _ in items] == [r[11] for r in rows]
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
        row(request_id="r" * 300),  # too long
        row(actor_id="a\x00b"),  # NUL
        row(resource_id="\ud800"),  # lone surrogate
        row(outcome="maybe"),  # not an outcome
        row(ip="999.1.1.1"),  # not an address
        row(action=""),  # empty action
        row(metadata=b"{}"),  # not text
        (None, 1),  # malformed
        row(occurred_at=-5),  # before 1970: negative
    ]
    check_same(rows)
    _, (_, bad, _) = both(rows)
    rejected = {rows.index(r): why for r, why in bad}
    assert sorted(rejected) == [5, 6, 7, 8, 9, 10, 11, 12, 13], rejected
    assert rejected[5].startswith("request_id: 300 characters")
    assert rejected[12] == "malformed entry: 2 fields"
    assert rejected[13].startswith("occurred_at: before 1970")


names = st.one_of(
    st.none(),
    st.sampled_from(["a", "tenant-1", "ünïcode", "x" * 256, "x" * 257, "a\x00", ""]),
    st.text(max_size=12),
    st.integers(-5, 5),
    st.booleans(),
)


@needs_c
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["doc.read", "doc.write", "", "ä" * 257]),
            names,
            names,
            names,
            st.sampled_from([None, "success", "failure", "nope"]),
            st.sampled_from([None, "10.0.0.1", "::1", "bad", "10.0.0.1%eth0"]),
            st.one_of(st.none(), st.text(max_size=8)),
            st.one_of(st.none(), st.just("{}"), st.just('{"k":"ü"}')),
            st.sampled_from([time.time_ns(), 0, -1, 2**63, 2**64]),
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
    _, (_, bad, _) = both([text, number, boolean])
    assert [r[3] for r, _ in bad] == [True]


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
