"""Channels to one session's two agents: opened together, reopened after a link failure, closed once.

The engine's status poller and each of its workers hold a ``ChannelSet``:
one client (client.py) per agent it talks to, each over its own channel.
How a channel is made is the holder's choice (a ``serve`` process over the
host's connection, one opened while install ran, or the agent's code in this
process); when a link fails, the set drops what went over it, and the next
``open`` makes new ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from .aio import quietly
from .client import CLIENTS, AgentClient, Channel, HostAgent
from .protocol import AgentChannel
from .transport import Host, LocalHost


@dataclass
class AgentSide:
    """One host's agent of this session."""

    host: Host
    session_dir: str
    role: str  # "send" | "receive"
    needs: list[str]

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def local(self) -> bool:
        """On this machine: the coordinator may read this side's spool itself."""
        return isinstance(self.host, LocalHost)

    async def open_channel(self, stall_timeout: float, source: bytes | None = None,
                           control: bool = False) -> AgentChannel:
        """A ``serve`` process's channel to this side's agent (``HostAgent.serve``); ``control``: over the
        host's connection for short requests (``Host.control``), not the one the chunks take."""
        host = self.host.control() if control else self.host
        return await HostAgent(host).serve(self.session_dir, self.needs, stall_timeout, source)


Opener = Callable[[AgentSide], Awaitable[Channel]]


class ChannelSet:
    """One client per side of ``sides``, each over a channel ``opener`` makes when it is missing."""

    def __init__(self, sides: Sequence[AgentSide], opener: Opener) -> None:
        self.sides = list(sides)
        self.opener = opener
        self.clients: dict[str, AgentClient | None] = {side.role: None for side in self.sides}

    def complete(self) -> bool:
        return all(c is not None for c in self.clients.values())

    async def open(self, quietly: bool = False) -> None:
        """Every missing channel, opened concurrently (each may start an agent process on its host).
        The first failure is raised once all have finished (``quietly``: an ordinary failure is not; the
        caller finds the side still missing and tries again)."""
        closed = [side for side in self.sides if self.clients[side.role] is None]
        opened = await asyncio.gather(*(self.opener(side) for side in closed), return_exceptions=True)
        for side, ch in zip(closed, opened):
            if not isinstance(ch, BaseException):
                self.clients[side.role] = CLIENTS[side.role](ch)
        for ch in opened:
            if isinstance(ch, BaseException) and not (quietly and isinstance(ch, Exception)):
                raise ch

    async def get(self, side: AgentSide) -> AgentClient:
        """The client of ``side``, its channel opened first if it is missing."""
        client = self.clients[side.role]
        if client is None:
            channel = await self.opener(side)
            client = self.clients[side.role] = CLIENTS[side.role](channel)
        return client

    def take(self, role: str) -> AgentClient | None:
        """The client of ``role`` for the caller to keep (and close): this set forgets it."""
        client, self.clients[role] = self.clients[role], None
        return client

    async def reset(self, failed_host: str | None = None, roles: Iterable[str] | None = None) -> None:
        """Close the channels of ``roles`` (all by default); the connection of ``failed_host``, whose link
        failed, is dropped rather than used again. The next ``open`` or ``get`` makes new ones."""
        for role in list(roles if roles is not None else self.clients):
            client = self.take(role)
            if client is not None:
                if client.host == failed_host:
                    client.drop_connection()
                await quietly(client.close())

    async def close(self) -> None:
        await self.reset()

    async def park(self) -> None:
        """The end of a stream that went well: each channel between requests is kept for the run's next
        stream on its host (``AgentClient.park``), the others closed."""
        for role in list(self.clients):
            client = self.take(role)
            if client is not None:
                await quietly(client.park())


def early_key(role: str, control: bool) -> str:
    """Where the channels opened during install wait for their user: the workers' under the role, the
    status poller's (over the control connection) under ``<role>-control``."""
    return f"{role}-control" if control else role


async def close_early(early: dict[str, list[asyncio.Task[AgentChannel]]]) -> None:
    """Close the channels opened during install that nobody took (their servers exit at EOF)."""
    tasks = [t for ts in early.values() for t in ts]
    for ts in early.values():
        ts.clear()
    for t in tasks:
        t.cancel()  # one still opening closes its pipe as it is cancelled (HostAgent.serve)
    for ch in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(ch, AgentChannel):
            await quietly(ch.close())
