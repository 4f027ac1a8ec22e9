"""One host over SSH: connect, check its host key, find Python, upload the bundle, start the agent, tunnel, stop."""

from __future__ import annotations

import logging
import os
import select
import shlex
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import paramiko

from ..errors import DeployError, HostKeyChanged, HostKeyUnknown
from .bundle import Bundle
from .inventory import Host, default_identities, user_known_hosts

log = logging.getLogger(__name__)

MIN_PYTHON = (3, 8)
PYTHON_CANDIDATES = ("python3", "python3.13", "python3.12", "python3.11", "python3.10", "python3.9", "python3.8", "python")
CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0
KEEPALIVE_SECONDS = 5.0  # an SSH-level keepalive this often on every held connection
TCP_USER_TIMEOUT_MS = 20_000  # unacknowledged data this long (a partition) and the kernel drops the connection
RECONNECT_CAP_SECONDS = 10.0
STOP_GRACE_SECONDS = 10.0  # a hard stop waits this long for the agent's own cleanup, then SIGKILLs its group
LOG_TAIL_LINES = 20

Report = Callable[[str, str, str], None]  # (step, status, message); status: start ok skip wait info fail


def fail(host: Host, step: str, message: str, hint: str = "", log_tail: str = "",
         cls: type[DeployError] = DeployError) -> DeployError:
    """A DeployError whose one line names the host and the step."""
    return cls(f"{host.alias}: {step}: {message}", hint, host=host.alias, step=step, log_tail=log_tail)


def host_id(host: Host) -> str:
    """How known_hosts names this host: `name`, or `[name]:port` off port 22."""
    return host.hostname if host.port == 22 else f"[{host.hostname}]:{host.port}"


# ---- host keys ----------------------------------------------------------------------------------

