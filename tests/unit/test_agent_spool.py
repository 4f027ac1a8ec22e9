"""The agent's spool and outbox: results kept until the master has them, on real files."""

from __future__ import annotations

import logging
import pickle
import threading
import time
from pathlib import Path

import pytest

from corral.agent.protocol import JobResult
from corral.agent.spool import Outbox, Spool


def result(job_id: int, state: str = "done") -> JobResult:
    return JobResult(job_id, 1, state, 0, pickle.dumps(job_id), "out", "", "", "", 1.0, 2.0)


def test_saved_results_load_back_equal(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool" / "a.pickle")  # its directory is made on the first save
    spool.save([result(1), result(2, "failed")])
    assert spool.load() == [result(1), result(2, "failed")]
    assert all(type(r) is JobResult for r in spool.load())


def test_the_file_holds_plain_tuples_and_no_temporary_stays(tmp_path: Path) -> None:
    path = tmp_path / "a.pickle"
    Spool(path).save([result(1)])
    rows = pickle.loads(path.read_bytes())
    assert rows == [tuple(result(1))] and type(rows[0]) is tuple
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pickle"]


def test_a_save_replaces_the_whole_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "a.pickle")
    spool.save([result(1), result(2)])
    spool.save([result(3)])
    assert spool.load() == [result(3)]


def test_no_file_is_no_results(tmp_path: Path) -> None:
    assert Spool(tmp_path / "a.pickle").load() == []


@pytest.mark.parametrize("content", [
    b"\x80\x04\x95 torn in the middle",  # a pickle cut short
    pickle.dumps({"not": "a list"}),
    pickle.dumps([("too", "short")]),
    pickle.dumps([("one", 1, "done", None, None, "", "", "", "", 0.0, 0.0)]),  # a job id that is no int
    b"",
])
def test_an_unreadable_file_is_set_aside_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                         content: bytes) -> None:
    path = tmp_path / "a.pickle"
    path.write_bytes(content)
    spool = Spool(path)
    with caplog.at_level(logging.WARNING, logger="corral.agent.spool"):
        assert spool.load() == []
    assert not path.exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("a.pickle.unreadable-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content  # kept, for whoever wants to look
    assert "unreadable spool" in caplog.text and aside[0].name in caplog.text
    spool.save([result(1)])  # and the spool goes on working
    assert spool.load() == [result(1)]


def test_a_spool_that_cannot_be_written_is_a_warning_not_a_failure(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "blocker").write_text("a file where the spool's directory should be")
    spool = Spool(tmp_path / "blocker" / "a.pickle")
    with caplog.at_level(logging.WARNING, logger="corral.agent.spool"):
        spool.save([result(1)])
        assert spool.load() == []
    assert "cannot write the spool" in caplog.text


def test_drop_removes_the_file_and_minds_no_missing_one(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "a.pickle")
    spool.save([result(1)])
    spool.drop()
    spool.drop()
    assert list(tmp_path.iterdir()) == []


def test_the_outbox_hands_out_in_order_and_forgets_what_is_acknowledged(tmp_path: Path) -> None:
    outbox = Outbox()
    outbox.put([result(1), result(2)])
    outbox.put([])
    batch = outbox.wait(0)
    assert batch == [result(1), result(2)] and len(outbox) == 2
    outbox.put([result(3)])  # arrives while the batch is on its way
    outbox.acknowledge(len(batch))
    assert outbox.wait(0) == [result(3)] and outbox.keys() == {(3, 1)}


def test_the_outbox_keeps_its_spool_until_all_is_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "a.pickle"
    Spool(path).save([result(1)])
    outbox = Outbox()
    assert outbox.attach(Spool(path)) == 1  # what a previous run left is queued first
    outbox.put([result(2)])
    outbox.save()
    assert Spool(path).load() == [result(1), result(2)]
    outbox.acknowledge(1)
    assert path.exists()
    outbox.acknowledge(1)
    assert not path.exists()


def test_saving_an_empty_outbox_leaves_the_file_alone(tmp_path: Path) -> None:
    outbox = Outbox()
    outbox.attach(Spool(tmp_path / "a.pickle"))
    outbox.save()
    assert list(tmp_path.iterdir()) == []


def test_a_wait_ends_at_the_first_result_or_the_timeout() -> None:
    outbox = Outbox()
    t0 = time.monotonic()
    assert outbox.wait(0.05) == []
    assert time.monotonic() - t0 >= 0.04
    threading.Timer(0.05, outbox.put, ([result(7)],)).start()
    t0 = time.monotonic()
    assert outbox.wait(5.0) == [result(7)]
    assert time.monotonic() - t0 < 2.0
    outbox.acknowledge(1)
    threading.Timer(0.05, outbox.wake).start()
    t0 = time.monotonic()
    assert outbox.wait(5.0) == []
    assert time.monotonic() - t0 < 2.0
