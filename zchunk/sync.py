"""``zchunk sync``, ``resume``, ``abort``, ``sessions``: the library calls behind the CLI.

A sync is: connect -> preflight both hosts -> plan -> negotiate codec and
checksum -> install the agents into fresh session directories -> start the
detached daemons -> run the transfer engine -> verify the target snapshot's
guid -> remove the session directories. Every step before the install
changes nothing on either host.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import posixpath
import shlex
import sys
from collections.abc import Awaitable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import agent
from . import errors as E
from .endpoint import Endpoint, parse_endpoint
from .engine import AgentSide, EngineOptions, Transfer, TransferResult, close_early
from .plan import SendPlan
from .protocol import AgentChannel, InProcessChannel, as_remote
from .session import SessionRecord, StateStore, TargetLock, default_state_dir, new_session_id
from .transport import Host, LinkDown, LocalHost, SshOptions, first_contact, make_host
from .zfs import RECEIVE_PERMS, SEND_PERMS, Dataset, Features, Zfs

AGENT_SOURCE = Path(agent.__file__).read_bytes()
# This interpreter as the local agent imports the agent module from the coordinator's own copy (its
# compiled cache: ~35 ms less per command than compiling the source from stdin); the source still comes
# on stdin, which is what install writes into the session directory.
LOCAL_BOOTSTRAP = (
    f"import sys;sys.path.insert(0,{str(Path(agent.__file__).resolve().parents[1])!r});"
    "import zchunk.agent as m;m.AGENT_SOURCE=sys.stdin.buffer.read();sys.exit(m.main(sys.argv[1:]))"
)
MIN_PYTHON = (3, 9)
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


@dataclass
class HostReport:
    """What preflight learned about one host."""

    name: str
    python: tuple[int, ...]
    capabilities: list[str]
    features: Features
    uid: int
    user: str = "root"
    groups: tuple[str, ...] = ()
    hostname: str = "host"
    sessions: list[dict[str, Any]] | None = None  # ``sessions --spool-dir`` as the probe saw it


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


class Emitter:
    """Callback wrapper: the library reports events; the CLI decides how to show them."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, kind: str, **fields: Any) -> None:
        if self.fn is not None:
            self.fn(kind, fields)


# -- preflight ----------------------------------------------------------------


def bootstrap(host: Host, *args: str) -> list[str]:
    """``python3 -c BOOTSTRAP ARGS...``: a one-shot agent command, the agent's source on stdin."""
    own = isinstance(host, LocalHost) and host.python == sys.executable
    return [host.python, "-c", LOCAL_BOOTSTRAP if own else agent.BOOTSTRAP, *args]


