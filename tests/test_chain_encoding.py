"""The canonical encoding: C == Python, RFC 6962 roots, and the jsonb round trip."""

from __future__ import annotations

import hashlib
import math
import struct
import uuid
from typing import Any

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditq import binary, chain, native
from auditq.chain import ChainError, ChainStream, Skip

from .chain_build import encoded, make_row

C = native.speedups if chain.ACCELERATED else None
needs_c = pytest.mark.skipif(C is None, reason="the C extension is not built")

_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
_json: Any = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)
metadata = st.dictionaries(_text, _json, max_size=6)


def test_canonical_number_normalises_like_numeric() -> None:
    same = ["1.50", "15e-1", "1.5E0", "0.15e1", "+1.5e0".lstrip("+")]
    assert {chain.canonical_number(x) for x in same} == {b"15e-1"}
    assert chain.canonical_number("-0.0") == b"0"
    assert chain.canonical_number("1e16") == chain.canonical_number("10000000000000000") == b"1e16"
    assert chain.canonical_number("-120") == b"-12e1"


def test_keys_sorted_by_utf8_bytes_and_last_duplicate_wins() -> None:
    text = '{"b": 1, "é": 2, "a": 3, "b": 4}'
    got = chain._canonical_json_python(text)
    assert got == chain._canonical_json_python('{"a":3,"b":4,"é":2}')
    assert got != chain._canonical_json_python('{"a":3,"b":1,"é":2}')
    # different JSON values never share a form
    forms = {
        chain._canonical_json_python(t)
        for t in [
            '{"a":"1"}',
            '{"a":1}',
            '{"a":[1]}',
            '{"a":{}}',
            '{"a":null}',
            '{"a":true}',
            '{"a":"true"}',
        ]
    }
    assert len(forms) == 7


@needs_c
@given(metadata)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_c_canonical_json_equals_python(value: dict[str, Any]) -> None:
    assert C is not None
    text = orjson.dumps(value)
    assert C.chain_canonical_json(text) == chain._canonical_json_python(text)
    spaced = orjson.dumps(value, option=orjson.OPT_INDENT_2)
    assert C.chain_canonical_json(spaced) == chain._canonical_json_python(text)


@needs_c
@pytest.mark.parametrize(
    "bad", ["", "{", '{"a":}', '{"a":1,}', "[1 2]", '"\\x"', "NaN", "01x", "{} {}", '"\x01"']
)
def test_c_and_python_refuse_the_same_non_json(bad: str) -> None:
    assert C is not None
    with pytest.raises(ValueError):
        C.chain_canonical_json(bad)
    with pytest.raises(ValueError):
        chain._canonical_json_python(bad)


@needs_c
@pytest.mark.parametrize("size", [0, 1, 55, 56, 63, 64, 65, 119, 120, 1000])
def test_sha256_backends_equal_hashlib(size: int) -> None:
    assert C is not None
    data = bytes(range(256)) * 4
    data = data[:size]
    try:
        for portable in (False, True):
            C.chain_sha256_backend(portable)
            assert C.chain_sha256(data) == hashlib.sha256(data).digest()
    finally:
        C.chain_sha256_backend(False)


@needs_c
@given(st.binary(max_size=300))
def test_portable_sha256_equals_hashlib_for_any_input(data: bytes) -> None:
    assert C is not None
    try:
        C.chain_sha256_backend(True)
        assert C.chain_sha256(data) == hashlib.sha256(data).digest()
    finally:
        C.chain_sha256_backend(False)


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 section 2.1, literally."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + _mth(leaves[:k]) + _mth(leaves[k:])).digest()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 8, 9, 31, 100])
def test_root_is_rfc6962(n: int) -> None:
    leaves = [hashlib.sha256(bytes([i])).digest() for i in range(n)]
    assert chain.root(b"".join(leaves)) == _mth(leaves) == chain._root_python(b"".join(leaves))
    for index in range(n):
        node = leaves[index]
        path = chain.inclusion_path(b"".join(leaves), index)
        # walk the path back to the root (RFC 9162 2.1.3.2)
        fn, sn = index, n - 1
        for sibling in path:
            if fn % 2 == 1 or fn == sn:
                node = chain.node_hash(sibling, node)
                while fn % 2 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
            else:
                node = chain.node_hash(node, sibling)
            fn >>= 1
            sn >>= 1
        assert node == _mth(leaves)


def _block(n: int, meta: dict[str, Any] | None = None) -> bytes:
    return b"".join(encoded(make_row(i, metadata=meta)) for i in range(n))


def test_leaf_columns_follow_the_writers_copy_columns() -> None:
    """v1 is frozen: the encoder's columns must be its prefix (origin included), else the
    writer's tuples would not be v1 tuples."""
    assert chain.LEAF_COLUMNS_V1[: len(binary.COPY_COLUMNS)] == binary.COPY_COLUMNS
    assert chain.LEAF_COLUMNS_V1[13:] == ("origin", "chain_stream", "chain_pos")
    assert chain.LEAF_COLUMNS_V1[chain.JSON_FIELD_V1] == "metadata"
    assert len(binary.COPY_COLUMNS) == chain.STAMPED_FIELDS_V1
    short = binary.encode_row(make_row(1))[0]
    cut = struct.pack(">h", 13) + short[2 : len(short) - 4]  # the origin field dropped
    for stamp in (chain.stamp, chain._stamp_python):
        with pytest.raises(ValueError, match="fields"):
            stamp(cut, uuid.uuid4().bytes, 1)


