"""The bounded plain-data decoder (console/master/decode.py): what it lets through, unchanged, and what it
refuses before building anything."""

from __future__ import annotations

import pickle

import pytest

from corral.agent.protocol import JobSpec
from corral.console.master.decode import MAX_DATA_BYTES, MAX_DEPTH, MAX_VALUES, Refused, plain_loads, scan

PLAIN = [None, True, False, 0, -1, 255, 65535, 2**31, -(2**63), 2**200, 1.5, float("inf"), "", "x", "é" * 300,
         "x" * 70_000, b"", b"y" * 70_000, (), (1,), (1, 2), (1, 2, 3), tuple(range(50)), [], [[]], {}, {"a": 1},
         {1: (2, 3)}, set(), {1, 2}, frozenset({"a"}), list(range(3000)), {str(i): i for i in range(3000)},
         JobSpec(command="echo hi", env={"A": "1"}, tags=("t",)).to_wire()]


@pytest.mark.parametrize("protocol", [4, 5])
def test_plain_values_come_through_unchanged(protocol: int) -> None:
    for value in PLAIN:
        assert plain_loads(pickle.dumps(value, protocol=protocol)) == value, value
    shared = ["s" * 10] * 5
    nested = [shared, shared, {"k": shared, "t": (shared, shared)}]
    assert plain_loads(pickle.dumps(nested, protocol=protocol)) == nested
    assert plain_loads(pickle.dumps(bytearray(b"ab"), protocol=5)) == bytearray(b"ab")


def test_protocols_2_and_3_for_what_they_write_without_globals() -> None:
    for value in (None, 1, "x", [1, {"a": (1, 2)}], {"k": [None, True]}):
        for protocol in (2, 3):
            assert plain_loads(pickle.dumps(value, protocol=protocol)) == value


def refused(data: bytes, *words: str) -> str:
    with pytest.raises(Refused) as info:
        plain_loads(data)
    text = str(info.value)
    for word in words:
        assert word in text, text
    return text


def test_shared_references_count_each_time() -> None:
    level: list = [0] * 10
    for _ in range(7):
        level = [level] * 10  # 10^8 references in 200 bytes
    refused(pickle.dumps(level, protocol=4), f"more than {MAX_VALUES:,} values")
    text = "x" * (1 << 20)
    refused(pickle.dumps([text] * 65, protocol=4), f"more than {MAX_DATA_BYTES >> 20} MiB")
    assert len(plain_loads(pickle.dumps([text] * 63, protocol=4))) == 63
    lone = b"\x80\x04\x8dZZZZZZZZ"  # BINUNICODE8 claiming more than the message holds
    refused(lone, "longer than the message")


def test_nesting_is_bounded_however_it_is_built() -> None:
    deep: list = []
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    refused(pickle.dumps(deep, protocol=4), f"more than {MAX_DEPTH} deep")
    ok: list = []
    for _ in range(MAX_DEPTH - 1):
        ok = [ok]
    assert plain_loads(pickle.dumps(ok, protocol=4)) == ok
    refused(b"\x80\x04" + b"(" * 100 + b".", f"{MAX_DEPTH} deep")
    refused(b"\x80\x04" + b"]" * 20_000 + b".", "containers being filled")
    # Inside out through the memo: each level a new list holding a reference to the last.
    chain = b"\x80\x04]\x94" + b"".join(b"]h" + bytes([i]) + b"a\x94" for i in range(MAX_DEPTH + 2)) + b"."
    refused(chain, f"{MAX_DEPTH} deep")


def test_what_pickle_dumps_never_writes_is_refused() -> None:
    looped: list = []
    looped.append(looped)
    refused(pickle.dumps(looped, protocol=4), "changed after it was used")
    # A list appended to after another list took a reference to it (the count would be stale).
    refused(b"\x80\x04]\x94]h\x00aNh\x00\x94N" + b"a.", "changed after it was used")
    refused(b"\x80\x04Nr\xff\xff\xff\x00.", "memo index out of sequence")  # a 4-billion-slot memo
    refused(b"\x80\x04h\x05.", "cut short or malformed")
    refused(b"\x80\x04N2.", "DUP")
    refused(b"\x80\x04N0N.", "POP")
    refused(b"\x80\x04(N.", "ends inside a container")
    refused(b"\x80\x04N", "cut short")
    refused(b"\x80\x01N.", "protocols 0 and 1")
    refused(b"(lp0\n.", "opcode")


def test_classes_and_functions_are_refused_by_name_and_nothing_runs() -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("ran",))

    refused(pickle.dumps(Evil(), protocol=4), "plain data only", "builtins.print")
    refused(b"\x80\x02cos\nsystem\n.", "os.system")
    refused(b"\x80\x04\x8c" + b"\x10" + b"m" * 16 + b"\x8c\x03abc\x93.", "plain data only")
    with pytest.raises(Refused):
        scan(pickle.dumps(Evil(), protocol=5) + b"")


def test_a_submission_as_the_client_sends_it() -> None:
    from multiprocessing.reduction import ForkingPickler

    specs = [JobSpec(command=f"make part{i}", name=f"p{i}", env={"CI": "1"}, tags=("linux",)).to_wire()
             for i in range(5000)]
    message = ("7f3a", "submit", (specs,), {})
    assert plain_loads(bytes(ForkingPickler.dumps(message))) == message


def test_a_job_counts_everything_it_carries() -> None:
    """The 1 MiB per job holds its name, env, cwd and tags too (the journal stores them with it)."""
    from corral.agent.errors import BadJobSpec
    from corral.console.master.validate import MAX_JOB_BYTES, check

    half = "v" * (MAX_JOB_BYTES // 2)
    check({"command": "true", "env": {"A": half}})
    for spec in ({"command": "echo " + half, "env": {"A": half}},
                 {"command": "true", "env": {f"K{i}": half[:1000] for i in range(1100)}},
                 {"func": "m:f", "payload": half.encode(), "cwd": "/" + half},
                 {"command": "true", "tags": [f"t{i}" + "x" * 1000 for i in range(1100)]}):
        with pytest.raises(BadJobSpec, match=f"bytes of command and arguments with its name, env, cwd and tags;"
                                             f" the limit is {MAX_JOB_BYTES}"):
            check(spec)
    # Non-ASCII text counts as the UTF-8 the journal stores.
    with pytest.raises(BadJobSpec, match="the limit is"):
        check({"command": "true", "env": {"A": "é" * (MAX_JOB_BYTES // 2 + 10)}})


def test_the_journal_stores_env_and_tags_as_counted() -> None:
    from corral.console.master.store import encode_env, encode_tags

    assert len(encode_env({"A": "é" * 100}).encode()) < 220
    assert encode_tags(["ü"]) == '["ü"]'
