"""corral, a cluster operations console for the terminal; `from corral import Client, Pool, Executor` for Python."""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

# One import name for the two wings: corral.console (operator side) and corral.agent (stdlib only, the
# part that goes over the wire). Installed, they sit inside this package (pyproject's package-dir maps the
# repository's console/ and agent/ folders here). In a checkout they sit beside this folder instead, so
# the repository root is searched too: the checkout and the wheel import the same names.
_here = os.path.dirname(os.path.abspath(__file__))
_checkout = os.path.dirname(_here)
if not os.path.exists(os.path.join(_here, "agent")) and os.path.isfile(os.path.join(_checkout, "agent", "__init__.py")):
    __path__.append(_checkout)  # noqa: F821 - a package's own __path__

# What `from corral import X` gives, imported on first use: importing corral itself stays stdlib-only
# (the agent's zipapp carries this file too).
_EXPORTS = {
    "Client": "corral.console.client",
    "Pool": "corral.console.pool",
    "Executor": "corral.console.executor",
    "JobSpec": "corral.agent.protocol",
    "CorralError": "corral.agent.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("corral.console"):
            raise
        # On an agent's host (the zipapp carries corral.agent only): a job's module may still say
        # `from corral import Pool` at its top; only using it here is an error.
        return _elsewhere(name)


def _elsewhere(name: str) -> Any:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise ImportError(f"corral.{name} needs corral's console side, which this host (an agent's) does not have")
    unavailable.__name__ = unavailable.__qualname__ = name
    return unavailable
