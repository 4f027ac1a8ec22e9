"""Text a job or an agent produced, made safe for the operator's terminal: every control character escaped.

The one rule every terminal edge (the CLI's output and error lines, the console's panes, detail and
notices) goes through: a job's output, an error text, a traceback, a job's name or tags, an agent's or a
host's name never reach the terminal as control characters, so they cannot clear it, move its cursor,
retitle it, switch its character set or hide text (bidi overrides). Newline and tab are kept where
multi-line text is shown; SGR colour may be kept by the console, which renders it itself (split_sgr).
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, Iterator, TextIO

# C0 and C1 controls, DEL, the Unicode line/paragraph separators and the bidirectional overrides and
# isolates (text that reorders what follows it, as in "Trojan Source"). Newline and tab are handled apart.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_UNSAFE_ALL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# Select Graphic Rendition (colour, bold...): CSI, digits, ';' or ':', 'm'. Nothing else an ESC starts.
_SGR = re.compile("\x1b\\[[0-9;:]{0,64}m")
_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def _shown(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def as_text(data: str | bytes) -> str:
    """Bytes (a job's output) decoded as UTF-8, what is not UTF-8 shown as U+FFFD; text as it is."""
    return data.decode("utf-8", errors="replace") if isinstance(data, (bytes, bytearray)) else data


def escape(data: str | bytes) -> str:
    """Multi-line text for a terminal: control characters as visible escapes (\\x1b, \\r, \\x07, \\u202e);
    newline and tab kept."""
    return _UNSAFE.sub(_shown, as_text(data))


def one_line(data: str | bytes) -> str:
    """Text for one line of a terminal (an error line, a table cell): every control character escaped,
    newline and tab included, so the line stays one line."""
    return _UNSAFE_ALL.sub(_shown, as_text(data))


def split_sgr(data: str | bytes) -> Iterator[tuple[bool, str]]:
    """The text as (is_sgr, piece): SGR sequences apart, every other piece escaped (newline, tab kept).
    For a display that renders colour itself and so sends no byte of the job's to the terminal."""
    text = as_text(data)
    start = 0
    for match in _SGR.finditer(text):
        if match.start() > start:
            yield False, escape(text[start:match.start()])
        yield True, match.group()
        start = match.end()
    if start < len(text):
        yield False, escape(text[start:])


class TerminalStream:
    """A text stream in front of a terminal that escapes everything written to it (escape()): the CLI puts
    one in front of its stdout and stderr when they are terminals, so no line it prints, whoever wrote
    it, can act on the operator's terminal. Bytes written to `.buffer` (`corral show --raw`) pass as they are."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(escape(text))
        return len(text)

    def __getattr__(self, name: str) -> object:  # flush, fileno, isatty, buffer, encoding...: the terminal's
        return getattr(self._stream, name)


def guard_terminal() -> None:
    """Put a TerminalStream in front of sys.stdout and sys.stderr where they are terminals (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, TerminalStream) and stream.isatty():
            setattr(sys, name, TerminalStream(stream))


class LineFormatter(logging.Formatter):
    """A log formatter whose every record is one line, control characters escaped: the master's log lines
    name agents, hosts and jobs, as their senders chose them, and are read on terminals (`-v`, `tail -f`)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return escape(super().formatException(ei))
