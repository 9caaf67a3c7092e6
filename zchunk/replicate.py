"""``zchunk sync``: replication around the chunk engine.

Per dataset (parents first with ``--recursive``): take a sync snapshot, plan
from the snapshots both sides share (by guid), apply the target policy
(refuse, or roll back / re-seed only when the user said so, naming what goes),
hold the incremental base, run each stream through the engine, move the
holds forward once the target has the new snapshot, and prune only our own
sync snapshots of this identifier. ``dry_run`` plans and changes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import agent, compat
from . import errors as E
from .aio import all_of
from .client import HostAgent, close_idle, served
from .endpoint import Endpoint, check_dataset_name, parse_endpoint
from .events import Emitter, Sink
from .fanout import DETACH_AFTER, Fanout, Slot
from .flags import KEY_PROPERTIES, StreamOptions, send_flags
from .hooks import Hooks, around_snapshot
from .link import Pacer
from .plan import (
    Policy,
    ReplicationPlan,
    Retention,
    SendPlan,
    is_own_sync_snapshot,
    plan_replication,
    prune_list,
    sync_snapshot_name,
)
from .preflight import HostReport, probe_host
from .session import StateStore, TargetLock
from .stream import StreamSpec, SyncOptions, SyncResult, abort, resume, run_stream
from .transport import Host, first_contact, make_host
from .zfs import SEED_PROPERTY, UNENCRYPTED, Dataset, Snapshot, Zfs, receive_perms, send_perms

# Properties never copied by --preserve-properties: they would clash with the
# source's mounts and shares or cannot be set on receive.
UNSAFE_PROPERTIES = frozenset({
    "mountpoint", "sharenfs", "sharesmb", "canmount", "zoned", "mlslabel", "version", "volsize",
    "encryption", "keylocation", "keyformat", "pbkdf2iters", "reservation", "refreservation",
})


@dataclass
class ReplicateOptions:
    identifier: str | None = None
    sync_snap: bool = True
    stream: bool = True
    include_snaps: list[str] = field(default_factory=list)
    exclude_snaps: list[str] = field(default_factory=list)
    rollback: bool = False
    force_delete: bool = False
    keep_sync_snaps: Retention = Retention(1)
    create_bookmark: bool = False
    recursive: bool = False
    exclude: list[str] = field(default_factory=list)
    jobs: int = 4  # with -r: datasets at a time
    preserve_properties: bool = False
    dry_run: bool = False
    stream_opts: StreamOptions = field(default_factory=StreamOptions)
    hooks: Hooks = field(default_factory=Hooks)  # commands around the sync snapshot
    keep_target_snaps: Retention | None = None  # the target's retention, when not keep_sync_snaps

    @property
    def keep_target(self) -> Retention:
        return self.keep_target_snaps or self.keep_sync_snaps


@dataclass
class DatasetOutcome:
    source: str
    target: str
    status: str  # sent | up-to-date | planned | skipped | failed
    streams: list[SyncResult] = field(default_factory=list)
    error: str = ""
    exit_code: int = 0


@dataclass
class ReplicationResult:
    outcomes: list[DatasetOutcome]

    @property
    def failed(self) -> list[DatasetOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"outcomes": [asdict(o) for o in self.outcomes]}


@dataclass
class Side:
    endpoint: Endpoint
    host: Host
    rep: HostReport
    zfs: Zfs
    holds: bool | None = None  # learned on first use

    @property
    def label(self) -> str:
        return self.host.name


#: What --identifier may be: it names snapshots (zchunk_<identifier>_...) and holds.
IDENTIFIER = re.compile(r"[A-Za-z0-9.:-]{1,40}")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def default_identifier(target: Endpoint) -> str:
    """Unique per target, so two targets of one source never prune each other's base."""
    return "t" + _short_hash(str(target))


def _regexes(patterns: list[str], what: str) -> tuple[re.Pattern[str], ...]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise E.UsageError(reason=f"{what} {p!r} is not a valid regular expression: {e}") from e
    return tuple(out)


async def replicate(source_spec: str, target_spec: str, opts: SyncOptions, ropts: ReplicateOptions,
                    on_event: Sink | None = None) -> ReplicationResult:
    emit = Emitter(on_event)
    source, target = parse_endpoint(source_spec), parse_endpoint(target_spec)
    if source == target:
        raise E.UsageError(reason="SOURCE and TARGET are the same dataset")
    identifier = ropts.identifier or default_identifier(target)
    if not IDENTIFIER.fullmatch(identifier):
        raise E.UsageError(reason=f"--identifier {identifier!r}: use 1-40 letters, digits, '.', ':' or '-'")
    policy = Policy(identifier, ropts.stream, _regexes(ropts.include_snaps, "--include-snaps"),
                    _regexes(ropts.exclude_snaps, "--exclude-snaps"), ropts.rollback, ropts.force_delete)
    excludes = _regexes(ropts.exclude, "--exclude")
    store = StateStore(opts.state_dir)
    if ropts.dry_run:
        return await _replicate(source, target, policy, excludes, ropts, opts, store, emit)
    lock = TargetLock(opts.state_dir, str(target))
    lock.acquire()
    try:
        def on_locked_event(kind: str, fields: dict[str, Any]) -> None:
            if kind == "session":
                lock.note_session(str(fields["session"]))
            if on_event is not None:
                on_event(kind, fields)

        finished = await _unfinished(source, target, opts, store, Emitter(on_locked_event))
        result = await _replicate(source, target, policy, excludes, ropts, opts, store, Emitter(on_locked_event))
        _count_finished(result.outcomes, finished)
        return result
    finally:
        lock.release()


async def _unfinished(source: Endpoint, target: Endpoint, opts: SyncOptions, store: StateStore,
                      emit: Emitter) -> list[tuple[str, SyncResult]]:
    """What an earlier run from ``source`` to ``target`` left: the directories of an ended session removed
    (a coordinator killed while cleaning up), an unfinished session finished (its agents still run)."""
    for ended in store.leftovers_under(str(source), str(target)):
        emit("leftovers", session=ended.id, state=ended.state)
        try:
            await abort(ended.id, opts, emit.sink)
        except E.ZchunkError as e:
            emit("warning", host=str(target), detail=f"could not remove what ended session {ended.id} left: {e}")
    finished: list[tuple[str, SyncResult]] = []
    for active in store.active_under(str(source), str(target)):
        emit("reattach", session=active.id)
        try:
            finished.append((parse_endpoint(active.source).dataset,
                             await resume(active.id, opts, emit.sink, lock=False)))
        except E.AgentDied as e:  # its agents are gone: plan afresh (token or common snapshot)
            emit("restart", source=active.source, reason=str(e), attempt=0,
                 how="the unfinished session's agents are gone: planning the stream again")
    return finished


def _count_finished(outcomes: list[DatasetOutcome], finished: list[tuple[str, SyncResult]]) -> None:
    """The run's bytes and snapshots include the sessions it finished."""
    for dataset, stream in finished:
        outcome = next((o for o in outcomes if o.source == dataset), None)
        if outcome is None:
            outcomes.append(DatasetOutcome(dataset, stream.target_snapshot.split("@")[0], "sent", [stream]))
        else:
            outcome.streams.insert(0, stream)
            outcome.status = "sent" if outcome.status == "up-to-date" else outcome.status


async def replicate_many(source_spec: str, target_specs: list[str], opts: SyncOptions, ropts: ReplicateOptions,
                         on_event: Sink | None = None, detach_after: float = DETACH_AFTER) -> ReplicationResult:
    """Fan-out: ``source`` to every target in one run. One sync snapshot for all; the targets whose streams
    are the same bytes share one ``zfs send`` and source spool (``zchunk.fanout``); each target keeps its own
    sessions, retries, verification and holds (``zchunk_<identifier>_<target hash>``, so one that falls
    behind keeps its base). A target that fails is its outcome (exit 15), not the others'."""
    emit = Emitter(on_event)
    source, targets = parse_endpoint(source_spec), [parse_endpoint(t) for t in target_specs]
    if len({str(t) for t in targets}) != len(targets):
        raise E.UsageError(reason="a TARGET is named twice")
    if source in targets:
        raise E.UsageError(reason="SOURCE is also one of the TARGETs")
    if ropts.recursive:
        raise E.UsageError(reason="-r with several targets is not supported yet: run one `zchunk sync -r` "
                           "per target")
    if ropts.create_bookmark:
        raise E.UsageError(reason="--create-bookmark with several targets is not supported yet: their "
                           "bookmarks would share one name")
    identifier = ropts.identifier or "f" + _short_hash("\n".join(sorted(str(t) for t in targets)))
    if not IDENTIFIER.fullmatch(identifier):
        raise E.UsageError(reason=f"--identifier {identifier!r}: use 1-40 letters, digits, '.', ':' or '-'")
    policy = Policy(identifier, ropts.stream, _regexes(ropts.include_snaps, "--include-snaps"),
                    _regexes(ropts.exclude_snaps, "--exclude-snaps"), ropts.rollback, ropts.force_delete)
    store = StateStore(opts.state_dir)
    locks = [] if ropts.dry_run else [TargetLock(opts.state_dir, str(t)) for t in sorted(targets, key=str)]
    taken: list[TargetLock] = []
    try:
        for lock in locks:
            lock.acquire()
            taken.append(lock)
        src = await _side(source, opts)
        try:
            return await _fan_out(src, targets, policy, ropts, opts, store, emit, detach_after)
        finally:
            await src.host.close()
    finally:
        for lock in taken:
            lock.release()


