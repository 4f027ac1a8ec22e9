"""console/escape.py: the one rule for what a job or an agent produced on the way to a terminal."""

from __future__ import annotations

import io
import random

from corral.console import escape
from corral.console.cli.render import error_line
from corral.agent.errors import CorralError

CONTROLS = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]] + ["\u2028", "\u2029", "\u202e", "\u2066"]


def test_every_control_character_is_escaped_newline_and_tab_kept() -> None:
    for char in CONTROLS:
        shown = escape.escape(f"a{char}b")
        if char in "\n\t":
            assert shown == f"a{char}b"
        else:
            assert char not in shown and shown.startswith("a\\") and shown.endswith("b"), repr(shown)
    assert escape.escape("\x1b[2J\r\x07") == "\\x1b[2J\\r\\x07"
    assert escape.escape("plain text, ünïcode, 中文 and a \\ backslash") == "plain text, ünïcode, 中文 and a \\ backslash"


def test_one_line_escapes_newlines_too() -> None:
    assert escape.one_line("a\nb\tc\x1b") == "a\\nb\\tc\\x1b"


def test_random_bytes_come_out_without_a_control_character() -> None:
    rng = random.Random(7)
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(1000))
        for shown in (escape.escape(data), escape.one_line(data)):
            assert not any(c in shown for c in CONTROLS if c not in "\n\t")
        assert not any(c in escape.one_line(data) for c in "\n\t")


def test_split_sgr_keeps_colour_apart_and_escapes_every_other_sequence() -> None:
    pieces = list(escape.split_sgr(b"\x1b[1;31mred\x1b[0m \x1b]0;t\x07\x1b[2J"))
    assert pieces == [(True, "\x1b[1;31m"), (False, "red"), (True, "\x1b[0m"), (False, " \\x1b]0;t\\x07\\x1b[2J")]


def test_terminal_stream_escapes_what_is_written_and_passes_the_rest() -> None:
    raw = io.StringIO()
    stream = escape.TerminalStream(raw)
    assert stream.write("out\x1b]0;t\x07\n") == len("out\x1b]0;t\x07\n")
    assert raw.getvalue() == "out\\x1b]0;t\\x07\n" and stream.getvalue() == raw.getvalue()


def test_an_error_line_stays_one_line_whatever_the_error_holds() -> None:
    line = error_line("corral wait", CorralError("job 3 failed: boom\n\x1b[2Jsecond line", "see\nthis"))
    assert line == "corral wait: job 3 failed: boom\\n\\x1b[2Jsecond line — see\\nthis"


def test_the_console_renders_a_jobs_colour_but_not_concealed_or_blinking_text() -> None:
    from corral.console.tui.format import output

    text = output(b"\x1b[31;1mred\x1b[0m \x1b[8msecret\x1b[0m \x1b[5mflash\x1b[0m \x1b]0;t\x07")
    assert text.plain == "red secret flash \\x1b]0;t\\x07"
    styles = {text.plain[s.start:s.end]: s.style for s in text.spans}
    assert styles["red"].color is not None and styles["red"].color.name == "color(1)" and styles["red"].bold
    assert not styles["secret"].conceal and not styles["flash"].blink
