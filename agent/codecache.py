"""Shipped code on an agent's host: each bundle fetched once, hash-checked, unpacked safely, cached; and a job's sys.path."""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import io
import logging
import os
import re
import shutil
import sys
import time
import uuid
import zipfile
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

from .connection import call, open_proxy
from .errors import CorralError
from .protocol import (
    CODE_TYPEID,
    MAX_BUNDLE_BYTES,
    MAX_BUNDLE_FILES,
    MAX_BUNDLE_UNPACKED,
    JobResult,
    JobState,
    Task,
)
from .statedir import check_trusted, default_home

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"[0-9a-f]{64}\Z")
KEEP_BUNDLES = 64  # bundles kept in a host's cache; older ones (unused for KEEP_SECONDS) are removed
KEEP_SECONDS = 3600.0
FETCH_SECONDS = 60.0  # connect, then one bundle (at most MAX_BUNDLE_BYTES) from the master, slow links included


class BadBundle(CorralError):
    """A code bundle that is malformed, over the limits, or not what its hash says."""


# ---- what a bundle is: files by relative path, named by the hash of their names and bytes ---------------

def is_digest(text: object) -> bool:
    return isinstance(text, str) and _DIGEST.match(text) is not None


def bundle_digest(files: Sequence[Tuple[str, bytes]]) -> str:
    """sha256 over each file's name, length and bytes, in name order: the same files always give the same
    name, whatever the zip's timestamps or compression."""
    digest = hashlib.sha256()
    for name, data in sorted(files):
        digest.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return digest.hexdigest()


def safe_name(name: str) -> str:
    """A member's path if it stays inside the bundle (relative, no `..`, no backslash); else BadBundle."""
    parts = name.split("/")
    if (not name or len(name) > 1024 or "\\" in name or "\0" in name or name.startswith("/")
            or any(part in ("", ".", "..") or len(part) > 255 for part in parts)):
        raise BadBundle(f"bundle member {name[:100]!r} is not a plain relative path")
    return name


def read_bundle(data: bytes, digest: str) -> List[Tuple[str, bytes]]:
    """The files of a bundle, checked: within the limits, every path inside it, and their hash is `digest`.
    The master runs this on arrival and the agent again before it unpacks (it trusts no copy in between)."""
    if not is_digest(digest):
        raise BadBundle(f"{str(digest)[:80]!r} is not a sha256 hex digest")
    if type(data) is not bytes or len(data) > MAX_BUNDLE_BYTES:
        raise BadBundle(f"a bundle must be bytes of at most {MAX_BUNDLE_BYTES} bytes")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [m for m in archive.infolist() if not m.filename.endswith("/")]
            if len(members) > MAX_BUNDLE_FILES:
                raise BadBundle(f"the bundle holds {len(members)} files; the limit is {MAX_BUNDLE_FILES}")
            unpacked = sum(m.file_size for m in members)
            if unpacked > MAX_BUNDLE_UNPACKED:
                raise BadBundle(f"the bundle unpacks to {unpacked} bytes; the limit is {MAX_BUNDLE_UNPACKED}")
            names = [safe_name(m.filename) for m in members]
            if len(set(names)) != len(names):
                raise BadBundle("the bundle names a file twice")
            # read() yields at most each member's declared size and checks its CRC: the sum above bounds it.
            files = [(name, archive.read(member)) for name, member in zip(names, members)]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as exc:
        raise BadBundle(f"the bundle is not a readable zip: {exc}") from None
    if bundle_digest(files) != digest:
        raise BadBundle(f"the bundle's content does not hash to {digest[:12]}")
    return files


# ---- the cache on this host --------------------------------------------------------------------------

def default_dir() -> Path:
    """Beside the agent's zipapp when deployed (its remote directory), else in the state directory."""
    archive = getattr(getattr(sys.modules[__name__], "__loader__", None), "archive", None)  # zipimport: the .pyz
    if archive:
        return Path(archive).parent / "code"
    return default_home() / "code-cache"


