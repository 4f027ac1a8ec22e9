"""State directory trust, as ssh's StrictModes: what another local user (really `nobody`) planted is refused
by the master, the agent and the CLI, each in one line; what corral makes has its final mode from birth."""

from __future__ import annotations

import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster import REPO, wait_until
from tests.faultkit import running_cluster

KEY = "ab" * 32 + "\n"


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every local user may create entries in, sticky like /tmp (so it is not itself a reason
    to refuse). Needs root, to act as `nobody`; CI runs as root, so CORRAL_NO_SKIPS makes a skip a failure."""
    if os.geteuid() != 0:
        pytest.skip("planting files as another user needs root")
    base = Path(tempfile.mkdtemp(prefix="corral-shared-", dir="/tmp"))
    os.chmod(base, 0o1777)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_nobody(script: str) -> None:
    """Run a shell script as the user `nobody`: what another local user could do."""
    subprocess.run(["sh", "-c", script], user="nobody", group="nogroup", check=True, timeout=30, cwd="/")


def corral(home: Path, *args: str, module: str = "corral") -> subprocess.CompletedProcess:
    env = dict(os.environ, CORRAL_HOME=str(home), PYTHONPATH=str(REPO))
    env.pop("CORRAL_AUTHKEY_FILE", None)
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def refused(result: subprocess.CompletedProcess, *needles: str) -> str:
    """A refusal: a non-zero exit and one line on stderr holding every needle, no traceback."""
    assert result.returncode != 0, result
    err = result.stderr.strip()
    assert err and "\n" not in err and "Traceback" not in err, result.stderr
    for needle in needles:
        assert needle in err, err
    return err


def test_a_state_directory_planted_by_nobody_is_refused_by_master_agent_and_cli(shared: Path) -> None:
    home = shared / "home"
    as_nobody(f"mkdir -m 755 {home} && printf '{KEY.strip()}\\n' > {home}/authkey && chmod 644 {home}/authkey"
              f" && printf '{{\"host\": \"127.0.0.1\", \"port\": 9, \"pid\": 1}}' > {home}/master.json")
    master = corral(home, "master")
    refused(master, f"refusing the state directory {home}", "nobody (uid 65534)")
    # Refused before anything was touched: no chmod of nobody's files by root, no record rewritten.
    assert stat.S_IMODE(home.stat().st_mode) == 0o755 and home.stat().st_uid == 65534
    assert stat.S_IMODE((home / "authkey").stat().st_mode) == 0o644
    assert not (home / "corral.db").exists()
    assert (home / "master.json").stat().st_uid == 65534
    for args in (["status"], ["jobs"], ["show", "1", "--json"], ["hosts"], ["--no-local-agent"]):  # last: the console
        refused(corral(home, *args), f"refusing the state directory {home}", "nobody")
    refused(corral(home, "agent"), "corral agent: refusing the state directory", "nobody")
    refused(corral(home, "--slots", "1", module="corral.agent"), "refusing the state directory", "nobody")
    # Told where the master is, the agent still reads the key from there: refused on the way to it.
    refused(corral(home, "--connect", "127.0.0.1:9", module="corral.agent"),
            f"refusing the authkey {home}/authkey", "through a directory of nobody")


def test_a_key_or_record_planted_by_nobody_in_our_directory_is_refused(shared: Path, tmp_path: Path) -> None:
    home = shared / "home"  # ours, in a place nobody can reach
    home.mkdir(mode=0o700)
    os.chmod(home, 0o777)  # left open for a moment (a careless umask, a chmod undone later)...
    as_nobody(f"printf '{KEY.strip()}\\n' > {home}/authkey")
    os.chmod(home, 0o700)  # ...and closed again: the key in it is still nobody's
    refused(corral(home, "master"), f"refusing the authkey {home}/authkey", "belongs to nobody (uid 65534)",
            "not to you (root (uid 0))")
    assert (home / "authkey").stat().st_uid == 65534 and not (home / "master.json").exists()
    (home / "master.json").write_text('{"host": "127.0.0.1", "port": 9, "pid": 1}')
    refused(corral(home, "status"), f"refusing the authkey {home}/authkey", "nobody")
    refused(corral(home, "agent"), f"refusing the authkey {home}/authkey", "nobody")
    # The agent's --authkey-file is held to the same rule, wherever it is.
    as_nobody(f"printf '{KEY.strip()}\\n' > {shared}/key")
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    refused(corral(ours, "--connect", "127.0.0.1:9", "--authkey-file", str(shared / "key"), module="corral.agent"),
            f"refusing the authkey {shared}/key", "nobody")
    # A master record nobody wrote (it names a pid a console would stop) is refused as well.
    os.chmod(home, 0o777)
    (home / "authkey").unlink()
    (home / "authkey").write_text(KEY)
    os.chmod(home / "authkey", 0o600)
    (home / "master.json").unlink()
    as_nobody(f"printf '{{\"host\": \"127.0.0.1\", \"port\": 9, \"pid\": 1}}' > {home}/master.json")
    os.chmod(home, 0o700)
    refused(corral(home, "status"), f"refusing the master record {home}/master.json", "nobody")


def test_a_symlink_of_nobody_on_the_way_is_refused_ours_is_followed(shared: Path, tmp_path: Path) -> None:
    with running_cluster(tmp_path / "home") as cluster:
        as_nobody(f"ln -s {cluster.home} {shared}/theirs")
        (shared / "mine").symlink_to(cluster.home)
        assert corral(shared / "mine", "status").returncode == 0  # our own link: followed, checked, used
        for args, module in ((["status"], "corral"), (["agent"], "corral"), (["master"], "corral"),
                             (["--slots", "1"], "corral.agent")):
            refused(corral(shared / "theirs", *args, module=module), "through a symlink of nobody", str(shared / "theirs"))
        assert cluster.corral("status").returncode == 0  # and the cluster itself is untouched


def test_a_directory_or_record_others_can_write_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(home, 0o770)
    refused(corral(home, "master"), f"refusing the state directory {home}", "writable by others (mode 770)")
    assert stat.S_IMODE(home.stat().st_mode) == 0o770
    os.chmod(home, 0o700)
    (home / "authkey").write_text(KEY)
    os.chmod(home / "authkey", 0o620)
    refused(corral(home, "master"), "refusing the authkey", "writable by others (mode 620)")
    os.chmod(home / "authkey", 0o600)
    (home / "master.json").write_text('{"host": "127.0.0.1", "port": 9}')
    os.chmod(home / "master.json", 0o666)
    refused(corral(home, "status"), "refusing the master record", "writable by others (mode 666)")
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    os.chmod(open_parent, 0o777)  # not sticky: anyone may rename our directory away and put theirs there
    (open_parent / "home").mkdir(mode=0o700)
    refused(corral(open_parent / "home", "master"), f"the directory {open_parent} on its way is writable by others")


def test_state_files_have_their_final_mode_from_birth_whatever_the_umask(tmp_path: Path) -> None:
    home = tmp_path / "fresh"
    env = dict(os.environ, CORRAL_HOME=str(home), PYTHONPATH=str(REPO))
    log = open(tmp_path / "master.log", "wb")
    master = subprocess.Popen(["sh", "-c", f"umask 000; exec {sys.executable} -m corral master"], env=env, cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: (home / "master.json").exists() or master.poll() is not None, timeout=60, what="master.json")
        assert master.poll() is None, (tmp_path / "master.log").read_text()
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        for name in ("authkey", "master.json"):
            assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name
        assert corral(home, "status").returncode == 0
    finally:
        master.terminate()
        master.wait(timeout=30)


class RunsCode:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (self.command,))


def test_a_planted_spool_is_set_aside_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with running_cluster(tmp_path / "home") as cluster:
        spool = cluster.home / "spool"
        spool.mkdir(mode=0o700, exist_ok=True)
        (spool / "a.pickle").write_bytes(pickle.dumps([RunsCode(f"touch {marker}")]))
        cluster.start_agent("a", slots=1)
        wait_until(lambda: list(spool.glob("a.pickle.unreadable-*")), timeout=30, what="the spool set aside")
        assert not marker.exists()
        assert "a spool names no classes" in cluster.agent_log("a")
        with cluster.client() as c:
            job = c.submit_command("echo fine")
            assert c.wait([job], timeout=60) == {job: "done"}
