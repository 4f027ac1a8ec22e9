"""Public-key authentication as ssh does it: the agent's keys first (only those of the IdentityFiles with
IdentitiesOnly), then the key files in the config's order; missing files skipped with a note; the agent of
the caller who asked for the deploy; and a last line that says what was tried."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Callable

import paramiko
from paramiko.agent import AgentSSH
from paramiko.pkey import PublicBlob

from ..errors import DeployError
from .inventory import Host

log = logging.getLogger(__name__)

Note = Callable[[str], None]


class _AgentAt(AgentSSH):
    """An ssh-agent at a given socket (paramiko's Agent reads only this process's SSH_AUTH_SOCK)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(timeout)
        try:
            conn.connect(path)
            self._connect(conn)  # type: ignore[attr-defined]  # as paramiko's own Agent does
        except (OSError, paramiko.SSHException):
            conn.close()
            raise

    def close(self) -> None:
        self._close()  # type: ignore[attr-defined]


@dataclass
class Offer:
    """The keys one connection may offer, in ssh's order, and what was learnt gathering them."""

    keys: list[tuple[str, paramiko.PKey]] = field(default_factory=list)  # (how to name it, the key)
    encrypted: list[str] = field(default_factory=list)  # key files that need a passphrase (no agent holds them)
    agent: _AgentAt | None = None


def agent_socket(host: Host, caller_socket: str) -> str:
    """The agent to ask: IdentityAgent if set ("none": none), else the caller's SSH_AUTH_SOCK, else ours."""
    setting = host.identity_agent
    if setting.lower() == "none":
        return ""
    if setting in ("", "SSH_AUTH_SOCK", "$SSH_AUTH_SOCK"):
        return caller_socket or os.environ.get("SSH_AUTH_SOCK", "")
    if setting.startswith("$"):
        return os.environ.get(setting[1:], "")
    return setting


def _public_blob(path: str) -> bytes | None:
    """The public half of a key file, from its .pub beside it (what ssh reads for an encrypted key)."""
    try:
        blob: bytes = PublicBlob.from_file(path + ".pub").key_blob
        return blob
    except (OSError, ValueError, paramiko.SSHException):
        return None


def _load_files(host: Host, note: Note) -> tuple[list[tuple[str, paramiko.PKey | None, bytes | None]], list[str]]:
    """(path, private key or None if encrypted, public blob) of each usable identity file; the encrypted ones."""
    files: list[tuple[str, paramiko.PKey | None, bytes | None]] = []
    encrypted: list[str] = []
    for path in host.identity:
        if not os.path.isfile(path):
            if not host.default_identities:  # ssh is silent about its own defaults
                note(f"no identity file {path}: skipped")
            continue
        try:
            key = paramiko.PKey.from_path(path)
        except (paramiko.PasswordRequiredException, TypeError):  # cryptography's TypeError: "password-protected"
            encrypted.append(path)
            files.append((path, None, _public_blob(path)))
            continue
        except (OSError, ValueError, paramiko.SSHException) as exc:
            note(f"cannot use the identity file {path} ({exc}): skipped")
            continue
        files.append((path, key, key.asbytes()))
    return files, encrypted


def gather(host: Host, caller_socket: str, timeout: float, note: Note) -> Offer:
    """The keys to offer this host, in ssh's order."""
    files, encrypted = _load_files(host, note)
    offer = Offer()
    blobs = {blob: path for path, _, blob in files if blob is not None}
    path = agent_socket(host, caller_socket)
    if path:
        try:
            offer.agent = _AgentAt(path, timeout)
        except (OSError, paramiko.SSHException) as exc:
            note(f"cannot use the agent at {path} ({exc}): skipped")
    # ssh's order: the agent's keys that are configured identity files, the agent's others (not with
    # IdentitiesOnly), then the identity files the agent does not hold, in the config's order.
    agent_keys = list(offer.agent.get_keys()) if offer.agent is not None else []
    mine = [key for key in agent_keys if key.asbytes() in blobs]
    others = [] if host.identities_only else [key for key in agent_keys if key.asbytes() not in blobs]
    for key in mine + others:
        offer.keys.append((f"agent:{blobs.get(key.asbytes(), key.comment or key.get_name())}", key))
    offered = {key.asbytes() for key in mine + others}
    for file_path, private, blob in files:
        if private is not None and blob not in offered:
            offer.keys.append((file_path, private))
    offer.encrypted = [p for p in encrypted if _public_blob(p) not in offered]
    return offer


def _tried(names: list[str]) -> str:
    """"A, B and 2 from the agent": the keys offered, as the last line names them."""
    files = [n for n in names if not n.startswith("agent:")]
    from_agent = len(names) - len(files)
    parts = files + ([f"{from_agent} from the agent"] if from_agent else [])
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def authenticate(transport: paramiko.Transport, host: Host, caller_socket: str, timeout: float, note: Note) -> None:
    """Offer the keys one by one until the host accepts one; else a DeployError that says what was tried."""
    offer = gather(host, caller_socket, timeout, note)
    tried: list[str] = []
    try:
        for name, key in offer.keys:
            tried.append(name)
            try:
                transport.auth_publickey(host.user, key)
            except paramiko.BadAuthenticationType as exc:
                raise DeployError.at(host.alias, "auth", f"{host.target} takes no public keys (only {', '.join(exc.allowed_types)})",
                                     "corral authenticates with keys only: enable PubkeyAuthentication there") from None
            except paramiko.AuthenticationException:
                if not transport.is_active():  # MaxAuthTries: the host hung up
                    break
                continue
            except (paramiko.SSHException, OSError, EOFError) as exc:
                if not transport.is_active():
                    break
                note(f"the key {name} failed ({exc}): skipped")
                continue
            if transport.is_authenticated():
                return
    finally:
        if offer.agent is not None:
            offer.agent.close()
    raise _no_method_left(host, tried, offer.encrypted, transport.is_active())


def _no_method_left(host: Host, tried: list[str], encrypted: list[str], still_up: bool) -> DeployError:
    load = f"load it into ssh-agent (`ssh-add {encrypted[0]}`) and deploy again" if encrypted else ""
    if not tried:
        if encrypted:
            return DeployError.at(host.alias, "auth", f"no key to offer {host.target}: the key {encrypted[0]} is "
                                  "encrypted and no agent holds it", load)
        return DeployError.at(host.alias, "auth", f"no key to offer {host.target}: no identity file exists and no agent "
                              "has keys", "set the host's identity (IdentityFile, or corral hosts add --identity), "
                              "or load a key into ssh-agent")
    plural = "s" if len(tried) > 1 else ""
    why = "no authentication method left" if still_up else "the host hung up (too many authentication failures?)"
    hint = (f"the key {encrypted[0]} is encrypted: {load}" if encrypted else
            f"add the public key to ~{host.user}/.ssh/authorized_keys on the host, or set the host's identity")
    return DeployError.at(host.alias, "auth", f"{host.target} refused our key{plural} ({_tried(tried)}): {why}", hint)
