"""Records packed (protocol 4: agent.protocol.pack_results, pack_attempts, pack_starts for an agent's report,
pack_specs for a Client's submission): what the master reads back is what was sent, a malformed packing is
refused whole in one line, and the bounded decoder walks a few opcodes per record instead of ~18."""

from __future__ import annotations

import pickle
import pickletools
import struct
from multiprocessing.reduction import ForkingPickler

import pytest

from corral.agent.errors import CorralError
from corral.agent.errors import BadJobSpec
from corral.agent.protocol import (OUTPUT_TAIL_BYTES, RELEASED, RESULT_HEAD, RESULT_STATE_CODES, SPEC_HEAD, JobResult,
                                   JobSpec, pack_attempts, pack_results, pack_specs, pack_starts, unpack_specs)
from corral.console.master.validate import check
from corral.console.master.records import RESULT_STATES
from corral.console.master.reports import Start, check_attempts, check_results, check_starts

EVERY_SHAPE = [
    JobResult(1, 1, "done", None, pickle.dumps(42), started=100.5, ended=101.25),  # a callable's value
    JobResult(2, 3, "done", 0, None, b"out\n", b"", started=1.0, ended=2.0, stdout_total=4),  # a shell job
    JobResult(3, 1, "failed", -9, None, b"", b"\xff\x00err", "killed", "Traceback...", 5.0, 6.0,
              "left 2 processes", 0, 3000),
    JobResult(4, 2, "timeout", 124, None, b"x" * OUTPUT_TAIL_BYTES, b"", "timed out", started=1.0, ended=9.0,
              stdout_total=10**12),
    JobResult(5, 1, "cancelled", None, None, error="cancelled"),
    JobResult(6, 1, RELEASED, None, None, error="handed back: the agent is draining"),
    JobResult(2**63 - 1, 2**40, "failed", -(2**63), b"", note="é ✓"),  # the limits of an int64, an empty value
]


def test_the_master_reads_back_every_result_as_the_agent_had_it() -> None:
    assert check_results(pack_results(EVERY_SHAPE)) == EVERY_SHAPE
    assert check_results(pack_results([])) == []
    # Protocol 3's list of tuples still reads the same.
    assert check_results([tuple(r) for r in EVERY_SHAPE]) == EVERY_SHAPE


def test_the_head_states_are_the_states_an_agent_may_report() -> None:
    assert set(RESULT_STATE_CODES) == RESULT_STATES and len(RESULT_STATE_CODES) == len(RESULT_STATES)


def test_trailing_empty_fields_do_not_travel() -> None:
    heads, fields = pack_results([JobResult(1, 1, "done", None, b"v"), JobResult(2, 1, "done", 0, None)])
    assert fields == [b"v"]
    assert [head[-1] for head in RESULT_HEAD.iter_unpack(heads)] == [1, 0]


def head(job_id: int = 7, state: int = 0, has_code: int = 0, count: int = 0, out_total: int = 0) -> bytes:
    return RESULT_HEAD.pack(job_id, 1, 0, 1.0, 2.0, out_total, 0, state, has_code, count)


@pytest.mark.parametrize("packed, words", [
    ((b"",), "packed results must be (heads as bytes, fields as a list)"),
    (("heads", []), "packed results must be"),
    ((b"", ()), "packed results must be"),
    ((head()[:-1], []), "is not a whole number of results"),
    ((head(state=len(RESULT_STATE_CODES)), []), "bad result head for job 7"),
    ((head(has_code=2), []), "bad result head"),
    ((head(count=7), [None] * 7), "bad result head"),
    ((head(out_total=-1), []), "bad result head"),
    ((head(count=2), [None]), "counts fields the report does not hold"),
    ((head(count=1), [None, b"extra"]), "1 fields no result head counts"),
    ((head(count=1), ["a str, not bytes"]), "bad result fields for job 7"),
    ((head(count=2), [None, "out as str"]), "bad result fields"),
    ((head(count=3), [None, b"", b"e" * (OUTPUT_TAIL_BYTES + 1)]), "bad result fields"),
    ((head(count=4), [None, b"", b"", b"error as bytes"]), "bad result fields"),
    ((head(count=5), [None, b"", b"", "", "\udc80"]), "bad result fields"),  # SQLite cannot store it
    ((head(count=6), [None, b"", b"", "", "", 5]), "bad result fields"),
])
def test_a_malformed_packing_is_refused_whole_in_one_line(packed: tuple, words: str) -> None:
    good = pack_results(EVERY_SHAPE[:2])
    whole = (good[0] + packed[0], good[1] + packed[1]) if len(packed) == 2 and type(packed[0]) is bytes \
        and type(packed[1]) is list else packed
    with pytest.raises(CorralError, match="^malformed report: ") as caught:
        check_results(whole)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_attempts_and_starts_packed_read_back_and_a_torn_one_is_refused() -> None:
    pairs = [(1, 1), (2, 5), (2**63 - 1, 2**63 - 1)]
    assert check_attempts(pack_attempts(pairs)) == set(pairs)
    assert check_attempts(pack_attempts([])) == set()
    with pytest.raises(CorralError, match=r"^malformed register\(\): 15 bytes of attempts"):
        check_attempts(pack_attempts(pairs)[:15], "register()")
    starts = [(1, 1, 100.5), (9, 2, 1_700_000_000.25)]
    assert check_starts(pack_starts(starts)) == [Start(*s) for s in starts]
    with pytest.raises(CorralError, match="^malformed report: began must be whole"):
        check_starts(pack_starts(starts)[:-1])
    with pytest.raises(CorralError, match="^malformed report: bad start"):
        check_starts(pack_starts([(1, 1, 0.0)]))  # a start time no clock gives
    with pytest.raises(CorralError, match="^malformed report: bad start"):
        check_starts(struct.pack("<qqd", 1, 1, float("nan")))


