"""Replication planning from hand-built snapshot lists: matched by guid, never by name."""

from __future__ import annotations

import pytest

from zchunk.errors import NoCommonSnapshot, NoSnapshot, TargetDiverged, TypeMismatch, UpToDate
from zchunk.plan import SendPlan, common_snapshot, plan_send
from zchunk.zfs import Dataset, Snapshot

SRC, DST = "tank/data", "backup/data"


def snap(ds: str, name: str, guid: int, txg: int) -> Snapshot:
    return Snapshot(f"{ds}@{name}", guid, txg)


def dataset(name: str, *snaps: Snapshot, type_: str = "filesystem") -> Dataset:
    return Dataset(name, type_, guid=hash(name) & 0xFFFF, referenced=0,
                   snapshots=tuple(sorted(snaps, key=lambda s: s.createtxg)))


# source: a(guid 11) -> b(12) -> c(13); txgs differ on the target (received later)
A, B, C = snap(SRC, "a", 11, 100), snap(SRC, "b", 12, 200), snap(SRC, "c", 13, 300)
SOURCE = dataset(SRC, A, B, C)


def plan(source: Dataset, target: Dataset | None, **kw: bool) -> SendPlan:
    return plan_send(source, target, DST, f"src:{source.name}", f"dst:{DST}", **kw)


def test_full_when_the_target_does_not_exist() -> None:
    p = plan(SOURCE, None)
    assert p.kind == "full" and p.base is None
    assert p.snapshot == C
    assert p.target_snapshot == f"{DST}@c"
    assert "full" in p.describe() and f"{SRC}@c" in p.describe()


def test_incremental_from_the_newest_common_snapshot() -> None:
    target = dataset(DST, snap(DST, "a", 11, 5), snap(DST, "b", 12, 9))
    p = plan(SOURCE, target)
    assert p.kind == "incremental"
    assert p.base == B and p.snapshot == C
    assert p.describe() == f"incremental -I b -> c of {SRC} -> {DST}"
    assert "-i b" in plan(SOURCE, target, intermediates=False).describe()


def test_common_snapshot_is_matched_by_guid_not_by_name() -> None:
    # The target has a "c" that is NOT the source's c (another guid: e.g. taken on the
    # target by hand), and an older "b" that IS the source's b under another name.
    target = dataset(DST, snap(DST, "renamed-b", 12, 9), snap(DST, "c", 999, 10))
    pair = common_snapshot(SOURCE, target)
    assert pair is not None
    src_common, tgt_common = pair
    assert src_common == B and tgt_common.name == f"{DST}@renamed-b"
    # ...and a same-name snapshot that is newer than the real common one means divergence
    with pytest.raises(TargetDiverged) as e:
        plan(SOURCE, target)
    assert "c" in e.value.fields["reason"]


def test_same_names_different_guids_share_nothing() -> None:
    target = dataset(DST, snap(DST, "a", 21, 5), snap(DST, "b", 22, 9), snap(DST, "c", 23, 12))
    assert common_snapshot(SOURCE, target) is None
    with pytest.raises(NoCommonSnapshot) as e:
        plan(SOURCE, target)
    assert e.value.exit_code == 4
    assert "guid" in str(e.value)
    assert DST in e.value.hint  # the fix names the target dataset


def test_newest_common_wins_by_source_createtxg() -> None:
    target = dataset(DST, snap(DST, "a", 11, 5), snap(DST, "b", 12, 9))
    assert common_snapshot(SOURCE, target) == (B, target.snapshots[1])


def test_up_to_date_when_the_newest_is_common() -> None:
    target = dataset(DST, snap(DST, "a", 11, 5), snap(DST, "c", 13, 9))
    with pytest.raises(UpToDate) as e:
        plan(SOURCE, target)
    assert e.value.exit_code == 0
    assert "c" in str(e.value)


