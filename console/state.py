"""The state directory on the operator's machine: created 0700, authkey 0600, its JSON records written atomically."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from corral.agent.errors import CorralError
from corral.agent.statedir import (AUTHKEY_NAME, MASTER_NAME, check_trusted, default_home, read_authkey,
                                   read_master_address)

CONSOLE_NAME = "console.json"  # the master and local agent a console started, so a later one may stop them
START_LOCK_NAME = "start.lock"  # held while a console decides whether to start a master
MASTER_LOCK_NAME = "master.lock"  # held by the running master for its whole life (flock)


class MasterRunning(CorralError):
    """Another live master holds this state directory's lock."""


class MasterLock:
    """The state directory's master lock, held (flock on an open file) until release() or this process
    ends, however it ends: the kernel lets go of a killed master's lock, so no pid is ever trusted. The
    file also says who holds it (pid, then the address once bound), for the refusal's one line."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    def announce(self, record: dict[str, Any]) -> None:
        """Write who holds the lock into its file (in place: the lock is on this open file)."""
        data = json.dumps(record).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the last descriptor of the open file drops the flock
            self._fd = -1


class StateDir:
    """One cluster's state: $CORRAL_HOME, else the user state directory."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = Path(home) if home is not None else default_home()

    @property
    def journal_path(self) -> Path:
        return self.home / "corral.db"

    @property
    def authkey_path(self) -> Path:
        return self.home / AUTHKEY_NAME

    @property
    def master_path(self) -> Path:
        return self.home / MASTER_NAME

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    def trusted_home(self) -> Path:
        """The directory, checked as ensure() checks it when it exists (a reader that creates nothing:
        one that does not exist yet holds nothing anyone planted)."""
        try:
            check_trusted(self.home, "state directory", directory=True)
        except FileNotFoundError:
            pass
        return self.home

    def ensure(self) -> None:
        """Create the directory (0700), or check that it is ours alone (check_trusted) and usable; a
        directory of ours that others may read is tightened to 0700."""
        try:
            self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
            check_trusted(self.home, "state directory", directory=True)  # before chmod: root may chmod anyone's
            os.chmod(self.home, 0o700)
        except FileExistsError:
            raise CorralError(f"the state directory {self.home} is not a directory",
                              "set CORRAL_HOME to a directory") from None
        except OSError as exc:
            raise CorralError(f"cannot use the state directory {self.home}: {exc.strerror}",
                              "check its permissions or set CORRAL_HOME") from None
        if not os.access(self.home, os.R_OK | os.W_OK | os.X_OK):
            raise CorralError(f"the state directory {self.home} is not writable",
                              "check its permissions or set CORRAL_HOME")

    def ensure_authkey(self) -> bytes:
        """The cluster's authkey, created on first use: 32 random bytes, hex-encoded, mode 0600."""
        self.ensure()
        path = self.authkey_path
        try:  # created with its final mode (no write-then-chmod), never through a planted symlink
            fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
        try:
            check_trusted(path, "authkey")  # before chmod: a key another user planted is refused, not adopted
        except FileNotFoundError:
            return read_authkey(path)  # a dangling symlink: its one line
        if stat.S_IMODE(path.lstat().st_mode) & 0o077:
            os.chmod(path, 0o600)  # ours, only readable by others: tightened as before
        return read_authkey(path)

    def authkey(self) -> bytes:
        return read_authkey(self.authkey_path)

    def master_address(self) -> tuple[str, int]:
        return read_master_address(self.home)

    @property
    def console_path(self) -> Path:
        return self.home / CONSOLE_NAME

    # ---- master.json: the running master's address and pid ---------------------------------

    def master_record(self) -> dict[str, Any]:
        return _read_record(self.master_path)

    def write_master(self, record: dict[str, Any]) -> None:
        _write_record(self.master_path, record)

    def clear_master(self, pid: int) -> None:
        """Remove master.json if it is still ours (a newer master may have replaced it)."""
        if self.master_record().get("pid") == pid:
            _unlink(self.master_path)

    def lock_master(self) -> MasterLock:
        """Take the lock only one live master of this state directory can hold, or MasterRunning naming
        the one that holds it. Taken before the master opens its journal or writes master.json."""
        self.ensure()
        path = self.home / MASTER_LOCK_NAME
        if os.path.lexists(path):
            check_trusted(path, "master lock")  # another user's file (or a symlink) is refused, as any state file
        # Created with its final mode; never through a symlink planted since the check.
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_record(path)
            where = f"{holder['host']}:{holder['port']}" if "port" in holder else "starting"
            raise MasterRunning(f"a master is already running here (pid {holder.get('pid', '?')}, {where})",
                                "stop it first, or give this one another state directory (--home)") from None
        lock = MasterLock(path, fd)
        lock.announce({"pid": os.getpid()})
        return lock

    # ---- console.json: what a console started (console/local.py) -------------------------------

    def console_record(self) -> dict[str, Any]:
        return _read_record(self.console_path)

    def write_console(self, record: dict[str, Any]) -> None:
        _write_record(self.console_path, record)

    def clear_console(self) -> None:
        _unlink(self.console_path)

    @contextmanager
    def start_lock(self) -> Iterator[None]:
        """Held by one process at a time (flock), so two consoles never both start a master."""
        with open(self.home / START_LOCK_NAME, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


def _read_record(path: Path) -> dict[str, Any]:
    """A JSON object file; {} if it is missing or is not one (a record half-written by a crash reads as none).
    One that another user could have written is refused (check_trusted): these records name pids to stop."""
    try:
        check_trusted(path, "record")
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(path: Path, record: dict[str, Any]) -> None:
    """Write then rename: a reader sees the old record or the new one, never half of one. The temporary
    file is made with its final mode (0600) by this process alone (O_EXCL, no symlink followed)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
