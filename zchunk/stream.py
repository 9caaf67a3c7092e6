"""One stream session: a ``zfs send | zfs receive`` through both agents, and its life after a crash.

``run_stream`` negotiates codec and checksum, installs the agents into fresh
session directories and starts their detached daemons, runs the transfer
engine, verifies the target snapshot's guid and removes the session
directories. The session's record (session.py) outlives the coordinator:
``resume`` reattaches to its agents, ``abort`` stops them and removes what
they left, ``list_sessions`` lists them. Replication (replicate.py) decides
which streams to run; preflight (preflight.py) has learned the hosts first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import posixpath
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from . import agent
from . import errors as E
from .aio import all_of, raise_first
from .channels import AgentSide, close_early, early_key
from .client import AGENT_SOURCE, AgentClient, HostAgent
from .direct import run_direct
from .endpoint import parse_endpoint
from .engine import EngineOptions, Transfer, TransferResult
from .events import Emitter, Sink
from .fanout import Member, Slot
from .link import Bandwidth, LinkControl, Pacer
from .plan import SendPlan
from .preflight import HostReport, negotiate
from .protocol import AgentChannel
from .session import (
    SessionControl,
    SessionLock,
    SessionRecord,
    StateStore,
    TargetLock,
    default_state_dir,
    new_session_id,
)
from .transport import Host, LinkDown, LocalHost, SshOptions, first_contact, make_host
from .zfs import Zfs

# Chunk n holds min(chunk_size, FIRST_CHUNK * 2**n) raw bytes: zfs receive starts after 1 MiB has been
# spooled, moved and verified instead of a whole --chunk-size chunk (docs/chunk-format.md).
FIRST_CHUNK = 1 << 20


@dataclass
class SyncOptions:
    spool_dir: str = "/var/tmp/zchunk"
    chunk_size: int = 32 << 20
    compress: str = "auto"
    spool_max: int = 2 << 30
    parallel: int = 4
    patience: float = 24 * 3600.0
    connect_patience: float = 30.0
    agent_idle_timeout: float = 24 * 3600.0
    stall_timeout: float = 60.0
    state_dir: Path = field(default_factory=default_state_dir)
    ssh: SshOptions = field(default_factory=SshOptions)
    keep: bool = False
    python: str | None = None  # None: python3 on remote hosts, this interpreter locally
    verbose: bool = False
    bwlimit: str | None = None  # a rate or a weekly schedule (link.Bandwidth); None: unlimited
    timezone: str | None = None  # for the schedule; None: this machine's local time
    direct_max: int = 4 << 20  # a stream estimated at most this goes without a session (zchunk.direct); 0: never


@dataclass
class SyncResult:
    session: str | None
    plan: str
    up_to_date: bool = False
    transfer: TransferResult | None = None
    target_snapshot: str = ""
    guid: int = 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return d


# -- session set-up -----------------------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    """One zfs send | zfs receive, as the agents will run it."""

    plan: SendPlan
    recv_flags: tuple[str, ...] = ()
    recv_props: tuple[tuple[str, str], ...] = ()  # receive -o name=value
    resume_token: str | None = None  # send -t TOKEN instead of the plan's snapshots
    send_flags: tuple[str, ...] = ()  # -L -e -w ... (none with a token: it carries the original's)
    recv_excluded: tuple[str, ...] = ()  # receive -x name
    send_excluded: tuple[str, ...] = ()  # send -R -X dataset,...

    def describe(self) -> str:
        return (f"resume of {self.plan.snapshot.name} from its receive token" if self.resume_token
                else self.plan.describe())


def _goes_direct(spec: StreamSpec, estimate: int, opts: SyncOptions, fanout: Slot | None) -> bool:
    """A stream small enough to skip the session (``zchunk.direct``): not a fan-out's, whose targets share
    one zfs send, nor a resumed or a ``-R`` one."""
    return (0 < estimate <= opts.direct_max and fanout is None and spec.resume_token is None
            and "-R" not in spec.send_flags)


def _fields(spec: StreamSpec, role: str, direct: bool = False) -> dict[str, Any]:
    """The ``send`` or ``receive`` fields of an agent's config (``agent.zfs_argv``). ``direct``: a direct
    stream's receive, without -s, since a partial direct stream is never resumed but sent again."""
    plan = spec.plan
    if role == "send":
        return {"snapshot": plan.snapshot.name, "base": plan.base.name if plan.base else None,
                "intermediates": plan.intermediates,
                "flags": [] if spec.resume_token else list(spec.send_flags), "token": spec.resume_token,
                "exclude": list(spec.send_excluded)}
    return {"target": plan.target, "flags": [f for f in spec.recv_flags if not (direct and f == "-s")],
            "props": dict(spec.recv_props), "excluded": list(spec.recv_excluded)}


