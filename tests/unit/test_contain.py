"""agent/contain.py's pure parts: choosing a containment by name, and how killed leftovers are described."""

from __future__ import annotations

import pytest

from corral.agent import contain
from corral.agent.errors import CorralError


def test_an_unknown_containment_is_one_line() -> None:
    with pytest.raises(CorralError, match=r"^--containment must be one of auto, cgroup, subreaper, group, not 'box'$"):
        contain.choose("box", owns_process=False)


def test_group_is_what_it_says() -> None:
    chosen = contain.choose("group", owns_process=False)
    assert (chosen.kind, chosen.describe()) == ("group", "group (asked for)")


def test_leftovers_are_described_by_name_and_pid() -> None:
    assert contain.describe_killed([]) == ""
    assert contain.describe_killed([contain.Killed(7, "sleep")]) == \
        "1 process left running at its end was killed: sleep (pid 7)"
    many = [contain.Killed(pid, "sh") for pid in range(1, 11)]
    assert contain.describe_killed(many) == ("10 processes left running at its end were killed: "
                                             + ", ".join(f"sh (pid {pid})" for pid in range(1, 9)) + " and 2 more")
