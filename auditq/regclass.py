"""Relation names as text for `%s::regclass` parameters, quoted like identifiers."""

from __future__ import annotations


def regclass_text(schema: str, table: str) -> str:
    """`"schema"."table"`, with embedded double quotes doubled."""
    return '"{}"."{}"'.format(schema.replace('"', '""'), table.replace('"', '""'))
