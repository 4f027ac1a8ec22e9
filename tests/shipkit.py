"""For the Pool, Executor and shipping tests: task modules written to a temporary folder (importable here, never
on the agents' cwd or sys.path), and a real master with real agents shared by one test module."""

from __future__ import annotations

import importlib
import sys
import textwrap
import types
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster import Cluster

# The functions of CPython's own Pool and futures tests (Lib/test/_test_multiprocessing.py,
# test_concurrent_futures), plus a few of corral's; {helper} is the sibling module's name.
TASKS = '''
import os
import sys
import time

import {helper} as helper


def sqr(x, wait=0.0):
    time.sleep(wait)
    return x * x


def mul(x, y):
    return x * y


def identity(x):
    return x


def capture(*args, **kwargs):
    return args, kwargs


def raise_large_valuerror(wait):
    time.sleep(wait)
    raise ValueError("x" * 1024**2)


def raising():
    raise KeyError("key")


def unpickleable_result():
    return lambda: 42


def raise_123():
    raise RuntimeError(123) # some comment


class SayWhenError(ValueError):
    pass


def exception_throwing_generator(total, when):
    if when == -1:
        raise SayWhenError("Somebody said when")
    for i in range(total):
        if i == when:
            raise SayWhenError("Somebody said when")
        yield i


def sibling(x):
    return helper.twice(x)


def where():
    """What the job sees: its cwd, the head of its sys.path, and whether this module came from a bundle."""
    return os.getcwd(), sys.path[:3], __file__


def pid_after(seconds):
    time.sleep(seconds)
    return os.getpid()


class Counter:
    """Picklable state for a bound method."""

    def __init__(self, start):
        self.start = start

    def add(self, x):
        return self.start + x
'''

HELPER = '''
def twice(x):
    return 2 * x
'''


def write_module(folder: Path, name: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def import_from(folder: Path, name: str) -> types.ModuleType:
    """Import `name` from `folder` in this (the test's) process only."""
    sys.path.insert(0, str(folder))
    try:
        importlib.invalidate_caches()
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))


def forget(*names: str) -> None:
    for name in names:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[loaded]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[types.ModuleType]:
    """A task module with a sibling it imports, under unique names, in a folder only this process knows."""
    folder = tmp_path_factory.mktemp("mods")
    name, helper = f"tasks_{uuid.uuid4().hex[:8]}", f"helper_{uuid.uuid4().hex[:8]}"
    write_module(folder, helper, HELPER)
    write_module(folder, name, TASKS.format(helper=helper))
    module = import_from(folder, name)
    try:
        yield module
    finally:
        forget(name, helper)


@pytest.fixture(scope="module")
def pool_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One master and two agents of two slots (like Pool(4)), shared by a test module."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster") / "home")
    cluster.start_master()
    try:
        cluster.start_agent("a1", slots=2)
        cluster.start_agent("a2", slots=2)
        yield cluster
    finally:
        cluster.stop()
