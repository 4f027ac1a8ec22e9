"""Bundles, in-process: named by their files, checked before use (limits, paths, hash), unpacked whole; and a pool
worker's sys.path: a job's code leads it, and what a job imported is forgotten before the next one."""

from __future__ import annotations

import io
import os
import sys
import zipfile
from pathlib import Path

import pytest

from corral.agent import codecache
from corral.agent.codecache import BadBundle, bundle_digest, read_bundle, unpack
from corral.agent.protocol import Task
from corral.console import ship


def make_zip(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out.getvalue()


def task(code: str | None = None, cwd: str | None = None) -> Task:
    return Task(1, 1, None, "m:f", None, {}, cwd, None, code)


def test_the_same_files_make_the_same_name_whatever_the_zip(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("A = 1\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("")
    first = ship.build(ship.named_sources([tmp_path]))
    again = ship.build(ship.named_sources([tmp_path]))
    assert first is not None and again is not None
    assert first.digest == again.digest and first.data == again.data
    assert sorted(name for name, _ in read_bundle(first.data, first.digest)) == ["a.py", "pkg/__init__.py"]
    (tmp_path / "a.py").write_text("A = 2\n")
    changed = ship.build(ship.named_sources([tmp_path]))
    assert changed is not None and changed.digest != first.digest
    # The name is of the files, not of the zip: another archiver's zip of the same files checks out.
    files = read_bundle(changed.data, changed.digest)
    assert sorted(read_bundle(make_zip(dict(reversed(files))), changed.digest)) == sorted(files)


@pytest.mark.parametrize("name", ["../up.py", "/abs.py", "a/../../up.py", "a//b.py", "./a.py", "a\\b.py", "a/./b"])
def test_a_member_outside_the_bundle_is_refused(name: str) -> None:
    files = [(name, b"x")]
    with pytest.raises(BadBundle, match="not a plain relative path"):
        read_bundle(make_zip(dict(files)), bundle_digest(files))


def test_limits_and_hash_are_checked_before_anything_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"m{i}.py": b"" for i in range(5)}
    digest = bundle_digest(list(files.items()))
    monkeypatch.setattr(codecache, "MAX_BUNDLE_FILES", 4)
    with pytest.raises(BadBundle, match="holds 5 files"):
        read_bundle(make_zip(files), digest)
    monkeypatch.setattr(codecache, "MAX_BUNDLE_FILES", 100)
    monkeypatch.setattr(codecache, "MAX_BUNDLE_UNPACKED", 10)
    with pytest.raises(BadBundle, match="unpacks to"):
        read_bundle(make_zip({"big.py": b"x" * 11}), bundle_digest([("big.py", b"x" * 11)]))
    monkeypatch.setattr(codecache, "MAX_BUNDLE_UNPACKED", 1000)
    with pytest.raises(BadBundle, match="does not hash"):
        read_bundle(make_zip(files), bundle_digest([("other.py", b"")]))
    with pytest.raises(BadBundle, match="twice"):
        read_bundle(make_zip({}) if False else _dup_zip(), bundle_digest([("a.py", b"1"), ("a.py", b"2")]))


def _dup_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("a.py", b"1")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            z.writestr("a.py", b"2")
    return out.getvalue()


def test_unpack_is_all_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    with pytest.raises(OSError):
        unpack([("a", b"file"), ("a/b.py", b"under a file")], target)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    unpack([("pkg/m.py", b"X = 1\n")], target)
    assert (target / "pkg" / "m.py").read_bytes() == b"X = 1\n"


def test_a_bundle_is_fetched_once_and_a_bad_one_fails_its_tasks(tmp_path: Path) -> None:
    files = [("m.py", b"X = 1\n")]
    digest = bundle_digest(files)
    fetched: list[str] = []

    def fetch(d: str) -> bytes:
        fetched.append(d)
        return make_zip(dict(files)) if d == digest else b"not a zip"

    cache = codecache.CodeCache(fetch, tmp_path / "cache")
    bad = "0" * 64
    rows = [task(d)._replace(job_id=i) for i, d in enumerate([digest, digest, bad, digest])]
    ready, failed = cache.prepare(rows + [task()._replace(job_id=9)])
    assert [r[0] for r in ready] == [0, 1, 3, 9] and [f[0] for f in failed] == [2]
    assert "not a readable zip" in failed[0][7]
    assert fetched == [digest, bad]
    cache.prepare(rows[:1])
    assert fetched == [digest, bad]  # cached on disk: not fetched again


def test_a_jobs_code_leads_sys_path_and_is_forgotten_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codecache, "CACHE_DIR", tmp_path)
    digest = bundle_digest([("shipped_mod_xyz.py", b"WHO = 'bundle'\n")])
    unpack([("shipped_mod_xyz.py", b"WHO = 'bundle'\n")], tmp_path / digest)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "cwd_mod_xyz.py").write_text("WHO = 'cwd'\n")
    saved = list(sys.path)
    try:
        assert codecache.enter(task(digest, str(elsewhere)))
        assert sys.path[:2] == [str(tmp_path / digest), str(elsewhere)]
        import cwd_mod_xyz  # type: ignore[import-not-found]
        import shipped_mod_xyz  # type: ignore[import-not-found]

        assert (shipped_mod_xyz.WHO, cwd_mod_xyz.WHO) == ("bundle", "cwd")
        assert not codecache.enter(task(digest, str(elsewhere)))  # same job kind: nothing to redo
        assert codecache.enter(task())
        assert "shipped_mod_xyz" not in sys.modules and "cwd_mod_xyz" not in sys.modules
        assert str(elsewhere) not in sys.path and str(tmp_path / digest) not in sys.path
        assert "os" in sys.modules and "corral.agent.codecache" in sys.modules  # what was there before stays
        with pytest.raises(ImportError):
            import shipped_mod_xyz  # noqa: F401,F811
    finally:
        codecache.enter(task())
        sys.path[:] = saved
        for name in ("shipped_mod_xyz", "cwd_mod_xyz"):
            sys.modules.pop(name, None)
    assert os.getcwd()


def test_a_cache_directory_others_can_write_to_is_refused(tmp_path: Path) -> None:
    files = [("m.py", b"X = 1\n")]
    digest = bundle_digest(files)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    unpack(files, shared / digest)  # planted by someone who could write there
    ready, failed = codecache.CodeCache(lambda d: make_zip(dict(files)), shared).prepare([task(digest)])
    assert not ready and "is not this user's alone" in failed[0][7]
    if os.geteuid() == 0:  # and one owned by another user
        other = tmp_path / "other"
        other.mkdir(mode=0o700)
        os.chown(other, 65534, 65534)
        ready, failed = codecache.CodeCache(lambda d: b"", other).prepare([task(digest)])
        assert not ready and "owner uid 65534" in failed[0][7]
    fresh = tmp_path / "fresh" / "code"
    ready, _ = codecache.CodeCache(lambda d: make_zip(dict(files)), fresh).prepare([task(digest)])
    assert ready and fresh.stat().st_mode & 0o777 == 0o700
