"""SSH the way ssh does it, against real sshd servers: each case passes where `ssh` passes and fails with one
clear line where `ssh` fails. `ssh` itself, run on the same config, is the oracle."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster import Cluster
from scripts.sshlab import SSH_KEYGEN, SshHost, SshLab, keygen, processes_in

pytestmark = pytest.mark.sshd

SSH = shutil.which("ssh") or "/usr/bin/ssh"


class Agent:
    """An ssh-agent of the test's own, on its own socket (never the operator's)."""

    def __init__(self, root: Path) -> None:
        self.socket = str(root / "agent.sock")
        self.proc = subprocess.Popen(["ssh-agent", "-D", "-a", self.socket], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        for _ in range(100):
            if os.path.exists(self.socket):
                break
            subprocess.run(["sleep", "0.05"])
        self.env = {"SSH_AUTH_SOCK": self.socket}

    def add(self, *keys: Path) -> None:
        for key in keys:
            subprocess.run(["ssh-add", "-q", str(key)], env=dict(os.environ, **self.env), check=True,
                           stdin=subprocess.DEVNULL, capture_output=True)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    started = Agent(tmp_path)
    try:
        yield started
    finally:
        started.stop()


def config_host(lab: SshLab, host: SshHost, *lines: str) -> str:
    """A Host block for this sshd: its address, port, our user, then `lines`."""
    body = "".join(f"  {line}\n" for line in lines)
    return f"Host {host.alias}\n  HostName {host.address}\n  Port {host.port}\n  User {getpass.getuser()}\n{body}\n"


def write_config(lab: SshLab, *blocks: str) -> None:
    """The lab's ssh config: the blocks, then defaults that keep ssh (and corral) off the machine's own files."""
    lab.config.write_text("".join(blocks) + f"Host *\n  UserKnownHostsFile {lab.known_hosts}\n"
                          "  GlobalKnownHostsFile /dev/null\n  BatchMode yes\n  ConnectTimeout 5\n")


def ssh_passes(lab: SshLab, alias: str, env: dict[str, str] | None = None) -> bool:
    """Whether OpenSSH's own client, on the same config, logs in and runs a command."""
    base = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    done = subprocess.run([SSH, "-F", str(lab.config), alias, "true"], env=dict(base, **(env or {})),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    return done.returncode == 0


def register(cluster: Cluster, host: SshHost, *extra: str) -> None:
    """corral's own entry adds only what ssh config cannot say: the remote directory."""
    added = cluster.corral("hosts", "add", host.alias, "--remote-dir", str(host.remote_dir), *extra)
    assert added.returncode == 0, added.stderr


def deploy(cluster: Cluster, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    saved = dict(cluster.env)
    cluster.env.update(env or {})
    try:
        return cluster.corral("deploy", *args, timeout=120)
    finally:
        cluster.env.clear()
        cluster.env.update(saved)


def errors_of(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("corral deploy: ")]


def assert_deployed(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.stdout.splitlines()[-1].startswith("deployed 1 of 1 host"), done.stdout


def accepted(host: SshHost) -> int:
    return host.log.read_text().count("Accepted publickey")


# ---- authentication -------------------------------------------------------------------------------

def test_agent_only_auth_from_the_clis_environment_past_a_missing_identity_file(
        ssh_cluster: Cluster, lab: SshLab, agent: Agent, tmp_path: Path) -> None:
    """The master has no agent; the CLI's SSH_AUTH_SOCK is passed for the deploy. The IdentityFile the
    config names does not exist: skipped with a note, as ssh does, and the agent's key logs in."""
    host = lab.add_host("h1", "127.0.0.2")
    agent.add(lab.key)
    write_config(lab, config_host(lab, host, f"IdentityFile {tmp_path / 'absent_key'}"))
    register(ssh_cluster, host)
    assert ssh_passes(lab, "h1", agent.env) and not ssh_passes(lab, "h1")
    assert "SSH_AUTH_SOCK" not in ssh_cluster.env, "the master runs without an agent"
    without = deploy(ssh_cluster, "h1")
    assert without.returncode == 1 and errors_of(without) == [
        f"corral deploy: h1: auth: no key to offer {getpass.getuser()}@127.0.0.2:{host.port}: no identity file exists "
        "and no agent has keys — set the host's identity (IdentityFile, or corral hosts add --identity), "
        "or load a key into ssh-agent"]
    done = deploy(ssh_cluster, "h1", env=agent.env)
    assert_deployed(done)
    assert f"no identity file {tmp_path / 'absent_key'}: skipped" in done.stdout


def test_identities_only_offers_just_the_configured_key_to_a_host_with_max_auth_tries_3(
        ssh_cluster: Cluster, lab: SshLab, agent: Agent, tmp_path: Path) -> None:
    host = lab.add_host("h1", "127.0.0.2", options="MaxAuthTries 3\n")
    others = []
    for i in range(4):
        keygen(tmp_path / f"other{i}")
        others.append(tmp_path / f"other{i}")
    agent.add(*others, lab.key)  # the right key last: without IdentitiesOnly, four wrong ones go first
    write_config(lab, config_host(lab, host, f"IdentityFile {lab.key}", "IdentitiesOnly yes"))
    register(ssh_cluster, host)
    assert ssh_passes(lab, "h1", agent.env)
    assert_deployed(deploy(ssh_cluster, "h1", env=agent.env))

    # Without IdentitiesOnly nor a key file of its own, ssh and corral both run out of tries on the agent's
    # other keys (ssh would offer a configured key that the agent holds first: so does corral).
    write_config(lab, config_host(lab, host, f"IdentityFile {tmp_path / 'absent'}"))
    assert not ssh_passes(lab, "h1", agent.env)
    done = deploy(ssh_cluster, "h1", "--reconnect", env=agent.env)
    assert done.returncode == 1
    (line,) = errors_of(done)
    assert line.startswith(f"corral deploy: h1: auth: {getpass.getuser()}@127.0.0.2:{host.port} refused our keys ("), line
    assert " from the agent): " in line and "absent" not in line.split(" — ")[0].split("refused")[1], line

    # The option itself: the configured key is a file the agent does not hold. Without IdentitiesOnly the
    # agent's four wrong keys go before it and use up MaxAuthTries 3 (ssh fails so, and so must corral);
    # with it only that file is offered, and both get in.
    own = tmp_path / "own"
    host.authorize(keygen(own))
    write_config(lab, config_host(lab, host, f"IdentityFile {own}"))
    assert not ssh_passes(lab, "h1", agent.env)
    assert deploy(ssh_cluster, "h1", "--reconnect", env=agent.env).returncode == 1
    write_config(lab, config_host(lab, host, f"IdentityFile {own}", "IdentitiesOnly yes"))
    assert ssh_passes(lab, "h1", agent.env)
    assert_deployed(deploy(ssh_cluster, "h1", "--reconnect", env=agent.env))


def test_identity_agent_names_the_agent_to_use(ssh_cluster: Cluster, lab: SshLab, agent: Agent) -> None:
    host = lab.add_host("h1", "127.0.0.2")
    agent.add(lab.key)
    write_config(lab, config_host(lab, host, f"IdentityAgent {agent.socket}", f"IdentityFile {lab.root}/none"))
    register(ssh_cluster, host)
    assert ssh_passes(lab, "h1")
    assert_deployed(deploy(ssh_cluster, "h1"))


def test_an_encrypted_pem_key_is_one_line_without_an_agent_and_works_from_one(
        ssh_cluster: Cluster, lab: SshLab, agent: Agent, tmp_path: Path) -> None:
    key = tmp_path / "pem_key"
    subprocess.run([SSH_KEYGEN, "-q", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "secret", "-f", str(key)], check=True)
    assert "ENCRYPTED" in key.read_text()
    host = lab.add_host("h1", "127.0.0.2", authorize=False)
    host.authorize(key.with_name("pem_key.pub").read_text().strip())
    write_config(lab, config_host(lab, host, f"IdentityFile {key}"))
    register(ssh_cluster, host)
    assert not ssh_passes(lab, "h1")
    done = deploy(ssh_cluster, "h1")
    assert done.returncode == 1 and errors_of(done) == [
        f"corral deploy: h1: auth: no key to offer {getpass.getuser()}@127.0.0.2:{host.port}: the key {key} is encrypted "
        f"and no agent holds it — load it into ssh-agent (`ssh-add {key}`) and deploy again"]
    plain = tmp_path / "plain_copy"
    shutil.copy(key, plain)
    plain.chmod(0o600)
    subprocess.run([SSH_KEYGEN, "-q", "-p", "-P", "secret", "-N", "", "-f", str(plain)], check=True, capture_output=True)
    agent.add(plain)  # what `ssh-add pem_key` and its passphrase would have done
    assert ssh_passes(lab, "h1", agent.env)
    assert_deployed(deploy(ssh_cluster, "h1", env=agent.env))


# ---- hops -----------------------------------------------------------------------------------------

def test_a_two_hop_proxy_jump_chain(ssh_cluster: Cluster, lab: SshLab) -> None:
    j1, j2 = lab.add_host("j1", "127.0.0.2"), lab.add_host("j2", "127.0.0.3")
    inner = lab.add_host("inner", "127.0.0.4")
    write_config(lab, config_host(lab, j1, f"IdentityFile {lab.key}"), config_host(lab, j2, f"IdentityFile {lab.key}"),
                 config_host(lab, inner, f"IdentityFile {lab.key}", "ProxyJump j1,j2"))
    register(ssh_cluster, inner)
    before = (accepted(j1), accepted(j2))
    assert ssh_passes(lab, "inner")
    assert (accepted(j1), accepted(j2)) > before
    before = (accepted(j1), accepted(j2))
    done = deploy(ssh_cluster, "inner")
    assert_deployed(done)
    assert accepted(j1) > before[0] and accepted(j2) > before[1], "both jump hosts carried the connection"


def test_each_hops_host_key_is_checked_like_the_targets(ssh_cluster: Cluster, lab: SshLab) -> None:
    j1, j2 = lab.add_host("j1", "127.0.0.2"), lab.add_host("j2", "127.0.0.3", trust=False)
    inner = lab.add_host("inner", "127.0.0.4")
    write_config(lab, config_host(lab, j1, f"IdentityFile {lab.key}"), config_host(lab, j2, f"IdentityFile {lab.key}"),
                 config_host(lab, inner, f"IdentityFile {lab.key}", "ProxyJump j1,j2"))
    register(ssh_cluster, inner)
    assert not ssh_passes(lab, "inner")  # ssh will not go through a jump host whose key it does not know
    before = accepted(inner)
    done = deploy(ssh_cluster, "inner")
    assert done.returncode == 1
    (line,) = errors_of(done)
    # Named by the hop whose key it is, at the host-key step, as for a target.
    assert line.startswith(f"corral deploy: j2: hostkey: unknown host key for [127.0.0.3]:{j2.port}: "), line
    assert accepted(inner) == before and not list(inner.remote_dir.glob("*"))
    # A jump host whose key changed is refused likewise, --accept-new or not (as ssh: a changed key is never accepted).
    lab.known_hosts.write_text(lab.known_hosts.read_text() + f"[127.0.0.3]:{j2.port} {' '.join(j1.host_pub.split()[:2])}\n")
    for extra in ([], ["--accept-new"]):
        done = deploy(ssh_cluster, "inner", *extra)
        assert done.returncode == 1
        (line,) = errors_of(done)
        assert line.startswith(f"corral deploy: j2: hostkey: the host key of [127.0.0.3]:{j2.port} has CHANGED: "), line
    assert accepted(inner) == before


def test_proxy_command_carries_the_connection(ssh_cluster: Cluster, lab: SshLab) -> None:
    jump, inner = lab.add_host("jump", "127.0.0.2"), lab.add_host("inner", "127.0.0.3")
    write_config(lab, config_host(lab, jump, f"IdentityFile {lab.key}"),
                 config_host(lab, inner, f"IdentityFile {lab.key}", f"ProxyCommand {SSH} -F {lab.config} -W %h:%p jump"))
    register(ssh_cluster, inner)
    assert ssh_passes(lab, "inner")
    before = accepted(jump)
    assert_deployed(deploy(ssh_cluster, "inner"))
    assert accepted(jump) > before, "the ProxyCommand's ssh went through the jump host"


# ---- host keys ------------------------------------------------------------------------------------

def test_host_key_alias_names_the_key_in_known_hosts(ssh_cluster: Cluster, lab: SshLab) -> None:
    host = lab.add_host("h1", "127.0.0.2", trust=False)
    lab.known_hosts.write_text(f"build-box {' '.join(host.host_pub.split()[:2])}\n")
    write_config(lab, config_host(lab, host, f"IdentityFile {lab.key}", "HostKeyAlias build-box"))
    register(ssh_cluster, host)
    assert ssh_passes(lab, "h1")
    done = deploy(ssh_cluster, "h1")
    assert_deployed(done)
    assert f"known: {lab.known_hosts}" in done.stdout
    assert not (ssh_cluster.home / "known_hosts").exists(), "nothing had to be accepted"


def test_a_revoked_key_is_refused_though_another_line_lists_it(ssh_cluster: Cluster, lab: SshLab) -> None:
    host = lab.add_host("h1", "127.0.0.2")  # its key is listed in the lab's known_hosts...
    with lab.known_hosts.open("a") as f:
        f.write(f"# and revoked\n@revoked * {' '.join(host.host_pub.split()[:2])}\n")
    write_config(lab, config_host(lab, host, f"IdentityFile {lab.key}"))
    register(ssh_cluster, host)
    assert not ssh_passes(lab, "h1")
    for extra in ([], ["--accept-new"]):
        done = deploy(ssh_cluster, "h1", *extra)
        assert done.returncode == 1
        (line,) = errors_of(done)
        assert line.startswith(f"corral deploy: h1: hostkey: the host key of [127.0.0.2]:{host.port} (ssh-ed25519 SHA256:")
        assert f"is REVOKED in {lab.known_hosts}:3; refused" in line
    assert not list(host.remote_dir.glob("*")), "nothing was done on the host"


def test_a_host_certificate_is_checked_against_the_cert_authority_line(
        ssh_cluster: Cluster, lab: SshLab, tmp_path: Path) -> None:
    ca, other_ca = tmp_path / "host_ca", tmp_path / "other_ca"
    keygen(ca, "host-ca")
    keygen(other_ca, "other-ca")
    host = lab.add_host("h1c", "127.0.0.2", trust=False)
    cert = host.root / "hostkey-cert.pub"

    def certify(signer: Path, *how: str) -> None:
        """The host's key certified by `signer` (sshd restarted to present it)."""
        cert.unlink(missing_ok=True)
        subprocess.run([SSH_KEYGEN, "-q", "-s", str(signer), "-I", "h1c", "-h", *how, str(host.root / "hostkey.pub")],
                       check=True)
        host.stop()
        host.options = f"HostCertificate {cert}\n"
        host.start()

    ca_key = " ".join(ca.with_name("host_ca.pub").read_text().split()[:2])
    lab.known_hosts.write_text(f"@cert-authority 127.0.0.2,[127.0.0.2]:* {ca_key}\n")
    write_config(lab, config_host(lab, host, f"IdentityFile {lab.key}"))
    register(ssh_cluster, host)

    certify(ca, "-n", "127.0.0.2")
    assert ssh_passes(lab, "h1c"), "ssh checks the host's certificate against the authority"
    assert_deployed(deploy(ssh_cluster, "h1c"))
    assert not (ssh_cluster.home / "known_hosts").exists() or "127.0.0.2" not in (ssh_cluster.home / "known_hosts").read_text()

    # Where ssh refuses the certificate, corral refuses it too, in one line saying why (and --accept-new
    # changes nothing for a certificate its trusted authority signed).
    for how, why in ((["-n", "web1.example"], "a certificate for web1.example, not for 127.0.0.2"),
                     (["-n", "127.0.0.2", "-V", "20200101:20200102"], "a certificate that expired 2020-01-02"),
                     (["-n", "127.0.0.2", "-V", "+3650d:+3651d"], "a certificate not valid before ")):
        certify(ca, *how)
        assert not ssh_passes(lab, "h1c")
        done = deploy(ssh_cluster, "h1c", "--reconnect", "--accept-new")
        assert done.returncode == 1, done.stdout
        (line,) = errors_of(done)
        assert line.startswith(f"corral deploy: h1c: hostkey: [127.0.0.2]:{host.port} offered {why}"), line
        assert f"authority of {lab.known_hosts}:1); refused" in line, line

    # A certificate from an authority no line trusts is judged by its plain key, as ssh does: unknown here.
    certify(other_ca, "-n", "127.0.0.2")
    assert not ssh_passes(lab, "h1c")
    done = deploy(ssh_cluster, "h1c", "--reconnect")
    (line,) = errors_of(done)
    assert line.startswith(f"corral deploy: h1c: hostkey: unknown host key for [127.0.0.2]:{host.port}: ssh-ed25519"), line
    # ... and once its plain key is listed, it is known by that line, for ssh and corral alike.
    before = lab.known_hosts.read_text()
    lab.known_hosts.write_text(before + f"[127.0.0.2]:{host.port} {' '.join(host.host_pub.split()[:2])}\n")
    assert ssh_passes(lab, "h1c")
    assert_deployed(deploy(ssh_cluster, "h1c", "--reconnect"))
    lab.known_hosts.write_text(before)

    # The authority itself revoked: refused, whoever it signed.
    certify(ca, "-n", "127.0.0.2")
    lab.known_hosts.write_text(lab.known_hosts.read_text() + f"@revoked * {ca_key}\n")
    assert not ssh_passes(lab, "h1c")
    done = deploy(ssh_cluster, "h1c", "--reconnect", "--accept-new")
    (line,) = errors_of(done)
    assert "its certificate's authority is REVOKED in " in line and line.endswith(
        "refused — the host needs a new key or certificate; ask its owner"), line


# ---- no SFTP; a host fixed after a failed deploy ---------------------------------------------------

def test_a_host_without_sftp_is_deployed_over_exec_channels(ssh_cluster: Cluster, lab: SshLab) -> None:
    host = lab.add_host("h1", "127.0.0.2", sftp=False)
    assert ssh_cluster.corral(*lab.host_args(host, "--tags", "nosftp")).returncode == 0
    done = deploy(ssh_cluster, "h1")
    assert_deployed(done)
    assert "subsystem request for sftp by user root failed" in host.log.read_text()
    pid = int((host.remote_dir / "agent.pid").read_text())
    assert (host.remote_dir / "authkey").stat().st_mode & 0o777 == 0o600
    with ssh_cluster.client() as c:
        (job,) = c.submit([{"command": "echo over exec", "tags": ["nosftp"]}])
        assert c.wait([job], 60) == {job: "done"}
    again = deploy(ssh_cluster, "h1")
    assert_deployed(again)
    assert "nothing to do" in again.stdout, "the quick path reads the pid and command line without SFTP"
    stopped = ssh_cluster.corral("stop", "h1", timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_host_fixed_after_a_failed_deploy_is_deployed_and_reconnect_connects_afresh(
        ssh_cluster: Cluster, lab: SshLab) -> None:
    host = lab.add_host("h1", "127.0.0.2", authorize=False)
    assert ssh_cluster.corral(*lab.host_args(host)).returncode == 0
    failed = deploy(ssh_cluster, "h1")
    assert failed.returncode == 1 and errors_of(failed)[0].startswith("corral deploy: h1: auth: ")
    host.authorize(lab.public_key)
    assert_deployed(deploy(ssh_cluster, "h1"))
    held = deploy(ssh_cluster, "h1")
    assert held.stdout.split("\n")[0].split()[:3] == ["h1", "connect", "skip"], held.stdout
    sessions = accepted(host)
    fresh = deploy(ssh_cluster, "h1", "--reconnect")
    assert_deployed(fresh)
    assert any(line.split()[:3] == ["h1", "connect", "ok"] for line in fresh.stdout.splitlines()), fresh.stdout
    assert "nothing to do" in fresh.stdout and accepted(host) > sessions


# ---- one account, two clusters --------------------------------------------------------------------

def test_two_clusters_deploying_to_one_account_keep_their_files_apart(ssh_cluster: Cluster, lab: SshLab,
                                                                      tmp_path: Path) -> None:
    home = tmp_path / "remote_home"  # the account's home, as sshd gives it to the sessions (not the machine's)
    home.mkdir()
    host = lab.add_host("h1", "127.0.0.2", options=f"SetEnv HOME={home}\n")
    other = Cluster(tmp_path / "other_home")
    other.env.update(lab.env())
    other.env.pop("SSH_AUTH_SOCK", None)
    other.start_master()
    try:
        for cluster, tag in ((ssh_cluster, "first"), (other, "second")):
            add = ["hosts", "add", "h1", "--hostname", host.address, "--port", str(host.port), "--user",
                   getpass.getuser(), "--identity", str(lab.key), "--tags", tag]  # the default remote dir
            assert cluster.corral(*add).returncode == 0
            assert_deployed(deploy(cluster, "h1"))
        cache = home / ".cache" / "corral"
        dirs = sorted(p for p in cache.iterdir() if p.is_dir())
        assert len(dirs) == 2, "one directory per cluster"
        keys = {(d / "authkey").read_bytes() for d in dirs}
        assert keys == {(c.home / "authkey").read_bytes().strip() + b"\n" for c in (ssh_cluster, other)}
        assert len(list(cache.glob("agent-*.pyz"))) == 1, "the bundle, content-addressed, is shared"
        pids = {d.name: int((d / "agent.pid").read_text()) for d in dirs}
        assert len(set(pids.values())) == 2 and all(Path(f"/proc/{pid}").exists() for pid in pids.values())
        for cluster, tag in ((ssh_cluster, "first"), (other, "second")):
            with cluster.client() as c:
                (job,) = c.submit([{"command": "pwd", "tags": [tag]}])
                assert c.wait([job], 60) == {job: "done"}
                assert Path(c.job(job)["attempt_list"][-1]["stdout"].decode().strip()).parent == cache.resolve()
        removed = other.corral("hosts", "remove", "h1", timeout=60)
        assert removed.returncode == 0, removed.stderr
        left = [p for p in cache.iterdir() if p.is_dir()]
        assert len(left) == 1 and (left[0] / "authkey").exists(), "the other cluster's files are untouched"
        assert len(list(cache.glob("agent-*.pyz"))) == 1, "its agent still uses the shared bundle"
        assert Path(f"/proc/{int((left[0] / 'agent.pid').read_text())}").exists()
    finally:
        other.stop()
        for pid in processes_in(home):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
