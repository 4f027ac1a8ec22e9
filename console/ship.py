"""Code shipping, client side: which files a function needs on agents, as one bundle named by their hash, sent once."""

from __future__ import annotations

import importlib.util
import io
import os
import site
import sys
import sysconfig
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from corral.agent.codecache import bundle_digest
from corral.agent.protocol import MAX_BUNDLE_BYTES, MAX_BUNDLE_FILES, MAX_BUNDLE_UNPACKED

from .callables import Call
from .errors import CannotShip

_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed: the same files make the same zip (the name is their hash anyway)


@dataclass(frozen=True)
class Bundle:
    """Files for the front of a job's sys.path: `digest` names them (agent/codecache.py's hash), `data` is the zip."""

    digest: str
    data: bytes
    files: int
    unpacked: int


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _installed_roots() -> tuple[str, ...]:
    """Where this Python's own and installed modules live: assumed importable on agents too."""
    paths = sysconfig.get_paths()
    roots = {paths.get(k, "") for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots |= set(getattr(site, "getsitepackages", lambda: [])())
    roots.add(getattr(site, "getusersitepackages", lambda: "")())
    roots |= {sys.prefix, sys.base_prefix, sys.exec_prefix}
    return tuple(os.path.realpath(r).rstrip(os.sep) + os.sep for r in roots if r)


_INSTALLED = _installed_roots()


def installed(module: types.ModuleType) -> bool:
    """Whether agents can be expected to import `module` without shipping: a builtin, the stdlib, anything
    installed in site-packages, or corral itself (the agent is corral)."""
    name = module.__name__
    if name == "corral" or name.startswith("corral."):
        return True
    where = getattr(module, "__file__", None)
    if not where:
        return getattr(module, "__path__", None) is None  # a builtin; a namespace package is user code
    return os.path.realpath(str(where)).startswith(_INSTALLED)


@dataclass(frozen=True)
class _Source:
    """One thing to ship: a file or a folder, and where it goes in the bundle ("" = the bundle's root)."""

    path: Path
    at: str


def _module_source(module: types.ModuleType, as_name: str = "") -> tuple[_Source, Path] | None:
    """The module's file, or its top-level package's folder, and the folder that holds it (its root)."""
    where = getattr(module, "__file__", None)
    top = module.__name__.split(".")[0]
    if where is None:
        paths = list(getattr(module, "__path__", None) or ())
        if not paths:
            return None
        folder = Path(paths[0]).resolve()  # a namespace package: its (first) folder
        for _ in module.__name__.split(".")[1:]:
            folder = folder.parent
        return _Source(folder, top), folder.parent
    path = Path(where).resolve()
    depth = len(module.__name__.split(".")) - (0 if path.name == "__init__.py" else 1)
    if depth == 0 or module.__name__ in ("__main__", "__mp_main__"):
        return _Source(path, (as_name or top) + ".py"), path.parent  # a top-level module (or the main script)
    folder = path.parent
    for _ in range(depth - 1):
        folder = folder.parent
    return _Source(folder, top), folder.parent


def _siblings(root: Path, exclude: str) -> list[_Source]:
    """Modules beside the shipped one (in the same folder) that this process imported: what it imports too."""
    out = []
    for name, module in list(sys.modules.items()):
        if "." in name or name in (exclude, "__main__", "__mp_main__") or not isinstance(module, types.ModuleType):
            continue
        if installed(module):
            continue
        found = _module_source(module)
        if found is not None and found[1] == root:
            out.append(found[0])
    return out


def default_sources(call: Call) -> list[_Source]:
    """What a function object needs shipped: nothing if agents have its module; else its module (the whole
    top-level package if it is in one) and the modules beside it that this process imported."""
    module = call.module
    if module is None or installed(module):
        return []
    stem = call.name.partition(":")[0] if call.script else ""
    found = _module_source(module, stem)
    if found is None:
        return []
    source, root = found
    return [source] + _siblings(root, module.__name__.split(".")[0])


def named_sources(ship: Iterable[Any]) -> list[_Source]:
    """`ship=[module, "pkg", "/path/to/dir"]`: a module object or importable name (its file or top-level
    package), or a folder whose contents go at the bundle's root (as if it were on PYTHONPATH)."""
    out: list[_Source] = []
    for item in ship:
        if isinstance(item, types.ModuleType):
            found = _module_source(item)
        elif isinstance(item, (str, os.PathLike)) and (os.sep in str(item) or os.path.exists(item)):
            path = Path(item).expanduser().resolve()
            if not path.exists():
                raise CannotShip(f"cannot ship {item}: no such file or folder")
            out.append(_Source(path, "" if path.is_dir() else path.name))
            continue
        elif isinstance(item, str):
            try:
                spec = importlib.util.find_spec(item.split(".")[0])
            except (ImportError, ValueError) as exc:
                raise CannotShip(f"cannot ship {item!r}: {exc}") from None
            if spec is None:
                raise CannotShip(f"cannot ship {item!r}: no module of that name here, and no such folder")
            found = _spec_source(spec)
        else:
            raise CannotShip(f"cannot ship {item!r}: give a module, a module name or a folder")
        if found is None:
            raise CannotShip(f"cannot ship {item!r}: it has no files (a builtin module?)")
        out.append(found[0])
    return out


def _spec_source(spec: Any) -> tuple[_Source, Path] | None:
    if spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]).resolve()
        return _Source(folder, spec.name), folder.parent
    if spec.origin and os.path.isfile(spec.origin):
        path = Path(spec.origin).resolve()
        return _Source(path, spec.name + ".py"), path.parent
    return None