def test_the_bounded_decoder_walks_about_one_opcode_per_result() -> None:
    """What the packing is for: the master's scan costs per opcode (bench/pickle_boundary.py)."""
    results = [JobResult(1000 + i, 1, "done", None, pickle.dumps(i), started=1.0, ended=2.0) for i in range(1000)]
    message = ("7f3a", "report", ("session", pack_results(results), pack_attempts([(5000, 1)] * 8), 100), {})
    opcodes = sum(1 for _ in pickletools.genops(bytes(ForkingPickler.dumps(message))))
    plain = ("7f3a", "report", ("session", [tuple(r) for r in results], [(5000, 1)] * 8, 100), {})
    before = sum(1 for _ in pickletools.genops(bytes(ForkingPickler.dumps(plain))))
    assert opcodes < 2.2 * len(results) and before > 15 * len(results), (opcodes, before)


SPECS = [
    JobSpec(command="echo hi"),
    JobSpec(command="make -C /src test", name="part1", env={"CI": "1", "LANG": "C.UTF-8"}, cwd="/src", priority=-5,
            timeout=600.0, retries=3, tags=("linux", "x86")),
    JobSpec(func="mypkg.tasks:square", payload=pickle.dumps(((3,), {})), code="ab" * 32, timeout=0.5),
    JobSpec(func="m:f", payload=b"", name="é ✓", env={"K": ""}, priority=2**31 - 1),
]


def test_a_submission_packed_reads_back_as_the_specs_it_holds() -> None:
    packed = pack_specs([check(spec) for spec in SPECS])
    assert [check(spec) for spec in unpack_specs(packed, 10)] == [check(spec) for spec in SPECS]
    assert unpack_specs(pack_specs([]), 10) == []


def spec_head(flags: int = 0, pairs: int = 0, tags: int = 0) -> bytes:
    return SPEC_HEAD.pack(0, 0.0, 0, flags, pairs, tags)


@pytest.mark.parametrize("packed, words", [
    ([], "packed specs must be"),
    ((b"", ()), "packed specs must be"),
    ((spec_head()[:-1], ["true"]), "is not a whole number of specs"),
    ((spec_head(), []), "a bad head, or no fields for it"),
    ((spec_head(flags=64), ["true"]), "a bad head"),
    ((spec_head(flags=4), ["true"]), "counts fields the submission does not hold"),
    ((spec_head(pairs=1), ["true", "K"]), "counts fields"),
    ((spec_head(tags=2), ["true", "t"]), "counts fields"),
    ((spec_head(), ["true", "extra"]), "1 fields no spec head counts"),
    ((spec_head(pairs=2), ["true", "K", "1", "K", "2"]), "an env key given twice"),
    ((spec_head(pairs=1), ["true", ["a list"], "1"]), "an env key that is not text"),
    ((spec_head() * 11, ["true"] * 11), "11 jobs in one call; the limit is 10"),
])
def test_a_malformed_packed_submission_is_refused_in_one_line(packed: object, words: str) -> None:
    with pytest.raises(ValueError) as caught:
        unpack_specs(packed, 10)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_the_master_refuses_a_malformed_packing_and_checks_what_it_holds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from corral.console.master.scheduler import Scheduler
    from corral.console.master.store import Journal

    s = Scheduler(Journal(tmp_path / "j.db"))
    try:
        with pytest.raises(BadJobSpec, match=r"^submit\(\): 1 fields no spec head counts$"):
            s.submit((spec_head(), ["true", "extra"]))
        # Unpacked, a spec meets every rule a plain dict meets: here, a command that is not text.
        with pytest.raises(BadJobSpec, match="^job: "):
            s.submit((spec_head(), [b"bytes, not a command"]))
        with pytest.raises(BadJobSpec, match="^job 2 of 2: .*tag"):
            s.submit((spec_head() + spec_head(tags=1), ["true", "true", "a,b"]))
        assert s.submit(pack_specs([check(spec) for spec in SPECS])) == [1, 2, 3, 4]
    finally:
        s.journal.close()


def test_a_packed_submission_costs_the_decoder_a_few_opcodes_per_job() -> None:
    checked = [check(JobSpec(command=f"make -C /src/part{i} test", name=f"part{i}", env={"CI": "1"}, tags=("linux",),
                             timeout=600.0)) for i in range(1000)]
    packed = ("7f3a", "submit", (pack_specs(checked),), {})
    plain = ("7f3a", "submit", ([JobSpec(*c).to_wire() for c in checked],), {})
    opcodes = [sum(1 for _ in pickletools.genops(bytes(ForkingPickler.dumps(m)))) for m in (packed, plain)]
    assert opcodes[0] < 9 * len(checked) and opcodes[1] > 20 * len(checked), opcodes


def test_one_report_carries_at_most_its_limits_whoever_packs_it() -> None:
    from corral.agent.protocol import MAX_HELD, MAX_REPORT_RESULTS

    many = [JobResult(i, 1, "done") for i in range(MAX_REPORT_RESULTS + 1)]
    for form in (pack_results(many), [tuple(r) for r in many]):
        with pytest.raises(CorralError, match="^malformed report: 100,001 results in one report; the limit is 100,000$"):
            check_results(form)
    with pytest.raises(CorralError, match="more than 1,000,000 attempts held"):
        check_attempts(bytes(16 * (MAX_HELD + 1)))
    with pytest.raises(CorralError, match="more than 1,000,000 attempts held"):
        check_attempts([(1, 1)] * (MAX_HELD + 1))
