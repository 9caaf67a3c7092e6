"""The transfer engine: moves spooled chunks from the source agent to the target agent.

Scheduling is state-based: every decision is derived from what the two
agents report (chunks in the source spool, chunks and partial chunks in the
target spool, how far ``zfs receive`` got), so a reconnect, a coordinator
restart or a discarded chunk needs no special case — the next status simply
shows what is missing. ``parallel`` workers each own one channel to each
agent and move the lowest missing chunk inside the target's spool window.
Transport failures (``LinkDown``) are retried with exponential backoff and
jitter until ``patience`` passes without progress.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from .aio import backoff, quietly
from .channels import AgentSide, ChannelSet, close_early, early_key
from .client import AgentClient, AgentStatus, HostAgent, ReceiverClient, SenderClient
from .errors import (
    AgentDied,
    ChunkCorrupt,
    IntegrityError,
    LeftBehind,
    NoChunk,
    PatienceExhausted,
    SpoolFull,
    TargetFull,
    ZchunkError,
    ZfsReceiveFailed,
    from_daemon,
)
from .link import Bandwidth, LinkControl, LinkRate, Pacer
from .progress import human_bytes, percent_of
from .protocol import AgentChannel, InProcessChannel
from .relay import ChannelChunks, ChunkSource, LocalSpoolChunks, relay_chunk
from .scheduler import Reports, already_there, may_overtake, next_chunk, poll_delay, turn_wait
from .transport import LinkDown
from .zfs import Zfs

log = logging.getLogger("zchunk.engine")

Emit = Callable[..., None]
# How often the user's limit and pause are looked at (one stat of the session's control file).
LINK_CHECK = 0.25
# A sender daemon that died (killed, its host rebooted) while zfs receive still runs is started again this
# often per transfer: it runs zfs send anew, checks the chunks it cut before and writes only the missing ones.
SENDER_RESTARTS = 3


@dataclass
class EngineOptions:
    parallel: int = 4
    patience: float = 24 * 3600.0
    stall_timeout: float = 60.0
    poll_interval: float = 0.1  # status of both agents; also how soon a newly spooled chunk starts moving
    max_corrupt_retries: int = 5
    # Short enough that a 5 s outage costs little more than 5 s; one SSH connect
    # attempt per few seconds is cheap even over a 24 h outage.
    max_backoff: float = 5.0
    # A daemon writes its state file as it starts; one that never did (it died at once, e.g. on a full
    # spool filesystem) would otherwise look "starting" until patience runs out.
    start_timeout: float = 60.0
    # Parallel moves go in sequence order: a later chunk forwards data only while the lowest one in
    # flight has forwarded nothing for this long (it waits on its link: room for the others).
    overtake_idle: float = 0.02


@dataclass
class TransferResult:
    raw_bytes: int
    wire_bytes: int
    total_chunks: int
    stream_hash: str
    elapsed: float
    outages: int
    outage_seconds: float
    discarded_chunks: int
    receiver: dict[str, Any] = field(default_factory=dict)


class _SpoolRoom:
    """A side whose spool filesystem is full: said once per episode, and (target) chunks held back a while."""

    def __init__(self) -> None:
        self.full = False
        self.backoff = 0.0
        self.until = 0.0


class _Outage:
    def __init__(self) -> None:
        self.since: dict[str, float] = {}
        self.count = 0
        self.total = 0.0


class Transfer:
    def __init__(self, src: AgentSide, dst: AgentSide, *, session_id: str, chunk_size: int,
                 spool_max: int, estimate: int, opts: EngineOptions, emit: Emit,
                 early: dict[str, list[asyncio.Task[AgentChannel]]] | None = None,
                 link: LinkControl | None = None, pacer: Pacer | None = None) -> None:
        self.src, self.dst, self.sid = src, dst, session_id
        # the user's say over the link: a bandwidth limit (paced by ``pacer``, which the streams of one
        # recursive run share: the limit is the run's) and pause
        self.link = link or LinkControl(Bandwidth())
        self.pacer = pacer or Pacer()
        self.applied_rate: float | None = None  # the rate this transfer last set on the pacer
        self.limit_said: tuple[float | None, str] | None = None
        self.paused = False
        self.unpaused = asyncio.Event()
        self.unpaused.set()
        # channels being opened while the agents were installed (open_channel with source), by role:
        # the status poller's and the first worker's, taken before any new one is opened
        self.early = early or {}
        self.opts, self.emit = opts, emit
        self.window = max(1, spool_max // max(1, chunk_size))
        self.estimate = estimate
        self.reports = Reports()  # what the agents last reported
        self.in_flight: set[int] = set()
        self.moving: dict[int, float] = {}  # chunks being relayed -> when each last forwarded data
        self._turn = asyncio.Event()  # set (and replaced) when the set of moving chunks changes
        self.finish_sent = False
        # After a transfer that ended well: the status poller's client of the receiver, its channel still open
        self.receiver: AgentClient | None = None
        self.wire_bytes = 0
        self.seen_events = 0
        self.corrupt_retries: dict[int, int] = {}
        self.changed = asyncio.Event()
        self.done = asyncio.Event()
        self.error: BaseException | None = None
        self.last_progress = time.monotonic()
        self.outage = _Outage()
        self.src_room, self.dst_room = _SpoolRoom(), _SpoolRoom()
        self.starting_since: dict[str, float] = {}
        self.sender_restarts = 0
        self.restarted: tuple[int, float] | None = None  # the restarted sender's pid, when
        self.restart_wanted = False
        self.started = time.monotonic()
        self.link_rate = LinkRate()
        self._last_progress_event = 0.0

    # -- bookkeeping ---------------------------------------------------------

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    def _fail(self, err: BaseException) -> None:
        if self.error is None:
            self.error = err
        self.done.set()
        self.changed.set()

    def _link_trouble(self, host: str, reason: str) -> None:
        if host not in self.outage.since:
            self.outage.since[host] = time.monotonic()
            self.outage.count += 1
            self.emit("link_down", host=host, reason=reason)

    def _link_ok(self, host: str) -> None:
        since = self.outage.since.pop(host, None)
        if since is not None:
            took = time.monotonic() - since
            self.outage.total += took
            self.emit("link_up", host=host, outage=round(took, 1))

    def _retrying(self, host_hint: str) -> AsyncRetrying:
        def stop(rs: RetryCallState) -> bool:
            return self.done.is_set() or time.monotonic() - self.last_progress > self.opts.patience

        def before_sleep(rs: RetryCallState) -> None:
            exc = rs.outcome.exception() if rs.outcome else None
            host = exc.host if isinstance(exc, LinkDown) else host_hint
            since = self.outage.since.get(host, time.monotonic())
            sleep = rs.next_action.sleep if rs.next_action else 0.0
            self.emit("retrying", host=host, delay=round(sleep, 1),
                      outage=round(time.monotonic() - since, 1), reason=str(exc) if exc else "")

        return AsyncRetrying(retry=retry_if_exception_type(LinkDown),
                             wait=backoff(0.25, self.opts.max_backoff),
                             stop=stop, before_sleep=before_sleep, reraise=True)

    async def _with_retries(self, host_hint: str, fn: Callable[[], Any]) -> Any:
        try:
            async for attempt in self._retrying(host_hint):
                with attempt:
                    try:
                        return await fn()
                    except LinkDown as e:
                        self._link_trouble(e.host, e.reason)
                        raise
        except LinkDown as e:
            if self.done.is_set():
                return None
            raise PatienceExhausted(waited=_fmt_duration(time.monotonic() - self.last_progress),
                                    patience=_fmt_duration(self.opts.patience), reason=str(e),
                                    session=self.sid) from e
        return None

    # -- the main loop -------------------------------------------------------

    async def run(self) -> TransferResult:
        self._follow_link()  # the limit in force before the first byte moves
        poller = asyncio.create_task(self._guard(self._poll_loop()))
        link = asyncio.create_task(self._guard(self._link_loop()))
        workers = [asyncio.create_task(self._guard(self._worker(i))) for i in range(self.opts.parallel)]
        try:
            await self.done.wait()
        finally:
            for t in [poller, link, *workers]:
                t.cancel()
            await asyncio.gather(poller, link, *workers, return_exceptions=True)
            await close_early(self.early)
        if self.error is not None:
            raise self.error
        sender, receiver = self.reports.sender, self.reports.receiver
        return TransferResult(
            raw_bytes=int(receiver.get("raw_bytes", 0)), wire_bytes=self.wire_bytes,
            total_chunks=int(sender.get("total_chunks", 0)), stream_hash=str(receiver.get("stream_hash", "")),
            elapsed=time.monotonic() - self.started, outages=self.outage.count,
            outage_seconds=self.outage.total, discarded_chunks=int(receiver.get("discarded", 0)),
            receiver=receiver)

    async def _open(self, side: AgentSide, control: bool = False) -> AgentChannel:
        """A channel to ``side``'s agent: one opened during install if any is left, else a new one
        (also when that one failed: a new one says what is wrong, or is retried on a dead link).
        ``control``: the status poller's, over the host's control connection (``Host.control``)."""
        pending = self.early.get(early_key(side.role, control)) or []
        while pending:
            try:
                return await pending.pop(0)
            except (ZchunkError, LinkDown):
                continue
        return await side.open_channel(self.opts.stall_timeout, control=control)

    async def _guard(self, coro: Any) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # any component's failure ends the transfer
            self._fail(e)

    # -- status polling ------------------------------------------------------

    async def _poll_loop(self) -> None:
        async def opener(side: AgentSide) -> AgentChannel | InProcessChannel:
            # an agent on this machine is asked in process: no serve process to start
            return (InProcessChannel(side.session_dir, side.name) if side.local
                    else await self._open(side, control=True))

        chans = ChannelSet([self.src, self.dst], opener)

        async def poll_side(side: AgentSide, wait: float = 0.0, known: int = 0) -> AgentStatus:
            try:
                st = await (await chans.get(side)).status(wait, known)
            except LinkDown:
                await chans.reset(failed_host=side.name, roles=[side.role])
                raise
            self._link_ok(side.name)
            return st

        async def once(wait: float, known: int) -> None:
            # Both at once (each may first have to start its agent server); both finish before a failure
            # is raised, so no request is left pending on a channel that the retry then uses again.
            src_st: AgentStatus | BaseException
            dst_st: AgentStatus | BaseException
            src_st, dst_st = await asyncio.gather(poll_side(self.src, wait, known), poll_side(self.dst),
                                                  return_exceptions=True)
            for st in (src_st, dst_st):
                if isinstance(st, BaseException):
                    raise st
            assert isinstance(src_st, AgentStatus) and isinstance(dst_st, AgentStatus)
            self._absorb(src_st, dst_st)
            sender = await chans.get(self.src)
            assert isinstance(sender, SenderClient)
            if self.reports.releasable():
                await sender.release(upto=self.reports.received)
            end = self.reports.sender
            if end.get("state") == "done" and not self.finish_sent:
                receiver = await chans.get(self.dst)
                assert isinstance(receiver, ReceiverClient)
                try:
                    await receiver.finish(total_chunks=end["total_chunks"], raw_bytes=end["raw_bytes"],
                                          stream_hash=end["stream_hash"])
                except SpoolFull:
                    self._target_spool_full()
                    return
                self.finish_sent = True
                self.emit("stream_end", chunks=end["total_chunks"], raw_bytes=end["raw_bytes"],
                          sender_cpu=end.get("cpu"), sender=end.get("daemon_dir"))

        try:
            wait = 0.0  # the next poll's delay, spent by the sender's agent waiting for a new chunk (_wait_at_source)
            while not self.done.is_set():
                spooled, asked = self.reports.spooled, time.monotonic()
                await self._with_retries(self.dst.name, functools.partial(once, wait, spooled))
                if wait and self.reports.spooled <= spooled:  # an agent without the wait, or zfs send ended
                    await asyncio.sleep(max(0.0, wait - (time.monotonic() - asked)))
                try:
                    self._check_daemons()
                except ZfsReceiveFailed as e:
                    if _out_of_space(str(e.fields.get("stderr", ""))):
                        raise await self._target_full(e) from e
                    raise
                if self.restart_wanted:
                    await self._restart_sender()
                self._emit_progress()
                if self.done.is_set():
                    break
                if time.monotonic() - self.last_progress > self.opts.patience:
                    raise PatienceExhausted(waited=_fmt_duration(time.monotonic() - self.last_progress),
                                            patience=_fmt_duration(self.opts.patience),
                                            reason="the agents report no progress", session=self.sid)
                delay = poll_delay(self.reports, self.opts.poll_interval, in_flight=bool(self.in_flight),
                                   finish_sent=self.finish_sent, running_for=time.monotonic() - self.started,
                                   fresh=self.reports.spooled > spooled)
                wait = delay if self._wait_at_source() else 0.0
                if not wait:
                    await asyncio.sleep(delay)
        finally:
            if self.error is None and self.done.is_set():  # kept for the clean-up: no process to start for it
                self.receiver = chans.take(self.dst.role)
                await chans.park()  # for the run's next stream on these hosts
            else:
                await chans.close()

    async def _link_loop(self) -> None:
        """The user's limit and pause, followed on their own clock: also while an outage holds the poller."""
        while not self.done.is_set():
            self._follow_link()
            await asyncio.sleep(LINK_CHECK)

    def _follow_link(self) -> None:
        """The limit and pause in force now (a schedule's boundary, ``zchunk limit``/``pause``/``resume``)."""
        st = self.link.state()
        if st.rate != self.applied_rate or self.limit_said is None:  # its own change (a shared pacer's others')
            self.applied_rate = st.rate
            self.pacer.set_rate(st.rate)
        said = (st.rate, st.limit)
        if said != self.limit_said and (self.limit_said is not None or st.rate is not None):
            self.emit("limit", rate=st.rate, limit=st.limit)  # not for the first "unlimited"
        self.limit_said = said
        if st.paused != self.paused:
            self.paused = st.paused
            if st.paused:
                self.unpaused.clear()
                self.emit("paused", session=self.sid)
            else:
                self.unpaused.set()
                self.changed.set()
                self.emit("unpaused", session=self.sid)
        if self.paused:
            self.progressed()  # paused time is not a stall: --patience counts from the resume

    async def close(self) -> None:
        """The receiver's channel that a finished transfer kept open (``receiver``): kept for the run's next
        stream on its host when its server stayed after the clean-up, else closed."""
        client, self.receiver = self.receiver, None
        if client is not None:
            await quietly(client.park())

    def _absorb(self, src_st: AgentStatus, dst_st: AgentStatus) -> None:
        before = self.reports.progress_mark()
        self.reports = Reports(src_st, dst_st)
        sender, receiver = self.reports.sender, self.reports.receiver
        if sender.get("eof"):
            self.estimate = int(sender.get("raw_bytes", self.estimate))
        self._watch_source_spool()
        events = receiver.get("events") or []
        total_discarded = int(receiver.get("discarded", 0))
        if total_discarded > self.seen_events:
            for ev in events[-(total_discarded - self.seen_events):]:
                if ev.get("kind") == "chunk-discarded":
                    self.emit("chunk_discarded", host=self.dst.name, detail=ev.get("text"))
            self.seen_events = total_discarded
        if self.reports.progress_mark() != before:
            self.progressed()
        self.changed.set()

    def _check_daemons(self) -> None:
        src, dst = self.reports.sender, self.reports.receiver
        for side, st in ((self.src, src), (self.dst, dst)):
            if st.get("state") == "failed":
                raise from_daemon(side.name, side.role, st)
        if src.get("detached"):  # fan-out: the shared sender stopped feeding this target (zchunk.fanout)
            raise LeftBehind(host=self.dst.name, session=self.sid, reason=str(src.get("reason")))
        for side, st in ((self.src, src), (self.dst, dst)):
            if side is self.src and st.get("state") == "dead" and self._sender_restartable(st):
                continue
            if st.get("state") in ("dead", "aborted"):
                raise AgentDied(host=side.name, role=side.role, session=self.sid,
                                state=st.get("reason") or st.get("state"))
            if st.get("state") == "starting" and not st.get("pid"):
                since = self.starting_since.setdefault(side.role, time.monotonic())
                if time.monotonic() - since > self.opts.start_timeout:
                    raise AgentDied(host=side.name, role=side.role, session=self.sid,
                                    state=f"its daemon wrote no state in {self.opts.start_timeout:.0f}s: "
                                    "it never started")
            else:
                self.starting_since.pop(side.role, None)
        if dst.get("state") == "done":
            if src.get("stream_hash") and dst.get("stream_hash") != src.get("stream_hash"):
                raise IntegrityError(reason=f"whole-stream checksum: sender {src.get('stream_hash')}, "
                                     f"receiver {dst.get('stream_hash')}")
            self.done.set()
            self.changed.set()

    def _sender_restartable(self, st: dict[str, Any]) -> bool:
        """A dead sender is started again (``restart_wanted``) while zfs receive still waits for the stream
        and restarts are left; one restarted a moment ago is given ``start_timeout`` to report itself."""
        if self.reports.receiver.get("state") not in ("running", "starting"):
            return False
        if self.restarted is not None:
            pid, when = self.restarted
            if st.get("pid") != pid and time.monotonic() - when < self.opts.start_timeout:
                return True  # the new daemon has not written its state yet
        if self.sender_restarts >= SENDER_RESTARTS:
            return False
        self.restart_wanted = True
        return True

    async def _restart_sender(self) -> None:
        self.restart_wanted = False
        self.sender_restarts += 1
        self.emit("sender_restart", host=self.src.name, attempt=self.sender_restarts,
                  detail=f"the sender died (state {self.reports.sender.get('reason') or 'dead'}) while zfs "
                  "receive still runs: starting zfs send again; the chunks cut before are checked, not sent again")
        try:
            pid = await self._with_retries(self.src.name,
                                           lambda: HostAgent(self.src.host).restart(self.src.session_dir))
        except ZchunkError as e:  # its session directory gone with the host's reboot (a spool on tmpfs), ...
            raise AgentDied(host=self.src.name, role=self.src.role, session=self.sid,
                            state=f"dead, and could not be started again: {e}") from e
        self.restarted = (pid, time.monotonic())
        self.progressed()

    # -- full spool filesystems and a full target pool ------------------------------

    def _watch_source_spool(self) -> None:
        """The sender pauses ``zfs send`` on a full spool filesystem (never fails it): tell the user, once."""
        paused = self.reports.sender.get("paused") == "no-space"
        if paused and not self.src_room.full:
            self.emit("warning", host=self.src.name, detail="source spool filesystem is full: zfs send is paused "
                      "(not failed) until there is room under the spool directory; the transfer then continues")
        elif not paused and self.src_room.full:
            self.emit("note", host=self.src.name, detail="source spool filesystem has room again: zfs send "
                      "continues")
        self.src_room.full = paused

    def _target_spool_full(self) -> None:
        """A chunk was refused for lack of room on the target: hold chunks back with a growing delay
        (each try moves a whole chunk over the link), and tell the user once per episode."""
        room = self.dst_room
        room.backoff = min(max(1.0, 2 * room.backoff), self.opts.max_backoff)
        room.until = time.monotonic() + room.backoff
        if not room.full:
            room.full = True
            self.emit("warning", host=self.dst.name, detail="target spool filesystem is full: chunks wait in the "
                      "source spool (nothing is lost) until there is room under the spool directory")

    def _target_spool_ok(self) -> None:
        room = self.dst_room
        room.backoff, room.until = 0.0, 0.0
        if room.full:
            room.full = False
            self.emit("note", host=self.dst.name, detail="target spool filesystem has room again")

    async def _target_full(self, err: ZfsReceiveFailed) -> TargetFull:
        """``zfs receive`` ran out of space: how much the stream needs, how much the target has."""
        argv = self.reports.receiver.get("argv") or ["?"]
        dataset = str(argv[-1])
        needed = int(self.reports.sender.get("raw_bytes", 0))
        if not self.reports.sender.get("eof"):
            needed = max(needed, self.estimate)
        try:
            found = await Zfs(self.dst.host).available(dataset)
        except (ZchunkError, LinkDown):
            found = None
        where, free = found if found is not None else (dataset.split("/")[0], None)
        stderr = str(err.fields.get("stderr") or "").strip().splitlines()
        return TargetFull(host=self.dst.name, dataset=dataset, needed=human_bytes(needed), where=where,
                          free=human_bytes(free) if free is not None else "unknown",
                          stderr=stderr[-1] if stderr else "out of space")

    def _emit_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress_event < 1.0:
            return
        self._last_progress_event = now
        sender, receiver = self.reports.sender, self.reports.receiver
        raw = int(receiver.get("raw_bytes", 0))
        est = max(self.estimate, raw)
        # What is left is counted in the link's bytes (compressed chunks), at the link's rate while it is up,
        # both from what the target holds (what was forwarded may still sit in buffers on the way).
        total = self.reports.expected_on_target(est)
        done = min(self.reports.on_target(), total)
        rate = self.link_rate.sample(now, done, moving=not self.outage.since and not self.paused)
        eta = round((total - done) / rate) if rate > 0 else None
        exact = bool(sender.get("eof"))
        received = self.reports.received
        self.emit("progress", raw_bytes=raw, estimate=est, exact=exact, wire_bytes=self.wire_bytes,
                  on_target=done, expected=total, percent=round(percent_of(done, total, exact), 1), rate=round(rate),
                  eta=eta, eta_seconds=eta,
                  chunks_spooled=self.reports.spooled,
                  chunks_moved=received + len(self.reports.stored), chunks_received=received,
                  total_chunks=sender.get("total_chunks"), paused=sender.get("paused"),
                  link_down=sorted(self.outage.since), limit=self.pacer.rate, user_paused=self.paused)

    def _wait_at_source(self) -> bool:
        """The next poll lets the sender's agent answer when it spools a new chunk (within the poll's delay):
        zfs send goes on and the link has nothing left to move but what is in flight, so it waits for the
        source, and a chunk seen only at the next poll is time the transfer takes longer."""
        sender = self.reports.sender
        return (sender.get("state") == "running" and not sender.get("eof") and not sender.get("paused")
                and not self.paused and self._pick() is None)

    # -- workers -------------------------------------------------------------

    def _pick(self) -> int | None:
        if self.paused:
            return None  # zchunk pause: the poller wakes the workers at the resume
        if time.monotonic() < self.dst_room.until:
            return None  # the target spool is full: the poller wakes us again
        return next_chunk(self.reports, self.in_flight, self.window)

    async def _worker(self, wid: int) -> None:
        # A source spool on this machine is read directly: no channel (and no serve process) for it.
        local_src = LocalSpoolChunks(self.src.session_dir, self.src.name) if self.src.local else None
        chans = ChannelSet([side for side in (self.src, self.dst) if not (side is self.src and local_src)],
                           self._open)

        async def move(seq: int) -> None:
            try:
                await chans.open()
                receiver = chans.clients[self.dst.role]
                assert isinstance(receiver, ReceiverClient)
                source: ChunkSource
                if local_src is not None:
                    source = local_src
                else:
                    sender = chans.clients[self.src.role]
                    assert isinstance(sender, SenderClient)
                    source = ChannelChunks(sender)
                target = await receiver.status()
                if already_there(seq, target):
                    return
                have = target.parts.get(seq, 0)
                if have:
                    self.emit("chunk_resume", seq=seq, offset=have)

                def moved(n: int) -> None:
                    self.wire_bytes += n
                    self.moving[seq] = time.monotonic()
                    self.progressed()

                self.moving[seq] = time.monotonic()
                try:
                    stored = await relay_chunk(source, receiver, seq, have, moved,
                                               functools.partial(self._turn_of, seq), self._pace)
                finally:
                    self.moving.pop(seq, None)
                    self._turn.set()
                    self._turn = asyncio.Event()
                self._link_ok(self.src.name)
                self._link_ok(self.dst.name)
                if stored:
                    self.reports = self.reports.with_stored(seq)
                    self._target_spool_ok()
            except LinkDown as e:
                await chans.reset(failed_host=e.host)
                raise

        try:
            # The first worker is ready before the first chunk is spooled, not after (a failure here is
            # retried by move). The others open theirs when they get a chunk: each channel starts an agent
            # process on its host, and ten starting at once delay the first chunk by half a second.
            if wid == 0:
                await chans.open(quietly=True)
            while not self.done.is_set():
                overtake = may_overtake(self.moving, time.monotonic(), self.opts.overtake_idle)
                seq = self._pick() if wid == 0 or overtake else None
                if seq is None:
                    self.changed.clear()
                    await self.changed.wait()
                    continue
                if not chans.complete():
                    # Open them before taking a chunk, so that meanwhile a worker that is ready moves the
                    # lowest one (a failure is left to move(), which retries).
                    await chans.open(quietly=True)
                    seq = self._pick()
                    if seq is None:
                        continue
                self.in_flight.add(seq)
                try:
                    await self._with_retries(self.dst.name, functools.partial(move, seq))
                except (ChunkCorrupt, NoChunk, SpoolFull) as e:
                    await chans.reset()
                    self._on_refused(seq, e)
                finally:
                    self.in_flight.discard(seq)
                    self.changed.set()
        finally:
            if self.error is None and self.done.is_set():
                await chans.park()  # for the run's next stream on these hosts
            else:
                await chans.close()

    async def _pace(self, n: int) -> None:
        """Before a piece of ``n`` bytes goes on the link: its turn under the bandwidth limit, and not while
        paused (a piece read before a pause waits for the resume, wherever it was in the queue)."""
        await self.pacer.take(n)
        await self.unpaused.wait()

    async def _turn_of(self, seq: int) -> None:
        """Wait until chunk ``seq`` may forward its next data frame: not while paused, then in sequence
        order (``scheduler.turn_wait``)."""
        await self.unpaused.wait()
        while (wait := turn_wait(seq, self.moving, time.monotonic(), self.opts.overtake_idle)) > 0:
            try:
                await asyncio.wait_for(self._turn.wait(), wait)
            except asyncio.TimeoutError:
                pass

    def _on_refused(self, seq: int, e: ChunkCorrupt | NoChunk | SpoolFull) -> None:
        """The target refused chunk ``seq``: damaged on the way (move it again, up to a limit), already
        consumed and released (the next status shows it), or no room in its spool (hold chunks back)."""
        if isinstance(e, ChunkCorrupt):
            n = self.corrupt_retries[seq] = self.corrupt_retries.get(seq, 0) + 1
            self.emit("chunk_discarded", host=self.dst.name, detail=f"chunk {seq} arrived damaged: "
                      f"{e.fields.get('reason')}; moving it again")
            if n > self.opts.max_corrupt_retries:
                raise IntegrityError(reason=f"chunk {seq} arrived damaged {n} times in a row") from e
        elif isinstance(e, SpoolFull):
            self._target_spool_full()


_NO_SPACE_WORDS = ("out of space", "no space left", "disk quota exceeded", "enospc", "edquot")


def _out_of_space(stderr: str) -> bool:
    low = stderr.lower()
    return any(w in low for w in _NO_SPACE_WORDS)


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


__all__ = ["AgentSide", "EngineOptions", "Transfer", "TransferResult", "ZchunkError", "close_early"]