def agent_config(rec: SessionRecord, role: str, level: int | None, spec: StreamSpec, idle: float) -> dict[str, Any]:
    cfg: dict[str, Any] = {"id": rec.id, "role": role, "codec": rec.codec, "level": level,
                           "checksum": rec.checksum, "chunk_size": rec.chunk_size,
                           "first_chunk": min(rec.chunk_size, FIRST_CHUNK), "expected_bytes": rec.estimate,
                           "spool_max": rec.spool_max,
                           "idle_timeout": idle}
    cfg[role] = _fields(spec, role)  # the receive's target: rec.target_dataset, which is the plan's
    return cfg


def link_control(rec: SessionRecord, store: StateStore) -> LinkControl:
    """The session's --bwlimit (in its --timezone), and what the user asked of it since (``zchunk limit``,
    ``pause``, ``resume``: its control file, read again whenever it changes)."""
    def asked() -> tuple[str | None, bool]:
        ctl = store.control(rec.id)
        return ctl.limit, ctl.paused

    return LinkControl(Bandwidth.parse(rec.bwlimit), ZoneInfo(rec.timezone) if rec.timezone else None,
                       asked, lambda: store.control_changed(rec.id))


def record_ssh(opts: SyncOptions) -> dict[str, Any]:
    s = opts.ssh
    return {"config": str(s.config) if s.config else None, "key": str(s.key) if s.key else None,
            "port": s.port, "options": s.options}


def ssh_from_record(rec: SessionRecord, fallback: SshOptions) -> SshOptions:
    d = rec.ssh or {}
    if not d:
        return fallback
    return SshOptions(config=Path(d["config"]) if d.get("config") else None,
                      key=Path(d["key"]) if d.get("key") else None, port=d.get("port"),
                      options=dict(d.get("options") or {}))


# -- the commands -------------------------------------------------------------


