"""The `before_write` hook: redaction and enrichment on the writer thread, as Sentry's
`before_send`, and a built-in field masker.

The hook sees each entry as a dict (`occurred_at` an aware datetime, `metadata` a dict) just
before it is encoded, off the caller's path. It returns the entry to write (changed or not)
or None to drop it; a dropped entry is counted in `stats().filtered`. An entry whose hook
raises, or returns what cannot be written, is dead-lettered with the reason: a failing
redaction never writes the unredacted entry and never drops it silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

from .entry import COLUMNS, Row, dump_metadata

#: A `before_write` hook.
BeforeWrite = Callable[[dict[str, Any]], "dict[str, Any] | None"]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_FIELDS: Final = frozenset(COLUMNS)
_METADATA: Final = COLUMNS.index("metadata")
_OCCURRED_AT: Final = COLUMNS.index("occurred_at")


def entry_of(row: Row) -> dict[str, Any]:
    """The queued row as the hook sees it."""
    entry = dict(zip(COLUMNS, row, strict=False))
    stamp = entry.get("occurred_at")
    if type(stamp) is int:  # nanoseconds since the epoch, as log() takes the time
        entry["occurred_at"] = _EPOCH + timedelta(microseconds=stamp // 1000)
    metadata = entry.get("metadata")
    if isinstance(metadata, str):
        entry["metadata"] = orjson.loads(metadata)
    return entry


def row_of(entry: Mapping[str, Any]) -> Row:
    """The entry a hook returned, queued again; ValueError naming what cannot be written."""
    unknown = set(entry) - _FIELDS
    if unknown:
        raise ValueError(f"before_write returned unknown field(s): {', '.join(sorted(unknown))}")
    if not isinstance(entry.get("action"), str) or not entry["action"]:
        raise ValueError("before_write returned an entry without an action")
    values = [entry.get(name) for name in COLUMNS]
    if values[_METADATA] is not None:
        values[_METADATA] = dump_metadata(values[_METADATA])
    return tuple(values)


def run(hook: BeforeWrite, rows: Iterable[Row]) -> tuple[list[Row], list[tuple[Row, str]], int]:
    """(the rows to write, the rows dead-lettered with their reasons, how many were dropped)."""
    kept: list[Row] = []
    bad: list[tuple[Row, str]] = []
    dropped = 0
    for row in rows:
        try:
            result = hook(entry_of(row))
            if result is None:
                dropped += 1
                continue
            kept.append(row_of(result))
        except BaseException as exc:  # even SystemExit: the hook is the application's code
            bad.append((row, f"before_write failed: {type(exc).__name__}: {_text(exc)}"))
    return kept, bad, dropped


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return "(its message could not be read)"


def mask(
    *,
    fields: Iterable[str] = (),
    metadata_keys: Iterable[str] = (),
    replacement: str = "***",
) -> BeforeWrite:
    """A `before_write` hook that replaces the given top-level fields (e.g. "ip",
    "user_agent") and, at any depth of `metadata`, the values of the given keys (e.g.
    "password", "token", "email") with `replacement`; matching keys is case-insensitive.
    Masked entries say so in `metadata._auditq.masked`."""
    masked_fields = tuple(fields)
    for name in masked_fields:
        if name not in _FIELDS or name in ("id", "action", "occurred_at", "metadata"):
            raise ValueError(f"cannot mask {name!r}: mask one of the entry's text fields")
    keys = frozenset(key.lower() for key in metadata_keys)

    def hook(entry: dict[str, Any]) -> dict[str, Any]:
        hit: list[str] = []
        for name in masked_fields:
            if entry.get(name) is not None:
                entry[name] = None if name == "ip" else replacement
                hit.append(name)
        metadata = entry.get("metadata")
        if keys and isinstance(metadata, dict):
            entry["metadata"] = _mask_tree(metadata, keys, replacement, hit, "metadata")
        if hit:
            meta = entry.get("metadata")
            meta = dict(meta) if isinstance(meta, dict) else {}
            notes = dict(meta.get("_auditq") or {})
            notes["masked"] = sorted(set(notes.get("masked", [])) | set(hit))
            meta["_auditq"] = notes
            entry["metadata"] = meta
        return entry

    return hook


def _mask_tree(
    value: Any, keys: frozenset[str], replacement: str, hit: list[str], path: str
) -> Any:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            where = f"{path}.{key}"
            if isinstance(key, str) and key.lower() in keys:
                out[key] = replacement
                hit.append(where)
            else:
                out[key] = _mask_tree(item, keys, replacement, hit, where)
        return out
    if isinstance(value, list):
        return [_mask_tree(item, keys, replacement, hit, path) for item in value]
    return value