class KnownHosts:
    """The user's known_hosts files (only read) and corral's own (where accepted keys go)."""

    _write_lock = threading.Lock()

    def __init__(self, corral_file: Path, user_files: list[Path] | None = None) -> None:
        self.corral_file = Path(corral_file)
        self.user_files = list(user_files) if user_files is not None else user_known_hosts()

    def files(self, host: Host) -> list[Path]:
        return [*self.user_files, *(Path(p) for p in host.known_hosts), self.corral_file]

    def load_into(self, client: paramiko.SSHClient, host: Host) -> None:
        for path in [*self.user_files, *(Path(p) for p in host.known_hosts)]:
            if path.is_file():
                try:
                    client.load_system_host_keys(str(path))
                except (OSError, paramiko.SSHException, ValueError) as exc:
                    raise fail(host, "hostkey", f"cannot read {path}: {exc}", "fix or move that known_hosts file") from None
        if self.corral_file.is_file():
            try:
                client.load_host_keys(str(self.corral_file))
            except (OSError, paramiko.SSHException, ValueError) as exc:
                raise fail(host, "hostkey", f"cannot read {self.corral_file}: {exc}", "fix or remove that file") from None

    def holder(self, host: Host) -> str:
        """The known_hosts file that names this host (for messages)."""
        for path in self.files(host):
            if path.is_file():
                keys = paramiko.HostKeys()
                try:
                    keys.load(str(path))
                except (OSError, paramiko.SSHException, ValueError):
                    continue
                if keys.lookup(host_id(host)) is not None:
                    return str(path)
        return str(self.corral_file)

    def add(self, name: str, key_type: str, key_base64: str) -> None:
        """Append an accepted key to corral's known_hosts (never to the user's)."""
        line = f"{name} {key_type} {key_base64}\n"
        with self._write_lock:
            self.corral_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            existing = self.corral_file.read_text() if self.corral_file.is_file() else ""
            if line in existing:
                return
            fd = os.open(str(self.corral_file), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as f:
                if existing and not existing.endswith("\n"):
                    f.write("\n")
                f.write(line)


class _RecordUnknown(paramiko.RejectPolicy):
    """paramiko's RejectPolicy, which also remembers the key it rejected, so the operator can be shown it."""

    def __init__(self) -> None:
        self.key: paramiko.PKey | None = None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.key = key
        super().missing_host_key(client, hostname, key)


# ---- connecting ------------------------------------------------------------------------------------

def _tcp(host: Host, timeout: float) -> socket.socket:
    where = f"{host.hostname}:{host.port}"
    try:
        sock = socket.create_connection((host.hostname, host.port), timeout=timeout)
    except socket.gaierror as exc:
        raise fail(host, "connect", f"cannot resolve {host.hostname!r} ({exc.strerror})", "check its hostname") from None
    except socket.timeout:
        raise fail(host, "connect", f"no answer from {where} within {timeout:g}s", "is the host up, and the port right?") from None
    except ConnectionRefusedError:
        raise fail(host, "connect", f"connection refused by {where}", "is sshd running there, on that port?") from None
    except OSError as exc:
        raise fail(host, "connect", f"cannot reach {where}: {exc.strerror or exc}", "is the host up and reachable?") from None
    # Notice a dead peer (host crash, partition) in seconds, not at TCP's default of many minutes.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3),
                        ("TCP_USER_TIMEOUT", TCP_USER_TIMEOUT_MS)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    return sock


def connect_client(host: Host, known: KnownHosts, timeout: float = CONNECT_TIMEOUT, sock: Any = None,
                   on_tcp: Callable[[], None] | None = None) -> paramiko.SSHClient:
    """An authenticated SSHClient, or a DeployError naming the step: connect, hostkey or auth.

    Unknown host keys raise HostKeyUnknown (with the key's details) and changed ones HostKeyChanged:
    paramiko's RejectPolicy decides, nothing is accepted silently.
    """
    missing = [p for p in host.identity if not Path(p).is_file()]
    if missing:
        raise fail(host, "auth", f"the identity file {missing[0]} does not exist",
                   "fix the host's identity (IdentityFile in ~/.ssh/config, or corral hosts add --identity)")
    if sock is None:
        sock = _tcp(host, timeout)
    if on_tcp is not None:
        on_tcp()
    client = paramiko.SSHClient()
    policy = _RecordUnknown()
    client.set_missing_host_key_policy(policy)
    known.load_into(client, host)
    identities = list(host.identity) or default_identities()
    try:
        client.connect(host.hostname, host.port, username=host.user, key_filename=identities or None,
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout, sock=sock,
                       allow_agent=bool(os.environ.get("SSH_AUTH_SOCK")), look_for_keys=False)
        return client
    except paramiko.BadHostKeyException as exc:
        client.close()
        holder = known.holder(host)
        raise fail(host, "hostkey",
                   f"the host key of {host_id(host)} has CHANGED: {holder} has {exc.expected_key.get_name()} "
                   f"{exc.expected_key.fingerprint}, the host offered {exc.key.get_name()} {exc.key.fingerprint}; refused",
                   f"if the host was reinstalled, delete its line from {holder} and deploy again; "
                   "otherwise someone may be intercepting the connection", cls=HostKeyChanged) from None
    except paramiko.PasswordRequiredException:
        client.close()
        raise fail(host, "auth", f"the key {', '.join(identities)} needs a passphrase",
                   "load it into ssh-agent (ssh-add) and deploy again") from None
    except paramiko.AuthenticationException as exc:
        client.close()
        keys = ", ".join(identities) or "no key files"
        raise fail(host, "auth", f"{host.target} refused our key ({keys}): {exc}",
                   f"add the public key to ~{host.user}/.ssh/authorized_keys on the host, or set the host's identity") from None
    except paramiko.SSHException as exc:
        client.close()
        if policy.key is not None:
            key = policy.key
            error = fail(host, "hostkey", f"unknown host key for {host_id(host)}: {key.get_name()} {key.fingerprint}",
                         "check the fingerprint with the host's owner, then deploy with --accept-new "
                         "(or accept it in the console)", cls=HostKeyUnknown)
            error.host_id, error.key_type, error.key_base64 = host_id(host), key.get_name(), key.get_base64()  # type: ignore[attr-defined]
            error.fingerprint = key.fingerprint  # type: ignore[attr-defined]
            raise error from None
        raise fail(host, "connect", f"the SSH handshake with {host.hostname}:{host.port} failed: {exc}",
                   "is it an SSH server?") from None
    except (socket.timeout, OSError, EOFError) as exc:
        client.close()
        raise fail(host, "connect", f"the connection to {host.hostname}:{host.port} broke: {exc or type(exc).__name__}",
                   "is the host up and reachable?") from None


class Link:
    """The master's SSH connection to one host: it runs commands, carries the agent's reverse tunnel,
    is kept alive, and is re-established by itself (with the same tunnel port) when it drops."""

    def __init__(self, host: Host, known: KnownHosts, master: tuple[str, int],
                 jump: Callable[[str], "Link"] | None = None,
                 on_state: Callable[["Link", str, str], None] | None = None,
                 timeout: float = CONNECT_TIMEOUT) -> None:
        self.host = host
        self.known = known
        self.master = master  # where tunnelled connections go: the master's own loopback address
        self.jump = jump
        self.on_state = on_state
        self.timeout = timeout
        self.lock = threading.RLock()
        self.client: paramiko.SSHClient | None = None
        self.remote_port: int | None = None
        self.state = "new"
        self.since = time.time()
        self.reconnects = 0
        self.last_error = ""
        self.closed = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_transport: paramiko.Transport | None = None
        self._shell: paramiko.Channel | None = None
        self._shell_transport: paramiko.Transport | None = None
        self._shell_lock = threading.Lock()

    # ---- the connection -------------------------------------------------------------------

    @property
    def transport(self) -> paramiko.Transport | None:
        client = self.client
        return client.get_transport() if client is not None else None

    def active(self) -> bool:
        transport = self.transport
        return transport is not None and transport.is_active()

    def _set_state(self, state: str, message: str = "") -> None:
        if state != self.state:
            self.state, self.since = state, time.time()
            if self.on_state is not None:
                self.on_state(self, state, message)

    def open(self, on_tcp: Callable[[], None] | None = None, message: str = "") -> None:
        """(Re)connect now, re-opening the tunnel port if the link has one; DeployError (HostKeyUnknown,
        HostKeyChanged...) if it cannot."""
        with self.lock:
            if self.client is not None:
                self.client.close()
                self.client = None
            sock = None
            if self.host.proxy_jump:
                sock = self._via_jump()
            client = connect_client(self.host, self.known, self.timeout, sock=sock, on_tcp=on_tcp)
            transport = client.get_transport()
            assert transport is not None
            transport.set_keepalive(KEEPALIVE_SECONDS)
            self.client = client
            if self.remote_port:
                try:
                    self.forward(self.remote_port)  # the port the running agent dials
                except DeployError:
                    client.close()  # connected but no tunnel (an old session may still hold the port)
                    self.client = None
                    raise
            self._set_state("up", message)

    def ensure(self, on_tcp: Callable[[], None] | None = None) -> bool:
        """Connected (opening only if needed); True when this call opened it."""
        with self.lock:
            if self.active():
                return False
            self.open(on_tcp)
            return True

    def _via_jump(self) -> Any:
        name = self.host.proxy_jump.split(",")[0].strip()
        if self.jump is None:
            raise fail(self.host, "connect", f"ProxyJump {name!r} is not supported here")
        jump = self.jump(name)
        jump.ensure()
        transport = jump.transport
        assert transport is not None
        try:
            return transport.open_channel("direct-tcpip", (self.host.hostname, self.host.port), ("127.0.0.1", 0),
                                          timeout=self.timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise fail(self.host, "connect", f"the jump host {name} could not reach {self.host.hostname}:{self.host.port}: {exc}",
                       "check the host's address as the jump host sees it") from None

    def close(self) -> None:
        self.closed.set()
        with self.lock:
            if self.client is not None:
                self.client.close()
                self.client = None
        self._set_state("closed")

    # ---- commands and files ----------------------------------------------------------------------

    def sh(self, script: str, step: str, timeout: float = COMMAND_TIMEOUT) -> tuple[int, str, str]:
        """Run a POSIX sh script in the link's own /bin/sh: (exit status, output, output).

        One shell per connection, fed on its stdin, so the user's login shell and its rc files (which
        can cost a sizeable fraction of a second) start once, not per command; each script runs in a
        subshell, so its `exit` or `cd` cannot harm the next one."""
        with self._shell_lock:
            channel = self._shell_channel(step, timeout)
            marker = f"__corral_end_{os.urandom(6).hex()}"
            try:
                channel.settimeout(timeout)
                channel.sendall(f"(\n{script}\n) </dev/null 2>&1; echo; echo \"{marker} $?\"\n".encode())
                buffer = bytearray()
                while True:
                    end = buffer.find(marker.encode())
                    if end >= 0 and buffer.find(b"\n", end) >= 0:
                        break
                    chunk = channel.recv(65536)
                    if not chunk:
                        raise EOFError("the remote shell exited")
                    buffer += chunk
            except socket.timeout:
                self._close_shell()
                raise fail(self.host, step, f"the host did not finish a command within {timeout:g}s") from None
            except (paramiko.SSHException, OSError, EOFError) as exc:
                self._close_shell()
                raise fail(self.host, step, f"the SSH connection failed while running a command: {exc or type(exc).__name__}",
                           "deploy again once the host is reachable") from None
        text = buffer.decode("utf-8", "replace")
        out, _, tail = text.rpartition(marker)
        status = int(tail.split()[0]) if tail.split() and tail.split()[0].isdigit() else 255
        out = out[:-1] if out.endswith("\n") else out  # the echo that ends any unterminated last line
        return status, out, out

    def _shell_channel(self, step: str, timeout: float) -> paramiko.Channel:
        transport = self.transport
        if transport is None or not transport.is_active():
            raise fail(self.host, step, "the SSH connection is down", "deploy again once the host is reachable")
        channel = self._shell
        if channel is not None and self._shell_transport is transport and not channel.closed \
                and not channel.exit_status_ready():
            return channel
        self._close_shell()
        try:
            channel = transport.open_session(timeout=timeout)
            channel.exec_command("exec /bin/sh")
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise fail(self.host, step, f"cannot start a shell on the host: {exc or type(exc).__name__}") from None
        self._shell, self._shell_transport = channel, transport
        return channel

    def _close_shell(self) -> None:
        if self._shell is not None:
            self._shell.close()
        self._shell = None

    def sftp(self, step: str) -> paramiko.SFTPClient:
        """The link's SFTP session (opened on first use, again after a reconnect): no shell, no login
        scripts, so file work and process checks cost one round trip each."""
        with self.lock:
            transport = self.transport
            if transport is None or not transport.is_active():
                raise fail(self.host, step, "the SSH connection is down", "deploy again once the host is reachable")
            if self._sftp is not None and self._sftp_transport is transport and not self._sftp.sock.closed:
                return self._sftp
            try:
                sftp = paramiko.SFTPClient.from_transport(transport)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise fail(self.host, step, f"the host offers no SFTP ({exc})",
                           "enable it in the host's sshd_config (Subsystem sftp ...)") from None
            assert sftp is not None
            self._sftp, self._sftp_transport = sftp, transport
            return sftp

    def put(self, data: bytes, path: str, step: str, mode: int = 0o644) -> None:
        """Write a file over SFTP atomically: a temporary name, its mode set before any byte, then a rename."""
        sftp = self.sftp(step)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with sftp.open(tmp, "wb") as f:
                f.chmod(mode)
                f.set_pipelined(True)
                f.write(data)
            sftp.posix_rename(tmp, path)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise fail(self.host, step, f"cannot write {path} over SFTP: {exc}",
                       "check the remote directory's owner, mode and free space") from None

    def read(self, path: str, step: str, limit: int = 1 << 20) -> bytes | None:
        """A remote file's bytes (its last `limit`), or None if it does not exist."""
        sftp = self.sftp(step)
        try:
            with sftp.open(path, "rb") as f:
                size = f.stat().st_size or 0
                if size > limit:
                    f.seek(size - limit)
                return f.read()
        except FileNotFoundError:
            return None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise fail(self.host, step, f"cannot read {path} over SFTP: {exc}") from None

    def remove(self, paths: list[str], step: str) -> None:
        sftp = self.sftp(step)
        for path in paths:
            try:
                sftp.remove(path)
            except FileNotFoundError:
                pass
            except (OSError, paramiko.SSHException, EOFError) as exc:
                raise fail(self.host, step, f"cannot remove {path} over SFTP: {exc}") from None

    # ---- the reverse tunnel ------------------------------------------------------------------------

    def forward(self, port: int = 0) -> int:
        """Ask sshd to listen on the host's 127.0.0.1:port (0: any) and hand us each connection."""
        transport = self.transport
        if transport is None:
            raise fail(self.host, "tunnel", "the SSH connection is down")
        try:
            got = transport.request_port_forward("127.0.0.1", port, handler=self._on_channel)
        except paramiko.SSHException as exc:
            raise fail(self.host, "tunnel", f"sshd refused to forward 127.0.0.1:{port or 'any'} back to the master: {exc}",
                       "allow it in the host's sshd_config (AllowTcpForwarding yes), or deploy with --direct") from None
        self.remote_port = int(got)
        return self.remote_port

    def _on_channel(self, channel: paramiko.Channel, origin: Any, server: Any) -> None:
        """paramiko's transport thread calls this per tunnelled connection: pump it in a thread of its own."""
        threading.Thread(target=self._pump, args=(channel,), name=f"tunnel-{self.host.alias}", daemon=True).start()

    def _pump(self, channel: paramiko.Channel) -> None:
        try:
            sock = socket.create_connection(self.master, timeout=5)
        except OSError as exc:
            log.warning("%s: tunnel: cannot reach the master at %s:%s: %s", self.host.alias, *self.master, exc)
            channel.close()
            return
        try:
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small request/reply messages
            while not self.closed.is_set():
                ready, _, _ = select.select([sock, channel], [], [], 1.0)
                if sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        break
                    channel.sendall(data)
                if channel in ready:
                    data = channel.recv(65536)
                    if not data:
                        break
                    sock.sendall(data)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            log.debug("%s: a tunnelled connection ended: %s", self.host.alias, exc)
        finally:
            channel.close()
            sock.close()

    # ---- keepalive and re-establishing -------------------------------------------------------------

    def supervise(self) -> None:
        """Watch the connection from now on; re-establish it (and its tunnel port) whenever it drops."""
        with self.lock:
            if self._supervisor is None:
                self._supervisor = threading.Thread(target=self._watch, name=f"link-{self.host.alias}", daemon=True)
                self._supervisor.start()

    def _watch(self) -> None:
        backoff = 0.5
        while not self.closed.wait(0.25):
            if self.active():
                backoff = 0.5
                continue
            self._set_state("down", "the SSH connection dropped")
            while not self.closed.is_set():
                try:
                    with self.lock:
                        if self.closed.is_set():
                            return
                        self.open(message="re-established" + (f", tunnel port {self.remote_port}" if self.remote_port else ""))
                    self.reconnects += 1
                    self.last_error = ""
                    break
                except DeployError as exc:
                    self.last_error = exc.message
                    self._set_state("down", exc.message)
                    if self.closed.wait(backoff):
                        return
                    backoff = min(backoff * 2, RECONNECT_CAP_SECONDS)

    def wire(self) -> dict[str, Any]:
        return {"alias": self.host.alias, "target": self.host.target, "state": self.state, "since": self.since,
                "remote_port": self.remote_port, "reconnects": self.reconnects, "error": self.last_error}


# ---- what is on the host ---------------------------------------------------------------------------

def remote_dir_expr(path: str) -> str:
    """A shell expression for the remote directory: ~ expands to $HOME, the rest is quoted."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


# Prints "VERSION EXECUTABLE" and succeeds only for 3.8+; must itself run on any Python, 2.7 included.
_PY_VERSION = ("import sys; print('%d.%d.%d %s' % (tuple(sys.version_info[:3]) + (sys.executable,))); "
               "sys.exit(0 if sys.version_info >= (3, 8) else 1)")


@dataclass
class Probe:
    """One round trip's worth of facts about the host."""

    dir: str = ""
    dir_error: str = ""
    bundles: list[str] = field(default_factory=list)
    pid: int = 0  # the agent recorded in agent.pid, if that process is alive
    argv: list[str] = field(default_factory=list)  # its command line
    pythons: list[tuple[str, str]] = field(default_factory=list)  # (path, version) of each found
    executables: dict[str, str] = field(default_factory=dict)  # path -> its sys.executable (past shims)
    missing: list[str] = field(default_factory=list)


def probe(link: Link, python: str, step: str = "python", hint: str = "") -> Probe:
    """Create the remote directory (0700) if needed; list bundles, the running agent and the Pythons
    (the configured one; else `hint`, the interpreter chosen last time, then the usual names)."""
    candidates = [python] if python else list(dict.fromkeys([hint, *PYTHON_CANDIDATES] if hint else PYTHON_CANDIDATES))
    script = f"""
D={remote_dir_expr(link.host.remote_dir)}
if [ ! -d "$D" ]; then mkdir -p -m 700 "$D" 2>/dev/null; fi
if cd "$D" 2>/dev/null && [ -w . ]; then
  echo "dir $(pwd -P)"
  for f in agent-*.pyz; do [ -f "$f" ] && echo "bundle $f"; done
  if [ -f agent.pid ]; then
    p=$(cat agent.pid)
    if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then echo "pid $p"; echo "argv $(tr '\\000' '\\037' < /proc/$p/cmdline)"; fi
  fi
else
  echo "direrror $D"
fi
for p in {' '.join(shlex.quote(c) for c in candidates)}; do
  if path=$(command -v "$p" 2>/dev/null) && [ -n "$path" ]; then
    if v=$("$path" -c {shlex.quote(_PY_VERSION)} 2>/dev/null); then good=1; else good=; fi
    v=$(echo "$v" | head -n 1)
    echo "python $path ${{v:-?}}"
    [ -n "$good" ] && break
  else
    echo "missing $p"
  fi
done
exit 0
"""
    status, out, err = link.sh(script, step)
    if status != 0:
        raise fail(link.host, step, f"probing the host failed (exit {status}): {err.strip()[-300:]}")
    found = Probe()
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "dir":
            found.dir = rest
        elif kind == "direrror":
            found.dir_error = rest
        elif kind == "bundle":
            found.bundles.append(rest)
        elif kind == "pid" and rest.isdigit():
            found.pid = int(rest)
        elif kind == "argv":
            found.argv = [a for a in rest.split("\x1f") if a]
        elif kind == "python":
            path, _, rest = rest.partition(" ")
            version, _, executable = rest.partition(" ")
            found.pythons.append((path, version))
            found.executables[path] = executable or path
        elif kind == "missing":
            found.missing.append(rest)
    return found


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(".")[:3])
    except ValueError:
        return ()


def choose_python(host: Host, found: Probe) -> tuple[str, str]:
    """The (path, version) of the Python to run the agent with, or a DeployError saying why none will do."""
    if host.python:
        if not found.pythons:
            raise fail(host, "python", f"no Python at {host.python} (not found on the host)",
                       "fix the host's python setting, or clear it to let corral find one")
        path, version = found.pythons[0]
        if _version(version) < MIN_PYTHON:
            shown = version if version != "?" else "unknown (it did not run)"
            raise fail(host, "python", f"Python {shown} at {path} is too old: the agent needs 3.8 or newer",
                       "install Python 3.8+ there, or point the host's python setting at one")
        return path, version
    good = [(p, v) for p, v in found.pythons if _version(v) >= MIN_PYTHON]
    if good:
        path, version = good[0]
        return found.executables.get(path, path), version  # the interpreter itself, not a shim in front of it
    if found.pythons:
        seen = ", ".join(f"{p} is {v}" for p, v in found.pythons)
        raise fail(host, "python", f"no Python 3.8 or newer on the host ({seen})",
                   "install Python 3.8+ there, or set the host's python to one")
    raise fail(host, "python", f"no Python on the host (tried {', '.join(PYTHON_CANDIDATES)} on its PATH)",
               "install python3 (3.8+) there, or set the host's python to its path")


def log_tail(link: Link, directory: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of the agent's log on the host ("" if there is none or the host is gone)."""
    try:
        data = link.read(f"{directory}/agent.log", "log", limit=64 * 1024)
    except DeployError:
        return ""
    if not data:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:]) + "\n"


