"""A function object as a job's callable: the "module:qualname" an agent imports, and what it is bound to."""

from __future__ import annotations

import functools
import inspect
import os
import pickle
import sys
import types
from dataclasses import dataclass, field
from typing import Any

from .errors import CannotShip


@dataclass(frozen=True)
class Call:
    """What a job calls: `name` ("module:qualname") with `bound` before the caller's arguments (a bound
    method's object, a partial's arguments) and `keywords` under them; `module` defines it (None for a
    name given as text), `script` is the file of a function defined in the main script."""

    name: str
    bound: tuple[Any, ...] = ()
    keywords: dict[str, Any] = field(default_factory=dict)
    module: types.ModuleType | None = None
    script: str = ""

    def args(self, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The (args, kwargs) the agent passes, with what this call is bound to."""
        if not self.bound and not self.keywords:
            return args, kwargs or {}
        return self.bound + tuple(args), ({**self.keywords, **kwargs} if kwargs else dict(self.keywords))


def _refuse(what: str, why: str, hint: str = "define it with def at the top level of a module") -> CannotShip:
    return CannotShip(f"cannot send {what} to agents: {why}", hint)


def _lookup(module: types.ModuleType, qualname: str) -> Any:
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found


def describe(func: Any) -> Call:
    """The Call of a function object or of a "module:function" name; CannotShip, one line, for what an agent
    could never find by name (a lambda, a nested function, a bound object that does not pickle)."""
    if isinstance(func, str):
        return Call(func)
    if isinstance(func, functools.partial):
        inner = describe(func.func)
        return Call(inner.name, inner.bound + tuple(func.args), {**inner.keywords, **(func.keywords or {})},
                    inner.module, inner.script)
    bound: tuple[Any, ...] = ()
    target = func
    owner = getattr(func, "__self__", None)
    if inspect.ismethod(func) and not isinstance(owner, type):
        target, bound = func.__func__, (owner,)  # a method of an object: call the class's function with it
    elif inspect.isbuiltin(func) and owner is not None and not isinstance(owner, (types.ModuleType, type)):
        bound = (owner,)  # e.g. "text".upper: str.upper with the object first
    if bound:
        try:
            pickle.dumps(bound[0])
        except Exception as exc:  # noqa: BLE001 - any pickling failure means the object cannot travel
            raise _refuse(getattr(func, "__qualname__", repr(func)),
                          f"the object it is bound to does not pickle ({type(exc).__name__}: {exc})",
                          "pass a module-level function and the data it needs as arguments") from None
    if not callable(func):
        raise CannotShip(f"{func!r} is not callable", "pass a function or a 'module:function' name")
    qualname = getattr(target, "__qualname__", None)
    module_name = getattr(target, "__module__", None)
    if bound and module_name is None:
        module_name = type(bound[0]).__module__
    if not isinstance(qualname, str) or not isinstance(module_name, str):
        raise _refuse(repr(func), "it has no module and qualified name (a callable object?)",
                      "pass a function, or a 'module:function' name")
    if getattr(target, "__name__", "") == "<lambda>":
        raise _refuse(f"lambda {qualname}", "a lambda has no name an agent can import")
    module = sys.modules.get(module_name)
    if "<locals>" in qualname:
        alias = next((k for k, v in vars(module).items() if v is target), None) if module is not None else None
        if alias is not None:  # found at module level under another name: a decorator replaced it
            raise _refuse(f"{module_name}.{alias}", f"its name says {qualname}: a decorator replaced it without"
                          " functools.wraps", "decorate the wrapper with @functools.wraps(func)")
        raise _refuse(qualname, "a function defined inside another function has no name an agent can import")
    if module is None:
        raise _refuse(qualname, f"its module {module_name!r} is not imported here")
    found = _lookup(module, qualname)
    if inspect.isbuiltin(target) and bound:
        pass  # a builtin's method of an object ("text".upper): its class holds a descriptor, not the method
    elif found is not target and getattr(found, "__func__", None) is not getattr(target, "__func__", target):
        raise _refuse(f"{module_name}.{qualname}", "that name does not lead back to it (a decorator without"
                      " functools.wraps, or a name rebound since)")
    if module_name in ("__main__", "__mp_main__"):
        return _from_script(module, qualname, bound)
    return Call(f"{module_name}:{qualname}", bound, {}, module)


def _from_script(main: types.ModuleType, qualname: str, bound: tuple[Any, ...]) -> Call:
    """A function of the main script runs on agents as a module named after the script's file (its
    `if __name__ == "__main__":` block does not run there, as with multiprocessing's spawn)."""
    path = getattr(main, "__file__", None)
    if not path:
        raise _refuse(qualname, "it is defined in an interactive session", "put it in a module file and import it")
    stem = os.path.splitext(os.path.basename(path))[0]
    if not stem.isidentifier():
        raise _refuse(qualname, f"its script's name {os.path.basename(path)!r} is not a module name",
                      "rename the script, or put the function in a module")
    return Call(f"{stem}:{qualname}", bound, {}, main, os.path.abspath(path))