async def run_stream(src_host: Host, dst_host: Host, src_rep: HostReport, dst_rep: HostReport,
                     source: str, target: str, spec: StreamSpec, opts: SyncOptions, store: StateStore,
                     emit: Emitter, pacer: Pacer | None = None, fanout: Slot | None = None) -> SyncResult:
    """Negotiate, start both agents in fresh session directories, move the stream, verify, clean up.
    ``pacer``: the bandwidth budget this stream shares with others of its run (-r --jobs, fan-out).
    ``fanout``: this target's place in a fan-out run; a stream the same as other targets' shares their
    ``zfs send`` and source spool (``zchunk.fanout``)."""
    plan = spec.plan
    codec, level, checksum = negotiate(opts.compress, src_rep, dst_rep)
    estimate = await Zfs(src_host).estimate(plan.snapshot, plan.base, src_rep.features, spec.send_flags)
    if _goes_direct(spec, estimate, opts, fanout):
        emit("plan", plan=spec.describe(), send_kind=plan.kind, snapshot=plan.snapshot.name,
             base=plan.base.name if plan.base else None, estimate=estimate, codec=None, checksum=None, direct=True)
        sent, put = await all_of(
            run_direct(src_host, dst_host, plan.snapshot.name, plan.snapshot.guid, plan.target_snapshot,
                       _fields(spec, "send"), _fields(spec, "receive", direct=True), estimate, opts.direct_max,
                       opts.bwlimit, opts.timezone, opts.stall_timeout, pacer, emit),
            all_of(*(HostAgent(h).program_if_idle(opts.spool_dir) for h in (src_host, dst_host))))
        _said_programs((src_host, dst_host), put, emit)
        if sent is not None:
            return SyncResult(None, f"{plan.snapshot.name} -> {plan.target}", transfer=sent[0],
                              target_snapshot=plan.target_snapshot, guid=sent[1])
    emit("plan", plan=spec.describe(), send_kind=plan.kind, snapshot=plan.snapshot.name,
         base=plan.base.name if plan.base else None, estimate=estimate, codec=codec, checksum=checksum)
    rec = SessionRecord(
        id=new_session_id(), source=source, target=target, snapshot=plan.snapshot.name,
        snapshot_guid=plan.snapshot.guid, base=plan.base.name if plan.base else None,
        target_dataset=plan.target, source_dir="", target_dir="", spool_base=opts.spool_dir,
        codec=codec, checksum=checksum, chunk_size=opts.chunk_size, spool_max=opts.spool_max,
        estimate=estimate, ssh=record_ssh(opts), dirs_left=True, bwlimit=opts.bwlimit, timezone=opts.timezone,
        source_python=None if isinstance(src_host, LocalHost) else src_host.python,
        target_python=None if isinstance(dst_host, LocalHost) else dst_host.python)
    store.save(rec)
    member: Member | None = None
    if fanout is not None:  # waits for the run's other targets to say which stream they need
        member = await fanout.join((plan.snapshot.guid, plan.base.guid if plan.base else None, plan.intermediates,
                                    spec.send_flags, spec.send_excluded, spec.resume_token, codec, level,
                                    checksum, opts.chunk_size, opts.spool_max, opts.spool_dir))
    early: dict[str, list[asyncio.Task[AgentChannel]]] = {}
    try:
        await _put_programs(src_host, dst_host, opts, emit)
        early = _open_early(rec, src_host, dst_host, opts)
        await _start_agents(rec, spec, level, src_host, dst_host, opts, store, member)
    except (E.ZchunkError, LinkDown) as e:
        await close_early(early)
        if member is not None:
            await member.give_up()
        rec.state, rec.reason = "failed", f"could not start the agents: {e}"
        store.save(rec)
        await _cleanup(rec, src_host, dst_host, dataclasses.replace(opts, keep=False), store, emit)
        if isinstance(e, LinkDown):
            raise E.HostUnreachable(host=e.host, reason=e.reason) from e
        raise
    except BaseException:
        await close_early(early)
        if member is not None:
            await member.give_up()
        raise
    emit("session", session=rec.id, source_dir=rec.source_dir, target_dir=rec.target_dir,
         **({"fanout": rec.fanout} if rec.fanout else {}))
    return await _run_session(rec, src_host, dst_host, opts, store, emit, early, pacer)


async def _put_programs(src_host: Host, dst_host: Host, opts: SyncOptions, emit: Emitter) -> None:
    """The agent program on each host, once per host of a run: the sessions after the first start by
    importing it instead of receiving and compiling its source again (a recursive run has hundreds)."""
    hosts = (src_host, dst_host)
    _said_programs(hosts, await all_of(*(HostAgent(h).program(opts.spool_dir) for h in hosts)), emit)


def _said_programs(hosts: tuple[Host, Host], replies: list[dict[str, Any] | None], emit: Emitter) -> None:
    for host, reply in zip(hosts, replies):
        if reply is not None:
            emit("agent_program", host=host.name, path=f"{reply['program']}/{reply['module']}.py",
                 fresh=bool(reply.get("fresh")))


