"""The operator side's errors (those that cross the wire live in corral.agent.errors): one line and a hint each."""

from __future__ import annotations

from corral.agent.errors import CorralError


class MasterUnreachable(CorralError):
    """No master answers at the recorded address, or the connection to it broke."""


class AuthFailed(CorralError):
    """The master refused our authkey."""


class JobFailed(CorralError):
    """A job whose value was asked for did not end `done`."""


class MapTimeout(CorralError):
    """Client.map's timeout passed before every job was final."""


class DeployError(CorralError):
    """A deploy, stop or inventory operation that failed on one host, at one step."""

    def __init__(self, message: str, hint: str = "", host: str = "", step: str = "", log_tail: str = "") -> None:
        super().__init__(message, hint)
        self.host = host
        self.step = step
        self.log_tail = log_tail


class HostKeyUnknown(DeployError):
    """The host offered a key that is in no known_hosts file: the operator must accept or reject it."""


class HostKeyChanged(DeployError):
    """The host offered a key other than the one known for it: always refused."""
