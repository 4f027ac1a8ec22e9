"""A job's hostile output: clear screen, OSC title change, cursor moves, a charset switch, colour, then 1000
random bytes (fixed seed). Run as a job's command; tests check that the operator's terminal shrugs it off."""

from __future__ import annotations

import random
import sys

TITLE = "PWNED-BY-JOB"
ATTACK = (b"\x1b[2J\x1b[H"  # clear the screen, cursor home
          + b"\x1b]0;" + TITLE.encode() + b"\x07"  # OSC 0: the terminal's (and tmux pane's) title
          + b"\x1b]2;" + TITLE.encode() + b"\x1b\\"  # OSC 2, ST-terminated
          + b"\x1b[5;5HMOVED\x1b[A\x1b[10C"  # cursor moves
          + b"\x1b(0lqqk\x1b(B"  # DEC line drawing charset
          + b"\x1b[?1049l"  # leave the alternate screen
          + b"\x1b[31mred-text\x1b[0m\r\n"  # colour, which the console may render
          + "\u202eevil\u202c\n".encode())  # a bidi override


def payload() -> bytes:
    rng = random.Random(1000)
    return ATTACK + bytes(rng.randrange(256) for _ in range(1000)) + b"\nend-of-hostile-output\n"


if __name__ == "__main__":
    sys.stdout.buffer.write(payload())
    sys.stderr.buffer.write(ATTACK)