def test_target_diverged_lists_the_newer_target_snapshots() -> None:
    target = dataset(DST, snap(DST, "a", 11, 5), snap(DST, "local-1", 41, 7), snap(DST, "local-2", 42, 8))
    with pytest.raises(TargetDiverged) as e:
        plan(SOURCE, target)
    err = e.value
    assert err.exit_code == 4
    assert "local-1" in str(err) and "local-2" in str(err)
    assert err.fields["common"] == "a"
    assert f"zfs rollback -r {DST}@a" in err.hint


def test_no_snapshot_on_the_source() -> None:
    with pytest.raises(NoSnapshot) as e:
        plan(dataset(SRC), None)
    assert e.value.exit_code == 3
    assert SRC in str(e.value)


def test_no_snapshot_is_checked_before_the_target() -> None:
    with pytest.raises(NoSnapshot):
        plan(dataset(SRC), dataset(DST, snap(DST, "a", 11, 5)))


@pytest.mark.parametrize("src_type,dst_type", [("filesystem", "volume"), ("volume", "filesystem")])
def test_type_mismatch(src_type: str, dst_type: str) -> None:
    source = dataset(SRC, A, B, C, type_=src_type)
    target = dataset(DST, snap(DST, "a", 11, 5), type_=dst_type)
    with pytest.raises(TypeMismatch) as e:
        plan(source, target)
    assert e.value.exit_code == 4
    assert src_type in str(e.value) and dst_type in str(e.value)


def test_volume_to_volume_is_fine() -> None:
    source = dataset(SRC, A, B, type_="volume")
    target = dataset(DST, snap(DST, "a", 11, 5), type_="volume")
    assert plan(source, target).base == A


def test_empty_target_dataset_has_no_common_snapshot() -> None:
    with pytest.raises(NoCommonSnapshot):
        plan(SOURCE, dataset(DST))


def test_target_prunes_name_the_target_snapshots_that_arrive() -> None:
    from zchunk.plan import Policy, Retention, plan_replication, sync_snapshot_name
    from zchunk.replicate import _prunes

    own = [sync_snapshot_name("x", "h", t) for t in (1e9, 1e9 + 60, 1e9 + 120)]
    src = dataset("p/src", *(snap("p/src", n, 10 + i, 100 + i) for i, n in enumerate(own)))
    dst = dataset("t/dst", snap("t/dst", own[0], 10, 7))
    plan = plan_replication(src, dst, "t/dst", Policy("x"), "p/src", "t/dst")
    src_prunes, dst_prunes = _prunes(src, dst, plan, "x", keep=Retention(1), keep_target=Retention(1))
    assert [s.name for s in src_prunes] == [f"p/src@{own[0]}", f"p/src@{own[1]}"]
    assert [s.name for s in dst_prunes] == [f"t/dst@{own[0]}", f"t/dst@{own[1]}"], "not the source's names"


def test_own_sync_snapshots_gone_from_the_source_are_rolled_back_over_only_when_unwritten() -> None:
    from zchunk.plan import Policy, plan_replication, sync_snapshot_name

    old = sync_snapshot_name("x", "h", 1e9)
    src = dataset("p/src", snap("p/src", "s1", 1, 10), snap("p/src", "s2", 3, 30))
    dst = dataset("t/dst", snap("t/dst", "s1", 1, 5), snap("t/dst", old, 2, 6))
    plan = plan_replication(src, dst, "t/dst", Policy("x"), "p/src", "t/dst", target_changed=False)
    assert plan.rollback_to is not None and plan.rollback_to.name == "t/dst@s1" and plan.destroys == (f"t/dst@{old}",)
    for changed in (True, None):  # written after it, or this zfs cannot tell: the user decides
        with pytest.raises(TargetDiverged):
            plan_replication(src, dst, "t/dst", Policy("x"), "p/src", "t/dst", target_changed=changed)
    with pytest.raises(TargetDiverged):  # another identifier's (another target's) is not ours to drop
        plan_replication(src, dst, "t/dst", Policy("y"), "p/src", "t/dst", target_changed=False)


