"""What log lines may show of a text that came from the server or a caller: no control
characters (a newline in a value would forge a log line) and never the server's DETAIL
("Failing row contains (...)": personal data), which only the dead letters keep."""

from __future__ import annotations

from typing import Final

#: Where a dead-letter reason's server DETAIL starts: the dead-letter file and
#: `on_dead_letter` get it, log lines and `last_error` never do.
DETAIL_MARK: Final = "\nDETAIL: "


def escape_controls(text: str) -> str:
    """`text` with control characters (and Unicode line breaks) written as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char)
    if named:
        return named
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def loggable(reason: str) -> str:
    """What a log line may show of a dead-letter reason: not the server's DETAIL (see
    `Sink._dead_reason`), and no raw control characters."""
    return escape_controls(reason.split(DETAIL_MARK, 1)[0])