def _open_early(rec: SessionRecord, src_host: Host, dst_host: Host,
                opts: SyncOptions) -> dict[str, list[asyncio.Task[AgentChannel]]]:
    """The transfer's first channels, opened while the agents are installed (``AgentSide.open_channel``
    with the source): the status poller's and the first worker's for each side that needs them (none
    for a source on this machine: its spool is read directly and its status asked in process). Only
    for an absolute spool directory, whose session directories are known before install answers."""
    if not opts.spool_dir.startswith("/"):
        return {}
    early: dict[str, list[asyncio.Task[AgentChannel]]] = {}
    for host, role in ((src_host, "send"), (dst_host, "receive")):
        local = isinstance(host, LocalHost)
        wanted = [] if local else [True]  # the poller's, over the control connection (Host.control)
        wanted += [] if local and role == "send" else [False]  # worker 0's
        side = AgentSide(host, posixpath.normpath(posixpath.join(opts.spool_dir, f"{rec.id}-{role}")), role,
                         _needs(rec))
        for control in wanted:
            early[early_key(role, control)] = [
                asyncio.create_task(side.open_channel(opts.stall_timeout, AGENT_SOURCE, control=control))]
    return early


def _needs(rec: SessionRecord) -> list[str]:
    """What every channel of this session requires of its agent (its handshake checks it)."""
    return ["chunk-v1", agent.CODEC_CAPS[rec.codec], agent.HASH_CAPS[rec.checksum]]


async def _start_agents(rec: SessionRecord, spec: StreamSpec, level: int | None, src_host: Host, dst_host: Host,
                        opts: SyncOptions, store: StateStore, member: Member | None = None) -> None:
    # Both hosts at once, each in one command (install, then start the daemon: one round trip and one
    # agent process start). A directory one side made is recorded even when the other failed, so the
    # caller's cleanup finds it; one made by a command that never answered is found by its name.
    # A fan-out member's sender directory gets no daemon of its own: its group's daemon feeds it.
    configs = {role: agent_config(rec, role, level, spec, opts.agent_idle_timeout) for role in ("receive", "send")}
    if member is not None:
        configs["send"]["member_of"] = rec.fanout = member.group_dir
    installed = await asyncio.gather(*(
        HostAgent(host).install(opts.spool_dir, f"{rec.id}-{role}", configs[role],
                                start=role == "receive" or member is None)
        for host, role in ((dst_host, "receive"), (src_host, "send"))), return_exceptions=True)
    if isinstance(installed[0], str):
        rec.target_dir = installed[0]
    if isinstance(installed[1], str):
        rec.source_dir = installed[1]
    store.save(rec)
    if member is not None:
        async def install_group(name: str, cfg: dict[str, Any]) -> str:
            return await HostAgent(src_host).install(opts.spool_dir, name, cfg, start=True)

        await member.installed(rec.source_dir or None, configs["send"], install_group)
    raise_first(installed)
    rec.state = "running"
    store.save(rec)


async def resume(session_id: str, opts: SyncOptions, on_event: Sink | None = None, lock: bool = True) -> SyncResult:
    """Reattach to a session's agents and finish it (``lock``: unless the caller holds the target's lock)."""
    store = StateStore(opts.state_dir)
    rec = store.load(session_id)
    if not rec.active:
        raise E.UsageError(reason=f"session {rec.id} is {rec.state}, not resumable"
                           + (f" ({rec.reason})" if rec.reason else ""))
    if not lock:
        return await _resume(rec, opts, store, Emitter(on_event))
    target_lock = TargetLock(opts.state_dir, rec.target)
    target_lock.acquire(rec.id)
    try:
        return await _resume(rec, opts, store, Emitter(on_event))
    finally:
        target_lock.release()


