"""console/values.py: values agents hand in, read as data; named by class without being unpickled."""

from __future__ import annotations

import collections
import datetime
import os
import pickle
import random

import pytest

from corral.console import values


class Forged:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("exit 3",))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_the_class_is_named_from_opcodes_in_every_protocol(protocol: int) -> None:
    assert values.pickled_class(pickle.dumps(Forged(), protocol)) == "posix.system"
    assert values.pickled_class(pickle.dumps(datetime.date(2020, 1, 2), protocol)) == "datetime.date"
    assert values.pickled_class(pickle.dumps(collections.OrderedDict(a=1), protocol)) == "collections.OrderedDict"
    assert values.pickled_class(pickle.dumps([1, "x"], protocol)) == ""


def test_shown_is_plain_data_or_class_and_size_never_a_call() -> None:
    assert values.shown(pickle.dumps({"a": [1, 2.5, None, b"x"]})) == "{'a': [1, 2.5, None, b'x']}"
    forged = pickle.dumps(Forged())
    assert values.shown(forged) == f"<pickled posix.system, {len(forged)} bytes>"
    assert values.as_json(pickle.dumps({"a": [1, "b"]})) == {"a": [1, "b"]}
    assert values.as_json(pickle.dumps((1, 2))) == "(1, 2)"
    assert values.as_json(forged) == values.shown(forged)


def test_garbage_is_described_never_raised() -> None:
    rng = random.Random(3)
    for _ in range(300):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        values.shown(data)  # raises nothing: a description, or the plain data random bytes happen to be
        values.pickled_class(data)


def test_reader_policies() -> None:
    date = pickle.dumps(datetime.date(2020, 1, 2))
    assert values.Reader().load(date, 1) == datetime.date(2020, 1, 2)  # trusting, the default
    with pytest.raises(values.ValueRefused, match="job 1's value is a pickled datetime.date, .* plain data only"):
        values.Reader("plain").load(date, 1)
    assert values.Reader(["datetime.date"]).load(date, 1) == datetime.date(2020, 1, 2)
    assert values.Reader([datetime.date]).load(date, 1) == datetime.date(2020, 1, 2)
    with pytest.raises(values.ValueRefused, match="add 'posix.system' to Client"):
        values.Reader([datetime.date]).load(pickle.dumps(Forged()), 2)
    with pytest.raises(values.ValueUnreadable, match="does not unpickle here"):
        values.Reader("plain").load(b"not a pickle", 3)
    with pytest.raises(values.CorralError, match="'module.Name'"):
        values.Reader(["nodots"])
