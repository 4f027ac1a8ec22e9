"""The state directory on the operator's machine: created 0700, authkey 0600, master.json written atomically."""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from corral.agent.errors import CorralError
from corral.agent.statedir import AUTHKEY_NAME, MASTER_NAME, default_home, read_authkey, read_master_address


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

    def ensure(self) -> None:
        """Create the directory (0700) or check that it is a usable directory."""
        try:
            self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
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
        if not path.exists():
            fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, 0o600)
        return read_authkey(path)

    def authkey(self) -> bytes:
        return read_authkey(self.authkey_path)

    def master_address(self) -> tuple[str, int]:
        return read_master_address(self.home)

    def master_record(self) -> dict[str, Any]:
        try:
            return json.loads(self.master_path.read_text())
        except (OSError, ValueError):
            return {}

    def write_master(self, record: dict[str, Any]) -> None:
        tmp = self.master_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.master_path)

    def clear_master(self, pid: int) -> None:
        """Remove master.json if it is still ours (a newer master may have replaced it)."""
        if self.master_record().get("pid") == pid:
            try:
                self.master_path.unlink()
            except FileNotFoundError:
                pass