def running_agent(link: Link, step: str) -> tuple[str, int]:
    """(the remote directory, the pid of the agent running from it or 0); ("", 0) if the directory is absent."""
    script = f"""
D={remote_dir_expr(link.host.remote_dir)}
cd "$D" 2>/dev/null || exit 0
echo "dir $(pwd -P)"
if [ -f agent.pid ]; then p=$(cat agent.pid); if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then echo "pid $p"; fi; fi
exit 0
"""
    _, out, _ = link.sh(script, step)
    directory, pid = "", 0
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "dir":
            directory = rest
        elif kind == "pid" and rest.isdigit():
            pid = int(rest)
    return directory, pid


def quick_look(link: Link, directory: str, step: str) -> tuple[int, list[str]]:
    """The agent recorded in `directory` and its command line, read over SFTP alone (no shell): (0, []) if none runs."""
    raw = link.read(f"{directory}/agent.pid", step, limit=64)
    pid = int(raw) if raw and raw.strip().isdigit() else 0
    if not pid or not alive(link, pid, step):
        return 0, []
    data = link.read(f"/proc/{pid}/cmdline", step, limit=64 * 1024) or b""
    return pid, [a for a in data.decode("utf-8", "replace").split("\0") if a]


def alive(link: Link, pid: int, step: str) -> bool:
    """Whether the process runs (a zombie does not count), read from the host's /proc over SFTP."""
    try:
        stat = link.read(f"/proc/{pid}/stat", step, limit=4096)
    except DeployError:
        status, _, _ = link.sh(f"kill -0 {pid} 2>/dev/null", step, timeout=10)  # no /proc to read
        return status == 0
    if stat is None:
        return False
    state = stat.rsplit(b")", 1)[-1].split()[:1]
    return state != [b"Z"]


