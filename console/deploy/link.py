"""One held SSH connection to a host: connect, the jump host before it, commands and files over it, the reverse
tunnel, keepalive and re-establishing it when it drops."""

from __future__ import annotations

import hashlib
import logging
import os
import select
import shlex
import socket
import threading
import time
from typing import Any, Callable, NamedTuple

import paramiko

from ..errors import DeployError
from . import hostcerts
from .hostkeys import KnownHosts
from .inventory import Host

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0
KEEPALIVE_SECONDS = 5.0  # an SSH-level keepalive this often on every held connection
TCP_USER_TIMEOUT_MS = 20_000  # unacknowledged data this long (a partition) and the kernel drops the connection
RECONNECT_CAP_SECONDS = 10.0
MAX_HOPS = 8  # jump hosts in a chain, at most


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


def _proxy_command(host: Host) -> paramiko.ProxyCommand:
    """ProxyCommand as ssh runs it: by the user's shell, `exec`ed, its stdin and stdout the connection."""
    shell = os.environ.get("SHELL") or "/bin/sh"
    try:
        return paramiko.ProxyCommand(shlex.join([shell, "-c", "exec " + host.proxy_command]))
    except (OSError, paramiko.SSHException) as exc:
        raise DeployError.at(host.alias, "connect", f"cannot run its ProxyCommand ({host.proxy_command}): {exc}",
                             "fix ProxyCommand in the ssh config") from None


