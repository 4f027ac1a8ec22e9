"""Deploy failures against real sshd hosts: each names the host and the step in one line, and the other hosts carry on."""

from __future__ import annotations

import getpass
import os
import subprocess
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.sshhosts import SshLab, free_port, keygen, processes_in

pytestmark = pytest.mark.sshd

REAL_PY36 = "/root/.pyenv/versions/3.6.15/bin/python3"


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def failing_deploy(cluster: Cluster, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    done = cluster.corral("deploy", *args, timeout=120)
    assert done.returncode == 1, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    errors = [line for line in done.stderr.splitlines() if line.startswith("corral deploy: ")]
    return done, errors


def test_unreachable_host_fails_at_connect_and_the_other_host_carries_on(ssh_cluster: Cluster, lab: SshLab) -> None:
    good = lab.add_host("h1", "127.0.0.2")
    assert ssh_cluster.corral(*lab.host_args(good)).returncode == 0
    port = free_port("127.0.0.4")  # nothing listens there
    added = ssh_cluster.corral("hosts", "add", "gone", "--hostname", "127.0.0.4", "--port", str(port),
                               "--identity", str(lab.key), "--remote-dir", str(lab.root / "gone"))
    assert added.returncode == 0, added.stderr
    done, errors = failing_deploy(ssh_cluster, "gone", "h1")
    assert errors == [f"corral deploy: gone: connect: connection refused by 127.0.0.4:{port}"
                      " — is sshd running there, on that port?"]
    assert done.stdout.splitlines()[-1] == "deployed 1 of 2 hosts (gone failed)"
    with ssh_cluster.client() as c:
        assert [a["name"] for a in c.agents() if a["state"] == "up"] == ["h1"]


def test_refused_key_fails_at_auth(ssh_cluster: Cluster, lab: SshLab) -> None:
    host = lab.add_host("h1", "127.0.0.2", authorize=False)
    assert ssh_cluster.corral(*lab.host_args(host)).returncode == 0
    _, errors = failing_deploy(ssh_cluster, "h1")
    assert len(errors) == 1
    assert errors[0].startswith(f"corral deploy: h1: auth: {getpass.getuser()}@127.0.0.2:{host.port} refused our key ({lab.key})")
    assert "add the public key to" in errors[0]


def test_no_python_at_the_configured_path(ssh_cluster: Cluster, lab: SshLab) -> None:
    host = lab.add_host("h1", "127.0.0.2")
    assert ssh_cluster.corral(*lab.host_args(host, "--python", "/nonexistent/bin/python3")).returncode == 0
    _, errors = failing_deploy(ssh_cluster, "h1")
    assert errors == ["corral deploy: h1: python: no Python at /nonexistent/bin/python3 (not found on the host)"
                      " — fix the host's python setting, or clear it to let corral find one"]
    assert not list(host.remote_dir.glob("agent-*.pyz")), "nothing is uploaded after a failed step"


# A fake 3.6 always; a real one too where pyenv has it (not a skip elsewhere: CI forbids skips).
@pytest.mark.parametrize("which", ["script"] + (["pyenv-3.6"] if os.path.exists(REAL_PY36) else []))
def test_python_too_old(ssh_cluster: Cluster, lab: SshLab, tmp_path: Path, which: str) -> None:
    python = script(tmp_path / "python3.6", 'echo "3.6.15 $0"; exit 1\n') if which == "script" else REAL_PY36
    host = lab.add_host("h1", "127.0.0.2")
    assert ssh_cluster.corral(*lab.host_args(host, "--python", python)).returncode == 0
    _, errors = failing_deploy(ssh_cluster, "h1")
    assert len(errors) == 1
    assert errors[0].startswith(f"corral deploy: h1: python: Python 3.6.15 at {python} is too old: the agent needs 3.8 or newer")


def test_unknown_host_key_is_refused_without_accept_new(ssh_cluster: Cluster, lab: SshLab) -> None:
    host = lab.add_host("h1", "127.0.0.2", trust=False)
    assert ssh_cluster.corral(*lab.host_args(host)).returncode == 0
    fingerprint = subprocess.run(["ssh-keygen", "-lf", str(host.root / "hostkey.pub")], capture_output=True,
                                 text=True, check=True).stdout.split()[1]
    _, errors = failing_deploy(ssh_cluster, "h1")
    assert len(errors) == 1
    assert errors[0].startswith(f"corral deploy: h1: hostkey: unknown host key for [127.0.0.2]:{host.port}: "
                                f"ssh-ed25519 {fingerprint} — check the fingerprint")
    assert "--accept-new" in errors[0]
    assert not (ssh_cluster.home / "known_hosts").exists(), "nothing was accepted"

    done = ssh_cluster.corral("deploy", "h1", "--accept-new", timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"accepting the new key ssh-ed25519 {fingerprint} (--accept-new)" in done.stdout
    assert (ssh_cluster.home / "known_hosts").read_text() == host.known_hosts_line() + "\n"
    assert lab.known_hosts.read_text() == "", "the user's known_hosts is only read"


def test_changed_host_key_is_refused_even_with_accept_new(ssh_cluster: Cluster, lab: SshLab, tmp_path: Path) -> None:
    host = lab.add_host("h1", "127.0.0.2", trust=False)
    impostor = keygen(tmp_path / "otherkey")
    lab.known_hosts.write_text(f"[127.0.0.2]:{host.port} {' '.join(impostor.split()[:2])}\n")
    assert ssh_cluster.corral(*lab.host_args(host)).returncode == 0
    for extra in ([], ["--accept-new"]):
        _, errors = failing_deploy(ssh_cluster, "h1", *extra)
        assert len(errors) == 1
        assert errors[0].startswith(f"corral deploy: h1: hostkey: the host key of [127.0.0.2]:{host.port} has CHANGED: "
                                    f"{lab.known_hosts} has ssh-ed25519 SHA256:")
        assert f"delete its line from {lab.known_hosts}" in errors[0]
    assert not list(host.remote_dir.glob("*")), "nothing was done on a host whose key changed"


def test_agent_that_never_says_ready_fails_with_its_log_tail(ssh_cluster: Cluster, lab: SshLab, tmp_path: Path) -> None:
    python = script(tmp_path / "python3", 'if [ "$1" = "-c" ]; then exec python3 "$@"; fi\n'
                    'echo "fake agent: pretending to hang" >&2\nexec sleep 600\n')
    host = lab.add_host("h1", "127.0.0.2")
    assert ssh_cluster.corral(*lab.host_args(host, "--python", python)).returncode == 0
    done, errors = failing_deploy(ssh_cluster, "h1", "--ready-timeout", "3")
    assert len(errors) == 1
    assert errors[0].startswith("corral deploy: h1: ready: the agent (pid ")
    assert "never said ready within 3s — see its log" in errors[0]
    assert "  | fake agent: pretending to hang" in done.stderr.splitlines()
    assert not [p for p in processes_in(host.remote_dir)], "the stuck agent was killed"


def test_agent_that_exits_at_once_fails_without_waiting_out_the_timeout(ssh_cluster: Cluster, lab: SshLab, tmp_path: Path) -> None:
    python = script(tmp_path / "python3", 'if [ "$1" = "-c" ]; then exec python3 "$@"; fi\n'
                    'echo "fake agent: boom" >&2\nexit 3\n')
    host = lab.add_host("h1", "127.0.0.2")
    assert ssh_cluster.corral(*lab.host_args(host, "--python", python)).returncode == 0
    done, errors = failing_deploy(ssh_cluster, "h1", "--ready-timeout", "60")
    assert len(errors) == 1 and "exited before it said ready" in errors[0]
    assert "  | fake agent: boom" in done.stderr.splitlines()
    ready = [line for line in done.stdout.splitlines() if line.split()[:2] == ["h1", "ready"]]
    assert ready and ready[-1].split()[2] == "FAILED"
    assert ready[-1].split(None, 3)[3].startswith("the agent (pid "), "the step line does not repeat host and step"


def test_unknown_alias_is_one_line_before_anything_starts(ssh_cluster: Cluster, lab: SshLab) -> None:
    done = ssh_cluster.corral("deploy", "nope", timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"corral deploy: unknown host 'nope' — add it with `corral hosts add nope "
                                        f"--hostname ...`, or to {lab.config}"]
    assert done.stdout == ""


def test_deploy_without_a_master_says_so(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "home")
    done = cluster.corral("deploy", "h1", timeout=60)
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1 and "no master" in done.stderr