# ---- the agent's command line: what we start, and how to read back what runs ------------------------

@dataclass(frozen=True)
class Launch:
    """How the agent is to be started: compared with the running one to decide no-op or upgrade."""

    python: str
    bundle: str
    name: str
    slots: int | None
    tags: tuple[str, ...]
    started_by: str
    connect: str = ""  # HOST:PORT the agent dials (the tunnel's end on the host, or the master)

    def argv(self, directory: str) -> list[str]:
        args = [self.python, f"{directory}/{self.bundle}", "--connect", self.connect,
                "--authkey-file", f"{directory}/authkey", "--name", self.name]
        if self.slots:
            args += ["--slots", str(self.slots)]
        if self.tags:
            args += ["--tags", ",".join(self.tags)]
        return args + ["--started-by", self.started_by]

    @classmethod
    def parse(cls, argv: list[str]) -> "Launch | None":
        """The Launch of a running agent's command line (None if it is not one of ours)."""
        if len(argv) < 2 or not argv[1].endswith(".pyz"):
            return None
        opts: dict[str, str] = {}
        rest = argv[2:]
        for flag, value in zip(rest[::2], rest[1::2]):
            opts[flag] = value
        slots = opts.get("--slots")
        return cls(python=argv[0], bundle=os.path.basename(argv[1]), name=opts.get("--name", ""),
                   slots=int(slots) if slots and slots.isdigit() else None,
                   tags=tuple(t for t in opts.get("--tags", "").split(",") if t),
                   started_by=opts.get("--started-by", ""), connect=opts.get("--connect", ""))

    def same_agent(self, other: "Launch | None", pythons: tuple[str, ...] = ()) -> bool:
        """Same bundle, Python (this one, or any of `pythons`: what it execs into) and settings; the
        address it dials is checked apart."""
        return other is not None and other.python in (self.python, *pythons) and \
            (self.bundle, self.name, self.slots, self.tags, self.started_by) == \
            (other.bundle, other.name, other.slots, other.tags, other.started_by)