async def _fan_out(src: Side, targets: list[Endpoint], policy: Policy, ropts: ReplicateOptions, opts: SyncOptions,
                   store: StateStore, emit: Emitter, detach_after: float) -> ReplicationResult:
    found = await asyncio.gather(*(_side(t, opts) for t in targets), return_exceptions=True)
    try:
        outcomes: dict[str, DatasetOutcome] = {}
        for t, got in zip(targets, found):
            if isinstance(got, BaseException) and not isinstance(got, E.ZchunkError):
                raise got
            if isinstance(got, E.ZchunkError):  # unreachable, no zfs, ...: this target's outcome
                emit.bound(fanout_target=str(t))("dataset_failed", source=src.endpoint.dataset, target=t.dataset,
                                                 error=str(got), hint=got.hint)
                outcomes[str(t)] = DatasetOutcome(src.endpoint.dataset, str(t), "failed", error=str(got),
                                                  exit_code=got.exit_code)
        dsts = [d for d in found if isinstance(d, Side)]
        await _fan_out_to(src, dsts, policy, ropts, opts, store, emit, detach_after, outcomes)
        return ReplicationResult([outcomes[str(t)] for t in targets])
    finally:
        for side in found:
            if isinstance(side, Side):
                await side.host.close()


async def _fan_out_to(src: Side, dsts: list[Side], policy: Policy, ropts: ReplicateOptions, opts: SyncOptions,
                      store: StateStore, emit: Emitter, detach_after: float,
                      outcomes: dict[str, DatasetOutcome]) -> None:
    """The reachable targets: one sync snapshot, then each target's flow side by side (``Fanout`` makes the
    same streams one), then the source's retention once."""
    source, identifier = src.endpoint, policy.identifier
    for dst in dsts:
        emit.bound(fanout_target=str(dst.endpoint))("preflight", source=src.rep.summary(),
                                                     target=dst.rep.summary(), identifier=identifier)
    short = None
    if ropts.sync_snap and dsts:
        src_ds = await src.zfs.require(source.dataset)
        short = await _fresh_name(identifier, src.rep.hostname, src_ds.snapshots)
        snap = f"{source.dataset}@{short}"
        if ropts.dry_run:
            emit("would_snapshot", snapshot=snap)  # every target plans against it
        else:
            async def take() -> None:
                await src.zfs.snapshot(snap)
                emit("snapshot", snapshot=snap, targets=len(dsts))

            await around_snapshot(ropts.hooks, {"ZCHUNK_SOURCE": str(source), "ZCHUNK_TARGET": " ".join(
                str(d.endpoint) for d in dsts), "ZCHUNK_SNAPSHOT": snap}, emit, take)
    fan, pacer, unreachable = Fanout(detach_after), Pacer(), len(outcomes)
    slots = [fan.slot() for _ in dsts]

    async def one(dst: Side, slot: Slot) -> None:
        t, started = dst.endpoint, time.monotonic()
        its = emit.bound(fanout_target=str(t))
        try:
            earlier = not ropts.dry_run and bool(store.leftovers_under(str(source), str(t))
                                                 or store.active_under(str(source), str(t)))
            finished = await _unfinished(source, t, opts, store, its) if earlier else []
            tag = f"zchunk_{identifier}_{_short_hash(str(t))}"
            # the target's session directories as they are after its unfinished sessions (not preflight's)
            run = Run(short=short, opts=opts, dst_sessions=None if earlier else dst.rep.sessions, pacer=pacer,
                      fanout=slot)
            outcome = await _dataset(src, dst, source.dataset, t.dataset, dataclasses.replace(policy, hold_tag=tag),
                                     ropts, run, store, its)
            _count_finished([outcome], finished)
        except E.ZchunkError as e:
            its("dataset_failed", source=source.dataset, target=t.dataset, error=str(e), hint=e.hint)
            outcome = DatasetOutcome(source.dataset, t.dataset, "failed", error=str(e), exit_code=e.exit_code)
        finally:
            slot.leave()
        outcome.target = str(t)
        outcomes[str(t)] = outcome
        _done(its, outcome, time.monotonic() - started, len(outcomes) - unreachable, len(dsts))

    await asyncio.gather(*(one(d, slot) for d, slot in zip(dsts, slots)))
    if not ropts.dry_run and dsts:
        await _prune_fanout_source(src, source.dataset, identifier, ropts.keep_sync_snaps, emit)


async def _prune_fanout_source(src: Side, dataset: str, identifier: str, keep: Retention, emit: Emitter) -> None:
    """The source's retention of a fan-out run, once after every target: our own sync snapshots that
    ``keep`` does not keep, except any that is held (some target's base: one that fell behind keeps it)."""
    ds = await src.zfs.require(dataset)
    held = set(await src.zfs.held_snapshots(dataset))
    newest = {s.guid for s in ds.snapshots[-1:]}
    for s in prune_list(ds.snapshots, identifier, keep, newest):
        if s.name in held or s.seed:
            continue
        await src.zfs.destroy(s.name)
        emit("pruned", host=src.label, snapshot=s.name)


@dataclass
class Later:
    """What a tree run does for all its datasets at once at its end, a few commands per side instead of
    several per dataset: the hold of each dataset's new base on both sides, and then (an incremental run)
    the release of the old ones; the retention's prunes; and on a zfs without ``receive -u`` a new replica's
    ``canmount=noauto`` (it is unmounted at once, before its children arrive). A run stopped before the end
    leaves them to the next run, which holds the common snapshot before its stream, lets the other holds of
    ours go and prunes what its retention does not keep."""

    src_holds: list[str] = field(default_factory=list)
    dst_holds: list[str] = field(default_factory=list)
    noauto: list[str] = field(default_factory=list)
    moved: list[tuple[str, str]] = field(default_factory=list)  # (source, target) new bases, old ones let go
    src_prunes: list[tuple[Snapshot, Emitter]] = field(default_factory=list)  # each with its dataset's emitter
    dst_prunes: list[TargetPrunes] = field(default_factory=list)


@dataclass(frozen=True)
class TargetPrunes:
    """A replica's prunes, for the run's end: ``forecast`` as planned, or (``listed``) what its retention
    says of the snapshots the target really holds then, keeping ``keep`` (the new base's guid)."""

    dataset: str
    forecast: tuple[Snapshot, ...]
    listed: bool
    keep: frozenset[int]
    identifier: str
    retention: Retention
    emit: Emitter

    def prunes(self, tree: dict[str, Dataset]) -> list[Snapshot]:
        there = tree.get(self.dataset)
        if not self.listed or there is None:
            return list(self.forecast)
        return prune_list(there.snapshots, self.identifier, self.retention, set(self.keep))


