"""Where corral keeps its state on this machine: the directory, the authkey and the master's address."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Tuple

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


def read_authkey(path: Path) -> bytes:
    """The cluster's authkey from its file, or a CorralError that says what is wrong with the file."""
    try:
        key = path.read_bytes().strip()
    except FileNotFoundError:
        raise CorralError(f"no authkey at {path}", "start a master with `corral master`, or pass --authkey-file")
    except OSError as exc:
        raise CorralError(f"cannot read the authkey {path}: {exc.strerror}", "check the file's owner and mode")
    if len(key) < 16:
        raise CorralError(f"the authkey {path} is empty or too short", "remove it and start the master again")
    return key


def read_master_address(home: Path) -> Tuple[str, int]:
    """The (host, port) the running master recorded in the state directory."""
    path = home / MASTER_NAME
    try:
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
