"""The chunk scheduler: which chunk moves next, when a later one may overtake, when to ask the agents again.

Pure functions of what the two agents last reported (``Reports``) and of the
engine's own bookkeeping (chunks in flight, when each last forwarded data),
with the time passed in: no I/O and no asyncio, so each decision is tested
on its own (tests/test_scheduler.py). The engine (engine.py) calls them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .client import AgentStatus

# Chunks 0..5 are 1, 2, 4, 8, 16 and 32 MiB (stream.FIRST_CHUNK doubling up to --chunk-size): the ramp.
RAMP_CHUNKS = 6
RAMP_SECONDS = 30.0

NO_STATUS = AgentStatus("", {}, frozenset(), {}, 0, 0)


@dataclass(frozen=True)
class Reports:
    """What the sender and the receiver last reported (their ``status``), and what follows from it."""

    src: AgentStatus = NO_STATUS
    dst: AgentStatus = NO_STATUS
    #: chunks the target stored since that report (told by the move itself): not moved again meanwhile
    stored_since: frozenset[int] = field(default_factory=frozenset)

    @property
    def sender(self) -> dict[str, Any]:
        """The sender daemon's state file."""
        return self.src.daemon

    @property
    def receiver(self) -> dict[str, Any]:
        """The receiver daemon's state file."""
        return self.dst.daemon

    @property
    def received(self) -> int:
        """Chunks below this one have been fed to ``zfs receive`` (and may be released on the source)."""
        return int(self.dst.daemon.get("next_seq", 0))

    @property
    def stored(self) -> frozenset[int]:
        """Chunks the target holds, complete, not yet fed to zfs receive."""
        return self.dst.chunks | self.stored_since

    def with_stored(self, seq: int) -> Reports:
        return Reports(self.src, self.dst, self.stored_since | {seq})

    @property
    def spooled(self) -> int:
        """Chunks the sender's daemon has spooled so far (its state file's count)."""
        return int(self.src.daemon.get("chunks", 0))

    def progress_mark(self) -> tuple[int, int, int]:
        """Changes whenever the stream moved: chunks spooled, held in the source spool, received."""
        return len(self.src.chunks), self.received, self.spooled

    def on_target(self) -> int:
        """Chunk file bytes that have crossed the link: those fed to zfs receive, and those in the target
        spool, half-moved chunks included."""
        return int(self.receiver.get("stored_fed", 0)) + self.dst.spool_bytes

    def expected_on_target(self, estimate: int) -> int:
        """Chunk file bytes the whole stream will have moved: exact once zfs send has ended, else the stream
        estimate at the compression ratio seen so far."""
        sender = self.sender
        stored, raw = int(sender.get("stored_bytes", 0)), int(sender.get("raw_bytes", 0))
        if sender.get("eof"):
            return stored
        if raw <= 0:
            return estimate
        return max(stored, round(max(estimate, raw) * stored / raw))

    def releasable(self) -> bool:
        """The source spool still holds chunks the receiver has consumed."""
        return self.received > 0 and any(s < self.received for s in self.src.chunks)


def next_chunk(reports: Reports, in_flight: Iterable[int], window: int) -> int | None:
    """The lowest chunk in the source spool that the target neither holds nor has consumed, nor is on its
    way, within ``window`` chunks of the receiver's position (the target spool's room); None if none."""
    busy = set(in_flight)
    stored = reports.stored
    low = reports.received
    limit = low + window
    for seq in sorted(reports.src.chunks):
        if seq >= limit:
            break
        if seq >= low and seq not in stored and seq not in busy:
            return seq
    return None


def already_there(seq: int, target: AgentStatus) -> bool:
    """The target holds chunk ``seq`` or has consumed it: moving it again would be a second move."""
    return seq in target.chunks or seq < int(target.daemon.get("next_seq", 0))


def may_overtake(moving: Mapping[int, float], now: float, overtake_idle: float) -> bool:
    """Whether a second move would use what the first leaves: the lowest chunk in flight is idle
    (has forwarded nothing for ``overtake_idle`` seconds). ``moving``: chunk -> when it last forwarded."""
    if not moving:
        return False
    return now - moving[min(moving)] >= overtake_idle


def turn_wait(seq: int, moving: Mapping[int, float], now: float, overtake_idle: float) -> float:
    """0 when chunk ``seq`` may forward its next piece now, else how long to wait at most before asking again.

    The lowest chunk in flight always may: ``zfs receive`` needs it first, so a later chunk never slows it
    down (on a fast link the moves share the CPU, on a slow one the link). A later chunk may while the
    lowest one is idle (its link or its source is slower than one channel can use, e.g. a long fat link),
    so parallel moves still fill such a link.
    """
    lowest = min(moving)
    idle = now - moving[lowest]
    if lowest == seq or idle >= overtake_idle:
        return 0.0
    return overtake_idle - idle


def poll_delay(reports: Reports, poll_interval: float, *, in_flight: bool, finish_sent: bool,
               running_for: float, fresh: bool = False) -> float:
    """Until the next status poll: ``poll_interval``, or a fifth of it where a late poll is time the whole
    transfer takes longer:

    - ``fresh``: the last poll saw the source spool a chunk the one before had not, and zfs send goes on. A
      chunk is only moved once a poll has seen it, and while one source makes them quickly (a fast link
      moves each in less than the interval) the link would wait for the poll, not for the source;
    - with nothing in flight, at the two ends of a stream: the first chunks (they double from 1 MiB: zfs
      receive waits for each) and the tail (everything moved, the receiver finishing).

    In between, a slow source (a poll that sees nothing new) is asked at the normal interval: a chunk it
    makes is seen at most that much later, and that costs nothing at the end."""
    if fresh and not reports.sender.get("eof"):
        return poll_interval / 5
    if in_flight:
        return poll_interval
    src = reports.sender
    ramp = (reports.spooled < RAMP_CHUNKS and not src.get("eof") and not src.get("paused")
            and running_for < RAMP_SECONDS)  # a slow source: no quick polls for long
    return poll_interval / 5 if ramp or finish_sent else poll_interval
