"""SSH deploy against real OpenSSH servers: agents on two hosts, tagged jobs, cut connections, stop and drain."""

from __future__ import annotations

import getpass
import io
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from corral.console.deploy.bundle import build
from scripts.sshlab import SshHost, SshLab, processes_in
from tests.cluster import Cluster, wait_until

pytestmark = pytest.mark.sshd


def add_hosts(cluster: Cluster, lab: SshLab, *specs: tuple[str, str, str]) -> dict[str, SshHost]:
    """Start an sshd per (alias, address, tags) and add it with `corral hosts add`."""
    hosts = {}
    for alias, address, tags in specs:
        host = lab.add_host(alias, address)
        done = cluster.corral(*lab.host_args(host, "--tags", tags, "--slots", "2"))
        assert done.returncode == 0, done.stderr
        hosts[alias] = host
    return hosts


def deploy(cluster: Cluster, *args: str, ok: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    done = cluster.corral("deploy", *args, timeout=timeout)
    if ok:
        assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def zip_contents(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {name: z.read(name) for name in z.namelist()}


def step_line(output: str, alias: str, step: str) -> str:
    """The CLI's line for one host's step (ALIAS STEP STATUS MESSAGE), or ""."""
    return next((line for line in output.splitlines() if line.split()[:2] == [alias, step]), "")


def agent(cluster: Cluster, name: str) -> dict | None:
    with cluster.client() as c:
        return next((a for a in c.agents() if a["name"] == name), None)


def remote_pid(host: SshHost) -> int:
    return int((host.remote_dir / "agent.pid").read_text())


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def run_tagged(cluster: Cluster, tag: str, command: str, count: int = 1, timeout: float = 60) -> list[dict]:
    with cluster.client() as c:
        ids = c.submit([{"command": command, "tags": [tag]} for _ in range(count)])
        states = c.wait(ids, timeout)
        assert states == {i: "done" for i in ids}, states
        return [c.job(i) for i in ids]


def test_one_deploy_puts_agents_on_both_hosts_and_tagged_jobs_run_there(ssh_cluster: Cluster, lab: SshLab) -> None:
    hosts = add_hosts(ssh_cluster, lab, ("h1", "127.0.0.2", "red"), ("h2", "127.0.0.3", "blue"))
    done = deploy(ssh_cluster, "h1", "h2")

    # One line per host per step, and a summary.
    lines = done.stdout.splitlines()
    for alias in ("h1", "h2"):
        for step in ("connect", "hostkey", "auth", "python", "upload", "tunnel", "authkey", "start", "ready"):
            assert any(line.split()[:3] in ([alias, step, "ok"], [alias, step, "skip"]) for line in lines), (alias, step, done.stdout)
    assert lines[-1] == "deployed 2 of 2 hosts"

    bundle = build()
    master_host, master_port = ssh_cluster.address()
    assert master_host == "127.0.0.1"
    key = (ssh_cluster.home / "authkey").read_bytes().strip()
    for alias, host in hosts.items():
        pid = remote_pid(host)
        record = agent(ssh_cluster, alias)
        assert record is not None and record["state"] == "up" and record["pid"] == pid
        assert record["started_by"] == "ssh:tunnel" and record["slots"] == 2
        # The bundle, named by its hash, in this host's own remote directory; the authkey in a 0600 file.
        assert zip_contents((host.remote_dir / bundle.name).read_bytes()) == zip_contents(bundle.data)
        authkey = host.remote_dir / "authkey"
        assert authkey.stat().st_mode & 0o777 == 0o600 and authkey.read_bytes().strip() == key
        argv = cmdline(pid)
        assert not any(key.decode() in arg for arg in argv), "the authkey must never be on a command line"
        # The agent dials its end of the reverse tunnel on the host's loopback, not the master's port.
        connect = argv[argv.index("--connect") + 1]
        assert connect.startswith("127.0.0.1:") and connect != f"127.0.0.1:{master_port}"

    red = run_tagged(ssh_cluster, "red", "pwd; echo $CORRAL_JOB_ID", count=3)
    blue = run_tagged(ssh_cluster, "blue", "pwd", count=3)
    assert {j["agent"] for j in red} == {"h1"} and {j["agent"] for j in blue} == {"h2"}
    assert all(j["attempt_list"][-1]["stdout"].decode().split()[0] == str(hosts["h1"].remote_dir.resolve()) for j in red)
    assert all(j["attempt_list"][-1]["stdout"].decode().strip() == str(hosts["h2"].remote_dir.resolve()) for j in blue)

    listing = ssh_cluster.corral("hosts")
    assert listing.returncode == 0
    assert f"pid {remote_pid(hosts['h1'])} (tunnel)" in listing.stdout

    # The same bundle, already running: a no-op that leaves the agents alone.
    before = {alias: remote_pid(h) for alias, h in hosts.items()}
    again = deploy(ssh_cluster, "h1", "h2")
    assert again.stdout.count("nothing to do") == 2
    assert step_line(again.stdout, "h1", "upload").split()[2] == "skip"
    assert step_line(again.stdout, "h2", "start").split()[2] == "skip"
    assert {alias: remote_pid(h) for alias, h in hosts.items()} == before
    assert all(alive(pid) for pid in before.values())


def test_agents_come_back_after_their_ssh_connection_is_cut(ssh_cluster: Cluster, lab: SshLab) -> None:
    hosts = add_hosts(ssh_cluster, lab, ("h1", "127.0.0.2", "red"), ("h2", "127.0.0.3", "blue"))
    deploy(ssh_cluster, "h1", "h2")
    pids = {alias: remote_pid(h) for alias, h in hosts.items()}
    with ssh_cluster.client() as c:
        registered = {a["name"]: a["registered"] for a in c.agents()}
        ports = {link["alias"]: link["remote_port"] for link in c.ssh_links()}

    cut_at = time.time()
    for host in hosts.values():
        assert host.cut() > 0, "the master should hold an SSH session to each host"

    def back() -> bool:
        with ssh_cluster.client() as c:
            links = {link["alias"]: link for link in c.ssh_links()}
            agents = {a["name"]: a for a in c.agents()}
        return all(links[a]["state"] == "up" and links[a]["reconnects"] >= 1 and agents[a]["state"] == "up"
                   and agents[a]["registered"] > registered[a] for a in hosts)

    wait_until(back, timeout=60, interval=0.2, what="both links re-established and both agents registered again")
    with ssh_cluster.client() as c:
        links = {link["alias"]: link for link in c.ssh_links()}
        agents = {a["name"]: a for a in c.agents()}
    for alias in hosts:
        assert links[alias]["remote_port"] == ports[alias], "the tunnel comes back on the port the agent dials"
        assert agents[alias]["pid"] == pids[alias], "the same agent process came back; nothing was redeployed"
        assert agents[alias]["registered"] > cut_at
    assert {j["agent"] for j in run_tagged(ssh_cluster, "red", "true", count=2)} == {"h1"}
    assert {j["agent"] for j in run_tagged(ssh_cluster, "blue", "true", count=2)} == {"h2"}


def test_stop_drain_lets_the_running_job_finish_and_starts_no_more(ssh_cluster: Cluster, lab: SshLab, tmp_path: Path) -> None:
    hosts = add_hosts(ssh_cluster, lab, ("h1", "127.0.0.2", "red"))
    deploy(ssh_cluster, "h1", "--slots", "1")
    pid = remote_pid(hosts["h1"])
    started, release = tmp_path / "started", tmp_path / "release"
    with ssh_cluster.client() as c:
        first, second = c.submit([
            {"command": f"touch {started}; while [ ! -f {release} ]; do sleep 0.05; done; echo finished", "tags": ["red"]},
            {"command": "echo second", "tags": ["red"]}])
        wait_until(lambda: started.exists(), timeout=30, what="the first job to start")
    # The first job runs until the drain has begun: it finishes during the drain, not before it.
    stop = subprocess.Popen([sys.executable, "-m", "corral", "stop", "h1", "--drain"], env=ssh_cluster.env,
                            cwd=str(Path(__file__).resolve().parent.parent), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    assert stop.stdout is not None
    for line in stop.stdout:
        lines.append(line)
        if "draining agent pid" in line:
            break
    time.sleep(1.0)  # the agent hands back what it holds unstarted within half a second of the signal
    assert alive(pid), "the draining agent waits for its running job"
    release.touch()
    rest, errors = stop.communicate(timeout=120)
    output = "".join(lines) + rest
    assert stop.returncode == 0, errors
    assert "stopped 1 of 1 host" in output
    assert not alive(pid)
    with ssh_cluster.client() as c:
        job = c.job(first)
        assert job["state"] == "done" and job["attempt_list"][-1]["stdout"] == b"finished\n"
        assert c.job(second)["state"] == "queued", "a draining agent starts nothing new"
        assert agent(ssh_cluster, "h1")["state"] == "stopped"
        assert c.ssh_links() == [], "a stopped host's SSH link is closed"
    assert not (hosts["h1"].remote_dir / "agent.pid").exists()


def test_stop_kills_running_jobs_and_requeues_them(ssh_cluster: Cluster, lab: SshLab, tmp_path: Path) -> None:
    hosts = add_hosts(ssh_cluster, lab, ("h1", "127.0.0.2", "red"))
    deploy(ssh_cluster, "h1", "--slots", "1")
    pid = remote_pid(hosts["h1"])
    marker, job_pid = tmp_path / "marker", tmp_path / "job.pid"
    command = f"if [ -f {marker} ]; then echo second run; else touch {marker}; echo $$ > {job_pid}; exec sleep 120; fi"
    with ssh_cluster.client() as c:
        (job,) = c.submit([{"command": command, "tags": ["red"]}])
        wait_until(lambda: job_pid.exists() and job_pid.read_text().strip(), timeout=30, what="the job to start")
    sleeper = int(job_pid.read_text())
    began = time.monotonic()
    stopped = ssh_cluster.corral("stop", "h1", timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert time.monotonic() - began < 30
    assert "its jobs went back to the queue" in stopped.stdout
    assert not alive(pid) and not alive(sleeper), "the agent and its running job are both gone"
    with ssh_cluster.client() as c:
        record = c.job(job)
        assert record["state"] == "queued", record
        assert agent(ssh_cluster, "h1")["state"] == "stopped"
    # Deployed again, the re-queued job runs (its second run ends at once).
    deploy(ssh_cluster, "h1", "--slots", "1")
    with ssh_cluster.client() as c:
        assert c.wait([job], 60) == {job: "done"}
        assert c.job(job)["attempt_list"][-1]["stdout"] == b"second run\n"


def test_new_settings_upgrade_the_running_agent_by_drain_and_restart(ssh_cluster: Cluster, lab: SshLab) -> None:
    hosts = add_hosts(ssh_cluster, lab, ("h1", "127.0.0.2", "red"))
    deploy(ssh_cluster, "h1", "--slots", "1")
    old = remote_pid(hosts["h1"])
    done = deploy(ssh_cluster, "h1", "--slots", "3")
    assert f"upgrading agent pid {old} (new settings): draining it first" in done.stdout
    new = remote_pid(hosts["h1"])
    assert new != old and not alive(old) and alive(new)
    record = agent(ssh_cluster, "h1")
    assert record["pid"] == new and record["slots"] == 3 and record["state"] == "up"


def test_a_restarted_master_reopens_the_tunnels_and_the_agents_come_back(ssh_cluster: Cluster, lab: SshLab) -> None:
    hosts = add_hosts(ssh_cluster, lab, ("h1", "127.0.0.2", "red"))
    deploy(ssh_cluster, "h1")
    pid = remote_pid(hosts["h1"])
    assert ssh_cluster.master is not None
    ssh_cluster.master.send_signal(signal.SIGTERM)
    assert ssh_cluster.master.wait(timeout=30) == 0
    assert alive(pid), "agents outlive their master"
    ssh_cluster.start_master()
    wait_until(lambda: (agent(ssh_cluster, "h1") or {}).get("pid") == pid, timeout=60, interval=0.2,
             what="the deployed agent to reach the new master through a re-opened tunnel")
    assert {j["agent"] for j in run_tagged(ssh_cluster, "red", "true")} == {"h1"}


def test_direct_mode_dials_the_master_without_a_tunnel(ssh_cluster: Cluster, lab: SshLab) -> None:
    hosts = add_hosts(ssh_cluster, lab, ("h2", "127.0.0.3", "blue"))
    done = deploy(ssh_cluster, "h2", "--direct")
    assert step_line(done.stdout, "h2", "tunnel").split()[2:4] == ["skip", "--direct:"]
    host, port = ssh_cluster.address()
    argv = cmdline(remote_pid(hosts["h2"]))
    assert argv[argv.index("--connect") + 1] == f"{host}:{port}"
    assert agent(ssh_cluster, "h2")["started_by"] == "ssh:direct"
    assert {j["agent"] for j in run_tagged(ssh_cluster, "blue", "true")} == {"h2"}


def test_removing_a_host_removes_its_agent_and_its_bundle(ssh_cluster: Cluster, lab: SshLab) -> None:
    hosts = add_hosts(ssh_cluster, lab, ("h1", "127.0.0.2", "red"), ("h2", "127.0.0.3", "blue"))
    deploy(ssh_cluster, "h1", "h2")
    pid = remote_pid(hosts["h1"])
    assert (hosts["h1"].remote_dir / build().name).exists()
    # h2's agent is stopped first: its bundle stays until the host is removed.
    assert ssh_cluster.corral("stop", "h2", timeout=60).returncode == 0
    assert (hosts["h2"].remote_dir / build().name).exists()
    listing = ssh_cluster.corral("hosts").stdout
    assert f"pid {pid} (tunnel)" in next(line for line in listing.splitlines() if line.startswith("h1 "))
    assert "stopped" in next(line for line in listing.splitlines() if line.startswith("h2 "))
    for alias in ("h1", "h2"):
        removed = ssh_cluster.corral("hosts", "remove", alias, timeout=60)
        assert removed.returncode == 0, removed.stderr
        assert not hosts[alias].remote_dir.exists(), "corral's files are gone, and so the directory it made"
    assert not alive(pid)
    listing = ssh_cluster.corral("hosts").stdout
    assert "h1" not in listing and "h2" not in listing
    assert not processes_in(hosts["h1"].root)
    assert not (ssh_cluster.home / "deployments.json").read_text().strip("{}\n ")


def test_host_key_question_is_asked_and_answered_through_the_client(ssh_cluster: Cluster, lab: SshLab) -> None:
    """The backend of the console's host-key modal: a deploy waits on the question; accept or reject."""
    for alias, address in (("k1", "127.0.0.2"), ("k2", "127.0.0.3")):
        host = lab.add_host(alias, address, trust=False)
        assert ssh_cluster.corral(*lab.host_args(host)).returncode == 0
    expected = {alias: subprocess.run(["ssh-keygen", "-lf", str(h.root / "hostkey.pub")], capture_output=True,
                                      text=True, check=True).stdout.split()[1] for alias, h in lab.hosts.items()}
    with ssh_cluster.client() as c:
        op = c.deploy(["k1", "k2"], interactive=True)
        questions = wait_until(lambda: len(c.deploy_progress(op)["questions"]) == 2 and c.deploy_progress(op)["questions"],
                             timeout=30, what="two host-key questions")
        assert {q["alias"]: q["fingerprint"] for q in questions} == expected
        assert c.deploy_progress(op)["hosts"]["k1"]["state"] == "waiting"
        assert c.answer_host_key(op, "k1", expected["k1"], True)
        assert c.answer_host_key(op, "k2", expected["k2"], False)
        final = c.follow_operation(op)
    assert final["ok"] == ["k1"] and final["failed"] == ["k2"]
    assert "rejected" in final["hosts"]["k2"]["error"]
    corral_known = (ssh_cluster.home / "known_hosts").read_text()
    assert lab.hosts["k1"].known_hosts_line().split()[0] in corral_known
    assert lab.hosts["k2"].known_hosts_line().split()[0] not in corral_known
    assert lab.known_hosts.read_text() == "", "the user's known_hosts is never written"


def test_hosts_from_ssh_config_deploy_through_a_proxy_jump(ssh_cluster: Cluster, lab: SshLab) -> None:
    jump = lab.add_host("jump", "127.0.0.2")
    inner = lab.add_host("inner", "127.0.0.3")
    lab.config.write_text(
        f"Host jump\n  HostName {jump.address}\n  Port {jump.port}\n  IdentityFile {lab.key}\n\n"
        f"Host inner\n  HostName {inner.address}\n  Port {inner.port}\n  ProxyJump jump\n\n"
        f"Host *\n  User {getpass.getuser()}\n  IdentityFile {lab.key}\n")
    listing = ssh_cluster.corral("hosts")
    assert "inner" in listing.stdout and "ssh_config" in listing.stdout, listing.stdout
    # corral's own entry adds what ssh config cannot say (the remote dir); the rest comes from the config.
    added = ssh_cluster.corral("hosts", "add", "inner", "--remote-dir", str(inner.remote_dir), "--tags", "deep")
    assert added.returncode == 0, added.stderr
    before = jump.log.read_text().count("Accepted publickey")
    deploy(ssh_cluster, "inner")
    assert jump.log.read_text().count("Accepted publickey") > before, "the jump host carried the connection"
    assert {j["agent"] for j in run_tagged(ssh_cluster, "deep", "true")} == {"inner"}


def test_a_master_that_lost_its_records_adopts_the_running_agent(ssh_cluster: Cluster, lab: SshLab) -> None:
    """No deployments.json (a new state dir's master, say): the probe finds the agent running as asked,
    re-opens the tunnel port it dials, and leaves it running."""
    hosts = add_hosts(ssh_cluster, lab, ("h1", "127.0.0.2", "red"))
    deploy(ssh_cluster, "h1")
    pid = remote_pid(hosts["h1"])
    assert ssh_cluster.master is not None
    ssh_cluster.master.send_signal(signal.SIGTERM)
    assert ssh_cluster.master.wait(timeout=30) == 0
    (ssh_cluster.home / "deployments.json").unlink()
    ssh_cluster.start_master()
    done = deploy(ssh_cluster, "h1")
    assert step_line(done.stdout, "h1", "python").split()[2] == "ok", "the full probe ran"
    assert "nothing to do" in step_line(done.stdout, "h1", "done")
    assert remote_pid(hosts["h1"]) == pid and agent(ssh_cluster, "h1")["pid"] == pid
    assert {j["agent"] for j in run_tagged(ssh_cluster, "red", "true")} == {"h1"}


def test_an_agent_from_another_bundle_is_upgraded_by_drain_and_restart(ssh_cluster: Cluster, lab: SshLab) -> None:
    """An agent of another corral version runs there (its bundle has another hash): deploy drains it,
    starts the current one, and removes the old bundle."""
    hosts = add_hosts(ssh_cluster, lab, ("h1", "127.0.0.2", "red"))
    deploy(ssh_cluster, "h1")
    assert ssh_cluster.corral("stop", "h1", timeout=60).returncode == 0
    remote = hosts["h1"].remote_dir
    current = build().name
    old = remote / "agent-000000000000.pyz"
    shutil.copy(remote / current, old)
    host, port = ssh_cluster.address()
    argv = [sys.executable, str(old), "--connect", f"{host}:{port}", "--authkey-file", str(remote / "authkey"),
            "--name", "h1", "--slots", "2", "--tags", "red", "--started-by", "ssh:tunnel"]
    with open(remote / "agent.log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=remote, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    (remote / "agent.pid").write_text(f"{proc.pid}\n")
    wait_until(lambda: (agent(ssh_cluster, "h1") or {}).get("pid") == proc.pid and agent(ssh_cluster, "h1")["state"] == "up",
             timeout=30, what="the old agent to register")
    done = deploy(ssh_cluster, "h1")
    assert f"upgrading agent pid {proc.pid} (a new bundle): draining it first" in done.stdout
    assert proc.wait(timeout=30) == 0, "the old agent drained and exited cleanly"
    new = remote_pid(hosts["h1"])
    assert new != proc.pid and agent(ssh_cluster, "h1")["pid"] == new
    assert sorted(p.name for p in remote.glob("agent-*.pyz")) == [current], "the old bundle is gone"
