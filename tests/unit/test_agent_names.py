"""An agent with the default name whose name is taken tries the next one: host, host-2, host-3..."""

from __future__ import annotations

import pytest

from corral.agent.runner import next_name


@pytest.mark.parametrize("name, following", [
    ("host", "host-2"),
    ("host-2", "host-3"),
    ("host-9", "host-10"),
    ("my-box", "my-box-2"),  # a dash that numbers nothing is part of the name
    ("-3", "-3-2"),
])
def test_the_next_default_name(name: str, following: str) -> None:
    assert next_name(name) == following