def connect_transport(host: Host, known: KnownHosts, sock: Any, timeout: float = CONNECT_TIMEOUT,
                      agent_socket: str = "", note: Callable[[str], None] | None = None) -> paramiko.Transport:
    """An authenticated Transport over `sock`, or a DeployError naming the step: connect, hostkey or auth.

    The host key is checked against the known_hosts files before any key is offered: unknown ones raise
    HostKeyUnknown (paramiko's RejectPolicy: nothing is accepted silently), changed or revoked ones are refused.
    """
    transport = paramiko.Transport(sock)
    transport.banner_timeout = timeout
    transport.handshake_timeout = timeout
    transport.auth_timeout = timeout
    if known.trusts_authority(host):  # ask for its certificate first, as ssh does where it knows an authority
        options = transport.get_security_options()
        # paramiko offers each name given here, then a "-cert-v01" variant of each (of these too: names
        # no server knows, which it skips): the certificates come first either way.
        options.key_types = hostcerts.CERT_KEY_TYPES + tuple(options.key_types)
    try:
        try:
            transport.start_client(timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise DeployError.at(host.alias, "connect", f"the SSH handshake with {host.hostname}:{host.port} failed: "
                                 f"{exc or type(exc).__name__}", "is an SSH server listening there?") from None
        key = transport.get_remote_server_key()
        known.verify(host, key)
        from .auth import authenticate

        authenticate(transport, host, agent_socket, timeout, note or (lambda text: log.info("%s: %s", host.alias, text)))
        return transport
    except BaseException:
        transport.close()
        raise


class Link:
    """The master's SSH connection to one host: it runs commands, carries the agent's reverse tunnel,
    is kept alive, and is re-established by itself (with the same tunnel port) when it drops."""

    def __init__(self, host: Host, known: KnownHosts, master: tuple[str, int],
                 jump: Callable[[str, str, int], Link] | None = None,
                 on_state: Callable[[Link, str, str], None] | None = None,
                 timeout: float = CONNECT_TIMEOUT, depth: int = 0) -> None:
        self.host = host
        self.known = known
        self.master = master  # where tunnelled connections go: the master's own loopback address
        self.jump = jump
        self.on_state = on_state
        self.timeout = timeout
        self.depth = depth  # how many hops this link is itself (jump hosts of jump hosts...)
        self.agent_socket = ""  # the SSH_AUTH_SOCK of whoever asked last (the master may have none)
        self.lock = threading.RLock()
        self._transport: paramiko.Transport | None = None
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
        return self._transport

    def active(self) -> bool:
        transport = self._transport
        return transport is not None and transport.is_active()

    def _set_state(self, state: str, message: str = "") -> None:
        if state != self.state:
            self.state, self.since = state, time.time()
            if self.on_state is not None:
                self.on_state(self, state, message)

    def open(self, on_tcp: Callable[[], None] | None = None, message: str = "",
             note: Callable[[str], None] | None = None) -> None:
        """(Re)connect now, re-opening the tunnel port if the link has one; DeployError (HostKeyUnknown,
        HostKeyChanged...) if it cannot."""
        with self.lock:
            self._drop_transport()
            if self.host.proxy_jump:  # ssh's precedence: a ProxyJump, else a ProxyCommand, else TCP
                sock = self._via_jump(note)
            elif self.host.proxy_command:
                sock = _proxy_command(self.host)
            else:
                sock = _tcp(self.host, self.timeout)
            if on_tcp is not None:
                on_tcp()
            transport = connect_transport(self.host, self.known, sock, self.timeout, self.agent_socket, note)
            transport.set_keepalive(KEEPALIVE_SECONDS)
            self._transport = transport
            if self.remote_port:
                for attempt in range(4):  # the old session, just closed, may hold the port a moment longer
                    try:
                        self.forward(self.remote_port)  # the port the running agent dials
                        break
                    except DeployError:
                        if attempt == 3:
                            self._drop_transport()  # connected but no tunnel (an old session still holds the port)
                            raise
                        time.sleep(0.5)
            self._set_state("up", message)

    def ensure(self, on_tcp: Callable[[], None] | None = None, note: Callable[[str], None] | None = None) -> bool:
        """Connected (opening only if needed); True when this call opened it."""
        with self.lock:
            if self.active():
                return False
            self.open(on_tcp, note=note)
            return True

    def healthy(self, timeout: float = 10.0) -> bool:
        """Whether the held connection still runs a command (a live TCP session can hide a dead one)."""
        if not self.active():
            return False
        try:
            return self.sh("true", "connect", timeout=timeout).status == 0
        except DeployError:
            return False

    def _drop_transport(self) -> None:
        self._close_shell()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _via_jump(self, note: Callable[[str], None] | None) -> Any:
        """A channel to the host through the nearest jump host of its ProxyJump list (which reaches the
        others first): each hop is a held link of its own, resolved and host-key checked like the host."""
        hops = [h.strip() for h in self.host.proxy_jump.split(",") if h.strip()]
        if self.jump is None or not hops:
            raise DeployError.at(self.host.alias, "connect", f"ProxyJump {self.host.proxy_jump!r} is not supported here")
        if self.depth >= MAX_HOPS:
            raise DeployError.at(self.host.alias, "connect", f"more than {MAX_HOPS} jump hosts: a ProxyJump loop?",
                                 "check the ProxyJump settings of the host and its jump hosts")
        jump = self.jump(hops[-1], ",".join(hops[:-1]), self.depth + 1)
        jump.agent_socket = self.agent_socket
        jump.ensure(note=note)
        transport = jump.transport
        assert transport is not None
        try:
            return transport.open_channel("direct-tcpip", (self.host.hostname, self.host.port), ("127.0.0.1", 0),
                                          timeout=self.timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise DeployError.at(self.host.alias, "connect", f"the jump host {hops[-1]} could not reach "
                                 f"{self.host.hostname}:{self.host.port}: {exc}",
                                 "check the host's address as the jump host sees it") from None

    def close(self) -> None:
        self.closed.set()
        with self.lock:
            self._drop_transport()
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

    def sftp(self, step: str) -> paramiko.SFTPClient | None:
        """The link's SFTP session (opened on first use, again after a reconnect): no shell, no login
        scripts, so file work and process checks cost one round trip each. None if the host has no SFTP
        (the files then go over exec channels, as the zero-install tools do)."""
        with self.lock:
            transport = self.transport
            if transport is None or not transport.is_active():
                raise DeployError.at(self.host.alias, step, "the SSH connection is down",
                                     "deploy again once the host is reachable")
            if self._sftp_transport is transport and (self._sftp is None or not self._sftp.sock.closed):
                return self._sftp
            try:
                sftp = paramiko.SFTPClient.from_transport(transport)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                log.info("%s: no SFTP (%s): files go over exec channels", self.host.alias, exc)
                sftp = None
            self._sftp, self._sftp_transport = sftp, transport
            return sftp

    def run(self, command: str, step: str, data: bytes = b"", timeout: float = COMMAND_TIMEOUT) -> tuple[int, bytes]:
        """One command on an exec channel of its own, `data` on its stdin: (exit status, its stdout's bytes)."""
        transport = self.transport
        if transport is None or not transport.is_active():
            raise DeployError.at(self.host.alias, step, "the SSH connection is down", "deploy again once the host is reachable")
        try:
            channel = transport.open_session(timeout=timeout)
            try:
                channel.settimeout(timeout)
                channel.exec_command(command)
                if data:
                    channel.sendall(data)
                channel.shutdown_write()
                out = bytearray()
                while chunk := channel.recv(65536):
                    out += chunk
                return channel.recv_exit_status(), bytes(out)
            finally:
                channel.close()
        except socket.timeout:
            raise DeployError.at(self.host.alias, step, f"the host did not finish a command within {timeout:g}s") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise DeployError.at(self.host.alias, step, f"the SSH connection failed while running a command: {exc}",
                                 "deploy again once the host is reachable") from None

    def put(self, data: bytes, path: str, step: str, mode: int = 0o644) -> None:
        """Write a file atomically: a temporary name, its mode set before any byte, then a rename (over
        SFTP, else over an exec channel with the content's hash checked on arrival)."""
        tmp = f"{path}.tmp{os.getpid()}"
        sftp = self.sftp(step)
        if sftp is None:
            return self._put_by_exec(data, path, tmp, step, mode)
        try:
            with sftp.open(tmp, "wb") as f:
                f.chmod(mode)
                f.set_pipelined(True)
                f.write(data)
            sftp.posix_rename(tmp, path)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise DeployError.at(self.host.alias, step, f"cannot write {path} over SFTP: {exc}",
                                 "check the remote directory's owner, mode and free space") from None

    def _put_by_exec(self, data: bytes, path: str, tmp: str, step: str, mode: int) -> None:
        t, final = shlex.quote(tmp), shlex.quote(path)
        digest = hashlib.sha256(data).hexdigest()
        # The hash by whichever tool the host has (sha256sum, shasum, or a Python), else the size.
        check = (f'h=$( (sha256sum {t} || shasum -a 256 {t}) 2>/dev/null | cut -d" " -f1); '
                 f'[ -n "$h" ] || h=$(wc -c < {t} | tr -d " "); ')
        script = (f"umask 077; cat > {t} && chmod {mode:o} {t} && {{ {check}"
                  f'if [ "$h" = {digest} ] || [ "$h" = {len(data)} ]; then mv -f {t} {final}; '
                  f'else rm -f {t}; echo "arrived as $h"; exit 9; fi; }}')
        status, out = self.run(script, step, data, timeout=COMMAND_TIMEOUT + len(data) / 1e6)
        if status != 0:
            raise DeployError.at(self.host.alias, step, f"cannot write {path} over SSH (exit {status}): "
                                 f"{out.decode(errors='replace').strip()[-200:]}",
                                 "check the remote directory's owner, mode and free space")

    def read(self, path: str, step: str, limit: int = 1 << 20) -> bytes | None:
        """A remote file's bytes (its last `limit`), or None if it does not exist."""
        sftp = self.sftp(step)
        if sftp is None:
            q = shlex.quote(path)
            status, out = self.run(f"[ -e {q} ] || exit 3; cat {q} | tail -c {limit}", step)
            if status == 3:
                return None
            if status != 0:
                raise DeployError.at(self.host.alias, step, f"cannot read {path} over SSH (exit {status})")
            return out
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
        if sftp is None:
            status, out = self.run("rm -f " + " ".join(shlex.quote(p) for p in paths), step)
            if status != 0:
                raise DeployError.at(self.host.alias, step, f"cannot remove {', '.join(paths)}: "
                                     f"{out.decode(errors='replace').strip()[-200:]}")
            return
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
                        if self.active():  # a deploy (--reconnect, a failed health check) opened it meanwhile
                            break
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

