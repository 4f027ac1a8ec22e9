"""Host keys: the known_hosts files that vouch for a host, corral's own file of accepted keys, the operator's answers."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn

import paramiko

from ..errors import DeployError, HostKeyUnknown
from .inventory import Host, user_known_hosts

if TYPE_CHECKING:
    from .fleet import Operation, Report


def host_id(host: Host) -> str:
    """How known_hosts names this host: `name`, or `[name]:port` off port 22."""
    return host.hostname if host.port == 22 else f"[{host.hostname}]:{host.port}"


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
                    raise DeployError.at(host.alias, "hostkey", f"cannot read {path}: {exc}",
                                         "fix or move that known_hosts file") from None
        if self.corral_file.is_file():
            try:
                client.load_host_keys(str(self.corral_file))
            except (OSError, paramiko.SSHException, ValueError) as exc:
                raise DeployError.at(host.alias, "hostkey", f"cannot read {self.corral_file}: {exc}",
                                     "fix or remove that file") from None

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


class RecordingRejectPolicy(paramiko.RejectPolicy):
    """paramiko's RejectPolicy, which also remembers the key it rejected, so the operator can be shown it."""

    def __init__(self) -> None:
        self.key: paramiko.PKey | None = None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> NoReturn:
        self.key = key
        super().missing_host_key(client, hostname, key)
        raise AssertionError("RejectPolicy raises")  # pragma: no cover


def unknown_key_error(host: Host, key: paramiko.PKey) -> HostKeyUnknown:
    """The question for the operator: this host offered this key, which no known_hosts file vouches for."""
    name = host_id(host)
    error = HostKeyUnknown.at(host.alias, "hostkey", f"unknown host key for {name}: {key.get_name()} {key.fingerprint}",
                              "check the fingerprint with the host's owner, then deploy with --accept-new "
                              "(or accept it in the console)",
                              host_id=name, key_type=key.get_name(), key_base64=key.get_base64(),
                              fingerprint=key.fingerprint)
    assert isinstance(error, HostKeyUnknown)
    return error


# ---- the operator's answers -------------------------------------------------------------------------

@dataclass
class _Waiting:
    """One open question: set once answered (or when the master stops)."""

    event: threading.Event = field(default_factory=threading.Event)
    accept: bool | None = None


@dataclass(frozen=True)
class AskPolicy:
    """How one deploy answers an unknown key: accept it (--accept-new), ask the operator, or refuse."""

    accept_new: bool = False
    interactive: bool = False
    timeout: float = 300.0  # how long a question waits for its answer


class HostKeyQuestions:
    """Unknown host keys put to the operator: a deploy waits on its question until a client answers it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, str], _Waiting] = {}  # (op id, alias) -> its open question

    def asker(self, op: Operation, alias: str, policy: AskPolicy, report: Report) -> Callable[[HostKeyUnknown], bool]:
        """What a deploy of `alias` calls on an unknown key: True to accept it, False (or a DeployError) to refuse."""

        def ask(exc: HostKeyUnknown) -> bool:
            what = f"{exc.key_type} {exc.fingerprint}"
            if policy.accept_new:
                report("hostkey", "info", f"accepting the new key {what} (--accept-new)")
                return True
            if not policy.interactive:
                return False
            accept = self._wait(op, alias, exc, report, policy.timeout)
            if accept is None:
                raise DeployError.at(alias, "hostkey", f"no answer about the unknown key {what} within {policy.timeout:g}s",
                                     "deploy again and answer the question")
            if not accept:
                raise DeployError.at(alias, "hostkey", f"the operator rejected the host key {what}")
            report("hostkey", "info", f"the operator accepted {what}; it goes to corral's known_hosts")
            return True

        return ask

    def _wait(self, op: Operation, alias: str, exc: HostKeyUnknown, report: Report, timeout: float) -> bool | None:
        waiting = _Waiting()
        question = {"host_id": exc.host_id, "key_type": exc.key_type, "fingerprint": exc.fingerprint, "asked": time.time()}
        with op.cond:
            op.questions[alias] = question
        with self._lock:
            self._waiting[(op.id, alias)] = waiting
        report("hostkey", "wait", f"unknown host key {exc.key_type} {exc.fingerprint}: accept or reject it")
        try:
            answered = waiting.event.wait(timeout)
        finally:
            with self._lock:
                self._waiting.pop((op.id, alias), None)
            with op.cond:
                op.questions.pop(alias, None)
        return waiting.accept if answered else None

    def answer(self, op: Operation, alias: str, fingerprint: str, accept: bool) -> bool:
        """Answer an open question; the fingerprint must be the one asked about."""
        with op.cond:
            question = op.questions.get(alias)
        with self._lock:
            waiting = self._waiting.get((op.id, alias))
        if question is None or waiting is None:
            raise DeployError(f"no open host-key question for {alias!r} in operation {op.id}",
                              "it was answered already, or it timed out")
        if fingerprint != question["fingerprint"]:
            raise DeployError(f"{alias}: hostkey: the answer names {fingerprint}, the question {question['fingerprint']}",
                              "answer about the key that was shown")
        waiting.accept = accept
        waiting.event.set()
        return True

    def release_all(self) -> None:
        """The master is stopping: every waiting deploy gives up now (as if unanswered)."""
        with self._lock:
            for waiting in self._waiting.values():
                waiting.event.set()
