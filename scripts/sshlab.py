"""Real OpenSSH servers on loopback: one sshd per host, each with its own host key, config, authorized_keys and
remote directory; a client key, ssh config and known_hosts of the lab's own (the deploy tests, bench, screenshots).

A tool of the repository, as scripts/ all are: tests and bench import it, it imports neither (nor pytest)."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"


def sshd_missing() -> str:
    """Why real sshd hosts cannot run here ("" when they can)."""
    if not os.path.exists(SSHD):
        return f"{SSHD} is missing (apt-get install openssh-server)"
    if not os.path.exists(SSH_KEYGEN):
        return "ssh-keygen is missing (apt-get install openssh-client)"
    return ""


def keygen(path: Path, comment: str = "corral-test") -> str:
    """A new ed25519 key pair at path (and path.pub); returns the public key line."""
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True,
                   stdin=subprocess.DEVNULL)
    return path.with_name(path.name + ".pub").read_text().strip()


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Every descendant process of pid (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class SshHost:
    """One sshd on its own loopback address: its key, config, authorized_keys, log and remote directory."""

    alias: str
    address: str
    port: int
    root: Path
    host_pub: str
    remote_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    authorized: list[str] = field(default_factory=list)
    sftp: bool = True  # False: no SFTP subsystem (files must go over exec channels)
    options: str = ""  # more sshd_config lines (MaxAuthTries, HostCertificate...)

    @property
    def log(self) -> Path:
        return self.root / "sshd.log"

    def known_hosts_line(self) -> str:
        return f"[{self.address}]:{self.port} {' '.join(self.host_pub.split()[:2])}"

    def authorize(self, public_key: str) -> None:
        self.authorized.append(public_key)
        (self.root / "authorized_keys").write_text("\n".join(self.authorized) + "\n")

    def start(self) -> None:
        config = self.root / "sshd_config"
        config.write_text(
            f"Port {self.port}\n"
            f"ListenAddress {self.address}\n"
            f"HostKey {self.root / 'hostkey'}\n"
            f"PidFile {self.root / 'sshd.pid'}\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\n"
            "AllowTcpForwarding yes\n"
            + ("Subsystem sftp internal-sftp\n" if self.sftp else "") +
            "UsePAM no\n"
            "StrictModes no\n"
            "PermitRootLogin prohibit-password\n"
            "MaxSessions 100\n"
            "MaxStartups 100:30:200\n"
            "ClientAliveInterval 5\n"
            "ClientAliveCountMax 3\n"
            + self.options
        )
        if not (self.root / "authorized_keys").exists():
            (self.root / "authorized_keys").write_text("")
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)
        self.proc = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(self.log)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd for {self.alias} exited ({self.proc.returncode}): {self.log.read_text()[-500:]}")
            try:
                with socket.create_connection((self.address, self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd for {self.alias} did not answer on {self.address}:{self.port}")
            time.sleep(0.05)

    def sessions(self) -> list[int]:
        """The processes serving SSH connections to this host (not the listener itself)."""
        return descendants(self.proc.pid) if self.proc is not None else []

    def cut(self) -> int:
        """Kill every SSH session of this host (as a crash of the connection would): the listener stays."""
        victims = self.sessions()
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(victims)

    def stop(self) -> None:
        if self.proc is None:
            return
        victims = self.sessions()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None


class SshLab:
    """The client side of the lab's SSH world: a key, an ssh config, a known_hosts, and the hosts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ssh_dir = root / "ssh"
        self.ssh_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
        self.key = self.ssh_dir / "id_test"
        self.public_key = keygen(self.key, "corral-test-client")
        self.config = self.ssh_dir / "config"
        self.config.write_text("")
        self.known_hosts = self.ssh_dir / "known_hosts"
        self.known_hosts.write_text("")
        self.hosts: dict[str, SshHost] = {}

    def env(self) -> dict[str, str]:
        """What a master (or the CLI) needs to see this lab instead of the machine's ~/.ssh."""
        return {"CORRAL_SSH_CONFIG": str(self.config), "CORRAL_KNOWN_HOSTS": str(self.known_hosts)}

    def add_host(self, alias: str, address: str, authorize: bool = True, trust: bool = True, sftp: bool = True,
                 options: str = "") -> SshHost:
        root = self.root / "hosts" / alias
        root.mkdir(parents=True)
        host_pub = keygen(root / "hostkey", f"hostkey-{alias}")
        remote = root / "remote"
        last_error: Exception | None = None
        for _ in range(5):
            host = SshHost(alias, address, free_port(address), root, host_pub, remote, sftp=sftp, options=options)
            if authorize:
                host.authorize(self.public_key)
            try:
                host.start()
                break
            except RuntimeError as exc:  # the port was taken between free_port() and sshd's bind
                last_error = exc
                host.stop()
        else:
            raise RuntimeError(f"could not start sshd for {alias}: {last_error}")
        if trust:
            with self.known_hosts.open("a") as f:
                f.write(host.known_hosts_line() + "\n")
        self.hosts[alias] = host
        return host

    def host_args(self, host: SshHost, *extra: str) -> list[str]:
        """`corral hosts add` arguments for this host: address, port, user, the lab's key, its remote dir."""
        return ["hosts", "add", host.alias, "--hostname", host.address, "--port", str(host.port),
                "--user", getpass.getuser(), "--identity", str(self.key), "--remote-dir", str(host.remote_dir), *extra]

    def stop(self) -> None:
        for host in self.hosts.values():
            host.stop()


def processes_in(directory: Path) -> list[int]:
    """Processes whose working directory is in `directory` (an agent runs, and its jobs start, in its remote dir)."""
    found = []
    prefix = str(directory.resolve())
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd == prefix or cwd.startswith(prefix + "/"):
                found.append(int(entry))
    return found


def kill_remote_agents(host: SshHost) -> None:
    """Kill whatever a test left running from this host's remote directory: the agent, its pool, its jobs."""
    if not host.remote_dir.exists():
        return
    for pid in processes_in(host.remote_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