@contextlib.asynccontextmanager
async def _session_hosts(rec: SessionRecord, opts: SyncOptions) -> AsyncIterator[tuple[Host, Host]]:
    """The source and target hosts of a recorded session, reached as it was (its own ssh options), closed after."""
    ssh = ssh_from_record(rec, opts.ssh)
    src_host = make_host(parse_endpoint(rec.source), ssh, opts.python or rec.source_python)
    dst_host = make_host(parse_endpoint(rec.target), ssh, opts.python or rec.target_python)
    try:
        await first_contact(src_host, opts.patience, opts.connect_patience)
        await first_contact(dst_host, opts.patience, opts.connect_patience)
        yield src_host, dst_host
    finally:
        await src_host.close()
        await dst_host.close()


async def _resume(rec: SessionRecord, opts: SyncOptions, store: StateStore, emit: Emitter) -> SyncResult:
    async with _session_hosts(rec, opts) as (src_host, dst_host):
        if not rec.source_dir or not rec.target_dir or rec.state == "starting":
            rec.state, rec.reason = "failed", "the session never finished starting"
            store.save(rec)
            await _cleanup(rec, src_host, dst_host, dataclasses.replace(opts, keep=False), store, emit)
            raise E.AgentDied(host=src_host.name, role="send", session=rec.id,
                              state="the session never finished starting")
        emit("session", session=rec.id, source_dir=rec.source_dir, target_dir=rec.target_dir, resumed=True,
             **({"fanout": rec.fanout} if rec.fanout else {}))
        return await _run_session(rec, src_host, dst_host, opts, store, emit)


async def _run_session(rec: SessionRecord, src_host: Host, dst_host: Host, opts: SyncOptions,
                       store: StateStore, emit: Emitter,
                       early: dict[str, list[asyncio.Task[AgentChannel]]] | None = None,
                       pacer: Pacer | None = None) -> SyncResult:
    src = AgentSide(src_host, rec.source_dir, "send", _needs(rec))
    dst = AgentSide(dst_host, rec.target_dir, "receive", _needs(rec))
    eopts = EngineOptions(parallel=opts.parallel, patience=opts.patience, stall_timeout=opts.stall_timeout)

    def on_event(kind: str, **fields: Any) -> None:
        if kind == "progress":
            rec.raw_bytes = int(fields["raw_bytes"])
            rec.chunks_received = int(fields["chunks_received"])
            rec.total_chunks = fields.get("total_chunks")
        emit(kind, **fields)

    transfer = Transfer(src, dst, session_id=rec.id, chunk_size=rec.chunk_size, spool_max=rec.spool_max,
                        estimate=rec.estimate, opts=eopts, emit=on_event, early=early, link=link_control(rec, store),
                        pacer=pacer)
    lock = SessionLock(opts.state_dir, rec.id)
    lock.acquire()  # says to `zchunk resume ID` in another terminal that this process runs the session
    try:
        result = await transfer.run()
    except (E.PatienceExhausted, asyncio.CancelledError, KeyboardInterrupt) as e:
        rec.reason = str(e) or "interrupted"
        store.save(rec)
        raise
    except E.ZchunkError as e:
        rec.state, rec.reason = "failed", str(e)
        store.save(rec)
        await _cleanup(rec, src_host, dst_host, opts, store, emit)
        raise
    finally:
        lock.release()
    # The source's directory is of no more use once the target has the whole stream: removed while the
    # guid is checked. The target's stays until then (its receiver.json is the evidence of a mismatch).
    source_cleanup = asyncio.ensure_future(_remove_dirs(rec, src_host, dst_host, opts, emit, roles=("send",)))
    try:
        guid = await Zfs(dst_host).guid(f"{rec.target_dataset}@{rec.snapshot.split('@', 1)[1]}")
        if guid != rec.snapshot_guid:
            rec.state, rec.reason = "failed", "guid mismatch"
            store.save(rec)
            raise E.IntegrityError(reason=f"target snapshot guid {guid} != source guid {rec.snapshot_guid}")
        emit("verified", snapshot=rec.snapshot, guid=guid, stream_hash=result.stream_hash)
        target_removed = await _remove_dirs(rec, src_host, dst_host, opts, emit, roles=("receive",),
                                            receiver=transfer.receiver)
    finally:
        await transfer.close()
        source_removed = await source_cleanup
    rec.state, rec.raw_bytes, rec.total_chunks = "done", result.raw_bytes, result.total_chunks
    rec.chunks_received = result.total_chunks
    rec.dirs_left = not (source_removed and target_removed or opts.keep)
    store.save(rec)
    return SyncResult(rec.id, f"{rec.snapshot} -> {rec.target_dataset}", transfer=result,
                      target_snapshot=f"{rec.target_dataset}@{rec.snapshot.split('@', 1)[1]}", guid=guid)


