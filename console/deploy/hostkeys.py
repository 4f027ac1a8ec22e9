"""Host keys as ssh checks them: known_hosts files (markers, hashed names, wildcards, HostKeyAlias), corral's own
file of accepted keys, and the operator's answers about unknown ones."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn

import paramiko
from paramiko.pkey import UnknownKeyType

from ..errors import DeployError, HostKeyChanged, HostKeyUnknown
from . import hostcerts
from .inventory import Host, user_known_hosts
from .sshconfig import match_pattern

if TYPE_CHECKING:
    from .fleet import Operation, Report

log = logging.getLogger(__name__)


def host_id(host: Host) -> str:
    """How known_hosts names this host: its HostKeyAlias, else `name`, or `[name]:port` off port 22 (as ssh does)."""
    if host.host_key_alias:
        return host.host_key_alias
    return host.hostname if host.port == 22 else f"[{host.hostname}]:{host.port}"


@dataclass(frozen=True)
class KnownLine:
    """One line of a known_hosts file: its marker ("", "@cert-authority", "@revoked"), host patterns and key."""

    path: str
    number: int
    marker: str
    patterns: tuple[str, ...]
    key_type: str
    key_base64: str

    def names(self, name: str) -> bool:
        """Whether the line's patterns name this host (hashed entries, wildcards and negations as ssh reads them)."""
        matched = False
        for pattern in self.patterns:
            negated = pattern.startswith("!")
            bare = pattern[1:] if negated else pattern
            if bare.startswith("|1|"):
                hit = _hashed_matches(bare, name)
            else:
                hit = match_pattern(name, bare)
            if hit:
                if negated:
                    return False
                matched = True
        return matched


def _hashed_matches(entry: str, name: str) -> bool:
    try:
        _, _, salt, digest = entry.split("|", 3)
        mac = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(mac, base64.b64decode(digest))
    except (ValueError, binascii.Error):
        return False


def parse_known_hosts(text: str, path: str = "") -> list[KnownLine]:
    """The lines of a known_hosts file that say anything (comments, blanks and malformed lines are skipped, as ssh does)."""
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        marker = words.pop(0) if words[0].startswith("@") else ""
        if marker not in ("", "@cert-authority", "@revoked") or len(words) < 3:
            log.debug("%s:%d: skipping a malformed known_hosts line", path, number)
            continue
        lines.append(KnownLine(path, number, marker, tuple(words[0].split(",")), words[1], words[2]))
    return lines


@dataclass(frozen=True)
class Verdict:
    """What the known_hosts files say of the key a host offered."""

    state: str  # "known", "revoked", "changed", "unknown"
    line: KnownLine | None = None  # the line that decided (known, revoked, changed)
    authority: KnownLine | None = None  # a @cert-authority line for this host (the host offered no certificate)


