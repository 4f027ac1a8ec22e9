"""The errors that cross the wire: raised by the master, re-raised in agents and clients by their class name."""

from __future__ import annotations


class CorralError(Exception):
    """An error an operator can act on: a message and a hint of what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message, hint)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class BadJobSpec(CorralError):
    """A submission the master refuses: nothing of it was queued."""


class BadCall(CorralError):
    """A call whose arguments the master refuses (a wait of "soon", a list limit past any count): nothing changed."""


class UnknownJob(CorralError):
    """A job id the master has never issued."""


class UnknownAgent(CorralError):
    """An agent session the master does not know (it restarted, or the lease ran out): register again."""


class NameTaken(CorralError):
    """Another live agent already goes by this name."""


class ProtocolMismatch(CorralError):
    """An agent or client speaking another version of this protocol."""


class JournalFailed(CorralError):
    """The master could not write its journal, or the shipped code it keeps beside it (disk full,
    read-only, I/O error): nothing of the call changed, the master serves on, and the same call succeeds
    once the state directory can be written again."""
