"""Bad input, everywhere, one clear line: each case of issue 10's list refused at the edge where it enters
(CLI, Client, master), with the README's exit code, while the master and its agents go on serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import pytest

from corral.agent.errors import BadCall, BadJobSpec, CorralError
from corral.agent.protocol import JobSpec
from tests.cluster import REPO, Cluster

EXIT_ERROR, EXIT_USAGE = 1, 2  # README, "The command line": an operation that failed; a malformed command line


def a_function(x: int) -> int:
    return x


def one_line(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Exactly one line on stderr (no traceback), the exit code the README gives, the needles in the line."""
    err = result.stderr.decode(errors="replace") if isinstance(result.stderr, bytes) else result.stderr
    assert result.returncode == code, (result.returncode, err)
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err.strip()


def corral(cluster: Cluster, *args: str | bytes, timeout: float = 60) -> subprocess.CompletedProcess:
    """The real CLI, with arguments that may be bytes (a command line that is not UTF-8)."""
    return subprocess.run([sys.executable, "-m", "corral", *args], env=cluster.env, cwd=REPO,
                          capture_output=True, timeout=timeout)


def still_serves(cluster: Cluster, queued_before: int = 0) -> None:
    """Nothing of the refused input was queued, and the master and the agent run a job as before."""
    status = json.loads(cluster.corral("status", "--json").stdout)
    assert status["counts"]["queued"] == queued_before
    assert [a["state"] for a in status["agents"]] == ["up"]
    ran = cluster.corral("submit", "--wait", "--", "echo still serving")
    assert (ran.returncode, ran.stdout) == (0, "still serving\n"), ran


# Each case of the list, as the operator types it: (arguments, needles of the one line).
CLI_CASES: list[tuple[Sequence[str | bytes], tuple[str, ...]]] = [
    (["submit", "--priority", "2147483648", "--", "true"],
     ("--priority", "from -2,147,483,648 to 2,147,483,647", "'2147483648'")),
    (["submit", "--priority", "-2147483649", "--", "true"], ("--priority", "from -2,147,483,648")),
    (["submit", "--priority", "9" * 5000, "--", "true"], ("--priority", "from -2,147,483,648")),
    (["submit", "--timeout", "2592001", "--", "true"], ("--timeout", "at most 2,592,000 seconds (30 days)")),
    (["submit", "--timeout", "1e400", "--", "true"], ("--timeout", "positive number of seconds")),
    ([b"submit", b"--", b"echo \xff"], ("command", "is not valid UTF-8 text")),
    ([b"submit", b"--", b"echo", b"caf\xe9"], ("command", "is not valid UTF-8 text")),
    ([b"submit", b"--name", b"n\xff", b"--", b"true"], ("--name", "is not valid UTF-8 text")),
    ([b"submit", b"--env", b"A=\xff", b"--", b"true"], ("--env", "is not valid UTF-8 text")),
    ([b"submit", b"--cwd", b"/tmp/\xff", b"--", b"true"], ("--cwd", "UTF-8 text")),
    (["submit", "--tag", "gpu,fast", "--", "true"], ("--tag", "single words without commas or whitespace")),
    (["submit", "--tag", "gpu fast", "--", "true"], ("--tag", "single words without commas or whitespace")),
    (["submit", "--tag", "gpu\tfast", "--", "true"], ("--tag", "single words without commas or whitespace")),
    (["submit", "--count", "100001", "--", "true"], ("--count", "from 1 to 100,000")),
    (["submit", "--count", "10000000000000000000000", "--", "true"], ("--count", "from 1 to 100,000")),
    (["call", "--count", "100001", "tests.jobs:inc", "1"], ("--count", "from 1 to 100,000")),
    (["call", "not a function", "1"], ("module:function", "is not a module:function name")),
    ([b"call", b"tests.jobs:inc\xff", b"1"], ("module:function", "is not a module:function name")),
]


def test_each_bad_value_on_the_command_line_is_one_line_exit_2(cluster: Cluster) -> None:
    cluster.start_agent("a", slots=1)
    for args, needles in CLI_CASES:
        line = one_line(corral(cluster, *args), EXIT_USAGE, *needles)
        assert line.startswith(f"corral {os.fsdecode(args[0])}: argument "), line
        assert len(line) < 300, line
    still_serves(cluster)


