"""Where corral keeps its state on this machine: the directory, the authkey and the master's address."""

from __future__ import annotations

import errno
import json
import os
import pwd
import stat
from pathlib import Path
from typing import List, Optional, Tuple

from .errors import CorralError

AUTHKEY_NAME = "authkey"
MASTER_NAME = "master.json"


def default_home() -> Path:
    """$CORRAL_HOME, else the XDG user state directory (what platformdirs.user_state_dir gives on Linux)."""
    explicit = os.environ.get("CORRAL_HOME")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "corral"


_MAX_LINKS = 40  # symlinks followed in one path before giving up, as the kernel's ELOOP


def _who(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _chain(path: Path) -> List[Tuple[str, os.stat_result]]:
    """Everything the kernel passes through to reach `path` (each directory, each symlink and the target
    itself), in order, with its lstat: symlinks are followed here by hand so each one is seen."""
    text = os.fspath(path)
    if not os.path.isabs(text):
        text = os.path.join(os.getcwd(), text)
    todo = [part for part in text.split("/") if part]
    current = "/"
    seen = [("/", os.lstat("/"))]
    links = 0
    while todo:
        name = todo.pop(0)
        if name == ".":
            continue
        if name == "..":
            current = os.path.dirname(current)  # `current` is already resolved, so this is the kernel's `..`
            continue
        candidate = os.path.join(current, name)
        info = os.lstat(candidate)
        seen.append((candidate, info))
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.fspath(path))
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            todo[:0] = [part for part in target.split("/") if part]
        else:
            current = candidate
    return seen


def check_trusted(path: Path, what: str, directory: bool = False) -> None:
    """Refuse, as ssh's StrictModes does, a state path another local user could have made or can change:
    the path itself must be ours and not group/world-writable; every directory on the way there must be
    ours or root's and not writable by others (unless sticky, as /tmp); every symlink on the way must be
    ours or root's. One CorralError naming the path and why. The one check the master, the agents and
    every client make (FileNotFoundError if it does not exist: the caller says what that means)."""
    uid = os.getuid()
    hint = "it must be yours alone (as ssh's StrictModes wants): fix its owner and mode, or remove it"
    chain = _chain(path)
    *way, (final, info) = chain
    for step, step_info in way:
        if step_info.st_uid not in (0, uid):
            kind = "a symlink" if stat.S_ISLNK(step_info.st_mode) else "a directory"
            raise CorralError(f"refusing the {what} {path}: it is reached through {kind} of {_who(step_info.st_uid)},"
                              f" {step}", hint)
        mode = step_info.st_mode
        if stat.S_ISDIR(mode) and mode & 0o022 and not mode & stat.S_ISVTX:
            raise CorralError(f"refusing the {what} {path}: the directory {step} on its way is writable by others"
                              f" (mode {stat.S_IMODE(mode):o})", hint)
    if info.st_uid != uid:
        raise CorralError(f"refusing the {what} {path}: it belongs to {_who(info.st_uid)}, not to you ({_who(uid)})",
                          hint)
    if directory != stat.S_ISDIR(info.st_mode) or not (directory or stat.S_ISREG(info.st_mode)):
        raise CorralError(f"refusing the {what} {path}: it is not a {'directory' if directory else 'regular file'}",
                          hint)
    if info.st_mode & 0o022:
        raise CorralError(f"refusing the {what} {path}: it is writable by others (mode {stat.S_IMODE(info.st_mode):o})",
                          hint)


def read_authkey(path: Path) -> bytes:
    """The cluster's authkey from its file (checked by check_trusted first), or a CorralError that says
    what is wrong with the file."""
    try:
        check_trusted(path, "authkey")
        key = path.read_bytes().strip()
    except FileNotFoundError:
        raise CorralError(f"no authkey at {path}", "start a master with `corral master`, or pass --authkey-file")
    except OSError as exc:
        raise CorralError(f"cannot read the authkey {path}: {exc.strerror}", "check the file's owner and mode")
    if len(key) < 16:
        raise CorralError(f"the authkey {path} is empty or too short", "remove it and start the master again")
    return key


def read_master_address(home: Path) -> Tuple[str, int]:
    """The (host, port) the running master recorded in the state directory (both checked by check_trusted)."""
    path = home / MASTER_NAME
    try:
        check_trusted(home, "state directory", directory=True)
        check_trusted(path, "master record")
        record = json.loads(path.read_text())
        return str(record["host"]), int(record["port"])
    except FileNotFoundError:
        raise CorralError(f"no master is recorded in {home}", "start one with `corral master` (or just `corral`)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorralError(f"{path} is unreadable or corrupt ({exc})", "remove it and start the master again")


def parse_address(text: str, allow_any_port: bool = False) -> Tuple[str, int]:
    """HOST:PORT (or [v6]:PORT) into a tuple, with a clear error for anything else; port 0 only to listen."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    lowest = 0 if allow_any_port else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) < 65536:
        raise CorralError(f"bad address {text!r}", "give it as HOST:PORT, e.g. 127.0.0.1:7100")
    return host, int(port)


def authkey_path(home: Path, explicit: Optional[str] = None) -> Path:
    """--authkey-file, else $CORRAL_AUTHKEY_FILE, else the state directory's authkey."""
    chosen = explicit or os.environ.get("CORRAL_AUTHKEY_FILE")
    return Path(chosen).expanduser() if chosen else home / AUTHKEY_NAME