def test_a_recreated_snapshot_is_named_as_such() -> None:
    from zchunk.plan import Policy, plan_replication

    src = dataset("p/src", snap("p/src", "s1", 1, 10), snap("p/src", "s2", 3, 30))
    dst = dataset("t/dst", snap("t/dst", "s1", 1, 5), snap("t/dst", "s2", 2, 6))
    with pytest.raises(TargetDiverged) as e:
        plan_replication(src, dst, "t/dst", Policy("x"), "p/src", "t/dst", target_changed=False)
    assert "@s2 on the target is not the source's" in str(e.value) and "re-created" in str(e.value)
    plan = plan_replication(src, dst, "t/dst", Policy("x", force_delete=True), "p/src", "t/dst", target_changed=False)
    assert plan.rollback_to is not None and plan.destroys == ("t/dst@s2",), "--force-delete overwrites, as syncoid's"
    other = dataset("t/dst", snap("t/dst", "s1", 1, 5), snap("t/dst", "mine", 2, 6))
    with pytest.raises(TargetDiverged):  # no clash: --force-delete is no licence to roll back
        plan_replication(src, other, "t/dst", Policy("x", force_delete=True), "p/src", "t/dst", target_changed=False)


# -- retention: a count, or a grid ---------------------------------------------------------------


def test_retention_is_a_count_or_a_grid_and_says_what_is_wrong() -> None:
    from zchunk.plan import Retention

    assert Retention.parse(3) == Retention.parse("3") == Retention(3)
    day, week = 86400.0, 7 * 86400.0
    assert Retention.parse("10,1h1d,1d1w,1w1m") == Retention(10, ((3600.0, day), (day, week),
                                                                  (week, 30 * day)))
    assert Retention.parse("2,15min1h,1y10y").grid == ((900.0, 3600.0), (365 * day, 3650 * day))
    for bad, words in ((0, "at least 1"), ("0,1h1d", "at least 1"), ("10,1h", "INTERVALSPAN"),
                       ("10,1d1h", "keeps nothing"), ("1h1d", "starts with how many"), (True, "a count"),
                       (2.5, "a count")):
        with pytest.raises(ValueError, match=words):
            Retention.parse(bad)


def test_a_grid_keeps_the_newest_and_one_per_interval_within_each_span_and_only_ours() -> None:
    from zchunk.plan import Retention, prune_list, sync_snapshot_name

    now = 1_800_000_000.0
    hour, day = 3600.0, 86400.0
    # ours every 20 minutes for three days, then one of another identifier and one of the user
    times = [now - 3 * day + i * 1200 for i in range(int(3 * day / 1200) + 1)]
    names = [sync_snapshot_name("x", "h", t) for t in times]
    snaps = tuple(snap("p/ds", n, 10 + i, 1000 + i) for i, n in enumerate(names)) + (
        snap("p/ds", sync_snapshot_name("other", "h", now - 5 * day), 1, 1),
        snap("p/ds", "user-weekly", 2, 2))
    doomed = {s.name for s in prune_list(snaps, "x", Retention.parse("4,1h1d,1d1w"), protect=set(), now=now)}
    kept = [t for t, n in zip(times, names) if f"p/ds@{n}" not in doomed]
    assert all(s.name.startswith("p/ds@zchunk_x_") for s in snaps if s.name in doomed), "only ours"
    assert kept[-4:] == times[-4:], "the newest 4"
    oldest_per_hour = {}
    for t in times:
        if now - t <= day:
            oldest_per_hour.setdefault(int(t // hour), t)
    last_day = {t for t in kept if now - t <= day}
    assert last_day == set(oldest_per_hour.values()) | set(times[-4:]), "one per hour for a day, and the newest"
    older = [t for t in kept if now - t > day]
    assert len(older) == len({int(t // day) for t in older}) <= 3, "one per day beyond"
    protected = next(s for s in snaps if s.name in doomed)
    assert protected not in prune_list(snaps, "x", Retention(1), protect={protected.guid}, now=now)
    undated = snap("p/ds", "zchunk_x_h_garbled", 9999, 9999)
    assert undated not in prune_list((undated,) + snaps, "x", Retention(1), set(), now), "never on a guess"
