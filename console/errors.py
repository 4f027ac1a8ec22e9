"""The operator side's errors (those that cross the wire live in corral.agent.errors): one line and a hint each."""

from __future__ import annotations

from typing import Any

from corral.agent.errors import CorralError


class MasterUnreachable(CorralError):
    """No master answers at the recorded address, or the connection to it broke."""


class AuthFailed(CorralError):
    """The master refused our authkey."""


class JobFailed(CorralError):
    """A job whose value was asked for did not end `done`."""


class MapTimeout(CorralError):
    """Client.map's timeout passed before every job was final."""


class CannotShip(CorralError):
    """A callable or code the client cannot send to agents: a lambda, a nested function, an object that does
    not pickle, code over the shipping limits. Raised at submit; nothing of that submission was queued."""


class DeployError(CorralError):
    """A deploy, stop or inventory operation that failed on one host, at one step."""

    def __init__(self, message: str, hint: str = "", host: str = "", step: str = "", log_tail: str = "") -> None:
        super().__init__(message, hint)
        self.host = host
        self.step = step
        self.log_tail = log_tail

    @classmethod
    def at(cls, alias: str, step: str, message: str, hint: str = "", log_tail: str = "", **fields: Any) -> DeployError:
        """The error whose one line names the host and the step: `alias: step: message`."""
        return cls(f"{alias}: {step}: {message}", hint, host=alias, step=step, log_tail=log_tail, **fields)

    def __reduce__(self) -> tuple[Any, ...]:
        # It crosses the managers wire to the CLI: rebuilt from its fields (BaseException's own pickling
        # calls cls(message, hint), which would lose them, or fail for a subclass's required ones).
        return _rebuild, (type(self), dict(vars(self)))


def _rebuild(cls: type[DeployError], fields: dict[str, Any]) -> DeployError:
    return cls(**fields)


class HostKeyUnknown(DeployError):
    """The host offered a key that is in no known_hosts file: the operator must accept or reject it."""

    def __init__(self, message: str, hint: str = "", host: str = "", step: str = "hostkey", log_tail: str = "", *,
                 host_id: str, key_type: str, key_base64: str, fingerprint: str) -> None:
        super().__init__(message, hint, host=host, step=step, log_tail=log_tail)
        self.host_id = host_id  # how known_hosts names the host: `name` or `[name]:port` (or its HostKeyAlias)
        self.key_type = key_type
        self.key_base64 = key_base64
        self.fingerprint = fingerprint


class HostKeyChanged(DeployError):
    """The host offered a key other than the one known for it: always refused."""