async def probe_host(host: Host, opts: SyncOptions) -> HostReport:
    """python3 and zfs present and usable; nothing is written."""
    # Both at once (the zfs probes are read-only); python's answer is judged first, as before.
    res, features = await asyncio.gather(
        host.run(bootstrap(host, "probe", opts.spool_dir), stdin=AGENT_SOURCE),
        Zfs(host).features(),
        return_exceptions=True)
    if isinstance(res, BaseException):
        raise res
    if res.status == 127:
        raise E.MissingPython(host=host.name)
    try:
        info = json.loads(res.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        version = res.err_text.splitlines()[-1] if res.err_text else f"status {res.status}"
        raise E.OldPython(host=host.name, version=version) from None
    py = tuple(info.get("python", [0]))
    if py < MIN_PYTHON:
        raise E.OldPython(host=host.name, version=".".join(map(str, py)))
    if isinstance(features, BaseException):
        raise features
    return HostReport(host.name, py, list(info.get("capabilities", [])), features, int(info.get("uid", -1)),
                      str(info.get("user", "")), tuple(info.get("groups", [])), str(info.get("host", "host")),
                      _listing(info.get("sessions")) if "sessions" in info else None)


def negotiate(compress: str, src: HostReport, dst: HostReport) -> tuple[str, int | None, str]:
    """Pick codec (+level) and checksum both agents support; a failure names both lists."""
    both = set(src.capabilities) & set(dst.capabilities)
    name, _, level_s = compress.partition(":")
    level = int(level_s) if level_s.isdigit() else None
    if name == "auto":
        name = "zstd" if "zstd-v1" in both else "zlib"
    if name not in agent.CODEC_CAPS:
        raise E.UsageError(reason=f"--compress {compress!r}: use zstd[:LEVEL], zlib[:LEVEL] or none")
    if agent.CODEC_CAPS[name] not in both:
        raise E.CapabilityMismatch(what=f"codec {name}", ours=src.capabilities, theirs=dst.capabilities,
                                   host=f"{src.name}/{dst.name}")
    checksum = "xxh3-128" if "xxh3-128-v1" in both else "blake2b-128"
    return name, level, checksum


async def load_sides(source: Endpoint, target: Endpoint, src_host: Host, dst_host: Host,
                     src_rep: HostReport, dst_rep: HostReport) -> tuple[Dataset, Dataset | None]:
    """Both datasets (the target may be absent, its parent not) and, for non-root users, delegation."""
    src_zfs, dst_zfs = Zfs(src_host), Zfs(dst_host)
    src_ds = await src_zfs.require(source.dataset)
    dst_ds = await dst_zfs.dataset(target.dataset)
    dst_anchor = target.dataset
    if dst_ds is None and "/" in target.dataset:
        dst_anchor = target.dataset.rsplit("/", 1)[0]
        if await dst_zfs.dataset(dst_anchor) is None:
            raise E.UnknownDataset(host=dst_host.name, dataset=dst_anchor,
                                   dataset_parent=dst_anchor.split("/")[0])
    if src_rep.uid != 0:
        await src_zfs.check_delegation(source.dataset, src_rep.user, src_rep.groups, SEND_PERMS, "send")
    if dst_rep.uid != 0:
        await dst_zfs.check_delegation(dst_anchor, dst_rep.user, dst_rep.groups, RECEIVE_PERMS, "receive into")
    return src_ds, dst_ds


# -- session set-up -----------------------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    """One zfs send | zfs receive, as the agents will run it."""

    plan: SendPlan
    recv_flags: tuple[str, ...] = ()
    recv_props: tuple[tuple[str, str], ...] = ()  # receive -o name=value
    resume_token: str | None = None  # send -t TOKEN instead of the plan's snapshots

    def describe(self) -> str:
        return (f"resume of {self.plan.snapshot.name} from its receive token" if self.resume_token
                else self.plan.describe())


def agent_config(rec: SessionRecord, role: str, level: int | None, spec: StreamSpec, idle: float) -> dict[str, Any]:
    cfg: dict[str, Any] = {"id": rec.id, "role": role, "codec": rec.codec, "level": level,
                           "checksum": rec.checksum, "chunk_size": rec.chunk_size,
                           "first_chunk": min(rec.chunk_size, FIRST_CHUNK), "expected_bytes": rec.estimate,
                           "spool_max": rec.spool_max,
                           "idle_timeout": idle}
    plan = spec.plan
    if role == "send":
        cfg["send"] = {"snapshot": plan.snapshot.name, "base": plan.base.name if plan.base else None,
                       "intermediates": plan.intermediates, "flags": [], "token": spec.resume_token}
    else:
        cfg["receive"] = {"target": rec.target_dataset, "flags": list(spec.recv_flags),
                          "props": dict(spec.recv_props)}
    return cfg


async def install_agent(host: Host, opts: SyncOptions, sid: str, cfg: dict[str, Any], start: bool = False) -> str:
    """Create ``<spool-dir>/<session>-<role>`` (both may be on one host) holding the agent, and with
    ``start`` start its daemon in the same command."""
    dirname = f"{sid}-{cfg['role']}"
    argv = bootstrap(host, "install", opts.spool_dir, dirname, json.dumps(cfg))
    if start:  # an absolute spool directory names the session's: the daemon is forked by install itself
        argv += ["start"] + ([posixpath.normpath(posixpath.join(opts.spool_dir, dirname))]
                             if opts.spool_dir.startswith("/") else [])
    res = await host.run(argv, stdin=AGENT_SOURCE)
    reply = _agent_reply(host, res.stdout, res.err_text)
    return str(reply["path"])


async def agent_command(host: Host, opts: SyncOptions, session_dir: str, *args: str) -> dict[str, Any]:
    if isinstance(host, LocalHost) and args and args[0] in _IN_PROCESS:
        return await asyncio.to_thread(_agent_here, host, list(args))
    res = await host.run([host.python, f"{session_dir}/agent.py", *args])
    return _agent_reply(host, res.stdout, res.err_text)


# Agent commands that neither fork nor keep state: on this machine they run in the coordinator (on a
# thread), as the agent's own code under the agent's user, instead of starting an interpreter for them.
_IN_PROCESS = {"remove"}


def _agent_here(host: Host, argv: list[str]) -> dict[str, Any]:
    with as_remote(host.name, argv[0]):
        return dict(agent.COMMANDS[argv[0]](argv[1:]) or {})


def _agent_reply(host: Host, stdout: bytes, stderr: str) -> dict[str, Any]:
    try:
        reply = json.loads(stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise E.RemoteError(host=host.name, code="agent-crashed", reason=stderr[-2000:] or "no output") from None
    if "error" in reply:
        raise E.from_remote(host.name, reply["error"])
    return dict(reply)


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
                     emit: Emitter) -> SyncResult:
    """Negotiate, start both agents in fresh session directories, move the stream, verify, clean up."""
    plan = spec.plan
    codec, level, checksum = negotiate(opts.compress, src_rep, dst_rep)
    estimate = await Zfs(src_host).estimate(plan.snapshot, plan.base, src_rep.features)
    emit("plan", plan=spec.describe(), send_kind=plan.kind, snapshot=plan.snapshot.name,
         base=plan.base.name if plan.base else None, estimate=estimate, codec=codec, checksum=checksum)
    rec = SessionRecord(
        id=new_session_id(), source=source, target=target, snapshot=plan.snapshot.name,
        snapshot_guid=plan.snapshot.guid, base=plan.base.name if plan.base else None,
        target_dataset=plan.target, source_dir="", target_dir="", spool_base=opts.spool_dir,
        codec=codec, checksum=checksum, chunk_size=opts.chunk_size, spool_max=opts.spool_max,
        estimate=estimate, ssh=record_ssh(opts), dirs_left=True)
    store.save(rec)
    early = _open_early(rec, src_host, dst_host, opts)
    try:
        await _start_agents(rec, spec, level, src_host, dst_host, opts, store)
    except (E.ZchunkError, LinkDown) as e:
        await close_early(early)
        rec.state, rec.reason = "failed", f"could not start the agents: {e}"
        store.save(rec)
        await _cleanup(rec, src_host, dst_host, dataclasses.replace(opts, keep=False), store, emit)
        if isinstance(e, LinkDown):
            raise E.HostUnreachable(host=e.host, reason=e.reason) from e
        raise
    except BaseException:
        await close_early(early)
        raise
    emit("session", session=rec.id, source_dir=rec.source_dir, target_dir=rec.target_dir)
    return await _run_session(rec, src_host, dst_host, opts, store, emit, early)


def _open_early(rec: SessionRecord, src_host: Host, dst_host: Host,
                opts: SyncOptions) -> dict[str, list[asyncio.Task[AgentChannel]]]:
    """The transfer's first channels, opened while the agents are installed (``AgentSide.open_channel``
    with the source): the status poller's and the first worker's for each side that needs them (none
    for a source on this machine: its spool is read directly and its status asked in process). Only
    for an absolute spool directory, whose session directories are known before install answers."""
    if not opts.spool_dir.startswith("/"):
        return {}
    early: dict[str, list[asyncio.Task[AgentChannel]]] = {}
    eopts = EngineOptions(stall_timeout=opts.stall_timeout)
    for host, role in ((src_host, "send"), (dst_host, "receive")):
        local = isinstance(host, LocalHost)
        count = (0 if local else 1) + (0 if local and role == "send" else 1)  # the poller's, worker 0's
        side = AgentSide(host, posixpath.normpath(posixpath.join(opts.spool_dir, f"{rec.id}-{role}")), role,
                         _needs(rec))
        early[role] = [asyncio.create_task(side.open_channel(eopts, AGENT_SOURCE)) for _ in range(count)]
    return early


def _needs(rec: SessionRecord) -> list[str]:
    """What every channel of this session requires of its agent (its handshake checks it)."""
    return ["chunk-v1", agent.CODEC_CAPS[rec.codec], agent.HASH_CAPS[rec.checksum]]


async def _start_agents(rec: SessionRecord, spec: StreamSpec, level: int | None,
                        src_host: Host, dst_host: Host, opts: SyncOptions, store: StateStore) -> None:
    # Both hosts at once, each in one command (install, then start the daemon: one round trip and one
    # agent process start). A directory one side made is recorded even when the other failed, so the
    # caller's cleanup finds it; one made by a command that never answered is found by its name.
    installed = await asyncio.gather(
        install_agent(dst_host, opts, rec.id, agent_config(rec, "receive", level, spec, opts.agent_idle_timeout),
                      start=True),
        install_agent(src_host, opts, rec.id, agent_config(rec, "send", level, spec, opts.agent_idle_timeout),
                      start=True),
        return_exceptions=True)
    if isinstance(installed[0], str):
        rec.target_dir = installed[0]
    if isinstance(installed[1], str):
        rec.source_dir = installed[1]
    store.save(rec)
    raise_first(installed)
    rec.state = "running"
    store.save(rec)


def raise_first(results: Sequence[Any]) -> None:
    for r in results:
        if isinstance(r, BaseException):
            raise r


async def all_of(*steps: Awaitable[Any]) -> list[Any]:
    """The steps at once (each is a round trip); all finish before a failure (the first in this order) is
    raised, so none is left running. Their results."""
    results = list(await asyncio.gather(*steps, return_exceptions=True))
    raise_first(results)
    return results


async def resume(session_id: str, opts: SyncOptions, on_event: Any = None, lock: bool = True) -> SyncResult:
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


async def _resume(rec: SessionRecord, opts: SyncOptions, store: StateStore, emit: Emitter) -> SyncResult:
    ssh = ssh_from_record(rec, opts.ssh)
    src_host = make_host(parse_endpoint(rec.source), ssh, opts.python)
    dst_host = make_host(parse_endpoint(rec.target), ssh, opts.python)
    try:
        await first_contact(src_host, opts.patience, opts.connect_patience)
        await first_contact(dst_host, opts.patience, opts.connect_patience)
        if not rec.source_dir or not rec.target_dir or rec.state == "starting":
            rec.state, rec.reason = "failed", "the session never finished starting"
            store.save(rec)
            await _cleanup(rec, src_host, dst_host, dataclasses.replace(opts, keep=False), store, emit)
            raise E.AgentDied(host=src_host.name, role="send", session=rec.id,
                              state="the session never finished starting")
        emit("session", session=rec.id, source_dir=rec.source_dir, target_dir=rec.target_dir, resumed=True)
        return await _run_session(rec, src_host, dst_host, opts, store, emit)
    finally:
        await src_host.close()
        await dst_host.close()


async def _run_session(rec: SessionRecord, src_host: Host, dst_host: Host, opts: SyncOptions,
                       store: StateStore, emit: Emitter,
                       early: dict[str, list[asyncio.Task[AgentChannel]]] | None = None) -> SyncResult:
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
                        estimate=rec.estimate, opts=eopts, emit=on_event, early=early)
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
                                            channel=transfer.receiver_channel)
    finally:
        await transfer.close()
        source_removed = await source_cleanup
    rec.state, rec.raw_bytes, rec.total_chunks = "done", result.raw_bytes, result.total_chunks
    rec.chunks_received = result.total_chunks
    rec.dirs_left = not (source_removed and target_removed or opts.keep)
    store.save(rec)
    return SyncResult(rec.id, f"{rec.snapshot} -> {rec.target_dataset}", transfer=result,
                      target_snapshot=f"{rec.target_dataset}@{rec.snapshot.split('@', 1)[1]}", guid=guid)