@dataclass
class Run:
    """What the datasets of one run share: the tree's sync snapshot (its short name, taken at one moment for
    them all, or None: each takes its own), each side's listing read once for the whole tree (a dataset's
    first attempt plans from it), the bandwidth budget, the spool share and what happened so far."""

    short: str | None = None
    src_tree: dict[str, Dataset] = field(default_factory=dict)
    dst_tree: dict[str, Dataset] | None = None  # None: not read (each dataset reads its own)
    pacer: Pacer | None = None
    opts: SyncOptions | None = None  # the per-stream options (a share of the spool cap)
    jobs: int = 1  # datasets at a time
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (source, target) of every dataset, parents first
    enc_roots: dict[str, str] = field(default_factory=dict)  # source dataset -> its encryption root (-R seeds)
    dst_sessions: list[dict[str, Any]] | None = None  # the target's session directories, as probed at preflight
    streamed: set[str] = field(default_factory=set)  # source datasets whose first stream started
    received: set[str] = field(default_factory=set)  # target datasets that exist: listed, or received in this run
    seeded: dict[str, DatasetOutcome] = field(default_factory=dict)  # members of an encrypted tree's -R seed
    fanout: Slot | None = None  # one target of several: its streams may share the others' zfs send
    later: Later | None = None  # a tree run's work for all datasets at its end (None: each does its own)
    stream_props: dict[str, dict[str, str]] = field(default_factory=dict)  # compat.tree_props of the source

    def listed(self, src_name: str, dst_name: str) -> tuple[Dataset, Dataset | None] | None:
        """A dataset's first look at both sides, from the run's listings (None: read it)."""
        if self.dst_tree is None or src_name not in self.src_tree:
            return None
        return self.src_tree[src_name], self.dst_tree.get(dst_name)


async def _replicate(source: Endpoint, target: Endpoint, policy: Policy, excludes: tuple[re.Pattern[str], ...],
                     ropts: ReplicateOptions, opts: SyncOptions, store: StateStore,
                     emit: Emitter) -> ReplicationResult:
    identifier = policy.identifier
    got = await asyncio.gather(_side(source, opts), _side(target, opts), return_exceptions=True)
    src_or_err, dst_or_err = got
    if not isinstance(src_or_err, Side) or not isinstance(dst_or_err, Side):
        for side in got:
            if isinstance(side, Side):
                await side.host.close()
        raise src_or_err if isinstance(src_or_err, BaseException) else dst_or_err  # type: ignore[misc]
    src, dst = src_or_err, dst_or_err
    try:
        try:
            emit("preflight", source=src.rep.summary(), target=dst.rep.summary(), identifier=identifier)
            if not ropts.recursive:
                run = Run(opts=opts, dst_sessions=dst.rep.sessions)
                return ReplicationResult([await _dataset(src, dst, source.dataset, target.dataset, policy, ropts,
                                                         run, store, emit)])
            root_ds, pairs, left_out = await _datasets(src, dst, excludes, emit)
            run = await _tree_run(src, dst, root_ds, pairs, left_out, policy, ropts, opts, emit)
            return ReplicationResult(await _in_parallel(src, dst, pairs, policy, ropts, run, store, emit))
        finally:
            for side in (src, dst):
                started, attached = served(side.host)
                if started or attached:
                    emit("channels", host=side.host.name, started=started, attached=attached)
            await dst.host.close()
    finally:
        await src.host.close()


