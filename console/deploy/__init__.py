"""SSH deployment: the names the master's deploy service shares with its clients (no paramiko here)."""

from __future__ import annotations

# The second name registered on the master's BaseManager: the deploy service.
DEPLOY_TYPEID = "get_deployer"

# The steps of one host's deploy, in order; progress events name one of these (or "stop"/"remove").
STEPS = ("connect", "hostkey", "auth", "python", "upload", "tunnel", "authkey", "start", "ready")