def _walk(source: _Source) -> Iterator[tuple[str, Path]]:
    """(name in the bundle, file) for every file of a source: no __pycache__, no hidden files or folders."""
    if source.path.is_file():
        yield source.at, source.path
        return
    for folder, dirs, names in os.walk(source.path):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        rel = Path(folder).relative_to(source.path).as_posix()
        for name in sorted(names):
            if name.startswith(".") or name.endswith(_SKIP_SUFFIXES):
                continue
            inside = name if rel == "." else f"{rel}/{name}"
            yield (f"{source.at}/{inside}" if source.at else inside), Path(folder) / name


def build(sources: Sequence[_Source]) -> Bundle | None:
    """The bundle of these sources (None if there are none), or CannotShip, one line, over a limit."""
    if not sources:
        return None
    files: dict[str, bytes] = {}
    total = 0
    where = ", ".join(str(s.path) for s in sources[:3]) + (" …" if len(sources) > 3 else "")
    hint = "ship less (a smaller folder), or install it on the agents; see README 'Shipping code'"
    for source in sources:
        for name, path in _walk(source):
            if name in files:
                continue  # the same module reached twice (a sibling that is also named): the first stands
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise CannotShip(f"cannot ship {path}: {exc.strerror}") from None
            files[name] = data
            total += len(data)
            if len(files) > MAX_BUNDLE_FILES:
                raise CannotShip(f"the code to ship ({where}) is over {MAX_BUNDLE_FILES} files, the limit", hint)
            if total > MAX_BUNDLE_UNPACKED:
                raise CannotShip(f"the code to ship ({where}) is over {_mib(MAX_BUNDLE_UNPACKED)}, the limit", hint)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, _ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[name])
    data = out.getvalue()
    if len(data) > MAX_BUNDLE_BYTES:
        raise CannotShip(f"the code to ship ({where}) is {_mib(len(data))} zipped; the limit is {_mib(MAX_BUNDLE_BYTES)}",
                         hint)
    return Bundle(bundle_digest(list(files.items())), data, len(files), total)


def bundle_for(call: Call, ship: Sequence[Any] | None = None) -> Bundle | None:
    """The bundle a call needs: its default sources and the `ship` list (None when there is nothing to ship)."""
    return build(named_sources(ship or ()) + default_sources(call))
