"""What the deploy service needs of the master's agent registry: a Protocol, so deploy/ never imports master/."""

from __future__ import annotations

from typing import Any, Protocol


class AgentRegistry(Protocol):
    """The master's view of its agents (the scheduler is one): who is registered, and telling it of stops."""

    def agent_list(self) -> list[dict[str, Any]]:
        """Every agent the master knows: at least name, pid, state ("up", "draining", ...) and busy."""
        ...

    def drain_agent(self, name: str) -> bool:
        """Give this agent no more work (it is about to be drained over SSH)."""
        ...

    def retire_agent(self, name: str, reason: str) -> None:
        """The agent was stopped on purpose: what it held goes back to the queue now."""
        ...


def registered(registry: AgentRegistry, alias: str, pid: int) -> bool:
    """Whether the agent `alias`, process `pid`, has registered with the master and is up: the deploy's handshake."""
    return any(a["name"] == alias and a["pid"] == pid and a["state"] == "up" for a in registry.agent_list())
