"""What to send: pure decisions from the two sides' snapshot lists (matched by guid)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import NoCommonSnapshot, NoSnapshot, TargetDiverged, TypeMismatch, UpToDate
from .zfs import Dataset, Snapshot


@dataclass(frozen=True)
class SendPlan:
    source: str  # source dataset
    target: str  # target dataset
    snapshot: Snapshot  # newest source snapshot: what the target will have afterwards
    base: Snapshot | None  # common snapshot (on the source) for an incremental, None for full
    intermediates: bool = True  # -I (all snapshots between) rather than -i

    @property
    def kind(self) -> str:
        return "full" if self.base is None else "incremental"

    @property
    def target_snapshot(self) -> str:
        return f"{self.target}@{self.snapshot.short}"

    def describe(self) -> str:
        if self.base is None:
            return f"full stream of {self.snapshot.name} -> {self.target}"
        flag = "-I" if self.intermediates else "-i"
        return f"incremental {flag} {self.base.short} -> {self.snapshot.short} of {self.source} -> {self.target}"


def common_snapshot(source: Dataset, target: Dataset) -> tuple[Snapshot, Snapshot] | None:
    """Newest (source, target) snapshot pair with equal guids."""
    src_by_guid = source.by_guid()
    best: tuple[Snapshot, Snapshot] | None = None
    for tsnap in target.snapshots:
        ssnap = src_by_guid.get(tsnap.guid)
        if ssnap is not None and (best is None or ssnap.createtxg > best[0].createtxg):
            best = (ssnap, tsnap)
    return best


def plan_send(source: Dataset, target: Dataset | None, target_name: str, source_label: str,
              target_label: str, intermediates: bool = True) -> SendPlan:
    newest = source.newest
    if newest is None:
        raise NoSnapshot(host=source_label, dataset=source.name)
    if target is None:
        return SendPlan(source.name, target_name, newest, None, intermediates)
    if target.type != source.type:
        raise TypeMismatch(source=source_label, source_type=source.type, target=target_label,
                           target_type=target.type)
    pair = common_snapshot(source, target)
    if pair is None:
        raise NoCommonSnapshot(source=source_label, target=target_label, target_ds=target.name)
    src_common, tgt_common = pair
    if src_common.guid == newest.guid:
        raise UpToDate(target=target_label, snapshot=newest.short)
    newer = [s.short for s in target.snapshots if s.createtxg > tgt_common.createtxg]
    if newer:
        raise TargetDiverged(target=target_label, common=tgt_common.short, common_full=tgt_common.name,
                             reason=f"it has snapshots newer than the common one: {', '.join(newer)}")
    return SendPlan(source.name, target_name, newest, src_common, intermediates)


# -- replication: sync snapshots, policies, chains ----------------------------

SYNC_PREFIX = "zchunk_"


def sync_snapshot_name(identifier: str, host: str, when: float) -> str:
    """``zchunk_<identifier>_<host>_<UTC timestamp>``; host reduced to characters zfs accepts."""
    import time

    safe_host = "".join(c if c.isalnum() or c in "-." else "-" for c in host)[:40] or "host"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    return f"{SYNC_PREFIX}{identifier}_{safe_host}_{stamp}"


def is_own_sync_snapshot(short: str, identifier: str) -> bool:
    return short.startswith(f"{SYNC_PREFIX}{identifier}_")


@dataclass(frozen=True)
class Policy:
    """What the user allows; every destructive step needs an explicit flag."""

    identifier: str
    stream: bool = True  # -I; False: -i
    include: tuple[re.Pattern[str], ...] = ()
    exclude: tuple[re.Pattern[str], ...] = ()
    rollback: bool = False
    force_delete: bool = False
    hold_tag: str = ""  # fan-out: each target's own tag, so a target that lags keeps its base held

    @property
    def tag(self) -> str:
        """The user hold on each side's newest common snapshot."""
        return self.hold_tag or f"zchunk_{self.identifier}"

    def selects(self, short: str) -> bool:
        if is_own_sync_snapshot(short, self.identifier):
            return True
        if self.include and not any(p.search(short) for p in self.include):
            return False
        return not any(p.search(short) for p in self.exclude)

    @property
    def filtered(self) -> bool:
        return bool(self.include or self.exclude)


@dataclass(frozen=True)
class ReplicationPlan:
    source: str
    target: str
    steps: tuple[SendPlan, ...]
    common: Snapshot | None = None  # newest common (source side)
    target_common: Snapshot | None = None
    rollback_to: Snapshot | None = None  # target snapshot to roll back to first
    destroys: tuple[str, ...] = ()  # target snapshots the rollback destroys
    destroy_target: bool = False

    @property
    def up_to_date(self) -> bool:
        return not self.steps and not self.destroy_target

    @property
    def newest(self) -> Snapshot | None:
        return self.steps[-1].snapshot if self.steps else self.common


