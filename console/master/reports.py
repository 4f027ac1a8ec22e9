"""What an agent's report must be: checked whole before it changes anything, then its results named (JobResult)."""

from __future__ import annotations

from typing import Any, NamedTuple

from corral.agent.errors import CorralError
from corral.agent.protocol import (ATTEMPT_PAIR, MAX_HELD, MAX_REPORT_RESULTS, OUTPUT_TAIL_BYTES, RESULT_HEAD,
                                   RESULT_STATE_CODES, RESULT_VARIABLE_DEFAULTS, START_TRIPLE, JobResult)

from .records import RESULT_STATES
from .validate import shown

_OPT_INT, _OPT_BYTES, _NUMBER = (int, type(None)), (bytes, type(None)), (int, float)
_INT64 = range(-(2**63), 2**63)  # what an SQLite INTEGER holds
_new_tuple = tuple.__new__
RESULT_FIELDS = len(JobResult._fields)
MAX_STARTS = 100_000  # starts one report may name: more jobs than any agent holds


def _storable(text: str) -> bool:
    """Whether SQLite can store this text (UTF-8): lone surrogates cannot be encoded."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _sketch(row: Any) -> str:
    """A bounded picture of a result row someone sent (never the str() of all of it)."""
    if type(row) in (tuple, list):
        return "(" + ", ".join(shown(field) for field in row[:14]) + (", …)" if len(row) > 14 else ")")
    return shown(row)


def check_results(results: Any) -> list[JobResult]:
    """Refuse a malformed report whole (an agent holding the authkey may still be buggy), and one the
    journal could not store: nothing of it may change the master's state unless all of it is written.
    `results` is packed (protocol 4: agent.protocol.pack_results) or a list of JobResult tuples (3)."""
    if type(results) is tuple:
        return _check_packed_results(results)
    if type(results) is not list:
        raise CorralError("malformed report: results must be packed (heads, fields) or a list")
    if len(results) > MAX_REPORT_RESULTS:
        raise CorralError(f"malformed report: {len(results):,} results in one report; the limit is {MAX_REPORT_RESULTS:,}")
    lowest, highest = _INT64.start, _INT64.stop
    named: list[JobResult] = []
    for row in results:
        if type(row) not in (tuple, list) or len(row) != RESULT_FIELDS:
            raise CorralError(f"malformed report: bad result row {_sketch(row)}")
        # The one place a result's wire tuple is taken apart (JobResult's fields, in order): each
        # field checked as a local, the cheapest read there is; everything after reads it by name.
        job_id, attempt, state, exit_code, value, out, err, error, tb, started, ended, note, out_total, err_total = row
        if (type(job_id) is not int or type(attempt) is not int or type(state) is not str
                or state not in RESULT_STATES or type(exit_code) not in _OPT_INT
                or type(started) not in _NUMBER or type(ended) not in _NUMBER
                or type(out_total) is not int or type(err_total) is not int
                or not 0 <= out_total < highest or not 0 <= err_total < highest
                or not lowest <= job_id < highest or not lowest <= attempt < highest
                or (exit_code is not None and not lowest <= exit_code < highest)
                or not _variable_fields_ok(value, out, err, error, tb, note)):
            raise CorralError(f"malformed report: bad result row {_sketch(row)}")
        named.append(_new_tuple(JobResult, row))  # JobResult._make(row), without its length check
    return named


def _variable_fields_ok(value: Any, out: Any, err: Any, error: Any, tb: Any, note: Any) -> bool:
    """The one rule for a result's fields that vary in size, plain or packed: a value is bytes or None,
    output bytes within the tail, error, traceback and note text the journal can store."""
    return not (type(value) not in _OPT_BYTES or type(out) is not bytes or type(err) is not bytes
                or len(out) > OUTPUT_TAIL_BYTES or len(err) > OUTPUT_TAIL_BYTES
                or type(error) is not str or type(tb) is not str or type(note) is not str
                or not ((error.isascii() and tb.isascii() and note.isascii())
                        or (_storable(error) and _storable(tb) and _storable(note))))


def _check_packed_results(packed: tuple[Any, ...]) -> list[JobResult]:
    """Protocol 4's results: RESULT_HEAD per result (read by struct, in C: its numbers need no test of
    type or range), and the variable fields each head counts, in order. Written for the hot path (every
    result of every job passes here): plain type() tests, no generators."""
    if len(packed) != 2 or type(packed[0]) is not bytes or type(packed[1]) is not list:
        raise CorralError("malformed report: packed results must be (heads as bytes, fields as a list)")
    heads, fields = packed
    if len(heads) % RESULT_HEAD.size:
        raise CorralError(f"malformed report: {len(heads)} bytes of heads is not a whole number of results")
    if len(heads) // RESULT_HEAD.size > MAX_REPORT_RESULTS:
        raise CorralError(f"malformed report: {len(heads) // RESULT_HEAD.size:,} results in one report;"
                          f" the limit is {MAX_REPORT_RESULTS:,}")
    states, defaults, most = RESULT_STATE_CODES, RESULT_VARIABLE_DEFAULTS, len(RESULT_VARIABLE_DEFAULTS)
    named: list[JobResult] = []
    at = 0
    for (job_id, attempt, exit_code, started, ended, out_total, err_total, state, has_code,
         count) in RESULT_HEAD.iter_unpack(heads):
        if state >= len(states) or has_code > 1 or count > most or out_total < 0 or err_total < 0:
            raise CorralError(f"malformed report: bad result head for job {job_id}")
        mine = fields[at:at + count]
        if len(mine) != count:
            raise CorralError(f"malformed report: job {job_id}'s head counts fields the report does not hold")
        at += count
        value, out, err, error, tb, note = mine + list(defaults[count:]) if count < most else mine
        if not _variable_fields_ok(value, out, err, error, tb, note):
            raise CorralError(f"malformed report: bad result fields for job {job_id} {_sketch(mine)}")
        named.append(_new_tuple(JobResult, (job_id, attempt, states[state], exit_code if has_code else None, value,
                                            out, err, error, tb, started, ended, note, out_total, err_total)))
    if at != len(fields):
        raise CorralError(f"malformed report: {len(fields) - at} fields no result head counts")
    return named


def check_attempts(pairs: Any, what: str = "report") -> set[tuple[int, int]]:
    """The (job id, attempt) pairs an agent says it holds (register() and report()), checked whole: a
    list of two-int lists or tuples; anything else refuses the call, one line."""
    if type(pairs) is bytes:  # packed (protocol 4: agent.protocol.pack_attempts): int64 pairs by construction
        if len(pairs) % ATTEMPT_PAIR.size:
            raise CorralError(f"malformed {what}: {len(pairs)} bytes of attempts is not a whole number of pairs")
        if len(pairs) // ATTEMPT_PAIR.size > MAX_HELD:
            raise CorralError(f"malformed {what}: more than {MAX_HELD:,} attempts held")
        return set(ATTEMPT_PAIR.iter_unpack(pairs))
    if type(pairs) not in (list, tuple):
        raise CorralError(f"malformed {what}: the attempts held must be a list of (job id, attempt) pairs")
    if len(pairs) > MAX_HELD:
        raise CorralError(f"malformed {what}: more than {MAX_HELD:,} attempts held")
    lowest, highest = _INT64.start, _INT64.stop
    held: set[tuple[int, int]] = set()
    for pair in pairs:
        if (type(pair) not in (tuple, list) or len(pair) != 2 or type(pair[0]) is not int or type(pair[1]) is not int
                or not lowest <= pair[0] < highest or not lowest <= pair[1] < highest):
            raise CorralError(f"malformed {what}: {_sketch(pair)} is not a (job id, attempt) pair")
        held.add((pair[0], pair[1]))
    return held


def check_count(count: Any, what: str = "report") -> int | None:
    """How many tasks an agent says it has received this session: None (not said) or an int >= 0."""
    if count is None:
        return None
    if type(count) is not int or not 0 <= count < _INT64.stop:
        raise CorralError(f"malformed {what}: the count of tasks received must be a whole number, not {shown(count)}")
    return count
class Start(NamedTuple):
    """A held job the agent has started: its attempt, and when (the agent's clock, as its results' times)."""

    job_id: int
    attempt: int
    when: float


def check_starts(began: Any) -> list[Start]:
    """The starts a report names ((job id, attempt, when), see agent.pool.Holding), checked whole: a
    malformed list refuses the report, as a malformed result does."""
    if type(began) is bytes:  # packed (protocol 4: agent.protocol.pack_starts)
        if len(began) % START_TRIPLE.size or len(began) > MAX_STARTS * START_TRIPLE.size:
            raise CorralError("malformed report: began must be whole (job id, attempt, when) triples")
        began = list(START_TRIPLE.iter_unpack(began))
    if type(began) is not list or len(began) > MAX_STARTS:
        raise CorralError("malformed report: began must be a list of (job id, attempt, when)")
    lowest, highest = _INT64.start, _INT64.stop
    starts: list[Start] = []
    for row in began:
        if (type(row) not in (tuple, list) or len(row) != 3 or type(row[0]) is not int or type(row[1]) is not int
                or type(row[2]) not in _NUMBER or not lowest <= row[0] < highest or not lowest <= row[1] < highest
                or not 0 < row[2] < 1e12):
            raise CorralError(f"malformed report: bad start {_sketch(row)}")
        starts.append(Start(row[0], row[1], float(row[2])))
    return starts