def start_agent(link: Link, directory: str, launch: Launch) -> int:
    """Start the agent detached from the SSH session (its own session, stdio on its log); its pid."""
    args = " ".join(shlex.quote(a) for a in launch.argv(directory))
    script = f"""
cd {shlex.quote(directory)} || exit 3
if [ -f agent.log ]; then mv -f agent.log agent.log.1; fi
S=""; if command -v setsid >/dev/null 2>&1; then S=setsid; fi
$S {args} </dev/null >agent.log 2>&1 &
echo $! > agent.pid
echo "pid $!"
"""
    status, out, err = link.sh(script, "start")
    pid = next((int(line.split()[1]) for line in out.splitlines() if line.startswith("pid ") and line.split()[1].isdigit()), 0)
    if status != 0 or not pid:
        raise fail(link.host, "start", f"could not start the agent (exit {status}): {err.strip()[-300:]}")
    return pid


def kill_agent(link: Link, pid: int, drain: bool, step: str) -> None:
    """Signal the agent: SIGTERM drains it; SIGINT then SIGTERM (two distinct signals, so neither is
    coalesced) make it kill its jobs and leave."""
    command = f"kill -TERM {pid}" if drain else f"kill -INT {pid}; kill -TERM {pid}"
    link.sh(command + " 2>/dev/null; true", step, timeout=10)