async def list_spool(host: Host, spool_base: str) -> list[dict[str, Any]]:
    """The session directories under a host's spool base, as its agent sees them (role, state, pid, ...)."""
    res = await host.run(bootstrap(host, "sessions", spool_base), stdin=AGENT_SOURCE)
    try:
        listing = json.loads(res.stdout.decode().strip().splitlines()[-1]).get("sessions", [])
    except (ValueError, IndexError, AttributeError):
        return []
    return _listing(listing)


def _listing(listing: Any) -> list[dict[str, Any]]:
    return [s for s in listing if isinstance(s, dict) and "path" in s] if isinstance(listing, list) else []


async def session_dirs(rec: SessionRecord, host: Host, role: str) -> list[str]:
    """The directory of ``rec`` in ``role`` on ``host``: the recorded one, or else whatever the host holds
    under the name install gives it (``<spool_base>/<id>-<role>``). A coordinator killed between an install
    and recording its answer leaves such a directory that only the host knows of."""
    recorded = rec.source_dir if role == "send" else rec.target_dir
    if recorded:
        return [recorded]
    return [s["path"] for s in await list_spool(host, rec.spool_base) if s.get("id") == f"{rec.id}-{role}"]


async def _cleanup(rec: SessionRecord, src_host: Host, dst_host: Host, opts: SyncOptions, store: StateStore,
                   emit: Emitter) -> None:
    """``_remove_dirs`` of both sides, recorded: a session whose directories may remain says so."""
    rec.dirs_left = not await _remove_dirs(rec, src_host, dst_host, opts, emit) and not opts.keep
    store.save(rec)


