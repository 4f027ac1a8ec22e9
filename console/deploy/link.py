"""One held SSH connection to a host: connect, the jump host before it, commands and files over it, the reverse
tunnel, keepalive and re-establishing it when it drops."""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import paramiko

from ..errors import DeployError, HostKeyChanged
from .hostkeys import KnownHosts, RecordingRejectPolicy, host_id, unknown_key_error
from .inventory import Host, default_identities

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0
KEEPALIVE_SECONDS = 5.0  # an SSH-level keepalive this often on every held connection
TCP_USER_TIMEOUT_MS = 20_000  # unacknowledged data this long (a partition) and the kernel drops the connection
RECONNECT_CAP_SECONDS = 10.0


class ShellResult(NamedTuple):
    """What a script run over the link's shell gave: its exit status and its output (stdout and stderr)."""

    status: int
    output: str


# ---- connecting ------------------------------------------------------------------------------------

def _tcp(host: Host, timeout: float) -> socket.socket:
    where = f"{host.hostname}:{host.port}"
    try:
        sock = socket.create_connection((host.hostname, host.port), timeout=timeout)
    except socket.gaierror as exc:
        raise DeployError.at(host.alias, "connect", f"cannot resolve {host.hostname!r} ({exc.strerror})", "check its hostname") from None
    except socket.timeout:
        raise DeployError.at(host.alias, "connect", f"no answer from {where} within {timeout:g}s", "is the host up, and the port right?") from None
    except ConnectionRefusedError:
        raise DeployError.at(host.alias, "connect", f"connection refused by {where}", "is sshd running there, on that port?") from None
    except OSError as exc:
        raise DeployError.at(host.alias, "connect", f"cannot reach {where}: {exc.strerror or exc}", "is the host up and reachable?") from None
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
        raise DeployError.at(host.alias, "auth", f"the identity file {missing[0]} does not exist",
                   "fix the host's identity (IdentityFile in ~/.ssh/config, or corral hosts add --identity)")
    if sock is None:
        sock = _tcp(host, timeout)
    if on_tcp is not None:
        on_tcp()
    client = paramiko.SSHClient()
    policy = RecordingRejectPolicy()
    client.set_missing_host_key_policy(policy)
    known.load_into(client, host)
    identities = list(host.identity) or default_identities()
    try:
        # paramiko takes a list of key files, though its stubs say one
        client.connect(host.hostname, host.port, username=host.user, key_filename=identities or None,  # type: ignore[arg-type]
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout, sock=sock,
                       allow_agent=bool(os.environ.get("SSH_AUTH_SOCK")), look_for_keys=False)
        return client
    except paramiko.BadHostKeyException as exc:
        client.close()
        holder = known.holder(host)
        raise HostKeyChanged.at(host.alias, "hostkey",
                   f"the host key of {host_id(host)} has CHANGED: {holder} has {exc.expected_key.get_name()} "
                   f"{exc.expected_key.fingerprint}, the host offered {exc.key.get_name()} {exc.key.fingerprint}; refused",
                   f"if the host was reinstalled, delete its line from {holder} and deploy again; "
                   "otherwise someone may be intercepting the connection") from None
    except paramiko.PasswordRequiredException:
        client.close()
        raise DeployError.at(host.alias, "auth", f"the key {', '.join(identities)} needs a passphrase",
                   "load it into ssh-agent (ssh-add) and deploy again") from None
    except paramiko.AuthenticationException as exc:
        client.close()
        keys = ", ".join(identities) or "no key files"
        raise DeployError.at(host.alias, "auth", f"{host.target} refused our key ({keys}): {exc}",
                   f"add the public key to ~{host.user}/.ssh/authorized_keys on the host, or set the host's identity") from None
    except paramiko.SSHException as exc:
        client.close()
        if policy.key is not None:
            raise unknown_key_error(host, policy.key) from None
        raise DeployError.at(host.alias, "connect", f"the SSH handshake with {host.hostname}:{host.port} failed: {exc}",
                   "is it an SSH server?") from None
    except (socket.timeout, OSError, EOFError) as exc:
        client.close()
        raise DeployError.at(host.alias, "connect", f"the connection to {host.hostname}:{host.port} broke: {exc or type(exc).__name__}",
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
            raise DeployError.at(self.host.alias, "connect", f"ProxyJump {name!r} is not supported here")
        jump = self.jump(name)
        jump.ensure()
        transport = jump.transport
        assert transport is not None
        try:
            return transport.open_channel("direct-tcpip", (self.host.hostname, self.host.port), ("127.0.0.1", 0),
                                          timeout=self.timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise DeployError.at(self.host.alias, "connect", f"the jump host {name} could not reach {self.host.hostname}:{self.host.port}: {exc}",
                       "check the host's address as the jump host sees it") from None

    def close(self) -> None:
        self.closed.set()
        with self.lock:
            if self.client is not None:
                self.client.close()
                self.client = None
        self._set_state("closed")

    # ---- commands and files ----------------------------------------------------------------------

    def sh(self, script: str, step: str, timeout: float = COMMAND_TIMEOUT) -> ShellResult:
        """Run a POSIX sh script in the link's own /bin/sh: its exit status and output (stderr joined to stdout).

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
                raise DeployError.at(self.host.alias, step, f"the host did not finish a command within {timeout:g}s") from None
            except (paramiko.SSHException, OSError, EOFError) as exc:
                self._close_shell()
                raise DeployError.at(self.host.alias, step, f"the SSH connection failed while running a command: {exc or type(exc).__name__}",
                           "deploy again once the host is reachable") from None
        text = buffer.decode("utf-8", "replace")
        out, _, tail = text.rpartition(marker)
        status = int(tail.split()[0]) if tail.split() and tail.split()[0].isdigit() else 255
        out = out[:-1] if out.endswith("\n") else out  # the echo that ends any unterminated last line
        return ShellResult(status, out)

    def _shell_channel(self, step: str, timeout: float) -> paramiko.Channel:
        transport = self.transport
        if transport is None or not transport.is_active():
            raise DeployError.at(self.host.alias, step, "the SSH connection is down", "deploy again once the host is reachable")
        channel = self._shell
        if channel is not None and self._shell_transport is transport and not channel.closed \
                and not channel.exit_status_ready():
            return channel
        self._close_shell()
        try:
            channel = transport.open_session(timeout=timeout)
            channel.exec_command("exec /bin/sh")
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise DeployError.at(self.host.alias, step, f"cannot start a shell on the host: {exc or type(exc).__name__}") from None
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
                raise DeployError.at(self.host.alias, step, "the SSH connection is down", "deploy again once the host is reachable")
            if self._sftp is not None and self._sftp_transport is transport and not self._sftp.sock.closed:
                return self._sftp
            try:
                sftp = paramiko.SFTPClient.from_transport(transport)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise DeployError.at(self.host.alias, step, f"the host offers no SFTP ({exc})",
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
            raise DeployError.at(self.host.alias, step, f"cannot write {path} over SFTP: {exc}",
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
            raise DeployError.at(self.host.alias, step, f"cannot read {path} over SFTP: {exc}") from None

    def remove(self, paths: list[str], step: str) -> None:
        sftp = self.sftp(step)
        for path in paths:
            try:
                sftp.remove(path)
            except FileNotFoundError:
                pass
            except (OSError, paramiko.SSHException, EOFError) as exc:
                raise DeployError.at(self.host.alias, step, f"cannot remove {path} over SFTP: {exc}") from None

    # ---- the reverse tunnel ------------------------------------------------------------------------

    def forward(self, port: int = 0) -> int:
        """Ask sshd to listen on the host's 127.0.0.1:port (0: any) and hand us each connection."""
        transport = self.transport
        if transport is None:
            raise DeployError.at(self.host.alias, "tunnel", "the SSH connection is down")
        try:
            got = transport.request_port_forward("127.0.0.1", port, handler=self._on_channel)
        except paramiko.SSHException as exc:
            raise DeployError.at(self.host.alias, "tunnel", f"sshd refused to forward 127.0.0.1:{port or 'any'} back to the master: {exc}",
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
                watched: list[Any] = [sock, channel]
                ready, _, _ = select.select(watched, [], [], 1.0)
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