def _chain(source: str, target: str, base: Snapshot | None, snaps: list[Snapshot], policy: Policy) -> list[SendPlan]:
    """Streams taking the target from ``base`` to the last of ``snaps`` (all newer than base)."""
    if not snaps:
        return []
    steps: list[SendPlan] = []
    if base is None:
        first = snaps[0] if policy.stream else snaps[-1]
        steps.append(SendPlan(source, target, first, None, policy.stream))
        base, snaps = first, [s for s in snaps if s.createtxg > first.createtxg]
    if not snaps:
        return steps
    if policy.filtered or not policy.stream or "#" in base.name:
        # -i one by one: only the selected snapshots travel (a bookmark base allows -i only)
        for snap in snaps if policy.stream else snaps[-1:]:
            steps.append(SendPlan(source, target, snap, base, intermediates=False))
            base = snap
        return steps
    steps.append(SendPlan(source, target, snaps[-1], base, intermediates=True))
    return steps


def plan_replication(source: Dataset, target: Dataset | None, target_name: str, policy: Policy,
                     source_label: str, target_label: str, target_changed: bool | None = None,
                     bookmarks: tuple[Snapshot, ...] = ()) -> ReplicationPlan:
    """Everything to do for one dataset, or a refusal that says what would be lost."""
    selected = [s for s in source.snapshots if policy.selects(s.short)]
    if not selected:
        raise NoSnapshot(host=source_label, dataset=source.name)
    if target is None:
        return ReplicationPlan(source.name, target_name, tuple(_chain(source.name, target_name, None, selected,
                                                                        policy)))
    if target.type != source.type:
        raise TypeMismatch(source=source_label, source_type=source.type, target=target_label,
                           target_type=target.type)
    pair = common_snapshot(source, target)
    base: Snapshot | None = pair[0] if pair else None
    tgt_common = pair[1] if pair else None
    if pair is None:
        tgt_guids = {s.guid: s for s in target.snapshots}
        marks = [b for b in bookmarks if b.guid in tgt_guids]
        if marks:
            base = max(marks, key=lambda b: b.createtxg)
            tgt_common = tgt_guids[base.guid]
    if base is None or tgt_common is None:
        if policy.force_delete:
            return ReplicationPlan(source.name, target_name,
                                   tuple(_chain(source.name, target_name, None, selected, policy)),
                                   destroy_target=True)
        raise _no_common(source, target, source_label, target_label)
    newer = [s for s in target.snapshots if s.createtxg > tgt_common.createtxg]
    newer_on_target = tuple(s.name for s in newer)
    rollback_to = None
    if policy.rollback and target_changed is None:
        rollback_to = tgt_common  # this zfs can't say whether the target changed: with --rollback, make sure
    if newer_on_target or target_changed:
        # Our own sync snapshots whose source snapshot is gone (a run killed mid-transfer, its snapshot then
        # destroyed on the source, delivered by the next run) hold nothing a later sync snapshot would not
        # replace: rolled back over like any pruned sync snapshot, if nothing was written after them.
        ours = bool(newer) and target_changed is False and all(
            is_own_sync_snapshot(s.short, policy.identifier) for s in newer)
        # --force-delete allows overwriting snapshots the source re-created under the same name (as syncoid's)
        clash = policy.force_delete and bool(_clashes(source, newer))
        if not policy.rollback and not ours and not clash:
            raise TargetDiverged(target=target_label, common=tgt_common.short, common_full=tgt_common.name,
                                 reason=_divergence(source, newer, bool(target_changed)))
        rollback_to = tgt_common
    todo = [s for s in selected if s.createtxg > base.createtxg]
    steps = _chain(source.name, target_name, base, todo, policy)
    return ReplicationPlan(source.name, target_name, tuple(steps), base if "#" not in base.name else None,
                           tgt_common, rollback_to, newer_on_target)


def _divergence(source: Dataset, newer: list[Snapshot], written: bool) -> str:
    if not newer:
        return "data written on the target since then; it would be lost (--rollback allows it)"
    clash = _clashes(source, newer)
    what = f"target-only snapshots newer than it: {', '.join(s.name for s in newer)}"
    if clash:
        what += (f" ({', '.join('@' + c for c in clash)} on the target is not the source's: same name, another "
                 "guid, so the source's was destroyed and re-created; --rollback or --force-delete replaces it "
                 "with the source's)")
    return f"{what}; they would be lost (--rollback allows it)"


