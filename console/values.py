"""What agents hand in, read on the operator's side as data: a callable's pickled value, decoded by policy.

An agent (any host that was deployed) pickles a callable's return value; pickle.loads of it would run
whatever the pickle names. So the CLI and the console never unpickle one in full: they show the plain data
it holds (the master's own bounded, class-free unpickler) or `<pickled mod.Class, N bytes>`, the class
found by reading opcodes, building nothing. The Python API trusts its agents by default, as
multiprocessing trusts its workers, and can be told not to: Client(values="plain"), or an allowlist.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from typing import Any, Iterable, Union

from corral.agent.errors import CorralError

from .master.decode import plain_loads  # the master's own unpickler: bounded, class-free


TRUST = "trust"  # full pickle.loads: the agents are trusted (the Python API's default)
PLAIN = "plain"  # plain data only: dict/list/tuple/set/str/bytes/numbers/bool/None
Policy = Union[str, Iterable[Union[str, type]]]  # TRUST, PLAIN, or the classes ("module.Name") also allowed

# What a plain or malformed pickle raises on the way (the master's Refused is an UnpicklingError).
_UNREADABLE = (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, OverflowError,
               RecursionError, MemoryError)
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
# The machinery old protocols name before the class itself (protocol 0 reconstructs objects through these).
_HELPERS = {"copy_reg._reconstructor", "copyreg._reconstructor", "copyreg.__newobj__", "copyreg.__newobj_ex__",
            "__builtin__.object", "builtins.object"}


class ValueRefused(CorralError):
    """A job's value names a class this Client was told not to unpickle."""


class ValueUnreadable(CorralError):
    """A job's value that cannot be unpickled here (its class does not import, or the bytes are not a pickle)."""


def pickled_class(data: bytes) -> str:
    """The first class or function a pickle names ("module.Name"), read from its opcodes without running or
    building anything; "" if it names none that can be told."""
    pushed: list[str | None] = []  # what the opcodes pushed, as far as names go (None: not a string)
    memo: dict[int, str | None] = {}
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in ("GLOBAL", "INST", "STACK_GLOBAL"):
                if name != "STACK_GLOBAL":
                    found = str(arg).replace(" ", ".", 1)
                elif len(pushed) >= 2 and pushed[-1] is not None and pushed[-2] is not None:
                    found = f"{pushed[-2]}.{pushed[-1]}"
                else:
                    return ""
                if found not in _HELPERS:
                    return found
                pushed.append(None)
            if name in _STRINGS:
                pushed.append(arg if isinstance(arg, str) else None)
            elif name in _GETS:
                pushed.append(memo.get(arg if isinstance(arg, int) else -1))
            elif name in _PUTS:
                memo[arg if isinstance(arg, int) else -1] = pushed[-1] if pushed else None
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif opcode.stack_after:
                pushed.append(None)
    except ValueError:  # not a pickle, or cut short: what was read named nothing
        pass
    return ""


def opaque(data: bytes) -> str:
    """How a value that is not plain data is shown: its class and size, nothing of its content."""
    return f"<pickled {pickled_class(data) or 'value'}, {len(data):,} bytes>"


def shown(data: bytes) -> str:
    """A value for the operator (corral show/wait, the console's detail): the repr of the plain data it
    holds, else opaque(). Never runs anything the bytes name."""
    try:
        return repr(plain_loads(data))
    except _UNREADABLE:
        return opaque(data)


def as_json(data: bytes) -> Any:
    """A value for `corral show --json`: the plain data itself if JSON holds it, else its repr (tuples and
    sets become lists and strings as JSON has them), else opaque()."""
    try:
        value = plain_loads(data)
    except _UNREADABLE:
        return opaque(data)
    return value if _jsonable(value) else repr(value)


def _jsonable(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if depth > 64:
        return False
    if isinstance(value, list):
        return all(_jsonable(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v, depth + 1) for k, v in value.items())
    return False


def _allowed(policy: Iterable[str | type]) -> frozenset[tuple[str, str]]:
    names = set()
    for item in policy:
        text = f"{item.__module__}.{item.__qualname__}" if isinstance(item, type) else str(item)
        module, dot, name = text.rpartition(".") if ":" not in text else text.partition(":")
        if not dot or not module or not name:
            raise CorralError(f"values= lists classes as 'module.Name' (or the classes themselves), not {text!r}")
        names.add((module, name))
    return frozenset(names)


class _AllowedUnpickler(pickle.Unpickler):
    """Unpickles plain data and the allowed classes only; any other global is refused by name."""

    def __init__(self, data: bytes, allowed: frozenset[tuple[str, str]]) -> None:
        super().__init__(io.BytesIO(data))
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not among the classes this Client reads")


class Reader:
    """How one Client turns values into objects: TRUST (pickle.loads), PLAIN, or an allowlist of classes."""

    def __init__(self, policy: Policy = TRUST) -> None:
        if isinstance(policy, str) and policy not in (TRUST, PLAIN):
            raise CorralError(f"values must be {TRUST!r}, {PLAIN!r} or a list of classes, not {policy!r}")
        self.policy = policy
        self._allowed = None if isinstance(policy, str) else _allowed(policy)

    def load(self, data: bytes, job_id: int) -> Any:
        """The value as an object, or ValueRefused / ValueUnreadable in one line (never a traceback)."""
        try:
            if self.policy == TRUST:
                return pickle.loads(data)
            if self._allowed is None:
                return plain_loads(data)
            return _AllowedUnpickler(data, self._allowed).load()
        except (ImportError, AttributeError) as exc:
            raise ValueUnreadable(f"job {job_id}'s value is a {opaque(data)[1:-1]} that does not import here"
                                  f" ({type(exc).__name__}: {exc})",
                                  "import or install its module here, or read it with Client(values='plain')") from None
        except _UNREADABLE as exc:
            if self.policy != TRUST and pickled_class(data):
                raise ValueRefused(f"job {job_id}'s value is a {opaque(data)[1:-1]}; this Client reads "
                                   + ("plain data only (values='plain')" if self._allowed is None
                                      else "plain data and the classes it lists only"),
                                   f"if you trust the agents, add {pickled_class(data)!r} to Client(values=[...])"
                                   ) from None
            raise ValueUnreadable(f"job {job_id}'s value ({len(data):,} bytes) does not unpickle here"
                                  f" ({type(exc).__name__}: {str(exc)[:200]})") from None


TRUSTING = Reader(TRUST)  # the default reader of Pool and Executor, as multiprocessing trusts its workers
