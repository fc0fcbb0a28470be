"""`auditq export --tenant T --proofs` and `auditq verify-export`: one tenant's rows checked
offline against the signed checkpoint, and any change to the file caught."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from auditq.chain import ChainStream, inclusion_path, root
from auditq.checkpoint import keygen, make_checkpoint
from auditq.cli import main
from auditq.proofs import path_from_levels, root_from_path, tree_levels, verify_export
from auditq.verify import Finding

from .chain_build import Chained, make_row


@pytest.fixture
def chained(pg_dsn: str) -> Iterator[Chained]:
    made = Chained(pg_dsn, "public", f"chain_{uuid.uuid4().hex[:10]}")
    made.setup()
    yield made
    made.drop()


def test_root_from_path_walks_every_leaf_of_every_tree_size() -> None:
    for size in range(1, 40):
        leaves = b"".join(bytes([i]) * 32 for i in range(size))
        top = root(leaves)
        levels = tree_levels(leaves)
        assert levels[-1] == [top]
        for index in range(size):
            leaf = leaves[index * 32 : index * 32 + 32]
            path = inclusion_path(leaves, index)
            assert path_from_levels(levels, index) == path
            assert root_from_path(leaf, index, size, path) == top
            assert root_from_path(b"\xee" * 32, index, size, path) != top
            if size > 1:
                assert root_from_path(leaf, index, size, path[:-1]) != top
                wrong = (index + 1) % size
                assert root_from_path(leaf, wrong, size, path) != top


class Exported:
    def __init__(self, c: Chained, tmp: Path) -> None:
        self.c = c
        self.key = keygen("proofs.example/audit")
        self.pub = tmp / "audit.pub"
        self.pub.write_text(self.key.verifier().text() + "\n")
        self.file = tmp / "t1.jsonl"

    def cli(self, *args: str) -> int:
        c = self.c
        return main([*args, "--dsn", c.dsn, "--schema", c.schema, "--table", c.table])

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.file.read_text().splitlines()]

    def rewrite(self, lines: list[dict[str, Any]]) -> None:
        self.file.write_text("".join(json.dumps(o) + "\n" for o in lines))

    def check(self, *extra: str) -> int:
        return main(["verify-export", str(self.file), "--public-key", str(self.pub), *extra])


@pytest.fixture
def exported(chained: Chained, tmp_path: Path) -> Exported:
    """Two streams with t1's and t2's rows interleaved in batches (one position skipped), a
    checkpoint, then two more t1 rows the checkpoint does not sign; t1 exported with proofs."""
    made = Exported(chained, tmp_path)
    one, two = ChainStream(), ChainStream()
    tenants = ["t1", "t2", "t2", "t1", "t1", "t2", "t1"]
    chained.write(one, [make_row(i, tenant=t) for i, t in enumerate(tenants)], skip=[3])
    chained.write(one, [make_row(10 + i, tenant="t2") for i in range(3)])
    chained.write(one, [make_row(20 + i, tenant=t) for i, t in enumerate(["t2", "t1", "t2"])])
    chained.write(two, [make_row(30 + i, tenant=t) for i, t in enumerate(["t1", "t2", "t1"])])
    with psycopg.connect(chained.dsn) as conn:
        make_checkpoint(conn, chained.schema, chained.table, made.key)
    chained.write(one, [make_row(40, tenant="t1"), make_row(41, tenant="t2")])
    chained.write(two, [make_row(42, tenant="t1")])
    assert made.cli("export", "--tenant", "t1", "--proofs", "-o", str(made.file)) == 0
    return made


def _found(made: Exported) -> tuple[Any, list[Finding]]:
    found: list[Finding] = []
    with open(made.file, "rb") as source:
        summary = verify_export(source, [made.key.verifier()], found.append)
    return summary, found


def test_an_export_with_proofs_verifies_offline(
    exported: Exported, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = exported.lines()
    kinds = [o["kind"] for o in lines]
    assert kinds[0] == "header" and kinds[-1] == "end"
    rows = [o for o in lines if o["kind"] == "row"]
    # t1's rows only: 3 of the first batch (one of its t1 rows was dead-lettered), 1 of the
    # third, 2 of stream two, and the 2 written after the checkpoint.
    assert len(rows) == 8 and {o["row"]["tenant_id"] for o in rows} == {"t1"}
    assert sum(1 for o in rows if o.get("unanchored")) == 2
    # Nothing of t2's rows is in the file: not a value, not a tuple.
    text = exported.file.read_text()
    for n in (1, 2, 5, 10, 11, 12, 20, 22, 31, 41):
        assert f'actor{n}"' not in text and f'req{n}"' not in text
    assert '"t2"' not in text
    summary, found = _found(exported)
    assert [f.kind for f in found] == ["UNANCHORED", "UNANCHORED"]
    assert (summary.rows, summary.proven, summary.damaged) == (8, 6, False)
    capsys.readouterr()
    assert exported.check() == 0
    assert "6 of 8 rows proven" in capsys.readouterr().out


def test_a_modified_value_is_caught(exported: Exported) -> None:
    lines = exported.lines()
    row = next(o for o in lines if o["kind"] == "row" and not o.get("unanchored"))
    row["row"]["action"] = "user.logout"
    exported.rewrite(lines)
    _, found = _found(exported)
    assert [(f.kind, f.stream, f.first_pos, f.id) for f in found if f.kind != "UNANCHORED"] == [
        ("MODIFIED", row["stream"], row["pos"], row["row"]["id"])
    ]
    assert exported.check() == 1


def test_modified_bytes_with_matching_values_are_caught(exported: Exported) -> None:
    """The file is edited consistently (the tuple re-encoded with the new value, the values
    changed to match): the leaf no longer reaches the batch's root."""
    lines = exported.lines()
    row = next(o for o in lines if o["kind"] == "row" and not o.get("unanchored"))
    old = row["row"]["actor_id"].encode()
    new = old[:-1] + (b"9" if old[-1:] != b"9" else b"8")
    data = base64.b64decode(row["tuple"])
    assert data.count(old) == 1
    row["tuple"] = base64.b64encode(data.replace(old, new)).decode()
    row["row"]["actor_id"] = new.decode()
    exported.rewrite(lines)
    _, found = _found(exported)
    damage = [f for f in found if f.kind != "UNANCHORED"]
    assert [(f.kind, f.first_pos) for f in damage] == [("MODIFIED", row["pos"])]
    assert "root" in damage[0].detail