def _clashes(source: Dataset, newer: list[Snapshot]) -> list[str]:
    """Target snapshot names the source has with another guid."""
    by_name = {s.short: s for s in source.snapshots}
    return [s.short for s in newer if s.short in by_name and by_name[s.short].guid != s.guid]


def _no_common(source: Dataset, target: Dataset, source_label: str, target_label: str) -> NoCommonSnapshot:
    src_names = {s.short for s in source.snapshots}
    same_name = [s.short for s in target.snapshots if s.short in src_names]
    nearest = same_name[-3:] or [s.short for s in target.snapshots[-3:]]
    err = NoCommonSnapshot(source=source_label, target=target_label, target_ds=target.name)
    if nearest:
        err.args = (f"{err} (nearest target snapshots: {', '.join(nearest)}"
                    + (" — same names, other guids" if same_name else "") + ")",)
    return err


_GRID_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "m": 30 * 86400, "y": 365 * 86400}
_GRID_RULE = re.compile(r"^(\d+)(s|min|h|d|w|m|y)(\d+)(s|min|h|d|w|m|y)$")
_STAMP = re.compile(r"_(\d{8}T\d{6}Z)$")


@dataclass(frozen=True)
class Retention:
    """Which of our own sync snapshots stay: the newest ``count``, and for each (interval, span) of ``grid``
    the oldest of every ``interval`` within ``span`` of now, as zfs_autobackup's thinner keeps them. Written
    ``3`` or ``"10,1h1d,1d1w,1w1m"``: the newest 10, then one per hour for a day, one per day for a week, one
    per week for a month (units s, min, h, d, w, m = 30 days, y = 365 days)."""

    count: int = 1
    grid: tuple[tuple[float, float], ...] = ()

    def __str__(self) -> str:
        """As ``parse`` reads it back (a grid's intervals and spans in seconds)."""
        return ",".join([str(self.count)] + [f"{interval:.0f}s{span:.0f}s" for interval, span in self.grid])

    @classmethod
    def parse(cls, value: object) -> Retention:
        """From a count or a grid (a number in a string is a count); ValueError says what is wrong."""
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError("a count (3) or a grid (\"10,1h1d,1d1w\")")
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"{value}: keep at least 1 (the newest common snapshot always stays)")
            return cls(value)
        parts = [p.strip() for p in value.split(",")]
        if not parts[0].isdigit() or int(parts[0]) < 1:
            raise ValueError(f"{value!r}: a grid starts with how many newest to keep (at least 1), e.g. "
                             "\"10,1h1d,1d1w\"")
        grid = []
        for rule in parts[1:]:
            m = _GRID_RULE.match(rule)
            if m is None:
                raise ValueError(f"{value!r}: {rule!r} is not INTERVALSPAN like 1h1d (one per hour for a day); "
                                 "units s, min, h, d, w, m (30 days), y")
            interval = int(m.group(1)) * _GRID_UNITS[m.group(2)]
            span = int(m.group(3)) * _GRID_UNITS[m.group(4)]
            if interval <= 0 or span < interval:
                raise ValueError(f"{value!r}: {rule!r} keeps nothing (the span is shorter than the interval)")
            grid.append((float(interval), float(span)))
        return cls(int(parts[0]), tuple(grid))

    def keep(self, own: list[Snapshot], now: float) -> set[str]:
        """The names of ``own`` (oldest first) that stay. One whose time cannot be read from its name
        (``_YYYYmmddTHHMMSSZ``) always stays: nothing is destroyed on a guess."""
        kept = {s.name for s in own[-self.count:]}
        dated = [(s, _stamp_time(s.short)) for s in own]
        kept |= {s.name for s, t in dated if t is None}
        for interval, span in self.grid:
            buckets: set[int] = set()
            for s, t in dated:
                if t is not None and now - t <= span and int(t // interval) not in buckets:
                    buckets.add(int(t // interval))
                    kept.add(s.name)
        return kept


def _stamp_time(short: str) -> float | None:
    import calendar
    import time

    m = _STAMP.search(short)
    if m is None:
        return None
    try:
        return float(calendar.timegm(time.strptime(m.group(1), "%Y%m%dT%H%M%SZ")))
    except ValueError:
        return None


def prune_list(snapshots: tuple[Snapshot, ...], identifier: str, keep: Retention, protect: set[int],
               now: float | None = None) -> list[Snapshot]:
    """Our own sync snapshots that ``keep`` does not keep (at ``now``, default the clock); never one whose
    guid is protected, never anyone else's."""
    import time

    own = [s for s in snapshots if is_own_sync_snapshot(s.short, identifier)]
    kept = keep.keep(own, time.time() if now is None else now)
    return [s for s in own if s.name not in kept and s.guid not in protect]
