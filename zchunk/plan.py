"""What to send: pure decisions from the two sides' snapshot lists (matched by guid)."""

from __future__ import annotations

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
