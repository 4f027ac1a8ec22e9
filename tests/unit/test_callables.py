"""Functions as objects: the name an agent imports, what a call is bound to, and what is refused (in-process)."""

from __future__ import annotations

import functools
import math
import os.path
import threading

import pytest

from corral.console.callables import describe
from corral.console.errors import CannotShip


def plain(x: int) -> int:
    return x


class Thing:
    def __init__(self, n: int) -> None:
        self.n = n

    def method(self, x: int) -> int:
        return self.n + x

    @classmethod
    def make(cls, n: int) -> "Thing":
        return cls(n)

    @staticmethod
    def static(x: int) -> int:
        return x


def undecorated(func):  # a decorator without functools.wraps
    def wrapper(*a):
        return func(*a)
    return wrapper


@undecorated
def hidden(x: int) -> int:
    return x


def renamed(x: int) -> int:
    return x


alias = renamed
del renamed


def test_module_level_functions_builtins_and_classes_are_named() -> None:
    assert describe(plain).name == f"{__name__}:plain"
    assert describe(math.sqrt).name == "math:sqrt" and describe(pow).name == "builtins:pow"
    assert describe(os.path.join).name == "posixpath:join"
    assert describe(int).name == "builtins:int" and describe(Thing).name == f"{__name__}:Thing"
    assert describe(Thing.static).name == f"{__name__}:Thing.static"
    assert describe("pkg.mod:func").name == "pkg.mod:func" and describe("pkg.mod:func").module is None


def test_methods_and_partials_carry_what_they_are_bound_to() -> None:
    thing = Thing(5)
    call = describe(thing.method)
    assert call.name == f"{__name__}:Thing.method" and call.bound[0] is thing
    assert call.args((1,)) == ((thing, 1), {})
    assert describe(Thing.make).name == f"{__name__}:Thing.make" and describe(Thing.make).bound == ()
    upper = describe("text".upper)
    assert upper.name == "builtins:str.upper" and upper.bound == ("text",)
    part = describe(functools.partial(plain, 1))
    assert part.name == f"{__name__}:plain" and part.args((), {}) == ((1,), {})
    nested = describe(functools.partial(functools.partial(Thing(1).method), x=2))
    assert nested.keywords == {"x": 2} and nested.args((), {"y": 3})[1] == {"x": 2, "y": 3}


def test_what_no_agent_could_find_by_name_is_refused_in_one_line() -> None:
    def inner(x: int) -> int:
        return x

    class Holder:
        def __init__(self) -> None:
            self.lock = threading.Lock()

        def go(self) -> None:
            pass

    class CallMe:
        def __call__(self) -> None:
            pass

    for func, words in ((lambda x: x, "a lambda has no name"), (inner, "defined inside another function"),
                        (Holder().go, "does not pickle"), (CallMe(), "callable object"),
                        (hidden, "without functools.wraps"), (alias, "does not lead back to it"),
                        (42, "is not callable")):
        with pytest.raises(CannotShip) as caught:
            describe(func)
        assert words in str(caught.value) and "\n" not in str(caught.value)