async def _remove_dirs(rec: SessionRecord, src_host: Host, dst_host: Host, opts: SyncOptions,
                       emit: Emitter, roles: tuple[str, ...] = ("send", "receive"),
                       channel: AgentChannel | InProcessChannel | None = None) -> bool:
    """Stop the agents and remove the session directories (kept with --keep), also unrecorded ones; both
    sides unless ``roles`` says which. ``cleaned`` is said once the receiving side's is done. True when
    every side did it (a side that could not is a warning, and the record keeps ``dirs_left``).
    ``channel``, an open channel to the receiver (the finished transfer's), asks it there: one round
    trip instead of an interpreter start on the target; on any failure the ``remove`` command follows."""
    async def one_side(host: Host, role: str) -> bool:
        try:
            paths = await session_dirs(rec, host, role)
        except (E.ZchunkError, LinkDown) as e:
            emit("warning", host=host.name, detail=f"could not look for {rec.id}-{role} in {rec.spool_base}: {e}")
            return False
        done = True
        for path in paths:
            if role == "receive" and channel is not None and path == rec.target_dir:
                try:
                    await channel.request("cleanup", keep=opts.keep)
                    continue
                except (E.ZchunkError, LinkDown):
                    pass  # the command below says what is wrong, if anything still is
            args = ["remove", path] + (["keep"] if opts.keep else [])
            try:
                await agent_command(host, opts, path, *args)
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