CACHE_DIR = default_dir()


def bundle_dir(digest: str, cache: Optional[Path] = None) -> Path:
    return (cache or CACHE_DIR) / digest


def fetch(address: Tuple[str, int], authkey: bytes, digest: str) -> bytes:
    """One bundle from the master's code store (it is rare: once per bundle per host)."""
    store = open_proxy(address, authkey, CODE_TYPEID)
    data: bytes = call(store, "get", FETCH_SECONDS, digest)  # on this thread's connection to the master
    return data


class CodeCache:
    """The agent's side: before tasks reach the pool, every bundle they name is on this host's disk."""

    def __init__(self, fetch: Callable[[str], bytes], directory: Optional[Path] = None, verbose: bool = False) -> None:
        self.fetch = fetch
        self.directory = directory or CACHE_DIR
        self.verbose = verbose
        self.checked = False  # the directory is ours (made or checked once)

    def prepare(self, tasks: List[Task]) -> Tuple[List[Task], List[JobResult]]:
        """(tasks ready to run, failed results for tasks whose code could not be had). Each bundle is
        fetched at most once, however many tasks need it (the take loop is one thread; a lock file keeps
        other agents on this host from fetching it too)."""
        wanted: Dict[str, str] = {task.code: "" for task in tasks if task.code is not None}
        if not wanted:
            return tasks, []
        for digest in wanted:
            wanted[digest] = self.ensure(digest)
        ready, failed = [], []
        now = time.time()
        for task in tasks:
            problem = wanted[task.code] if task.code is not None else ""
            if problem:
                failed.append(JobResult(task.job_id, task.attempt, JobState.FAILED.value, error=problem,
                                        started=now, ended=now))
            else:
                ready.append(task)
        return ready, failed

    def ensure(self, digest: str) -> str:
        """"" once the bundle is unpacked here; else why it cannot be (the job's error)."""
        if not is_digest(digest):
            return f"code {str(digest)[:80]!r} does not name a code bundle (a sha256 hex digest)"
        target = bundle_dir(digest, self.directory)
        try:
            if not self.checked:
                own_directory(self.directory)
                self.checked = True
            if target.is_dir():
                _touch(target)
                return ""
            with open(self.directory / f"{digest}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another agent on this host may be fetching it right now
                if not target.is_dir():
                    data = self.fetch(digest)
                    unpack(read_bundle(data, digest), target)
                    if self.verbose:
                        print(f"Fetched shipped code {digest[:12]} ({len(data)} bytes)", flush=True)
        except (CorralError, OSError, EOFError) as exc:
            return f"cannot get the job's shipped code {digest[:12]}: {exc}"
        except Exception as exc:  # noqa: BLE001 - e.g. the master's error, re-raised by the managers protocol
            return f"cannot get the job's shipped code {digest[:12]}: {type(exc).__name__}: {exc}"
        prune(self.directory, keep=digest)
        return ""


def own_directory(directory: Path) -> None:
    """Make the cache directory (0700), or check that it is ours and no one else can write to it: what is
    in it runs as code, unchecked once unpacked (as ssh's StrictModes, a directory of another user's is refused)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        check_trusted(directory, "code cache", directory=True)  # the state directory's own rule
    except CorralError as exc:
        info = directory.stat()
        raise BadBundle(f"the code cache {directory} is not this user's alone (owner uid {info.st_uid},"
                        f" mode {info.st_mode & 0o777:o}; {exc.message}); refusing to run code from it") from None


def unpack(files: List[Tuple[str, bytes]], target: Path) -> None:
    """Write checked files into `target` all at once (a temporary directory renamed into place)."""
    stage = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        for name, data in files:
            path = stage.joinpath(*name.split("/"))
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "xb") as out:  # x: a name met twice (file and folder) fails, never overwrites
                out.write(data)
        stage.mkdir(exist_ok=True)  # an empty bundle is still a bundle
        try:
            os.rename(stage, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def prune(directory: Path, keep: str, limit: int = KEEP_BUNDLES) -> None:
    """Keep the cache to `limit` bundles: the least recently used go, unless used within KEEP_SECONDS."""
    try:
        bundles = [p for p in directory.iterdir() if is_digest(p.name) and p.name != keep]
        if len(bundles) < limit:
            return
        bundles.sort(key=lambda p: p.stat().st_mtime)
        cutoff = time.time() - KEEP_SECONDS
        for path in bundles[: len(bundles) - limit + 1]:
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
                (directory / f"{path.name}.lock").unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not prune the code cache %s: %s", directory, exc)


# ---- inside a pool worker: what a job can import -----------------------------------------------------

# What this module put at the front of sys.path for the current job, and which modules were loaded before.
_active: Tuple[str, ...] = ()
_before: FrozenSet[str] = frozenset()
_last: Tuple[Optional[str], Optional[str]] = (None, None)  # (code, cwd) of the job before
_NEVER_SHADOWED = frozenset({"corral", "__main__", "__mp_main__"}) | frozenset(sys.builtin_module_names)


def job_entries(task: Task) -> Tuple[str, ...]:
    """What goes at the front of a callable job's sys.path: its shipped code, then its cwd."""
    digest = task.code
    entries: Tuple[str, ...] = (str(bundle_dir(digest)),) if digest and is_digest(digest) else ()
    if task.cwd:
        entries += (os.path.abspath(task.cwd),)
    return entries


def enter(task: Task) -> bool:
    """Make sys.path start with this job's entries; True when what is importable changed. The modules
    the previous job's entries brought in are forgotten first, so no job sees another's code; the
    agent's own modules (loaded before any job) are never touched."""
    global _active, _before, _last
    key = (task.code, task.cwd)
    if key == _last:
        return False  # the hot path: the same code and cwd as the job before (a map's jobs)
    _last = key
    entries = job_entries(task) if key != (None, None) else ()
    if entries == _active:
        return False
    if _active:
        _forget(_active, _before)
        for entry in _active:
            if entry in sys.path:
                sys.path.remove(entry)
    _before = frozenset(sys.modules) if entries else frozenset()
    sys.path[:0] = entries
    digest = task.code
    if entries and digest and entries[0] == str(bundle_dir(digest)):
        # A module of the same name loaded from elsewhere (the agent's own path) must not shadow the shipped one.
        for name in _top_names(entries[0]):
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[loaded]
    _active = entries
    importlib.invalidate_caches()
    return True


def _top_names(entry: str) -> List[str]:
    try:
        names = os.listdir(entry)
    except OSError:
        return []
    tops = [n[:-3] if n.endswith(".py") else n for n in names
            if n.endswith(".py") or os.path.isdir(os.path.join(entry, n))]
    return [n for n in tops if n not in _NEVER_SHADOWED]


def _forget(entries: Tuple[str, ...], before: FrozenSet[str]) -> None:
    """Drop the modules loaded since `before` from under `entries` (a file or a package path there)."""
    prefixes = tuple(entry.rstrip(os.sep) + os.sep for entry in entries)
    for name, module in list(sys.modules.items()):
        if name in before:
            continue
        where = getattr(module, "__file__", None) or ""
        paths = list(getattr(module, "__path__", None) or ())
        if where.startswith(prefixes) or any(str(p).startswith(prefixes) for p in paths):
            del sys.modules[name]


def shell_env(env: Dict[str, str], digest: Optional[str]) -> Dict[str, str]:
    """A shell job's environment with its shipped code (bundle `digest`) at the front of PYTHONPATH."""
    if not digest or not is_digest(digest):
        return env
    rest = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(bundle_dir(digest)) + (os.pathsep + rest if rest else "")
    return env