class KnownHosts:
    """The known_hosts files that vouch for hosts: the user's and the system's (only read, as ssh reads them:
    UserKnownHostsFile replaces the default when set) and corral's own, where accepted keys go."""

    _write_lock = threading.Lock()

    def __init__(self, corral_file: Path, user_files: list[Path] | None = None) -> None:
        self.corral_file = Path(corral_file)
        self.user_files = list(user_files) if user_files is not None else user_known_hosts()

    def files(self, host: Host) -> list[Path]:
        users = [Path(p) for p in host.known_hosts] if host.known_hosts else self.user_files
        return [*users, *(Path(p) for p in host.global_known_hosts), self.corral_file]

    def lines(self, host: Host) -> list[KnownLine]:
        out: list[KnownLine] = []
        for path in self.files(host):
            try:
                out += parse_known_hosts(path.read_text(errors="replace"), str(path))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise DeployError.at(host.alias, "hostkey", f"cannot read {path}: {exc.strerror or exc}",
                                     "fix its mode, or move that known_hosts file") from None
        return out

    def verdict(self, host: Host, key_type: str, key_base64: str) -> Verdict:
        """Revoked anywhere wins; then a line listing this very key; then one of the same type with another key."""
        name = host_id(host)
        mine = [line for line in self.lines(host) if line.names(name)]
        for line in mine:
            if line.marker == "@revoked" and line.key_base64 == key_base64:
                return Verdict("revoked", line)
        plain = [line for line in mine if not line.marker]
        authority = next((line for line in mine if line.marker == "@cert-authority"), None)
        for line in plain:
            if line.key_type == key_type and line.key_base64 == key_base64:
                return Verdict("known", line)
        for line in plain:
            if line.key_type == key_type:
                return Verdict("changed", line)
        return Verdict("unknown", authority=authority)

    def holder(self, host: Host) -> str:
        """The known_hosts file that names this host (for messages)."""
        name = host_id(host)
        line = next((line for line in self.lines(host) if not line.marker and line.names(name)), None)
        return line.path if line is not None else str(self.corral_file)

    def trusts_authority(self, host: Host) -> bool:
        """Whether a @cert-authority line vouches for this host: then its certificate is asked for first."""
        name = host_id(host)
        return any(line.marker == "@cert-authority" and line.names(name) for line in self.lines(host))

    def verify(self, host: Host, key: paramiko.PKey) -> str:
        """Accept the offered key (returns the file that vouches for it) or raise: HostKeyUnknown for the
        operator to decide, HostKeyChanged or a revoked key's DeployError, refused for good. A certificate
        is checked against the @cert-authority lines; one no line's authority signed is judged by its
        plain key, as ssh does."""
        if hostcerts.is_certificate(key):
            vouching = self._verify_certificate(host, key)
            if vouching:
                return vouching
        verdict = self.verdict(host, key.get_name(), key.get_base64())
        name = host_id(host)
        if verdict.state == "known" and verdict.line is not None:
            return verdict.line.path
        if verdict.state == "revoked" and verdict.line is not None:
            raise DeployError.at(host.alias, "hostkey", f"the host key of {name} ({key.get_name()} {key.fingerprint}) is "
                                 f"REVOKED in {verdict.line.path}:{verdict.line.number}; refused",
                                 "the host needs a new key; ask its owner")
        if verdict.state == "changed" and verdict.line is not None:
            line = verdict.line
            expected = paramiko.PKey.from_type_string(line.key_type, base64.b64decode(line.key_base64))
            raise HostKeyChanged.at(
                host.alias, "hostkey",
                f"the host key of {name} has CHANGED: {line.path} has {line.key_type} {expected.fingerprint}, "
                f"the host offered {key.get_name()} {key.fingerprint}; refused",
                f"if the host was reinstalled, delete its line from {line.path} and deploy again; "
                "otherwise someone may be intercepting the connection")
        policy = UnknownKeyPolicy(host, verdict.authority)
        policy.missing_host_key(None, name, key)  # paramiko's RejectPolicy: nothing unknown is accepted

    def _verify_certificate(self, host: Host, key: paramiko.PKey) -> str:
        """The file whose @cert-authority line signed this host's certificate; "" if none of them did (the
        plain key is judged then); a DeployError if it is revoked, or signed by a trusted authority but not
        good for this host (ssh refuses those too)."""
        name = host_id(host)
        mine = [line for line in self.lines(host) if line.names(name)]
        assert key.public_blob is not None  # is_certificate(key)
        try:
            cert = hostcerts.parse(key.public_blob.key_blob)
        except hostcerts.BadCertificate as exc:
            raise DeployError.at(host.alias, "hostkey", f"{name} offered {exc}; refused",
                                 "ask the host's owner about its certificate") from None
        authority_base64 = base64.b64encode(cert.signature_key).decode()
        for line in mine:
            if line.marker == "@revoked" and line.key_base64 in (key.get_base64(), authority_base64):
                what = "its certificate's authority" if line.key_base64 == authority_base64 else "its key"
                raise DeployError.at(host.alias, "hostkey", f"the host key of {name} ({key.get_name()} {key.fingerprint}): "
                                     f"{what} is REVOKED in {line.path}:{line.number}; refused",
                                     "the host needs a new key or certificate; ask its owner")
        names = (host.host_key_alias,) if host.host_key_alias else (host.hostname,)
        for line in mine:
            if line.marker != "@cert-authority" or line.key_base64 != authority_base64:
                continue
            try:
                authority = paramiko.PKey.from_type_string(line.key_type, base64.b64decode(line.key_base64))
                hostcerts.check(cert, authority, names)
            except (UnknownKeyType, paramiko.SSHException, binascii.Error, ValueError) as exc:
                raise DeployError.at(host.alias, "hostkey", f"cannot read the authority's key at {line.path}:"
                                     f"{line.number} ({type(exc).__name__}: {exc})"[:300], "fix or remove that line") from None
            except hostcerts.BadCertificate as exc:
                raise DeployError.at(host.alias, "hostkey", f"{name} offered {exc} ({key.get_name()} {key.fingerprint},"
                                     f" authority of {line.path}:{line.number}); refused",
                                     "the host's owner must renew or fix its certificate") from None
            return line.path
        return ""

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


class UnknownKeyPolicy(paramiko.RejectPolicy):
    """paramiko's RejectPolicy, raising the question for the operator: the key's details, and why it is unknown."""

    def __init__(self, host: Host, authority: KnownLine | None = None) -> None:
        self.host = host
        self.authority = authority

    def missing_host_key(self, client: paramiko.SSHClient | None, hostname: str, key: paramiko.PKey) -> NoReturn:
        name = host_id(self.host)
        message = f"unknown host key for {name}: {key.get_name()} {key.fingerprint}"
        if self.authority is not None:
            message += (f" ({self.authority.path}:{self.authority.number} trusts a certificate authority for it, "
                        "but the host offered no certificate it signed)")
        raise HostKeyUnknown.at(self.host.alias, "hostkey", message,
                                "check the fingerprint with the host's owner, then deploy with --accept-new "
                                "(or accept it in the console)",
                                host_id=name, key_type=key.get_name(), key_base64=key.get_base64(),
                                fingerprint=key.fingerprint)


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
