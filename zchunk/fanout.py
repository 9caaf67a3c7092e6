"""Fan-out: one ``zfs send`` and one source spool for several targets (``zchunk sync SOURCE T1 T2 ...``).

Each target's stream is planned, recorded and moved as its own session: its own link retries,
verification, holds and resume. The targets whose streams are the same bytes (the same snapshots by
guid, flags, codec and chunking) share one sender: a *group* directory on the source whose daemon runs
the one ``zfs send`` and hard-links every chunk into each target's own sender directory (a *member*), so
each target's transfer releases its own links and a chunk's bytes leave the disk once every target has
it. ``Fanout`` is the run's meeting point: every target says which stream it needs (``Slot.join``) or
that it needs none (``Slot.leave``); once all have, the members of each group install their
directories and the last of them installs and starts the group's daemon.
"""

from __future__ import annotations

import asyncio
import posixpath
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import errors as E

#: How long a source spool full of chunks one target does not take may hold the others back before that
#: target is detached (its next run continues from its own common snapshot).
DETACH_AFTER = 300.0
#: How long the targets that know their next stream wait for the others to know theirs: a target still
#: finishing an earlier session, or whose host answers slowly, is not waited for longer (it runs alone).
JOIN_WAIT = 120.0

Install = Callable[[str, dict[str, Any]], Awaitable[str]]


@dataclass
class _Group:
    """The targets of one shared stream: their sender directories and the group's daemon."""

    size: int
    name: str = field(default_factory=lambda: f"fanout-{secrets.token_hex(6)}-send")
    members: list[str] = field(default_factory=list)  # directory names of the installed members
    reported: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    how: tuple[dict[str, Any], Install] | None = None  # a member's sender config and its host's install


class Member:
    """One target's place in a shared stream."""

    def __init__(self, group: _Group, detach_after: float) -> None:
        self._group, self.detach_after = group, detach_after
        self._reported = False

    @property
    def group_dir(self) -> str:
        """The group's directory name (beside the members' under the spool directory)."""
        return self._group.name

    async def installed(self, member_dir: str | None, config: dict[str, Any], install: Install) -> None:
        """Report this member's sender directory (None: its install failed) and wait for the group's daemon;
        the last member to report installs and starts it (``install(dirname, config)``)."""
        group = self._group
        if self._reported:
            return
        self._reported = True
        if member_dir is not None:
            group.members.append(posixpath.basename(member_dir))
            group.how = group.how or (config, install)
        await self._count()
        await group.started.wait()
        if group.error is not None and member_dir is not None:
            raise group.error

    async def give_up(self) -> None:
        """This member failed before it could report: the others must not wait for it."""
        if not self._reported:
            self._reported = True
            await self._count()

    async def _count(self) -> None:
        group = self._group
        group.reported += 1
        if group.reported < group.size:
            return
        try:
            if group.how is None:
                raise E.UsageError(reason="no target of the fan-out could install its sender directory")
            config, install = group.how
            cfg = dict(config, id=group.name, fanout=sorted(group.members), detach_after=self.detach_after)
            cfg.pop("member_of", None)
            await install(group.name, cfg)
        except BaseException as e:
            group.error = e
        finally:
            group.started.set()


class Slot:
    """One target's say in the run's fan-out: the key of each stream it needs, in order (its n-th stream
    meets the other targets' n-th), until it leaves."""

    def __init__(self, fanout: Fanout) -> None:
        self._fanout = fanout
        self.rounds = 0  # streams it said it needs
        self.left = False

    async def join(self, key: tuple[Any, ...]) -> Member | None:
        """The key of its next stream (what makes two streams the same bytes); waits for every other target
        to say its stream of this round, or to leave. A ``Member`` when others need the same stream; None:
        it runs alone."""
        if self.left:
            return None
        fan, n = self._fanout, self.rounds
        self.rounds += 1
        if fan.round(n).is_set():
            return None  # the others went on without it (``JOIN_WAIT``): alone
        keys = fan.keys.setdefault(n, {})
        keys[key] = keys.get(key, 0) + 1
        fan.settle()
        try:
            await asyncio.wait_for(asyncio.shield(fan.round(n).wait()), fan.join_wait)
        except asyncio.TimeoutError:
            fan.round(n).set()  # a target still busy (reattaching, or its host slow to answer): not waited for
        if keys[key] < 2:
            return None
        group = fan.groups.setdefault((n, key), _Group(keys[key]))
        return Member(group, fan.detach_after)

    def leave(self) -> None:
        """It needs no more streams (done, up to date, refused, failed, or going on alone after an agent
        died): the others go on without waiting for it."""
        if not self.left:
            self.left = True
            self._fanout.settle()


class Fanout:
    def __init__(self, detach_after: float = DETACH_AFTER, join_wait: float = JOIN_WAIT) -> None:
        self.detach_after, self.join_wait = detach_after, join_wait
        self.slots: list[Slot] = []
        self.keys: dict[int, dict[tuple[Any, ...], int]] = {}  # round -> stream key -> targets
        self.groups: dict[tuple[int, tuple[Any, ...]], _Group] = {}
        self._rounds: dict[int, asyncio.Event] = {}

    def slot(self) -> Slot:
        """A target's place (all slots are taken before the first joins)."""
        slot = Slot(self)
        self.slots.append(slot)
        return slot

    def round(self, n: int) -> asyncio.Event:
        return self._rounds.setdefault(n, asyncio.Event())

    def settle(self) -> None:
        """Every round that every target has joined or left is complete."""
        for n in list(self.keys):
            if all(s.rounds > n or s.left for s in self.slots):
                self.round(n).set()


__all__ = ["DETACH_AFTER", "Fanout", "Member", "Slot"]
