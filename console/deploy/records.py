"""deployments.json: what the master deployed where, so a restarted master re-opens its tunnels. The only reader
and writer of that file (the master's deploy service and the CLI alike); every write is atomic."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

DEPLOYMENTS_NAME = "deployments.json"


@dataclass(frozen=True)
class Deployment:
    """One host's record: the host as deployed, how its agent runs, and, once stopped, when."""

    host: dict[str, Any] = field(default_factory=dict)  # Host.to_wire() as it was deployed
    mode: str = ""  # "tunnel" or "direct"
    remote_port: int | None = None  # the tunnel's port on the host, which the agent dials
    pid: int = 0
    bundle: str = ""  # the bundle's short hash
    dir: str = ""  # the remote directory, resolved
    python: str = ""  # the interpreter chosen
    python_setting: str = ""  # the host's python setting then ("": found by corral)
    deployed: float = 0.0
    stopped: float | None = None  # its agent was stopped at this time (the files stay until the host is removed)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.stopped is None:
            del data["stopped"]
        return data

    @classmethod
    def from_json(cls, data: Any) -> Deployment | None:
        """The record of this JSON object (settings it does not know are ignored), or None if it is not one."""
        if not isinstance(data, dict):
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError:
            return None


class Deployments:
    """The file of every host's Deployment, in a state directory."""

    _lock = threading.Lock()  # one writer at a time in this process; flock() keeps other processes out

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / DEPLOYMENTS_NAME

    def all(self) -> dict[str, Deployment]:
        """Every record by alias ({} if there is no file; an unreadable one is logged and read as empty)."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return {}
        if not isinstance(data, dict):
            log.warning("ignoring %s: not a JSON object", self.path)
            return {}
        records = {alias: Deployment.from_json(record) for alias, record in data.items()}
        return {alias: record for alias, record in records.items() if record is not None}

    def get(self, alias: str) -> Deployment | None:
        return self.all().get(alias)

    def put(self, alias: str, record: Deployment) -> None:
        with self._locked():
            records = self.all()
            records[alias] = record
            self._write(records)

    def drop(self, alias: str) -> None:
        with self._locked():
            records = self.all()
            if records.pop(alias, None) is not None:
                self._write(records)

    def mark_stopped(self, alias: str, when: float) -> None:
        """Its agent is gone: the record stays (what is left on the host, the Python to try first next time)."""
        with self._locked():
            records = self.all()
            record = records.get(alias)
            if record is not None:
                records[alias] = dataclasses.replace(record, stopped=when, pid=0, remote_port=None)
                self._write(records)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(str(self.path.with_name(DEPLOYMENTS_NAME + ".lock")), os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _write(self, records: dict[str, Deployment]) -> None:
        """A temporary file, flushed to disk, then renamed over the old one: a crash leaves one or the other."""
        tmp = self.path.with_name(DEPLOYMENTS_NAME + ".tmp")
        fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({alias: r.to_json() for alias, r in records.items()}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