async def session_dirs(rec: SessionRecord, host: Host, role: str) -> list[str]:
    """The directory of ``rec`` in ``role`` on ``host``: the recorded one, or else whatever the host holds
    under the name install gives it (``<spool_base>/<id>-<role>``). A coordinator killed between an install
    and recording its answer leaves such a directory that only the host knows of."""
    recorded = rec.source_dir if role == "send" else rec.target_dir
    if recorded:
        return [recorded]
    return [s["path"] for s in await HostAgent(host).sessions(rec.spool_base) if s.get("id") == f"{rec.id}-{role}"]


async def _cleanup(rec: SessionRecord, src_host: Host, dst_host: Host, opts: SyncOptions, store: StateStore,
                   emit: Emitter) -> None:
    """``_remove_dirs`` of both sides, recorded: a session whose directories may remain says so."""
    rec.dirs_left = not await _remove_dirs(rec, src_host, dst_host, opts, emit) and not opts.keep
    store.save(rec)


async def _remove_dirs(rec: SessionRecord, src_host: Host, dst_host: Host, opts: SyncOptions,
                       emit: Emitter, roles: tuple[str, ...] = ("send", "receive"),
                       receiver: AgentClient | None = None) -> bool:
    """Stop the agents and remove the session directories (kept with --keep), also unrecorded ones; both
    sides unless ``roles`` says which. ``cleaned`` is said once the receiving side's is done. True when
    every side did it (a side that could not is a warning, and the record keeps ``dirs_left``).
    ``receiver``, the receiver's client over an open channel (the finished transfer's), asks it there: one
    round trip instead of an interpreter start on the target; on any failure the ``remove`` command follows."""
    async def one_side(host: Host, role: str) -> bool:
        try:
            paths = await session_dirs(rec, host, role)
        except (E.ZchunkError, LinkDown) as e:
            emit("warning", host=host.name, detail=f"could not look for {rec.id}-{role} in {rec.spool_base}: {e}")
            return False
        done = True
        for path in paths:
            if role == "receive" and receiver is not None and path == rec.target_dir:
                try:
                    await receiver.cleanup(keep=opts.keep)
                    continue
                except (E.ZchunkError, LinkDown):
                    pass  # the command below says what is wrong, if anything still is
            try:
                await HostAgent(host).remove(path, keep=opts.keep)
            except (E.ZchunkError, LinkDown) as e:
                if not opts.keep and not _link_trouble(e) and await _gone(host, path):
                    continue  # a retry: the attempt whose answer the link lost removed it
                emit("warning", host=host.name, detail=f"could not clean up {path}: {e}")
                done = False
        return done

    sides = [(src_host, "send"), (dst_host, "receive")]
    results = await all_of(*(one_side(host, role) for host, role in sides if role in roles))  # both hosts at once
    if "receive" in roles:
        emit("cleaned", kept=opts.keep)
    return all(results)


def _link_trouble(e: BaseException) -> bool:
    """A failure of the link itself (already retried for --patience): no point asking the host more."""
    return isinstance(e, (LinkDown, E.HostUnreachable))