async def abort(session_id: str, opts: SyncOptions, on_event: Any = None) -> SessionRecord:
    emit = Emitter(on_event)
    store = StateStore(opts.state_dir)
    rec = store.load(session_id)
    ssh = ssh_from_record(rec, opts.ssh)
    src_host = make_host(parse_endpoint(rec.source), ssh, opts.python)
    dst_host = make_host(parse_endpoint(rec.target), ssh, opts.python)
    try:
        await first_contact(src_host, opts.patience, opts.connect_patience)
        await first_contact(dst_host, opts.patience, opts.connect_patience)
        for host, role in ((dst_host, "receive"), (src_host, "send")):
            for path in await session_dirs(rec, host, role):  # unrecorded ones too (killed while installing)
                res = await host.run(["test", "-d", path])
                if res.status != 0:
                    emit("warning", host=host.name, detail=f"{path} is already gone")
                    continue
                await agent_command(host, opts, path, "remove", path)
                emit("removed", host=host.name, path=path)
        if rec.active:
            rec.state, rec.reason = "aborted", "aborted by the user"
        rec.dirs_left = False  # an ended session's leftovers: removed, its state and reason stay
        store.save(rec)
        return rec
    finally:
        await src_host.close()
        await dst_host.close()


def list_sessions(opts: SyncOptions) -> list[SessionRecord]:
    return StateStore(opts.state_dir).all()


def report(rep: HostReport) -> dict[str, Any]:
    return {"host": rep.name, "python": ".".join(map(str, rep.python)), "capabilities": rep.capabilities,
            "zfs": rep.features.summary(), "uid": rep.uid}


def quote(argv: list[str]) -> str:
    return shlex.join(argv)
