"""SSH deployment: the names the master's deploy service shares with its clients (no paramiko here)."""

from __future__ import annotations

from agent.protocol import CorralError

# The second name registered on the master's BaseManager: the deploy service.
DEPLOY_TYPEID = "get_deployer"

# The steps of one host's deploy, in order; progress events name one of these (or "stop"/"remove").
STEPS = ("connect", "hostkey", "auth", "python", "upload", "tunnel", "authkey", "start", "ready")


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