def wait_gone(link: Link, pid: int, timeout: float | None, step: str, tick: Callable[[], None] | None = None) -> bool:
    """Poll until the process is gone (True) or `timeout` passes (False)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while alive(link, pid, step):
        if deadline is not None and time.monotonic() > deadline:
            return False
        if tick is not None:
            tick()
        time.sleep(0.2)
    return True


def stop_remote(link: Link, pid: int, drain: bool, report: Report, drain_timeout: float | None,
                tick: Callable[[], None] | None = None) -> None:
    """Stop a running agent: drained (its jobs finish first) or at once (its jobs are killed); SIGKILL last."""
    step = "stop"
    kill_agent(link, pid, drain, step)
    report(step, "info", f"draining agent pid {pid}: running jobs finish first" if drain else
           f"stopping agent pid {pid}: its running jobs are killed")
    if wait_gone(link, pid, drain_timeout if drain else STOP_GRACE_SECONDS, step, tick):
        return
    if drain:
        raise fail(link.host, step, f"the agent (pid {pid}) is still draining after {drain_timeout:g}s",
                   f"wait, or stop it at once with `corral stop {link.host.alias}`")
    link.sh(f"kill -KILL -{pid} 2>/dev/null; kill -KILL {pid} 2>/dev/null; true", step, timeout=10)
    if not wait_gone(link, pid, 5.0, step):
        raise fail(link.host, step, f"the agent (pid {pid}) survived SIGKILL", "look at the host")


def remove_files(link: Link, directory: str) -> None:
    """Remove what corral put in the remote directory, and the directory itself if that leaves it empty."""
    d = shlex.quote(directory)
    script = (f"cd {d} 2>/dev/null || exit 0\n"
              "rm -f agent-*.pyz agent-*.pyz.tmp* agent.log agent.log.1 authkey authkey.tmp* agent.pid\n"
              f"cd / && rmdir {d} 2>/dev/null; true\n")
    status, _, err = link.sh(script, "remove")
    if status != 0:
        raise fail(link.host, "remove", f"could not remove the agent's files from {directory}: {err.strip()[-200:]}")


# ---- one host's deploy -----------------------------------------------------------------------------

@dataclass(frozen=True)
class DeployPlan:
    """What one deploy asks of every host (plain values, from the caller's options)."""

    authkey: bytes
    master: tuple[str, int]
    ready_timeout: float = 30.0
    upgrade_drain_timeout: float = 120.0


def _is_loopback(name: str) -> bool:
    return name == "localhost" or name.startswith("127.") or name == "::1"


def deploy_host(link: Link, bundle: Bundle, plan: DeployPlan, report: Report,
                ask_host_key: Callable[[HostKeyUnknown], bool],
                registered: Callable[[str, int], bool],
                on_upgrade: Callable[[str], None] | None = None,
                previous: dict[str, Any] | None = None,
                on_replaced: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """connect → hostkey → auth → python → upload → tunnel → authkey → start → ready, reporting each step.

    on_upgrade(alias) is called before an agent that must be replaced is drained, on_replaced(alias,
    reason) once it is gone (so the master frees its name for the new one).
    `previous` is what the master recorded of its last deploy there (dir, python): with it, an agent
    already running as asked is recognised over SFTP alone, and the Python chosen then is tried first.
    Returns {"pid", "port", "mode", "bundle", "dir", "python", "noop"}; raises DeployError naming the
    failing step.
    """
    host = link.host
    mode = "direct" if host.direct else "tunnel"
    # connect, hostkey, auth
    if link.active():
        for step in ("connect", "hostkey", "auth"):
            report(step, "skip", f"the master already holds a connection to {host.target}")
    else:
        report("connect", "start", f"{host.target}" + (f" via {host.proxy_jump}" if host.proxy_jump else ""))
        on_tcp = lambda: report("connect", "ok", f"{host.hostname}:{host.port} answers")  # noqa: E731
        try:
            link.ensure(on_tcp=on_tcp)
        except HostKeyUnknown as exc:
            if not ask_host_key(exc):
                raise
            link.known.add(exc.host_id, exc.key_type, exc.key_base64)  # type: ignore[attr-defined]
            link.ensure()
        report("hostkey", "ok", f"known: {link.known.holder(host)}")
        report("auth", "ok", f"as {host.user}")

    # The quick path: the agent deployed last time still runs exactly as asked.
    before = previous or {}
    if before.get("dir") and before.get("python") and before.get("python_setting", "") == host.python:
        pid, argv = quick_look(link, before["dir"], "python")
        wanted = Launch(python=before["python"], bundle=bundle.name, name=host.alias, slots=host.slots,
                        tags=host.tags, started_by=f"ssh:{mode}")
        running = Launch.parse(argv) if pid else None
        if pid and wanted.same_agent(running) and running is not None and _already_connected(link, running, plan, mode):
            report("python", "skip", f"agent pid {pid} runs on {running.python}")
            for step in ("upload", "tunnel", "authkey", "start"):
                report(step, "skip", f"agent pid {pid} already runs {bundle.name}")
            _wait_ready(link, pid, before["dir"], plan.ready_timeout, report, registered, kill_on_fail=False)
            return {"pid": pid, "port": link.remote_port if mode == "tunnel" else None, "mode": mode,
                    "bundle": bundle.short, "dir": before["dir"], "python": before["python"], "noop": True}

    # python (one round trip also tells of the remote dir, its bundles and any running agent)
    report("python", "start", host.python or "looking for python3 (3.8+)")
    found = probe(link, host.python, hint="" if host.python else str(before.get("python") or ""))
    python, version = choose_python(host, found)
    report("python", "ok", f"Python {version} at {python}")
    if found.dir_error or not found.dir:
        raise fail(host, "upload", f"cannot use the remote directory {host.remote_dir} ({found.dir_error or 'no answer'})",
                   "set the host's remote_dir to a writable directory")
    directory = found.dir

    launch = Launch(python=python, bundle=bundle.name, name=host.alias, slots=host.slots, tags=host.tags,
                    started_by=f"ssh:{mode}")
    running = Launch.parse(found.argv) if found.pid else None
    if found.pid and launch.same_agent(running, tuple(found.executables.values())):
        assert running is not None
        if _already_connected(link, running, plan, mode):
            for step in ("upload", "tunnel", "authkey", "start"):
                report(step, "skip", f"agent pid {found.pid} already runs {bundle.name}")
            _wait_ready(link, found.pid, directory, plan.ready_timeout, report, registered, kill_on_fail=False)
            return {"pid": found.pid, "port": link.remote_port if mode == "tunnel" else None, "mode": mode,
                    "bundle": bundle.short, "dir": directory, "python": python, "noop": True}
    if found.pid:
        why = "a new bundle" if running is None or running.bundle != bundle.name else "new settings"
        report("upload", "info", f"upgrading agent pid {found.pid} ({why}): draining it first")
        if on_upgrade is not None:
            on_upgrade(host.alias)
        stop_remote(link, found.pid, True, report, plan.upgrade_drain_timeout)
        if on_replaced is not None:
            on_replaced(host.alias, f"replaced by a new deploy ({why})")

    # upload
    if bundle.name in found.bundles:
        report("upload", "skip", f"{bundle.name} is already there")
    else:
        report("upload", "start", f"{bundle.name} ({len(bundle.data) // 1024} KiB) to {directory}")
        link.put(bundle.data, f"{directory}/{bundle.name}", "upload")
        report("upload", "ok", f"{directory}/{bundle.name}")

    # tunnel (or the master's own address with --direct)
    if mode == "tunnel":
        if link.remote_port is None:
            link.forward(0)
        connect = f"127.0.0.1:{link.remote_port}"
        report("tunnel", "ok", f"{host.alias}'s 127.0.0.1:{link.remote_port} → master {plan.master[0]}:{plan.master[1]}")
    else:
        connect = _direct_address(link, plan)
        report("tunnel", "skip", f"--direct: the agent dials the master at {connect}")
    launch = Launch(**{**launch.__dict__, "connect": connect})

    # authkey: a 0600 file beside the bundle, never on a command line
    link.put(plan.authkey + b"\n", f"{directory}/authkey", "authkey", mode=0o600)
    report("authkey", "ok", f"{directory}/authkey (0600)")

    # start, detached, then wait for it to register with the master
    pid = start_agent(link, directory, launch)
    report("start", "ok", f"pid {pid}")
    _wait_ready(link, pid, directory, plan.ready_timeout, report, registered, kill_on_fail=True)
    stale = [b for b in found.bundles if b != bundle.name]
    if stale:
        link.remove([f"{directory}/{b}" for b in stale], "ready")
    return {"pid": pid, "port": link.remote_port if mode == "tunnel" else None, "mode": mode,
            "bundle": bundle.short, "dir": directory, "python": python, "noop": False}


def _already_connected(link: Link, running: Launch, plan: DeployPlan, mode: str) -> bool:
    """Whether the running agent dials where it should (re-opening its tunnel port if we lost it)."""
    if mode == "direct":
        return running.connect == _direct_address(link, plan)
    host, _, port = running.connect.rpartition(":")
    if host != "127.0.0.1" or not port.isdigit():
        return False
    if link.remote_port == int(port):
        return True
    if link.remote_port is None:
        try:
            link.forward(int(port))
            return True
        except DeployError as exc:
            log.info("%s: cannot re-open tunnel port %s: %s", link.host.alias, port, exc)
    return False


def _direct_address(link: Link, plan: DeployPlan) -> str:
    host, port = plan.master
    if host in ("0.0.0.0", "::", ""):
        transport = link.transport
        assert transport is not None
        host = transport.sock.getsockname()[0]  # our address on the route to that host
    elif _is_loopback(host) and not _is_loopback(link.host.hostname):
        raise fail(link.host, "tunnel", f"--direct needs a master the host can reach, but it listens on {host} only",
                   "start it with `corral master --listen 0.0.0.0:PORT --allow-remote`, or deploy without --direct")
    return f"{host}:{port}"


def _wait_ready(link: Link, pid: int, directory: str, timeout: float, report: Report,
                registered: Callable[[str, int], bool], kill_on_fail: bool) -> None:
    """The handshake: the agent has registered with the master. It dying, or the timeout, is a failure."""
    host = link.host
    report("ready", "start", f"waiting up to {timeout:g}s for agent pid {pid} to register")
    started = time.monotonic()
    next_check = started + 0.5
    while not registered(host.alias, pid):
        now = time.monotonic()
        if now >= next_check:
            next_check = now + 0.5
            if not alive(link, pid, "ready"):
                raise fail(host, "ready", f"the agent (pid {pid}) exited before it said ready",
                           f"see its log, {directory}/agent.log", log_tail=log_tail(link, directory))
        if now - started > timeout:
            tail = log_tail(link, directory)
            if kill_on_fail:
                link.sh(f"kill -KILL {pid} 2>/dev/null; true", "ready", timeout=10)
            raise fail(host, "ready", f"the agent (pid {pid}) never said ready within {timeout:g}s",
                       f"see its log, {directory}/agent.log", log_tail=tail)
        time.sleep(0.05)
    report("ready", "ok", f"agent {host.alias} (pid {pid}) registered in {time.monotonic() - started:.2f}s")