def test_stamp_appends_chain_fields_and_leaves_match() -> None:
    stream = uuid.uuid4()
    data = _block(5, {"z": [1, 2.5], "a": None})
    stamped, leaves = chain._stamp_python(data, stream.bytes, 41)
    rows = binary.split_rows(stamped)
    assert len(rows) == 5 and len(leaves) == 5 * 32
    fields, _ = chain.tuple_fields(rows[2], 0)
    assert len(fields) == len(chain.LEAF_COLUMNS_V1)
    assert fields[-2] == stream.bytes and int.from_bytes(fields[-1] or b"", "big") == 43
    assert chain._leaves_python(stamped) == leaves
    if C is not None:
        assert C.chain_stamp(data, stream.bytes, 41) == (stamped, leaves)
        assert C.chain_leaves(stamped) == leaves


def test_scan_twins_agree_and_stop_at_partial_tuples() -> None:
    stamped, leaves = chain._stamp_python(_block(4), uuid.uuid4().bytes, 1)
    buf = stamped + b"\xff\xff"
    at, records, ended, again = chain._scan_python(buf, 0)
    assert ended and at == len(buf) and len(records) == 4 * chain.SCAN_RECORD.size
    assert b"".join(r[3] for r in chain.SCAN_RECORD.iter_unpack(records)) == leaves == again
    cut = len(stamped) - 7
    part = chain._scan_python(stamped[:cut], 0)
    assert not part[2] and len(part[1]) == 3 * chain.SCAN_RECORD.size
    if C is not None:
        assert C.chain_scan(buf, 0) == (at, records, True, leaves)
        assert C.chain_scan(stamped[:cut], 0) == part


def test_each_field_changes_the_leaf() -> None:
    stamped, _ = chain._stamp_python(_block(1), uuid.uuid4().bytes, 1)
    fields, _ = chain.tuple_fields(stamped, 0)
    base = chain.leaf_of_fields(fields)
    for index, value in enumerate(fields):
        changed = list(fields)
        if value is None:
            changed[index] = b"x"
        elif index == chain.JSON_FIELD_V1:
            changed[index] = b'\x01{"n":1}'
        else:
            changed[index] = bytes([value[0] ^ 1]) + value[1:] if value else b"x"
        assert chain.leaf_of_fields(changed) != base, chain.LEAF_COLUMNS_V1[index]


def test_chain_stream_seal_and_commit() -> None:
    stream = ChainStream()
    _, leaves, first = stream.stamp(_block(3))
    assert first == 1 and stream.next_pos == 4
    with pytest.raises(ChainError):
        stream.seal(leaves, 2, 3)
    with pytest.raises(ChainError):
        stream.seal(leaves, 1, 4)
    record = stream.seal(leaves[32:], 1, 3, [(1, Skip.DEAD_LETTER)])
    assert record.prev_hash == chain.GENESIS and record.next_pos == 4
    assert stream.sealed_pos == 1  # sealing is pure
    stream.committed(record)
    assert stream.sealed_pos == 4 and stream.head_hash == record.hash
    with pytest.raises(ChainError):
        stream.committed(record)
    assert record.hash != chain.digest_hash(
        stream.id, 1, 3, [(1, 2)], record.root, record.prev_hash
    )


def test_non_finite_floats_never_reach_the_hash() -> None:
    # orjson writes NaN as null; entry.dump_metadata refuses it before the queue
    assert chain._canonical_json_python(
        orjson.dumps({"x": math.nan})
    ) == chain._canonical_json_python('{"x":null}')


@pytest.fixture(scope="module")
def jsonb_conn(pg_dsn: str) -> Any:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE chain_jsonb_probe (m jsonb)")
        yield conn


@given(st.lists(metadata, min_size=1, max_size=8))
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_canonical_survives_the_jsonb_round_trip(
    jsonb_conn: Any, values: list[dict[str, Any]]
) -> None:
    """What the writer hashes (orjson's text) and what the verifier reads back (PostgreSQL's
    jsonb text, via binary COPY) have the same canonical form."""
    texts = [orjson.dumps(v).decode() for v in values]
    jsonb_conn.execute("TRUNCATE chain_jsonb_probe")
    with jsonb_conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO chain_jsonb_probe (m) VALUES (%s::jsonb)", [(t,) for t in texts]
        )
        back = [
            row[0] for row in cur.execute("SELECT m::text FROM chain_jsonb_probe ORDER BY ctid")
        ]
        with cur.copy(
            "COPY (SELECT m FROM chain_jsonb_probe ORDER BY ctid) TO STDOUT (FORMAT binary)"
        ) as copy:
            raw = b"".join(bytes(x) for x in copy)
    fields = binary.split_rows(raw[19:-2])
    assert len(back) == len(texts) == len(fields)
    for text, stored, tuple_bytes in zip(texts, back, fields, strict=True):
        want = chain._canonical_json_python(text)
        assert chain._canonical_json_python(stored) == want
        assert chain.canonical_json(tuple_bytes[7:]) == want  # 2 count + 4 length + 1 version
        if C is not None:
            assert C.chain_canonical_json(text) == want


def test_wide_and_deep_objects_agree() -> None:
    wide = {f"k{i:03d}": i for i in range(70)}
    wide["nested"] = {f"{chr(0x41 + i % 26) * (i % 5 + 1)}": [i, {"x": i}] for i in range(40)}
    deep: dict[str, Any] = {"v": 1}
    for i in range(100):
        deep = {"d": deep, "i": i}
    for value in (wide, deep):
        text = orjson.dumps(value)
        want = chain._canonical_json_python(text)
        assert chain.canonical_json(text) == want
    dup = '{"b":1,' + ",".join(f'"k{i}":{i}' for i in range(30)) + ',"b":2}'
    assert chain.canonical_json(dup) == chain._canonical_json_python(dup)
    assert chain.canonical_json(dup) == chain.canonical_json(dup.replace('"b":1,', ""))