def test_a_forged_digest_another_key_or_a_cut_file_are_caught(exported: Exported) -> None:
    lines = exported.lines()
    digest = next(o for o in lines if o["kind"] == "digest")
    digest["root"] = base64.b64encode(b"\x01" * 32).decode()
    exported.rewrite(lines)
    summary, found = _found(exported)
    assert "BROKEN" in {f.kind for f in found} and summary.damaged
    assert summary.proven < 6
    # Another key: nothing is proven.
    exported.file.unlink()
    assert exported.cli("export", "--tenant", "t1", "--proofs", "-o", str(exported.file)) == 0
    stranger = keygen("someone.else")
    found = []
    with open(exported.file, "rb") as source:
        summary = verify_export(source, [stranger.verifier()], found.append)
    assert "BAD_SIGNATURE" in {f.kind for f in found} and summary.proven == 0
    # An edited checkpoint (a head changed): unreadable or unsigned, nothing proven.
    lines = exported.lines()
    lines[0]["checkpoint"] = lines[0]["checkpoint"].replace("head ", "head 0", 1)
    exported.rewrite(lines)
    summary, found = _found(exported)
    assert "BAD_SIGNATURE" in {f.kind for f in found} and summary.proven == 0
    exported.file.unlink()
    assert exported.cli("export", "--tenant", "t1", "--proofs", "-o", str(exported.file)) == 0
    # The last lines cut off.
    lines = exported.lines()
    exported.rewrite(lines[:-2])
    summary, found = _found(exported)
    assert "TRUNCATED" in {f.kind for f in found} and summary.damaged


def test_proofs_refuse_other_filters_and_a_table_without_checkpoint(
    chained: Chained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = Exported(chained, tmp_path)
    assert made.cli("export", "--tenant", "t1", "--proofs", "--since", "7d") == 2
    assert "--proofs" in capsys.readouterr().err
    assert made.cli("export", "--tenant", "t1", "--proofs", "--format", "csv") == 2
    chained.write(ChainStream(), [make_row(1, tenant="t1")])
    assert made.cli("export", "--tenant", "t1", "--proofs", "-o", str(made.file)) == 1
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "auditq checkpoint" in err