async def _tree_run(src: Side, dst: Side, root_ds: Dataset, pairs: list[tuple[str, str]], left_out: list[str],
                    policy: Policy, ropts: ReplicateOptions, opts: SyncOptions, emit: Emitter) -> Run:
    """-r: the tree's sync snapshot, at one moment for every dataset; both sides' listings; the run's shares
    of the spool cap and of the bandwidth limit."""
    root, jobs = src.endpoint.dataset, max(1, ropts.jobs)
    if opts.spool_max // jobs < opts.chunk_size:
        fits = max(1, opts.spool_max // opts.chunk_size)
        emit("note", host=src.label, detail=f"--spool-max {opts.spool_max >> 20} MiB holds {fits} chunk(s) "
             f"of --chunk-size: {fits} dataset(s) at a time instead of --jobs {jobs}")
        jobs = fits
    enc_roots, dst_tree = await _both(_encryption_roots(src, pairs, ropts), dst.zfs.tree(dst.endpoint.dataset))
    top = dst_tree.get(dst.endpoint.dataset)
    if top is not None and top.locked:  # before the tree's snapshot: a refused run leaves the source as it was
        raise E.TargetLocked(target=_label(dst, top.name), lock=top.locked)
    run = Run(opts=dataclasses.replace(opts, spool_max=opts.spool_max // jobs), pacer=Pacer(), jobs=jobs,
              pairs=pairs, enc_roots=enc_roots, dst_sessions=dst.rep.sessions, dst_tree=dst_tree,
              received=set(dst_tree), later=Later())
    if ropts.sync_snap and pairs:
        run.short = await _fresh_name(policy.identifier, src.rep.hostname, root_ds.snapshots)
        members = [s for s, _ in pairs]
        if ropts.dry_run:
            emit("would_snapshot", snapshot=f"{root}@{run.short}")
        else:
            async def take() -> None:
                await src.zfs.snapshot_all(root, run.short or "", members, left_out, many=src.rep.features.openzfs)
                emit("snapshot", snapshot=f"{root}@{run.short}", datasets=len(members))

            await around_snapshot(ropts.hooks, _hook_env(src, dst, f"{root}@{run.short}"), emit, take)
    if dst.rep.features.openzfs:  # receives any stream: compat asks nothing
        run.src_tree = await src.zfs.tree(root)
    else:
        run.src_tree, run.stream_props = await all_of(src.zfs.tree(root), compat.tree_props(src.zfs, root))
    gone = sorted(set(dst_tree) - {t for _, t in pairs} - {dst.endpoint.dataset + s[len(root):]
                                                               for s in left_out})
    if gone:
        emit("note", host=dst.label, detail=f"{len(gone)} dataset(s) on the target are no longer on the source "
             f"and are left as they are: {', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''}")
    return run


async def _in_parallel(src: Side, dst: Side, pairs: list[tuple[str, str]], policy: Policy,
                       ropts: ReplicateOptions, run: Run, store: StateStore,
                       emit: Emitter) -> list[DatasetOutcome]:
    """Every dataset of the tree, up to --jobs at once, each after its parent (which it needs on the target);
    one failing does not stop the others. Outcomes in the order of ``pairs``."""
    gate = asyncio.Semaphore(run.jobs)
    finished = {s: asyncio.Event() for s, _ in pairs}
    targets = dict(pairs)
    outcomes: dict[str, DatasetOutcome] = {}

    async def one(src_name: str, dst_name: str) -> None:
        try:
            parent = src_name.rsplit("/", 1)[0]
            if parent in finished and parent != src_name and targets[parent] not in (run.dst_tree or {}):
                await finished[parent].wait()  # its replica must exist first (a full stream makes it)
            started = time.monotonic()
            its = emit.bound(dataset=src_name)
            if src_name in run.seeded:  # came with its encrypted tree's -R stream
                outcome = run.seeded.pop(src_name)
            else:
                async with gate:
                    started = time.monotonic()
                    outcome = await _dataset(src, dst, src_name, dst_name, policy, ropts, run, store, its)
            outcomes[src_name] = outcome
            _done(its, outcome, time.monotonic() - started, len(outcomes), len(pairs))
        finally:
            finished[src_name].set()

    tasks = [asyncio.ensure_future(one(s, t)) for s, t in pairs]
    try:
        await asyncio.gather(*tasks)
    except BaseException:  # not a dataset's failure (those are outcomes): ^C, a bug. The others stop too.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    await all_of(close_idle(src.host), close_idle(dst.host))  # no stream is left to take them
    if run.later is not None:
        await _at_the_end(src, dst, run.later, policy.tag, run.jobs, emit)
    return [outcomes[s] for s, _ in pairs]


async def _at_the_end(src: Side, dst: Side, later: Later, tag: str, jobs: int, emit: Emitter) -> None:
    """The run's ``Later``: every replica is there, so a refusal here fails no dataset; it is said instead
    (the next run holds its base before its stream, and a replica left mountable may need --rollback). On
    each side: the new bases held, in one command; only then the old ones let go, in one command, and the
    prunes destroyed. A side whose holds were refused lets nothing go and prunes nothing."""
    async def said(side: Side, step: Awaitable[None]) -> None:
        try:
            await step
        except E.ZchunkError as e:
            emit("note", host=side.label, detail=f"at the end of the run: {e}")

    async def noauto() -> None:
        await dst.zfs.set(later.noauto[0], "canmount", "noauto", *later.noauto[1:])
        emit("note", host=dst.label, detail=f"this zfs has no `receive -u`: {len(later.noauto)} new "
             "replica(s) unmounted and set canmount=noauto, so they stay unchanged between syncs")

    async def target_prunes() -> list[tuple[Snapshot, Emitter]]:
        listed = any(p.listed for p in later.dst_prunes)  # what the target really holds now decides
        tree = await dst.zfs.tree(dst.endpoint.dataset) if listed else {}
        return [(s, p.emit) for p in later.dst_prunes for s in p.prunes(tree)]

    async def source_prunes() -> list[tuple[Snapshot, Emitter]]:
        return later.src_prunes

    async def settle(side: Side, holds: list[str], moved: list[str],
                     prunes: Callable[[], Awaitable[list[tuple[Snapshot, Emitter]]]]) -> None:
        if holds:
            await _hold(side, tag, *holds, emit=emit)
        gone = await prunes()
        if side.holds and (moved or gone):  # ours let go: the old bases (any left by a killed run too), the prunes
            keep, moved_from = set(holds), {m.split("@", 1)[0] for m in moved}
            names = {s.name for s, _ in gone}
            await side.zfs.release(tag, *(h for h in await side.zfs.held_snapshots(side.endpoint.dataset, tree=True)
                                          if h not in keep and (h in names or h.split("@", 1)[0] in moved_from)))
        gate = asyncio.Semaphore(jobs)

        async def destroy(snap: Snapshot, its: Emitter) -> None:
            async with gate:
                try:
                    await side.zfs.destroy(snap.name)
                except E.ZchunkError as e:
                    its("note", host=side.label, detail=f"at the end of the run, {snap.name} was not pruned: {e}")
                    return
            its("pruned", host=side.label, snapshot=snap.name)

        await all_of(*(destroy(s, its) for s, its in gone))

    steps = [said(src, settle(src, later.src_holds, [s for s, _ in later.moved], source_prunes)),
             said(dst, settle(dst, later.dst_holds, [d for _, d in later.moved], target_prunes))]
    if later.noauto:  # at once: canmount mounts nothing (the replicas are unmounted), holds change no mount
        steps.append(said(dst, noauto()))
    await all_of(*steps)


def _done(emit: Emitter, outcome: DatasetOutcome, seconds: float, done: int, total: int) -> None:
    emit("dataset_done", source=outcome.source, target=outcome.target, status=outcome.status,
         raw_bytes=sum(r.transfer.raw_bytes for r in outcome.streams if r.transfer is not None),
         seconds=round(seconds, 2), done=done, total=total)


async def _dataset(src: Side, dst: Side, src_name: str, dst_name: str, policy: Policy, ropts: ReplicateOptions,
                   run: Run, store: StateStore, emit: Emitter) -> DatasetOutcome:
    """One dataset of the run (with -r, a failure is its outcome, not the run's); with the encrypted-tree
    seed where that applies. A dataset refused before its first stream started gives back the tree's sync
    snapshot taken for it: a refused run leaves the source as it was."""
    opts = run.opts or SyncOptions()
    try:
        tree = await _encrypted_tree(src, dst, src_name, dst_name, run, policy, ropts, emit)
        if tree is not None:
            run.seeded.update(await _seed_tree(src, dst, tree, run, policy, ropts, opts, store, emit))
            return run.seeded.pop(src_name)
        return await _one(src, dst, src_name, dst_name, policy, ropts, opts, run, store, emit)
    except E.ZchunkError as e:
        if not ropts.recursive:
            raise
        emit("dataset_failed", source=src_name, target=dst_name, error=str(e), hint=e.hint)
        if run.short and not ropts.dry_run and src_name not in run.streamed:
            try:
                await src.zfs.destroy(f"{src_name}@{run.short}", busy_retry=5.0)
            except E.ZchunkError:
                pass  # it stays, pruned as ours by a later run
        return DatasetOutcome(src_name, dst_name, "failed", error=str(e), exit_code=e.exit_code)


async def _side(ep: Endpoint, opts: SyncOptions) -> Side:
    host = make_host(ep, opts.ssh, opts.python)
    try:
        await first_contact(host, opts.patience, opts.connect_patience)
        rep = await probe_host(host, opts.spool_dir, choose_python=opts.python is None)
    except BaseException:
        await host.close()
        raise
    zfs = Zfs(host)
    zfs.user, zfs.written = rep.user, rep.features.openzfs
    return Side(ep, host, rep, zfs)


async def _datasets(src: Side, dst: Side, excludes: tuple[re.Pattern[str], ...],
                    emit: Emitter) -> tuple[Dataset, list[tuple[str, str]], list[str]]:
    """-r: the root, the (source, target) pairs of the tree, parents first, and the datasets of the tree left
    out. A missing root is said as such (its listing's failure comes second)."""
    root, troot = src.endpoint.dataset, dst.endpoint.dataset
    root_ds, listed = await all_of(src.zfs.require(root), src.zfs.children(root))
    pairs = []
    skipped: list[str] = []  # a skipped dataset's children go too (as zfs send -X): their parent is missing
    for name, _type, prop in listed:
        rel = name[len(root):]
        under = next((s for s in skipped if name.startswith(s + "/")), None)
        reason = (f"its parent {under} is skipped" if under is not None
                  else "matches --exclude" if any(p.search(name) for p in excludes)
                  else "zchunk:sync=false" if prop.strip().lower() == "false" else None)
        if reason is not None:
            emit("dataset_skipped", source=name, reason=reason)
            skipped.append(name)
            continue
        pairs.append((name, check_dataset_name(troot + rel)))
    return root_ds, pairs, skipped


MAX_RESTARTS = 3


async def _one(src: Side, dst: Side, src_name: str, dst_name: str, policy: Policy, ropts: ReplicateOptions,
               opts: SyncOptions, run: Run, store: StateStore, emit: Emitter) -> DatasetOutcome:
    """One dataset; when an agent dies (killed, host rebooted) the stream starts again, said in one line."""
    for attempt in range(1, MAX_RESTARTS + 2):
        try:
            first = attempt == 1  # later: what the host has now, not what the run read at its start
            return await _one_attempt(src, dst, src_name, dst_name, policy, ropts, opts, run, first, store, emit)
        except E.AgentDied as e:
            if run.fanout is not None:
                run.fanout.leave()  # its streams go on alone: the other targets do not wait for its restarts
            if attempt > MAX_RESTARTS:
                raise
            _restarting(src_name, dst, e, attempt, emit)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Tree:
    """A dataset and its descendants of this run, seeded together by one raw ``zfs send -R`` stream."""

    root: str
    target: str
    members: tuple[tuple[str, str], ...]  # (source, target), the root first
    excluded: tuple[str, ...]  # descendants on the source this run skips (send -R -X)


async def _encryption_roots(src: Side, pairs: list[tuple[str, str]], ropts: ReplicateOptions) -> dict[str, str]:
    """Each source dataset's encryption root ("-": not encrypted), one command for the whole tree of a
    recursive raw run where both hosts have encryption; empty otherwise (nothing to seed as a tree)."""
    if not (ropts.recursive and ropts.stream_opts.raw and src.rep.features.encryption
            and "R" in src.rep.features.send_flags and len(pairs) > 1):
        return {}
    root = pairs[0][0]
    res = await src.zfs.run("get", "-H", "-r", "-t", "filesystem,volume", "-o", "name,value", "encryptionroot",
                            root, dataset=root)
    return dict(line.split("\t", 1) for line in res.stdout.decode().splitlines() if "\t" in line)


async def _encrypted_tree(src: Side, dst: Side, src_name: str, dst_name: str, run: Run, policy: Policy,
                          ropts: ReplicateOptions, emit: Emitter) -> Tree | None:
    """With -r, an encrypted dataset whose target does not exist yet and below which a dataset inherits its
    key is seeded with its subtree as one raw ``zfs send -R``: only such a stream keeps the encryption roots
    on the target (each raw stream of its own makes its dataset an encryption root there: openzfs #15687,
    zrepl #950). Later runs send each dataset incrementally, raw, which keeps them. None: send it alone."""
    roots, pairs = run.enc_roots, run.pairs
    if not roots or not dst.rep.features.encryption or roots.get(src_name, "-") == "-":
        return None
    members = tuple(p for p in pairs if p[0] == src_name or p[0].startswith(src_name + "/"))
    if not any(roots.get(m, "-") not in ("-", m) for m, _ in members[1:]):
        return None  # no descendant inherits a key: separate streams lose nothing
    if dst_name in (run.dst_tree or {}) or await dst.zfs.dataset(dst_name) is not None:
        return None  # seeded before: each dataset goes incrementally, raw, which keeps the roots
    why = ("--include-snaps/--exclude-snaps" if policy.filtered else "--no-sync-snap" if not ropts.sync_snap
           else None)
    excluded = tuple(n for n in roots if n.startswith(src_name + "/") and n not in dict(members))
    if why is None and excluded and "X" not in src.rep.features.send_flags:
        why = "--exclude (this zfs has no send -R -X)"
    if why is not None:
        emit("note", host=src.label, detail=f"{src_name}: with {why} its encrypted descendants are sent one by "
             "one, and each becomes its own encryption root on the target (same key)")
        return None
    return Tree(src_name, dst_name, members, excluded)


async def _seed_tree(src: Side, dst: Side, tree: Tree, run: Run, policy: Policy, ropts: ReplicateOptions,
                     opts: SyncOptions, store: StateStore, emit: Emitter) -> dict[str, DatasetOutcome]:
    """The run's sync snapshot of the whole subtree (atomic), one raw ``send -R`` of it (``-X`` the excluded),
    received unmounted without the properties a replica must not have; then the same holds, checks and
    key location as a dataset sent alone. Outcomes by source dataset."""
    root, target = tree.root, tree.target
    await all_of(_check_target_parent(dst, target, None, ropts),
                 _check_delegation(src, dst, root, target, None, ropts))
    if not ropts.dry_run:
        await _other_sessions(dst, target, opts, store, emit, run.dst_sessions)
    assert run.short is not None, "a tree is seeded only with the run's sync snapshot"
    short = run.short
    flags = send_flags(_label(src, root), _label(dst, target), src.rep.features, dst.rep.features,
                       await src.zfs.encryption(root), ropts.stream_opts)
    local = await src.zfs.run("get", "-H", "-r", "-s", "local", "-o", "property", "all", root, dataset=root)
    props = set(local.stdout.decode().split()) - KEY_PROPERTIES - {"keylocation"}
    sets = ropts.stream_opts.receive.set
    keep = set() if not ropts.preserve_properties else props - UNSAFE_PROPERTIES
    excluded_props = tuple(sorted((props - keep) | set(ropts.stream_opts.receive.excluded)))
    step = f"full raw -R stream of {root}@{short} and {len(tree.members) - 1} descendants -> {target} " \
           "(one stream keeps their encryption roots)"
    emit("dataset_plan", source=root, target=target, up_to_date=False, steps=[step], rollback=None, destroys=[],
         destroy_target=False, hold=policy.tag, prune_source=[], prune_target=[],
         properties=list(sets) + [(p, "(kept)") for p in sorted(keep)], dry_run=ropts.dry_run,
         send_flags=[*flags, "-R"] + (["-X", ",".join(tree.excluded)] if tree.excluded else []),
         encryption="raw: the replica keeps the source's keys and encryption roots, never decrypted on the target")
    if ropts.dry_run:
        return {s: DatasetOutcome(s, t, "planned") for s, t in tree.members}
    snap = next((s for s in (await src.zfs.require(root)).snapshots if s.short == short), None)
    if snap is None:
        raise E.NoSnapshot(host=src.label, dataset=f"{root}@{short}")
    spec = StreamSpec(SendPlan(root, target, snap, None), _recv_flags(dst), sets, send_flags=(*flags, "-R"),
                      recv_excluded=excluded_props, send_excluded=tree.excluded)
    run.streamed.add(root)
    if tree.excluded:  # zfs send -R wants the snapshot on the datasets -X leaves out too: only for the send
        await src.zfs.run("snapshot", *(f"{n}@{short}" for n in tree.excluded), dataset=root, action="snapshot")
    try:
        result = await run_stream(src.host, dst.host, src.rep, dst.rep, _label(src, root), _label(dst, target),
                                  spec, opts, store, emit, pacer=run.pacer)
    finally:
        for name in tree.excluded:  # not theirs to keep
            await src.zfs.destroy(f"{name}@{short}")
    await _check_tree(src, dst, tree, short)
    tag = policy.tag
    await _both(_hold(src, tag, *(f"{s}@{short}" for s, _ in tree.members), emit=emit),
                _hold(dst, tag, *(f"{t}@{short}" for _, t in tree.members), emit=emit))
    await _prompt_for_keys(dst, target)
    return {s: DatasetOutcome(s, t, "sent", [result] if s == root else []) for s, t in tree.members}


async def _check_tree(src: Side, dst: Side, tree: Tree, short: str) -> None:
    """Every member's snapshot arrived with its guid (the stream's own check covered the root's)."""
    async def guids(side: Side, names: list[str]) -> list[int | None]:
        return [await side.zfs.guid(n) for n in names]

    want, got = await _both(guids(src, [f"{s}@{short}" for s, _ in tree.members]),
                            guids(dst, [f"{t}@{short}" for _, t in tree.members]))
    for (s, t), a, b in zip(tree.members, want, got):
        if a is None or a != b:
            raise E.IntegrityError(reason=f"{t}@{short} did not arrive with the guid of {s}@{short} "
                                   f"({b} != {a}) after the -R stream")


async def _prompt_for_keys(dst: Side, target: str) -> None:
    """The -R stream brings the source's keylocation (a file path there, say): the replica's encryption roots
    ask for their key instead, as a raw stream of a single dataset leaves them (key properties are never
    copied)."""
    res = await dst.zfs.run("get", "-H", "-r", "-t", "filesystem,volume", "-o", "name,value,source", "keylocation",
                            target, dataset=target)
    for line in res.stdout.decode().splitlines():
        name, value, source = (line.split("\t") + ["", "", ""])[:3]
        if source == "local" and value not in ("prompt", "none"):
            await dst.zfs.set(name, "keylocation", "prompt")


def _restarting(src_name: str, dst: Side, err: E.ZchunkError, attempt: int, emit: Emitter) -> None:
    how = ("resuming from the target's zfs resume token" if dst.rep.features.resume_tokens
           else "restarting the stream from the common snapshot (this zfs has no resume tokens; "
                "the partial receive was discarded)")
    emit("restart", source=src_name, reason=str(err), how=how, attempt=attempt)


async def _one_attempt(src: Side, dst: Side, src_name: str, dst_name: str, policy: Policy,
                       ropts: ReplicateOptions, opts: SyncOptions, run: Run,
                       first: bool, store: StateStore, emit: Emitter) -> DatasetOutcome:
    listed = run.listed(src_name, dst_name) if first else None
    src_ds, dst_ds = listed or await _both(src.zfs.require(src_name), dst.zfs.dataset(dst_name))
    if dst_ds is not None and dst_ds.locked:
        raise E.TargetLocked(target=_label(dst, dst_name), lock=dst_ds.locked)
    seeding = dst_ds is not None and not dst_ds.snapshots and \
        await dst.zfs.prop(dst_name, SEEDING_PROPERTY) == policy.identifier
    if seeding:  # made by an earlier run of ours for a full stream that never arrived: receive into it again
        dst_ds = None
    # Read-only checks, all at once; the first failing in this order is the one reported. Before the sync
    # snapshot and any agent: what the target's zfs cannot receive is refused, naming the feature.
    await all_of(
        _check_target_parent(dst, dst_name, dst_ds, ropts, run.received),
        _check_delegation(src, dst, src_name, dst_name, dst_ds, ropts),
        compat.check_stream(src.zfs, src.rep.features, src_name, dst.zfs, dst.rep.features, dst_name,
                            run.stream_props.get(src_name) if first else None))
    if not ropts.dry_run:
        # before anything is planned or taken: a target another session is receiving looks like one without
        # a common snapshot, and a refused run must leave no sync snapshot behind
        if await _other_sessions(dst, dst_name, opts, store, emit, run.dst_sessions if first else None):
            dst_ds = await dst.zfs.dataset(dst_name)  # what the target holds with the leftovers gone
    results: list[SyncResult] = []
    if dst_ds is not None and dst.rep.features.resume_tokens and not ropts.dry_run:
        resumed = await _resume_partial(src, dst, src_ds, dst_ds, opts, run, store, emit)
        if resumed is not None:
            results.append(resumed)
            dst_ds = await dst.zfs.dataset(dst_name)
    # -r: the tree's sync snapshot, taken for every dataset at once (with --dry-run: to be taken)
    taken = run.short is not None and not ropts.dry_run
    short = run.short or await _fresh_name(policy.identifier, src.rep.hostname, src_ds.snapshots)
    snap_name = f"{src_name}@{short}"
    # Plan against the sync snapshot-to-be first: a refusal must leave the source untouched too.
    planned_ds = _with_planned_snapshot(src_ds, snap_name) if ropts.sync_snap and not taken else src_ds
    changed = await _target_changed(dst, dst_ds, ropts.dry_run)
    plan = await _plan(src, dst, planned_ds, dst_ds, dst_name, policy, changed)
    flags, encryption = await _stream_flags(src, dst, src_name, dst_name, dst_ds, plan, ropts.stream_opts)
    if not ropts.stream_opts.raw and not src.rep.features.encryption:
        emit("note", host=src.label, detail=f"{src.rep.features.implementation} has no encryption: "
             "--no-raw changes nothing")
    if ropts.sync_snap and ropts.dry_run:
        if run.short is None:
            emit("would_snapshot", snapshot=snap_name)
        src_ds = planned_ds
    elif ropts.sync_snap and not taken:
        async def take() -> None:
            await src.zfs.snapshot(snap_name)
            emit("snapshot", snapshot=snap_name)

        await around_snapshot(ropts.hooks, _hook_env(src, dst, snap_name), emit, take)
        src_ds = await src.zfs.require(src_name)
        plan = await _plan(src, dst, src_ds, dst_ds, dst_name, policy, changed)
    else:
        src_ds = planned_ds
    src_prunes, dst_prunes = _prunes(src_ds, dst_ds, plan, policy.identifier, ropts.keep_sync_snaps,
                                     ropts.keep_target)
    if run.fanout is not None:
        src_prunes = []  # the source's retention runs once, after every target (``_prune_fanout_source``)
    props = ropts.stream_opts.receive.merge(await _props(src, dst, src_name, ropts, emit))
    lost = None
    if plan.rollback_to is not None:  # what the rollback discards: OpenZFS's written@; zfs-fuse cannot say
        written = await dst.zfs.prop(dst_name, f"written@{plan.rollback_to.short}")
        lost = int(written) if written is not None and written.isdigit() else None
    emit("dataset_plan", source=src_name, target=dst_name, up_to_date=plan.up_to_date, send_flags=list(flags),
         encryption=encryption,
         steps=[s.describe() for s in plan.steps],
         rollback=plan.rollback_to.name if plan.rollback_to else None, destroys=list(plan.destroys),
         rollback_discards=lost,
         destroy_target=plan.destroy_target, hold=policy.tag,
         prune_source=[s.name for s in src_prunes], prune_target=[s.name for s in dst_prunes],
         properties=props, dry_run=ropts.dry_run)
    if ropts.dry_run:
        return DatasetOutcome(src_name, dst_name, "planned")
    tag = policy.tag
    await _prepare_target(dst, dst_name, plan, tag, emit)
    excluded = ropts.stream_opts.receive.excluded if "x" in dst.rep.features.recv_flags else ()
    full = bool(plan.steps) and plan.steps[0].base is None
    precreated = full and (seeding or bool(props) and not dst.rep.features.receive_props)
    if precreated:
        await _precreate(dst, dst_name, props if not dst.rep.features.receive_props else (), policy.identifier,
                         exists=seeding, emit=emit)
    if plan.common is not None and plan.target_common is not None:
        await _both(_hold(src, tag, plan.common.name, emit=emit), _hold(dst, tag, plan.target_common.name, emit=emit))
    for step in plan.steps:
        force = ("-F",) if precreated and step.base is None else ()  # a full stream into the dataset made for it
        spec = StreamSpec(step, _recv_flags(dst) + force, props if dst.rep.features.receive_props else (),
                          send_flags=flags, recv_excluded=excluded)
        run.streamed.add(src_name)
        results.append(await run_stream(src.host, dst.host, src.rep, dst.rep, _label(src, src_name),
                                        _label(dst, dst_name), spec, opts, store, emit, pacer=run.pacer,
                                        fanout=run.fanout))
        if props and not dst.rep.features.receive_props:  # every stream: a changed value too
            await _set_props(dst, dst_name, props)
        if force:
            await dst.zfs.run("inherit", SEEDING_PROPERTY, dst_name, dataset=dst_name, action="set properties on")
        if not dst.rep.features.receive_unmounted:
            await _keep_unmounted(dst, dst_name, step.base is None, run.later, emit)
    if plan.steps:
        run.received.add(dst_name)
    newest = plan.newest
    if newest is not None:
        await _move_holds(src, dst, tag, plan, newest, dst_name, run.later)
        await _release_seed(src, src_ds, dst_ds)
        if ropts.create_bookmark:
            await _bookmark(src, newest, policy.identifier, emit)

    # Sync snapshots of ours on the target can only be ones it had or ones the source sent.
    ours = any(is_own_sync_snapshot(s.short, policy.identifier)
               for s in src_ds.snapshots + (dst_ds.snapshots if dst_ds is not None else ()))

    only = dst_ds is None and len(plan.steps) == 1  # a new replica: one snapshot, the newest, kept
    target_prunes = TargetPrunes(dst_name, tuple(dst_prunes), bool(plan.steps) and ours and not only,
                                 frozenset({newest.guid} if newest is not None else ()), policy.identifier,
                                 ropts.keep_target, emit)
    if run.later is not None:  # a tree run: at its end, with every dataset's
        run.later.src_prunes += [(s, emit) for s in src_prunes]
        run.later.dst_prunes.append(target_prunes)
    else:
        async def prune_target() -> None:
            # what the target really holds now decides, not the forecast
            tree = {dst_name: await dst.zfs.require(dst_name)} if target_prunes.listed else {}
            await _prune(dst, target_prunes.prunes(tree), tag, emit)

        await _both(_prune(src, src_prunes, tag, emit), prune_target())  # the new base is held on both by now
    if plan.up_to_date:
        emit("up_to_date", detail=f"{_label(dst, dst_name)} already has "
             f"{newest.short if newest else 'everything'}: nothing to send")
    return DatasetOutcome(src_name, dst_name, "up-to-date" if plan.up_to_date and not results else "sent", results)


def _hook_env(src: Side, dst: Side, snapshot: str) -> dict[str, str]:
    return {"ZCHUNK_SOURCE": str(src.endpoint), "ZCHUNK_TARGET": str(dst.endpoint), "ZCHUNK_SNAPSHOT": snapshot}


def _label(side: Side, dataset: str) -> str:
    return str(Endpoint(dataset, side.endpoint.host, side.endpoint.user))


#: How long a session directory of another coordinator may stay "starting" (installed, its daemon not yet
#: started) before the run decides: the agent calls it dead after a minute without contact.
SETTLE_TIMEOUT = agent.NEVER_STARTED_AFTER + 15.0


async def _other_sessions(dst: Side, dst_name: str, opts: SyncOptions, store: StateStore, emit: Emitter,
                          known: list[dict[str, Any]] | None = None) -> bool:
    """Another live session receiving into this dataset refuses the run, naming its daemon's pid; a dead
    one's leftovers are cleaned. Runs before anything is planned or changed, so a refusal leaves nothing.

    Dead means: the host says so (daemon gone, never started, finished, failed), or the session is one of
    this state directory's that is no longer active (its coordinator, this one earlier, gave up on it, e.g.
    it was killed while installing the agents). A daemon that is dead never blocks a run. Another
    coordinator's directory that is still "starting" is waited for until it runs (refused) or is dead.
    True if something was cleaned."""
    cleaned = False
    deadline = time.monotonic() + SETTLE_TIMEOUT
    said_waiting = False
    while True:
        starting = None
        # The first look is ``known``: the probe's listing, taken at preflight for every dataset of the run
        # (a round trip per dataset saved); a later one (waiting, or a dataset's stream started again after
        # an agent died) asks the host.
        listing, known = known, None
        for s in listing if listing is not None else await HostAgent(dst.host).sessions(opts.spool_dir):
            if s.get("role") != "receive" or s.get("dataset") != dst_name:
                continue
            sid, state, pid = str(s.get("session") or s["id"]), s.get("state"), s.get("pid")
            live = state in ("running", "starting")
            if live and not _given_up(store, sid):
                if pid:
                    raise E.AlreadyRunning(target=_label(dst, dst_name), session=sid, pid=pid, host=dst.label)
                starting = sid
                continue
            await HostAgent(dst.host).remove(s["path"])
            emit("stale_cleaned", host=dst.label, path=s["path"], state=state if not live else "abandoned")
            cleaned = True
        if starting is None:
            return cleaned
        if time.monotonic() > deadline:  # still installed, never started and kept alive: someone is there
            raise E.AlreadyRunning(target=_label(dst, dst_name), session=starting, pid="not started yet",
                                   host=dst.label)
        if not said_waiting:
            emit("note", host=dst.label, detail=f"session {starting} is starting on {_label(dst, dst_name)}: "
                 "waiting until it runs or is found dead")
            said_waiting = True
        await asyncio.sleep(1.0)


def _given_up(store: StateStore, sid: str) -> bool:
    """A session of this state directory that is no longer active: whatever of it is left is dead."""
    try:
        return not store.load(sid).active
    except E.SessionNotFound:
        return False


async def _check_target_parent(dst: Side, dst_name: str, dst_ds: Dataset | None, ropts: ReplicateOptions,
                               known: set[str] | None = None) -> None:
    """The parent a new replica is received under exists (``known``: target datasets the run knows exist,
    a tree's parents, asked nothing)."""
    if dst_ds is None and "/" in dst_name:
        parent = dst_name.rsplit("/", 1)[0]
        if parent in (known or ()):
            return
        if await dst.zfs.dataset(parent) is None and not (ropts.recursive and ropts.dry_run):
            raise E.UnknownDataset(host=dst.label, dataset=parent, dataset_parent=parent.split("/")[0])


async def _check_delegation(src: Side, dst: Side, src_name: str, dst_name: str, dst_ds: Dataset | None,
                            ropts: ReplicateOptions) -> None:
    """A non-root user on either side: everything this run will do is delegated, before anything is done."""
    if src.rep.uid != 0:
        perms = send_perms(ropts.sync_snap, src.rep.features.holds, ropts.create_bookmark)
        await src.zfs.check_delegation(src_name, src.rep.user, src.rep.groups, perms, "send")
    if dst.rep.uid != 0:
        anchor = dst_name if dst_ds is not None else dst_name.rsplit("/", 1)[0]
        perms = receive_perms(ropts.sync_snap, dst.rep.features.holds, ropts.rollback)
        await dst.zfs.check_delegation(anchor, dst.rep.user, dst.rep.groups, perms, "receive into")


def _with_planned_snapshot(ds: Dataset, name: str) -> Dataset:
    planned = Snapshot(name, guid=0, createtxg=(ds.newest.createtxg + 1 if ds.newest else 1))
    return Dataset(ds.name, ds.type, ds.guid, ds.referenced, ds.snapshots + (planned,))


async def _plan(src: Side, dst: Side, src_ds: Dataset, dst_ds: Dataset | None, dst_name: str,
                policy: Policy, changed: bool | None) -> ReplicationPlan:
    bookmarks: tuple[Snapshot, ...] = ()
    if dst_ds is not None and src.rep.features.bookmarks:
        bookmarks = await src.zfs.bookmarks(src_ds.name)
    return plan_replication(src_ds, dst_ds, dst_name, policy, _label(src, src_ds.name), _label(dst, dst_name),
                            target_changed=changed, bookmarks=bookmarks)


async def _target_changed(dst: Side, dst_ds: Dataset | None, dry_run: bool) -> bool | None:
    """Was the target written after its newest snapshot? None: no target, or this zfs cannot tell."""
    if dst_ds is None or dst_ds.newest is None:
        return None
    if dst_ds.written is not None:  # listed with it
        return dst_ds.written > 0
    return await dst.zfs.changed_since(dst_ds.name, dst_ds.newest.name, probe=not dry_run,
                                       written=dst.rep.features.openzfs)  # else one command fewer per dataset


async def _stream_flags(src: Side, dst: Side, src_name: str, dst_name: str, dst_ds: Dataset | None,
                        plan: ReplicationPlan, sopts: StreamOptions) -> tuple[tuple[str, ...], str | None]:
    """The send flags of this dataset's streams (``flags.send_flags``) and what becomes of its encryption,
    said in the plan; refuses (exit 4), before the sync snapshot, what zfs would refuse late: a raw stream
    onto an unencrypted replica, a decrypted one into a target whose key is not loaded."""
    enc = await src.zfs.encryption(src_name) if src.rep.features.encryption else UNENCRYPTED
    replaced = dst_ds is None or plan.destroy_target
    where = dst_name.rsplit("/", 1)[0] if replaced else dst_name  # what the stream lands in or on
    dst_enc = UNENCRYPTED
    if plan.steps and dst.rep.features.encryption and (where != dst_name or not replaced):
        dst_enc = await dst.zfs.encryption(where)
    source, target = _label(src, src_name), _label(dst, dst_name)
    flags = send_flags(source, target, src.rep.features, dst.rep.features, enc, sopts, into_encrypted=dst_enc.on)
    if "-w" in flags:
        if plan.steps and not replaced and not dst_enc.on:
            raise E.RawOntoUnencrypted(target=target, source=source)
        return flags, "raw: the replica keeps the source's keys and is never decrypted on the target"
    if not dst_enc.on:
        return flags, "decrypted (--no-raw): the replica is not encrypted" if enc.on else None
    if dst_enc.keystatus != "available":
        if replaced:
            raise E.TargetKeyNotLoaded(target=target, why=f"would be encrypted under its parent {where}'s key",
                                       root=dst_enc.root, instead="replicate under a parent that is not encrypted")
        raise E.TargetKeyNotLoaded(target=target, why="is encrypted (a raw replica) and is sent decrypted",
                                   root=dst_enc.root, instead="leave out --no-raw: raw streams need no key")
    if replaced:
        return flags, f"encrypted on the target under {dst_enc.root}'s key (its parent {where} is encrypted)"
    return flags, f"encrypted on the target under {dst_enc.root}'s key"


def _prunes(src_ds: Dataset, dst_ds: Dataset | None, plan: ReplicationPlan, identifier: str,
            keep: Retention, keep_target: Retention) -> tuple[list[Snapshot], list[Snapshot]]:
    """Own sync snapshots to prune on each side once the plan has run (the target as it will be then)."""
    newest = plan.newest
    protect = {newest.guid} if newest is not None else set()
    src_list = prune_list(src_ds.snapshots, identifier, keep, protect)
    kept = () if dst_ds is None or plan.destroy_target else tuple(
        s for s in dst_ds.snapshots if s.name not in plan.destroys)
    arriving = tuple(dataclasses.replace(s, name=f"{plan.target}@{s.short}") for s in _arriving(src_ds, plan))
    return src_list, prune_list(kept + arriving, identifier, keep_target, protect)


def _arriving(src_ds: Dataset, plan: ReplicationPlan) -> list[Snapshot]:
    """Source snapshots the plan's streams create on the target (-I carries every one in between)."""
    out: list[Snapshot] = []
    for step in plan.steps:
        low = step.base.createtxg if step.base is not None else -1
        if step.intermediates:
            out += [s for s in src_ds.snapshots if low < s.createtxg <= step.snapshot.createtxg]
        else:
            out.append(step.snapshot)
    return out


async def _props(src: Side, dst: Side, src_name: str, ropts: ReplicateOptions,
                 emit: Emitter) -> tuple[tuple[str, str], ...]:
    if not ropts.preserve_properties:
        return ()
    local = await src.zfs.local_props(src_name)
    skipped = sorted(k for k in local if k in UNSAFE_PROPERTIES)
    if skipped:
        emit("properties_skipped", dataset=src_name, properties=skipped)
    return tuple(sorted((k, v) for k, v in local.items() if k not in UNSAFE_PROPERTIES))


#: Marks a target zchunk created, empty, for a full stream on a zfs without ``receive -o``; its value is the
#: identifier. Removed once the stream has arrived.
SEEDING_PROPERTY = "zchunk:seeding"


async def _precreate(dst: Side, dst_name: str, props: tuple[tuple[str, str], ...], identifier: str, exists: bool,
                     emit: Emitter) -> None:
    """Where ``zfs receive -o`` is missing (zfs-fuse): create the target with the properties first, so the
    full stream's blocks are written with them (compression above all), and receive it with ``-F``, which
    keeps a dataset's properties. Set after the receive, they would only apply to later writes."""
    if exists:
        await _set_props(dst, dst_name, props)
        emit("note", host=dst.label, detail=f"{dst_name}: receiving the full stream into the empty dataset an "
             "earlier run of this identifier created for it")
    else:
        args = [a for k, v in props for a in ("-o", f"{k}={v}")]
        await dst.zfs.run("create", *args, "-o", f"{SEEDING_PROPERTY}={identifier}", dst_name, dataset=dst_name,
                          action="create")
        emit("note", host=dst.label, detail=f"{dst_name}: this zfs has no `receive -o`: created it with "
             f"{', '.join(k for k, _ in props)} for the full stream to land in (receive -F)")
    await dst.zfs.unmount(dst_name)


async def _set_props(dst: Side, dst_name: str, props: tuple[tuple[str, str], ...]) -> None:
    """Where ``zfs receive -o`` is missing (old ZFS), set the properties right after the full receive."""
    for k, v in props:
        await dst.zfs.run("set", f"{k}={v}", dst_name, dataset=dst_name, action="set properties on")


async def _keep_unmounted(dst: Side, dst_name: str, first: bool, later: Later | None, emit: Emitter) -> None:
    """What ``zfs receive -u`` does, for a zfs without it (zfs-fuse): a mounted replica changes as soon as
    anything touches it (atime, a child's mountpoint directory) and then refuses the next incremental. A new
    replica of a tree run gets its canmount=noauto at the run's end, with the others'."""
    await dst.zfs.unmount(dst_name)
    if not first:
        return
    if later is not None:
        later.noauto.append(dst_name)
        return
    # After the unmount, not beside it: one change to a replica's mount state at a time. (An unmount that hung
    # for good on 2026-12-04 ran beside its set; the cause was zfs-fuse losing mounts, docs/reliability.md.)
    await dst.zfs.set(dst_name, "canmount", "noauto")
    emit("note", host=dst.label, detail=f"{dst_name}: this zfs has no `receive -u`: unmounted the replica "
         "and set canmount=noauto so it stays unchanged between syncs")


def _recv_flags(dst: Side) -> tuple[str, ...]:
    f = dst.rep.features
    return tuple(flag for flag, ok in (("-u", f.receive_unmounted), ("-s", f.resume_tokens)) if ok)


async def _prepare_target(dst: Side, dst_name: str, plan: ReplicationPlan, tag: str, emit: Emitter) -> None:
    """--force-delete's destroy and --rollback's rollback; a hold of ours on what goes (an earlier run's base)
    is released first, or zfs would refuse ("dataset is busy"). Anyone else's hold still refuses."""
    if plan.destroy_target:
        emit("destroying", target=_label(dst, dst_name), reason="--force-delete and no common snapshot")
        if dst.rep.features.holds:
            await dst.zfs.release(tag, *await dst.zfs.held_snapshots(dst_name))
        await dst.zfs.destroy(dst_name, "-r")
    elif plan.rollback_to is not None:
        emit("rolling_back", target=_label(dst, dst_name), to=plan.rollback_to.name, destroys=list(plan.destroys))
        if dst.rep.features.holds and plan.destroys:
            held = set(await dst.zfs.held_snapshots(dst_name))
            await dst.zfs.release(tag, *(s for s in plan.destroys if s in held))
        await dst.zfs.rollback(plan.rollback_to.name, destroy_newer=bool(plan.destroys))


async def _hold(side: Side, tag: str, *snapshots: str, emit: Emitter) -> None:
    """Hold them in one command, where this side has holds. Until the first hold worked, a refused one asks
    whether holds work here at all, of the first of them (and says when they do not): no extra round trip
    where they do."""
    if side.holds is False:
        return
    try:
        await side.zfs.hold(tag, *snapshots)
    except E.CommandFailed:
        if side.holds is None and not await side.zfs.holds_supported(snapshots[0]):
            side.holds = False
            emit("note", host=side.label, detail="this zfs has no working holds: the base is not protected "
                 "against `zfs destroy`")
            return
        raise
    side.holds = True


async def _move_holds(src: Side, dst: Side, tag: str, plan: ReplicationPlan, newest: Snapshot,
                      dst_name: str, later: Later | None) -> None:
    """Hold the new common snapshot on both sides, then release the old base: always one held. A first base
    of a tree run (no old one) is held at the run's end, with the others'."""
    dst_snap = f"{dst_name}@{newest.short}"
    if later is not None:
        later.src_holds.append(newest.name)
        later.dst_holds.append(dst_snap)
        if plan.common is not None and plan.common.guid != newest.guid:
            later.moved.append((newest.name, dst_snap))
        return
    await _both(_hold(src, tag, newest.name, emit=Emitter(None)), _hold(dst, tag, dst_snap, emit=Emitter(None)))
    if plan.common is not None and plan.common.guid != newest.guid:
        # the old base, and any other snapshot still holding our tag (a run killed between the hold of
        # the new base and the release of the old one): always exactly one held, the newest common
        await _both(_release_others(src, tag, newest.name), _release_others(dst, tag, dst_snap))


async def _release_seed(src: Side, src_ds: Dataset, dst_ds: Dataset | None) -> None:
    """``zchunk seed export`` holds its snapshot (marked ``zchunk:seed``) until the target has it: the first
    sync after the import (whose base it is) lets it go."""
    there = {s.guid for s in dst_ds.snapshots} if dst_ds is not None else set()
    for snap in src_ds.snapshots:
        if snap.seed and snap.guid in there:
            await src.zfs.release("zchunk_seed", snap.name)
            await src.zfs.run("inherit", SEED_PROPERTY, snap.name, check=False)


async def _release_others(side: Side, tag: str, keep: str) -> None:
    if side.holds:  # another's hold is not let go: zfs release says so, and nothing changes
        await side.zfs.release(tag, *(s for s in await side.zfs.held_snapshots(keep.split("@", 1)[0]) if s != keep))


async def _fresh_name(identifier: str, hostname: str, existing: tuple[Snapshot, ...]) -> str:
    """A sync snapshot name (to the second) the dataset does not have yet: a run within a second of the last
    one waits for the next second, rather than fail to take its snapshot (or, dry, plan with the old one)."""
    taken = {s.short for s in existing}
    while True:
        short = sync_snapshot_name(identifier, hostname, time.time())
        if short not in taken:
            return short
        await asyncio.sleep(1.02 - time.time() % 1.0)


async def _both(source_step: Awaitable[Any], target_step: Awaitable[Any]) -> tuple[Any, Any]:
    """One step on each host, at once (each is a round trip); both finish before a failure (the source's
    first) is raised. Their results."""
    source, target = await all_of(source_step, target_step)
    return source, target


async def _bookmark(src: Side, newest: Snapshot, identifier: str, emit: Emitter) -> None:
    if not src.rep.features.bookmarks:
        emit("note", host=src.label, detail="this zfs has no bookmarks: --create-bookmark ignored")
        return
    ds = newest.name.split("@", 1)[0]
    mark = f"{ds}#zchunk_{identifier}_{newest.short}"[:255]
    await src.zfs.run("bookmark", newest.name, mark, dataset=ds, action="bookmark")
    for old in await src.zfs.bookmarks(ds):
        short = old.name.split("#", 1)[1]
        if short.startswith(f"zchunk_{identifier}_") and old.name != mark:
            await src.zfs.destroy(old.name)
    emit("bookmark", bookmark=mark)


async def _prune(side: Side, snaps: list[Snapshot], tag: str, emit: Emitter) -> None:
    for s in snaps:
        if side.holds:
            await side.zfs.release(tag, s.name)
        await side.zfs.destroy(s.name)
        emit("pruned", host=side.label, snapshot=s.name)


async def _resume_partial(src: Side, dst: Side, src_ds: Dataset, dst_ds: Dataset, opts: SyncOptions, run: Run,
                          store: StateStore, emit: Emitter) -> SyncResult | None:
    """A receive that died left a resume token: finish it with ``send -t``, or discard a stale one."""
    token = await dst.zfs.prop(dst_ds.name, "receive_resume_token")
    if not token:
        return None
    newest = src_ds.newest
    assert newest is not None
    placeholder = SendPlan(src_ds.name, dst_ds.name, newest, None)
    spec = StreamSpec(placeholder, _recv_flags(dst), (), resume_token=token)
    check = await src.zfs.run("send", "-nP", "-t", token, check=False)
    if check.status != 0:
        emit("resume_token_stale", target=_label(dst, dst_ds.name), reason=check.err_text.splitlines()[-1:])
        await dst.zfs.run("receive", "-A", dst_ds.name, dataset=dst_ds.name, action="abort the partial receive of")
        return None
    snap = _token_snapshot(check.stdout.decode() + check.stderr.decode(), src_ds)
    if snap is not None:
        spec = StreamSpec(SendPlan(src_ds.name, dst_ds.name, snap, None), _recv_flags(dst), (), token)
    emit("resume_token", target=_label(dst, dst_ds.name), snapshot=spec.plan.snapshot.name)
    run.streamed.add(src_ds.name)
    return await run_stream(src.host, dst.host, src.rep, dst.rep, _label(src, src_ds.name),
                            _label(dst, dst_ds.name), spec, opts, store, emit, pacer=run.pacer)


def _token_snapshot(dry_run_output: str, src_ds: Dataset) -> Snapshot | None:
    """The snapshot a token resumes: the last source snapshot named by ``zfs send -nP -t``."""
    names = {s.name: s for s in src_ds.snapshots}
    found = [names[w] for line in dry_run_output.splitlines() for w in line.split() if w in names]
    return found[-1] if found else None


__all__ = ["ReplicateOptions", "ReplicationResult", "replicate", "is_own_sync_snapshot"]
