"""Values as short table cells: durations, ages, clock times, counts and one-line text."""

from __future__ import annotations

import re
import time
from rich.style import Style
from rich.text import Span, Text

from .. import escape

_BREAKS = re.compile(r"[\n\t]+")
# What a job's SGR may not do in the console: hide its text (conceal) or make it flash.
_TAMED = Style(conceal=False, blink=False, blink2=False)


def one_line(text: str) -> str:
    """Text for a single table cell: newlines and tabs become one space, every other control character
    is shown escaped (console/escape.py), so a name or an error cannot act on the terminal."""
    return escape.one_line(_BREAKS.sub(" ", text))


def output(data: str | bytes, style: str = "") -> Text:
    """A job's output (or any multi-line text a job or agent produced) for the console: its SGR colours
    rendered as colour by rich, every other control character shown escaped; newline and tab kept. No
    byte of it reaches the terminal as it came: rich turns the SGR it is left with into styles."""
    safe = "".join(piece for _, piece in escape.split_sgr(data))
    out = Text.from_ansi(safe, style=style, end="")
    out.spans = [Span(s.start, s.end, (Style.parse(s.style) if isinstance(s.style, str) else s.style) + _TAMED)
                 for s in out.spans]
    return out


def duration(seconds: float | None) -> str:
    """0.01s, 4.2s, 59s, 3m05s, 1h02m, 2d03h: precise when short, coarse when long."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.2f}s" if seconds < 1 else f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def age(seconds: float | None) -> str:
    """How long ago, in whole units: heartbeats are a second apart, so tenths would only flicker."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return "<1s"
    return duration(float(int(seconds))) if seconds < 10 else duration(seconds)


def clock(ts: float | None) -> str:
    """A local wall-clock time, HH:MM:SS."""
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "-"


def stamp(ts: float | None) -> str:
    """A local date and time, for the detail view."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def count(n: int) -> str:
    """A count with thousands separators: 100,234."""
    return f"{n:,}"
