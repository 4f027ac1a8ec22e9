"""The agent as a zipapp (corral/__init__.py and the corral/agent package), named by the hash of its content."""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import threading
import zipapp
from dataclasses import dataclass
from pathlib import Path

import corral
import corral.agent

AGENT_DIR = Path(corral.agent.__file__).resolve().parent
# The umbrella package's __init__ is stdlib-only at import, so the zipapp carries it as it is.
UMBRELLA_INIT = Path(corral.__file__).resolve()
HASH_CHARS = 12

# The archive's entry point: run the agent and exit with its code (zipapp's own template drops it).
MAIN_PY = "import sys\nfrom corral.agent.__main__ import main\nsys.exit(main())\n"

_cache: dict[str, "Bundle"] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class Bundle:
    """The zipapp's bytes and its name on a remote host: agent-<sha256[:12]>.pyz."""

    digest: str  # full sha256 hex of the content (sources and entry point)
    data: bytes

    @property
    def short(self) -> str:
        return self.digest[:HASH_CHARS]

    @property
    def name(self) -> str:
        return f"agent-{self.short}.pyz"


def _sources(source: Path) -> list[tuple[str, bytes]]:
    """corral/__init__.py and the agent package's .py files, sorted by name: what the bundle holds besides
    its entry point."""
    files = sorted(p for p in source.glob("*.py") if p.is_file())
    return [("corral/__init__.py", UMBRELLA_INIT.read_bytes())] + [(f"corral/agent/{p.name}", p.read_bytes()) for p in files]


def content_hash(sources: list[tuple[str, bytes]]) -> str:
    """sha256 over each file's name and bytes, in order: the same sources always give the same name,
    whatever the zip's timestamps."""
    digest = hashlib.sha256()
    for name, data in [*sources, ("__main__.py", MAIN_PY.encode())]:
        digest.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return digest.hexdigest()


def build(source: Path = AGENT_DIR) -> Bundle:
    """The bundle of the agent package at `source` (cached per content hash, so rebuilding is a hash)."""
    sources = _sources(source)
    digest = content_hash(sources)
    with _lock:
        cached = _cache.get(digest)
        if cached is not None:
            return cached
        with tempfile.TemporaryDirectory(prefix="corral-bundle-") as tmp:
            stage = Path(tmp) / "app"
            (stage / "corral" / "agent").mkdir(parents=True)
            for name, data in sources:
                (stage / name).write_bytes(data)
            (stage / "__main__.py").write_text(MAIN_PY)
            out = io.BytesIO()
            zipapp.create_archive(stage, out, interpreter="/usr/bin/env python3", compressed=True)
            shutil.rmtree(stage)
        bundle = Bundle(digest, out.getvalue())
        _cache[digest] = bundle
        return bundle
