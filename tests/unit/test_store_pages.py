"""The journal's Finished pages: read from either end of jobs_ended, the same rows in the same order."""

from __future__ import annotations

from pathlib import Path

from corral.console.master.store import Journal


def journal_with_finished(path: Path, count: int) -> Journal:
    journal = Journal(path)
    rows = [(i, f"job{i}", "true", None, None, "{}", None, 0, None, 0, "[]", 1.0, None) for i in range(1, count + 1)]
    journal.write([(Journal.INSERT_JOB, rows)])
    # Ends out of id order, and two at the same time, as jobs on several slots end.
    ended = {i: 100.0 + (i * 7) % count + (0.5 if i % 5 == 0 else 0.0) for i in range(1, count + 1)}
    ended[3] = ended[4]
    journal.write([(Journal.FINISH, [("done" if i % 3 else "failed", 0, "a", ended[i], 0, None, None, i)
                                     for i in range(1, count + 1)])])
    return journal


def test_pages_from_the_oldest_end_match_pages_from_the_newest(tmp_path: Path) -> None:
    journal = journal_with_finished(tmp_path / "c.db", 53)
    everything = journal.finished_page("", False, 100, 0)[1]
    assert len(everything) == 53
    for offset in range(0, 60):
        for limit in (1, 7, 20):
            _, rows = journal.finished_page("", False, limit, offset, known_total=53)
            assert rows == everything[offset : offset + limit], (offset, limit)


def test_filtered_pages_from_either_end(tmp_path: Path) -> None:
    journal = journal_with_finished(tmp_path / "c.db", 40)
    total, everything = journal.finished_page("failed", False, 100, 0)
    assert total == len(everything) == 13
    for offset in range(0, 15):
        assert journal.finished_page("failed", False, 4, offset)[1] == everything[offset : offset + 4]