async def _gone(host: Host, path: str) -> bool:
    """Whether ``path`` is certainly not there (False also when the host cannot say)."""
    try:
        return (await host.run(["test", "-e", path])).status == 1
    except (E.ZchunkError, LinkDown):
        return False


async def abort(session_id: str, opts: SyncOptions, on_event: Sink | None = None) -> SessionRecord:
    emit = Emitter(on_event)
    store = StateStore(opts.state_dir)
    rec = store.load(session_id)
    async with _session_hosts(rec, opts) as (src_host, dst_host):
        for host, role in ((dst_host, "receive"), (src_host, "send")):
            for path in await session_dirs(rec, host, role):  # unrecorded ones too (killed while installing)
                res = await host.run(["test", "-d", path])
                if res.status != 0:
                    emit("warning", host=host.name, detail=f"{path} is already gone")
                    continue
                await HostAgent(host).remove(path)
                emit("removed", host=host.name, path=path)
        if rec.active:
            rec.state, rec.reason = "aborted", "aborted by the user"
        rec.dirs_left = False  # an ended session's leftovers: removed, its state and reason stay
        store.save(rec)
        return rec


@dataclass
class SessionView:
    """A session as ``zchunk sessions`` shows it: its record and what the user asked of it."""

    record: SessionRecord
    control: SessionControl
    running: bool  # a coordinator runs it now (holds its lock)

    def to_json(self) -> dict[str, Any]:
        return {**self.record.to_json(), "paused": self.control.paused, "limit": self.control.limit or
                self.record.bwlimit, "running": self.running}


def list_sessions(opts: SyncOptions) -> list[SessionView]:
    store = StateStore(opts.state_dir)
    return [SessionView(rec, store.control(rec.id), rec.active and SessionLock(opts.state_dir, rec.id).held_elsewhere())
            for rec in store.all()]


def _active(store: StateStore, session_id: str, what: str) -> SessionRecord:
    rec = store.load(session_id)
    if not rec.active:
        raise E.UsageError(reason=f"session {rec.id} is {rec.state}: there is nothing to {what}")
    return rec


def set_limit(session_id: str, opts: SyncOptions, limit: str) -> SessionView:
    """``zchunk limit``: the session's bandwidth limit from now on (a rate, a schedule or ``unlimited``);
    its running coordinator follows within a poll, or the next one that resumes it."""
    store = StateStore(opts.state_dir)
    rec = _active(store, session_id, "limit")
    Bandwidth.parse(limit, "zchunk limit")  # refused here, with the reason, before anything is written
    ctl = store.set_control(rec.id, limit=limit.strip())
    return SessionView(rec, ctl, SessionLock(opts.state_dir, rec.id).held_elsewhere())


def pause(session_id: str, opts: SyncOptions) -> SessionView:
    """``zchunk pause``: no chunk moves until ``zchunk resume``; the agents, zfs pipes and spools stay (the
    sender stops at the spool cap), and the running coordinator keeps them alive."""
    store = StateStore(opts.state_dir)
    rec = _active(store, session_id, "pause")
    ctl = store.set_control(rec.id, paused=True)
    return SessionView(rec, ctl, SessionLock(opts.state_dir, rec.id).held_elsewhere())


def unpause(session_id: str, opts: SyncOptions) -> tuple[SessionView, bool]:
    """The first half of ``zchunk resume``: a paused session moves chunks again; and whether it was paused.
    Whether a coordinator is running it tells the caller whether to reattach (``resume``) or leave it be."""
    store = StateStore(opts.state_dir)
    rec = _active(store, session_id, "resume")
    ctl = store.control(rec.id)
    was_paused = ctl.paused
    if was_paused:
        ctl = store.set_control(rec.id, paused=False)
    return SessionView(rec, ctl, SessionLock(opts.state_dir, rec.id).held_elsewhere()), was_paused