def test_the_client_and_the_master_refuse_the_same_rules_with_one_line(cluster: Cluster) -> None:
    """The Python edge: the Client checks before it sends; the master checks what any key holder sends
    (c._call goes past the Client's own check). Each refusal is a CorralError of one line."""
    cluster.start_agent("a", slots=1)
    with cluster.client() as c:
        def refused(kind: type[CorralError], call: Any, *needles: str) -> None:
            with pytest.raises(kind) as caught:
                call()
            text = str(caught.value)
            assert "\n" not in text and len(text) < 300, text
            for needle in needles:
                assert needle in text, text

        fn = "func must be a 'module:function' string"
        refused(BadJobSpec, lambda: c.submit([JobSpec(func=a_function)]), fn)  # type: ignore[arg-type]
        refused(BadJobSpec, lambda: c.submit_batch({"func": a_function}, [b"x"]), fn)
        refused(BadJobSpec, lambda: c._call("submit", [{"func": 3}]), fn)  # the master's own check
        refused(BadJobSpec, lambda: c._call("submit", [{"command": "true", "priority": 2**31}]),
                "priority must be a whole number from -2,147,483,648 to 2,147,483,647")
        refused(BadJobSpec, lambda: c._call("submit", [{"command": "true", "timeout": 10**9}]),
                "timeout must be at most 2,592,000 seconds")
        refused(BadJobSpec, lambda: c._call("submit", [{"command": "echo \udcff"}]), "not valid UTF-8")
        refused(BadJobSpec, lambda: c._call("submit", [{"command": "true", "tags": ["a,b"]}]), "single words")
        refused(BadJobSpec, lambda: c._call("submit", [{"command": "true"}] * 100_001), "the limit is 100000")
        # The other arguments of the master's calls: BadCall, not a builtin error from deep inside.
        refused(BadCall, lambda: c.wait_outcomes([1], "soon"), "timeout must be a number of seconds")  # type: ignore[arg-type]
        refused(BadCall, lambda: c.wait([1], "soon"), "timeout must be a number of seconds")  # type: ignore[arg-type]
        refused(BadCall, lambda: c._call("wait", [1], float("nan")), "timeout must be a number of seconds")
        refused(BadCall, lambda: c._call("wait_outcomes", [1], "soon"), "timeout must be a number of seconds")
        refused(BadCall, lambda: c.jobs(limit=10**100), "limit must be a whole number from 0 to 1,000,000,000")
        refused(BadCall, lambda: c._call("submit_map", {"func": "m:f"}, [b"x"], "soon"), "wait must be a number")
        refused(CorralError, lambda: c.snapshot(0, {"finished": {"offset": 10**30, "limit": 5}}), "bad finished view")
        # Anything else that reaches Client._invoke is one line too: an argument that does not pickle here,
        # a method the master does not have.
        refused(CorralError, lambda: c.jobs(states=[lambda: 1]), "list_jobs() failed:")  # type: ignore[list-item]
        refused(CorralError, lambda: c._call("no_such_call"), "no_such_call() failed:")
        assert c.status()["counts"]["queued"] == 0  # the same Client still works
    still_serves(cluster)


def test_a_python_value_over_a_limit_is_refused_before_it_is_sent(cluster: Cluster) -> None:
    """The Client checks what its caller gives it (Client.map, submit_call) by the master's rules."""
    with cluster.client() as c:
        with pytest.raises(BadJobSpec, match="map\\(\\): priority must be a whole number from"):
            c.map("tests.jobs:inc", [1], priority=2**40)
        with pytest.raises(BadJobSpec, match="timeout must be at most 2,592,000 seconds"):
            c.submit_call("tests.jobs:inc", (1,), timeout=10**8)
        with pytest.raises(BadJobSpec, match="tags must be single words"):
            c.submit_command("true", tags=("a b",))
        assert c.status()["counts"]["queued"] == 0


def test_an_agent_with_another_authkey_is_one_line_exit_1(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_agent("a", slots=1)
    wrong = tmp_path / "wrong-key"
    wrong.write_text("0" * 64)
    wrong.chmod(0o600)
    for how in (["-m", "corral", "agent"], ["-m", "corral.agent"]):
        result = subprocess.run([sys.executable, *how, "--name", "intruder", "--authkey-file", str(wrong)],
                                env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=60)
        host, port = cluster.address()
        one_line(result, EXIT_ERROR, f"the master at {host}:{port} holds another authkey than {wrong}", "--authkey-file")
        assert "0" * 64 not in result.stderr
    still_serves(cluster)


def test_output_into_a_reader_that_went_away_is_quiet_for_every_printing_command(cluster: Cluster) -> None:
    """`corral ... | head -1` for the commands that print a lot: no BrokenPipeError, the pipe status 141."""
    cluster.start_agent("a", slots=1)
    # Each attempt keeps 64 KiB of stdout and of stderr: a pipe holds 64 KiB, so one job's output may just
    # fit; `show` prints both tails, `wait` three jobs' stdout, several times what the pipe holds.
    big = cluster.corral("submit", "--count", "3", "--wait", "--", "seq 20000; seq 20000 >&2")
    assert big.returncode == 0
    ids = [str(job["id"]) for job in json.loads(cluster.corral("jobs", "--json", "--limit", "3").stdout)]
    for args in (["show", ids[0]], ["show", ids[0], "--json"], ["wait", *ids],
                 ["submit", "--count", "50000", "--tag", "nobody", "--", "true"], ["jobs", "--limit", "50000"]):
        piped = '"$@" | head -1 >/dev/null; echo "${PIPESTATUS[0]}"'
        done = subprocess.run(["bash", "-c", piped, "-", sys.executable, "-m", "corral", *args], env=cluster.env,
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        # `wait` writes the jobs' own stderr there, and wait and show say when output shown is a tail of
        # what a job wrote (h9d's notes); nothing else may be there.
        said = "\n".join(line for line in done.stderr.splitlines() if " shown is the last " not in line)
        quiet = not said.strip("\n0123456789") if args[0] == "wait" else said == ""
        assert quiet, (args, done.stderr[-2000:])
        assert done.stdout.split() == ["141"], (args, done.stdout)
