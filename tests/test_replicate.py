"""Replication rules on real zfs-fuse pools: sync snapshots, pruning of our own
snapshots only, target policies, dry runs, recursion, properties."""

from __future__ import annotations

import random
import subprocess
import time
from typing import Any

import pytest

from tests.zc import Zchunk
from tests.zfsutil import (
    add_change,
    assert_replica,
    destroy_when_free,
    exists,
    guid,
    make_source,
    mounted,
    mountpoint,
    snapshot_digest,
    snapshots,
    zfs,
)
from zchunk import lab

pytestmark = [pytest.mark.zfs]

MiB = 1 << 20


# the shared fixtures zc and pools (conftest.py) read these
ZC_SYNC_ARGS = ("--chunk-size", "1M")


def names(dataset: str) -> list[str]:
    return [s.split("@", 1)[1] for s in snapshots(dataset)]


def own(dataset: str, identifier: str) -> list[str]:
    return [n for n in names(dataset) if n.startswith(f"zchunk_{identifier}_")]


def test_sync_snapshots_and_pruning_touch_only_our_own(zc: Zchunk, pools: Any, tier: str) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 2 * MiB, seed=41)
    dst = f"{dst_pool.name}/r"
    zfs("snapshot", f"{src}@zchunk_other_host_20200101T000000Z")  # another replication's snapshot
    for i in range(3):
        add_change(src, MiB // 2, seed=42 + i, snap=f"user{i}")
        run = zc.run("sync", src, dst, "--identifier", "mine")
        assert run.returncode == 0, run.explain()
        assert len(own(src, "mine")) == 1 and own(src, "mine") == own(dst, "mine"), (names(src), names(dst))
        newest = own(src, "mine")[0]
        assert_replica(src, dst, newest)
    # the user's snapshots and the other identifier's stay, on both sides
    for ds in (src, dst):
        assert {"s1", "user0", "user1", "user2", "zchunk_other_host_20200101T000000Z"} <= set(names(ds))
    pruned = [e["snapshot"] for e in run.of("pruned")]
    assert pruned and all("@zchunk_mine_" in p for p in pruned)
    notes = " ".join(e.get("detail", "") for e in run.of("note"))
    assert "no working holds" not in notes, "zfs-fuse holds too (hold/release work; only `zfs holds` is missing)"
    newest = own(src, "mine")[0]
    for ds in (src, dst):  # the base is held on both sides, on both tiers: an admin's destroy fails
        assert [userrefs(f"{ds}@{n}") for n in names(ds)] == [int(n == newest) for n in names(ds)], names(ds)
        refused = subprocess.run(["zfs", "destroy", f"{ds}@{newest}"], capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and ("busy" in refused.stderr or "hold" in refused.stderr), refused.stderr
        assert f"{ds}@{newest}" in snapshots(ds)
    if tier == "openzfs":
        assert "zchunk_mine" in zfs("holds", "-H", f"{src}@{newest}", f"{dst}@{newest}")


def userrefs(snapshot: str) -> int:
    return int(zfs("get", "-H", "-p", "-o", "value", "userrefs", snapshot).strip())


def test_a_hold_of_ours_left_on_an_older_snapshot_is_released(zc: Zchunk, pools: Any) -> None:
    """A run killed between the hold of the new base and the release of the old one leaves two held: the
    next run leaves only the newest common snapshot held, and never touches another tag's hold."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, MiB, seed=44)
    dst = f"{dst_pool.name}/r"
    run = zc.run("sync", src, dst, "--identifier", "lh")
    assert run.returncode == 0, run.explain()
    first = own(src, "lh")[0]
    zfs("hold", "zchunk_lh", f"{src}@s1")  # as a killed earlier run would have left it
    zfs("hold", "admin", f"{src}@s1")  # the admin's own
    add_change(src, MiB // 4, seed=45, snap="user1")
    time.sleep(1.1)  # sync snapshots are named to the second
    run = zc.run("sync", src, dst, "--identifier", "lh", "--keep-sync-snaps", "2")
    assert run.returncode == 0, run.explain()
    second = own(src, "lh")[-1]
    assert second != first
    assert userrefs(f"{src}@{second}") == 1 and userrefs(f"{src}@{first}") == 0
    assert userrefs(f"{src}@s1") == 1, "the admin's hold stays; ours is gone"
    zfs("release", "admin", f"{src}@s1")


@pytest.mark.same_everywhere
def test_no_sync_snap_no_stream_and_snapshot_filters(zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 1 * MiB, seed=43)
    for name in ("hourly-1", "daily-1", "hourly-2", "daily-2"):
        add_change(src, 256 << 10, seed=hash(name) & 0xFFFF, snap=name)
    a, b, c = (f"{dst_pool.name}/{x}" for x in "abc")
    run = zc.run("sync", src, a, "--no-sync-snap")
    assert run.returncode == 0, run.explain()
    assert names(a) == ["s1", "hourly-1", "daily-1", "hourly-2", "daily-2"], "full of the oldest, then -I"
    run = zc.run("sync", src, b, "--no-sync-snap", "--no-stream")
    assert run.returncode == 0, run.explain()
    assert names(b) == ["daily-2"], "--no-stream: only the newest"
    run = zc.run("sync", src, c, "--no-sync-snap", "--exclude-snaps", "^hourly")
    assert run.returncode == 0, run.explain()
    assert names(c) == ["s1", "daily-1", "daily-2"]
    assert_replica(src, c, "daily-2")


def test_diverged_target_is_refused_then_rolled_back_on_request(zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 1 * MiB, seed=44)
    dst = f"{dst_pool.name}/r"
    assert zc.run("sync", src, dst, "--no-sync-snap").returncode == 0
    zfs("snapshot", f"{dst}@local-only")
    add_change(src, MiB, seed=45, snap="s2")
    before_src, before_dst = names(src), names(dst)
    run = zc.run("sync", src, dst, "--no-sync-snap")
    assert run.returncode == 4 and "local-only" in run.stderr and "--rollback" in run.stderr, run.explain()
    assert (names(src), names(dst)) == (before_src, before_dst), "a refusal changes nothing"
    run = zc.run("sync", src, dst, "--no-sync-snap", "--rollback")
    assert run.returncode == 0, run.explain()
    rb = run.of("rolling_back")[0]
    assert rb["to"] == f"{dst}@s1" and rb["destroys"] == [f"{dst}@local-only"]
    assert names(dst) == ["s1", "s2"]
    assert_replica(src, dst, "s2")


def test_written_target_rolls_back_only_with_rollback(zc: Zchunk, pools: Any, tier: str) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 1 * MiB, seed=46)
    dst = f"{dst_pool.name}/r"
    assert zc.run("sync", src, dst, "--no-sync-snap").returncode == 0
    with mounted(dst) as files:
        (files / "stray").write_bytes(random.Random(46).randbytes(256 << 10))
    add_change(src, MiB, seed=47, snap="s2")
    before = (names(src), names(dst))
    run = zc.run("sync", src, dst)
    # refused at planning on both tiers (OpenZFS: `written`; zfs-fuse: a probe snapshot's incremental
    # stream), before the sync snapshot: nothing is left behind, not even the probe
    assert run.returncode == 4 and "written on the target" in run.stderr, run.explain()
    assert (names(src), names(dst)) == before
    # the plan says what the rollback discards: OpenZFS measures it (written@s1), zfs-fuse cannot
    plan = zc.run("sync", src, dst, "--no-sync-snap", "--rollback", "--dry-run")
    assert plan.returncode == 0 and (names(src), names(dst)) == before, plan.explain()
    discards = plan.of("dataset_plan")[0]["rollback_discards"]
    if tier == "openzfs":
        assert 256 << 10 <= discards < 2 * MiB, discards
    else:
        assert discards is None
    text = zc.run("sync", src, dst, "--no-sync-snap", "--rollback", "--dry-run", json_out=False)
    lost = "KiB on the target since it is discarded" if tier == "openzfs" else "this zfs cannot say how much"
    assert f"would roll the target back to {dst}@s1; " in text.stderr and lost in text.stderr, text.stderr
    run = zc.run("sync", src, dst, "--no-sync-snap", "--rollback")
    assert run.returncode == 0, run.explain()
    with mounted(dst) as files:
        assert not (files / "stray").exists()
    assert_replica(src, dst, "s2")


def test_encryption_options_where_zfs_has_no_encryption_say_so(zc: Zchunk, pools: Any, tier: str) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 256 << 10, seed=95)
    dst = f"{dst_pool.name}/r"
    run = zc.run("sync", src, dst, "--no-raw", "--no-sync-snap")
    assert run.returncode == 0, run.explain()
    notes = [n["detail"] for n in run.of("note")]
    if tier == "openzfs":
        assert not any("no encryption" in n for n in notes), notes
        return
    assert any("has no encryption: --no-raw changes nothing" in n for n in notes), notes
    add_change(src, 64 << 10, seed=96, snap="s2")
    refused = zc.run("sync", src, dst, "--send-option", "-w", "--no-sync-snap")
    assert refused.returncode == 2 and "has no send -w" in refused.error()["message"], refused.explain()
    assert names(dst) == ["s1"]


def test_a_target_an_earlier_run_created_for_its_full_stream_receives_it(zc: Zchunk, pools: Any) -> None:
    """Where receive -o is missing, the target is created first (with the properties) and the full stream
    received into it with -F; a run killed in between leaves it empty, marked: the next run goes on."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, 512 << 10, seed=97)
    dst = f"{dst_pool.name}/r"
    zfs("create", "-o", "zchunk:seeding=sd", dst)
    run = zc.run("sync", src, dst, "--identifier", "sd")
    assert run.returncode == 0, run.explain()
    assert zfs("get", "-H", "-o", "value", "zchunk:seeding", dst).strip() == "-", "the mark is gone"
    assert_replica(src, dst, [n for n in names(src) if n.startswith("zchunk_sd_")][-1])
    other = f"{dst_pool.name}/other"
    zfs("create", "-o", "zchunk:seeding=someone-else", other)
    refused = zc.run("sync", src, other, "--identifier", "sd")
    assert refused.returncode == 4, "an empty dataset not made by this identifier is never overwritten"


def test_a_snapshot_destroyed_and_recreated_on_the_source_is_named_and_replaced_with_rollback(
        zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 1 * MiB, seed=90)
    dst = f"{dst_pool.name}/r"
    add_change(src, MiB, seed=91, snap="s2")
    assert zc.run("sync", src, dst, "--no-sync-snap", "--identifier", "rc").returncode == 0
    zfs("release", "zchunk_rc", f"{src}@s2")  # the admin's way to a re-created @s2: release, destroy, snapshot
    destroy_when_free(f"{src}@s2")
    add_change(src, MiB, seed=92, snap="s2")
    before = (names(src), names(dst))
    run = zc.run("sync", src, dst, "--identifier", "rc")
    assert run.returncode == 4 and "destroyed and re-created" in run.stderr and "@s2" in run.stderr, run.explain()
    assert (names(src), names(dst)) == before, "refused at planning: no sync snapshot left behind"
    # --rollback replaces it; our hold on the old @s2 (the last base) is released first, or zfs says busy
    run = zc.run("sync", src, dst, "--identifier", "rc", "--rollback")
    assert run.returncode == 0, run.explain()
    assert_replica(src, dst, "s2")


def test_a_sync_snapshot_gone_from_the_source_is_rolled_back_over_on_the_target(zc: Zchunk, pools: Any) -> None:
    """The end state of a coordinator killed mid-transfer whose sync snapshot was then destroyed on the
    source and delivered by the next run: the target has our sync snapshot, the source does not."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, 1 * MiB, seed=93)
    dst = f"{dst_pool.name}/r"
    assert zc.run("sync", src, dst, "--identifier", "gone").returncode == 0
    ours = [n for n in names(src) if n.startswith("zchunk_gone_")][-1]
    zfs("release", "zchunk_gone", f"{src}@{ours}")
    destroy_when_free(f"{src}@{ours}")
    add_change(src, MiB, seed=94, snap="s2")
    time.sleep(1.1)  # sync snapshot names have seconds: the next one must not reuse the destroyed one's name
    run = zc.run("sync", src, dst, "--identifier", "gone")
    assert run.returncode == 0, run.explain()
    assert run.of("rolling_back")[0]["destroys"] == [f"{dst}@{ours}"]
    assert ours not in names(dst)
    assert_replica(src, dst, "s2")
    assert zc.run("sync", src, dst, "--identifier", "gone").returncode == 0, "and every later run works"


@pytest.mark.same_everywhere
def test_no_common_snapshot_is_refused_and_never_destroyed_without_force(zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 1 * MiB, seed=48)
    other = make_source(dst_pool, 1 * MiB, seed=49, name="r")  # same snapshot name s1, another guid
    run = zc.run("sync", src, other)
    assert run.returncode == 4 and "shares no snapshot" in run.stderr and "s1" in run.stderr, run.explain()
    assert "other guids" in run.stderr, "the same-named candidate is pointed out"
    assert names(src) == ["s1"] and names(other) == ["s1"]
    run = zc.run("sync", src, other, "--no-sync-snap", "--force-delete")
    assert run.returncode == 0, run.explain()
    assert run.of("destroying")
    assert_replica(src, other, "s1")


@pytest.mark.same_everywhere
def test_dry_run_changes_nothing_and_shows_the_plan(zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 2 * MiB, seed=50)
    dst = f"{dst_pool.name}/r"
    assert zc.run("sync", src, dst, "--identifier", "dr").returncode == 0
    zfs("snapshot", f"{dst}@extra")
    add_change(src, MiB, seed=51, snap="s2")
    state = (names(src), names(dst))
    run = zc.run("sync", src, dst, "--identifier", "dr", "--dry-run", "--rollback")
    assert run.returncode == 0, run.explain()
    plan = run.of("dataset_plan")[0]
    assert plan["dry_run"] and plan["rollback"] and plan["destroys"] == [f"{dst}@extra"]
    assert plan["steps"] and "incremental" in plan["steps"][0]
    assert plan["prune_source"] and plan["prune_target"]
    assert run.of("would_snapshot")
    assert (names(src), names(dst)) == state
    assert zc.session_dirs() == []
    text = zc.run("sync", src, dst, "--identifier", "dr", "--dry-run", "--rollback", json_out=False)
    assert "would roll the target back" in text.stderr and "would send" in text.stderr, text.stderr


def test_recursive_with_exclusions_and_a_failing_child(zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    root = make_source(src_pool, 1 * MiB, seed=52, name="tree")
    for child in ("a", "b", "skipme", "noprop", "a/deep", "skipme/under"):
        zfs("create", f"{root}/{child}")
        lab.write_dataset(mountpoint(f"{root}/{child}") / "f", 256 << 10, seed=len(child))
    zfs("set", "zchunk:sync=false", f"{root}/noprop")
    dst = f"{dst_pool.name}/tree"
    run = zc.run("sync", root, dst, "-r", "--exclude", "skipme$")
    assert run.returncode == 0, run.explain()
    for child in ("", "/a", "/b", "/a/deep"):
        newest = [n for n in names(root + child) if n.startswith("zchunk_")][-1]
        assert guid(f"{dst + child}@{newest}") == guid(f"{root + child}@{newest}"), child
        # children are mounted inside their parent: compare each dataset's own file
        assert snapshot_digest(f"{dst + child}@{newest}") == snapshot_digest(f"{root + child}@{newest}")
    assert not exists(f"{dst}/skipme") and not exists(f"{dst}/noprop")
    skipped = {e["source"]: e["reason"] for e in run.of("dataset_skipped")}
    assert skipped == {f"{root}/skipme": "matches --exclude", f"{root}/noprop": "zchunk:sync=false",
                       f"{root}/skipme/under": f"its parent {root}/skipme is skipped"}, "the hierarchy, as send -X"
    # one child diverges: the others still replicate, exit code says partial
    zfs("snapshot", f"{dst}/b@diverged")
    for child in ("", "/a", "/b"):
        add_change(root + child, 128 << 10, seed=60 + len(child), snap="next")
    run = zc.run("sync", root, dst, "-r", "--exclude", "skipme$")
    assert run.returncode == 15, run.explain()
    assert "1 of 4 datasets failed" in run.stderr and f"{root}/b" in run.stderr
    assert "next" in names(dst) and "next" in names(f"{dst}/a") and "next" not in names(f"{dst}/b")


def test_preserve_properties_copies_local_ones_but_not_unsafe(zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 1 * MiB, seed=53)
    zfs("set", "compression=gzip", src)
    zfs("set", "zchunk:note=keep me", src)
    zfs("set", f"mountpoint={src_pool.mountpoint}/elsewhere", src)
    dst = f"{dst_pool.name}/r"
    run = zc.run("sync", src, dst, "--preserve-properties")
    assert run.returncode == 0, run.explain()
    get = lambda p: zfs("get", "-H", "-o", "value,source", p, dst).split("\t")  # noqa: E731
    assert get("compression") == ["gzip", "local\n"]
    ratio = lambda d: float(zfs("get", "-H", "-o", "value", "compressratio", d).strip().rstrip("x"))  # noqa: E731
    # the full stream landed gzip-compressed (written before compression=gzip on the source, the source's own
    # blocks are not: 1.00x), not only what is written after it (receive -o, or a target created first)
    assert ratio(dst) > 1.15, f"replica compressratio {ratio(dst)}x (source {ratio(src)}x)"
    assert zfs("get", "-H", "-o", "value", "zchunk:seeding", dst).strip() == "-"
    assert get("zchunk:note")[0] == "keep me"
    assert get("mountpoint")[1].strip() != "local", "mountpoint is never copied"
    assert "mountpoint" in run.of("properties_skipped")[0]["properties"]
    # a changed value follows on the next run, also where zfs has no receive -o (zfs-fuse: set after it)
    zfs("set", "zchunk:note=changed", src)
    add_change(src, 64 << 10, seed=54, snap="s2")
    run = zc.run("sync", src, dst, "--preserve-properties", "--exclude-property", "compression",
                 "--set-property", "zchunk:extra=1")
    assert run.returncode == 0, run.explain()
    assert get("zchunk:note")[0] == "changed" and get("zchunk:extra")[0] == "1"
    assert run.of("dataset_plan")[0]["properties"] == [["zchunk:extra", "1"], ["zchunk:note", "changed"]]


def _createtxg(name: str) -> str:
    # One atomic snapshot is one transaction group; its snapshots' `creation` seconds may still differ by
    # one on OpenZFS (each is stamped as it is synced, and a txg's sync can cross a second).
    return zfs("get", "-H", "-p", "-o", "value", "createtxg", name).strip()


def test_recursive_runs_repeat_over_a_three_level_tree(zc: Zchunk, pools: Any, tier: str) -> None:
    """Three -r runs, with changes in the parent, a child and a grandchild between them, a child added and
    one removed on the source: every run works, every replica verified by guid and content. The tree's sync
    snapshot is one name at one moment (one transaction group) on every dataset."""
    src_pool, dst_pool = pools
    root = make_source(src_pool, 512 << 10, seed=81, name="tr")
    for child in ("a", "a/deep", "b", "gone"):
        zfs("create", f"{root}/{child}")
        lab.write_dataset(mountpoint(f"{root}/{child}") / "f", 128 << 10, seed=len(child))
    dst = f"{dst_pool.name}/tr"
    members = ["", "/a", "/a/deep", "/b"]
    for turn in range(3):
        had = [child for child in members if own(root + child, "tr")]  # an old base, pruned by this run
        run = zc.run("sync", "-r", root, dst, "--identifier", "tr", "--jobs", "3")
        assert run.returncode == 0, run.explain()
        newest = {child: own(root + child, "tr")[-1] for child in members}
        assert len(set(newest.values())) == 1, f"one sync snapshot name for the tree: {newest}"
        short = newest[""]
        txgs = {_createtxg(f"{root + child}@{short}") for child in members}
        assert len(txgs) == 1 and txgs.pop().isdigit(), f"one moment (one txg): {txgs}"
        taken = run.of("snapshot")
        assert [e["snapshot"] for e in taken] == [f"{root}@{short}"] and taken[0]["datasets"] >= 4
        for child in members:
            assert_replica(root + child, dst + child, short)
            # held on both sides (every new base's hold comes at the run's end, with the others'), and only it:
            # the old base let go and pruned there too (keep 1), on both sides
            assert (userrefs(f"{root + child}@{short}"), userrefs(f"{dst + child}@{short}")) == (1, 1), child
            assert own(root + child, "tr") == own(dst + child, "tr") == [short], child
            if tier == "zfs-fuse":  # no receive -u: kept from mounting (also set at the run's end)
                assert zfs("get", "-H", "-o", "value", "canmount", dst + child).strip() == "noauto", child
        done = {e["source"]: e["status"] for e in run.of("dataset_done")}
        assert set(done.values()) == {"sent"}, done
        assert all("dataset" in e for e in run.of("dataset_plan")), "a dataset's events name it"
        if turn == 0:
            # the child goes from the source (its hold released first, as an admin would): its replica stays
            for snap in snapshots(f"{root}/gone"):
                zfs("release", "zchunk_tr", snap)
            destroy_when_free("-r", f"{root}/gone")
            zfs("create", f"{root}/c")
            lab.write_dataset(mountpoint(f"{root}/c") / "f", 64 << 10, seed=9)
        else:
            assert any("no longer on the source" in e["detail"] and f"{dst}/gone" in e["detail"]
                       for e in run.of("note")), run.kinds()
            assert exists(f"{dst}/gone")
            assert userrefs(f"{root}@s1") == 0, "the hold of ours a killed run left is let go at the run's end"
            assert len(run.of("pruned")) == 2 * len(had), run.of("pruned")  # each one's old base, on both sides
            assert all(e["dataset"] in {root + c for c in had} for e in run.of("pruned")), run.of("pruned")
        zfs("hold", "zchunk_tr", f"{root}@s1")  # as a run killed between a hold and its release would leave it
        for child, seed in (("", 90), ("/a", 91), ("/a/deep", 92)) if turn == 0 else (("/b", 93), ("/a/deep", 94)):
            lab.write_dataset(mountpoint(root + child) / f"more{turn}", 64 << 10, seed=seed + 10 * turn)
        members = ["", "/a", "/a/deep", "/b", "/c"]
    if tier == "zfs-fuse":  # no receive -u: the replicas are kept unmounted between runs
        assert zfs("get", "-H", "-o", "value", "mounted", dst).strip() == "no"


@pytest.mark.same_everywhere
def test_a_retention_grid_prunes_only_our_own_snapshots_by_their_time(zc: Zchunk, pools: Any) -> None:
    """--keep-sync-snaps "1,1d1w": the newest, and the oldest of each day for a week, of this identifier's
    sync snapshots (their time is in their name), on both sides; anyone else's stay."""
    from zchunk.plan import sync_snapshot_name

    src_pool, dst_pool = pools
    src = make_source(src_pool, MiB, seed=61)
    day = 86400
    base = int(time.time()) // day * day
    when = {"10d": base - 10 * day + 6 * 3600, "3d": base - 3 * day + 6 * 3600, "2d": base - 2 * day + 6 * 3600,
            "2d-later": base - 2 * day + 7 * 3600, "1d": base - day + 6 * 3600}
    crafted = {k: sync_snapshot_name("g", "h", t) for k, t in when.items()}
    for n, name in enumerate(crafted.values()):
        add_change(src, 64 << 10, seed=70 + n, snap=name)
    zfs("snapshot", f"{src}@{sync_snapshot_name('other', 'h', when['10d'])}")
    zfs("snapshot", f"{src}@admin-weekly")
    dst = f"{dst_pool.name}/r"
    run = zc.run("sync", src, dst, "--identifier", "g", "--keep-sync-snaps", "1,1d1w")
    assert run.returncode == 0, run.explain()
    newest = own(src, "g")[-1]
    expect = {crafted["3d"], crafted["2d"], crafted["1d"], newest}
    assert set(own(src, "g")) == expect, own(src, "g")
    assert set(own(dst, "g")) <= expect and newest in own(dst, "g"), own(dst, "g")
    assert {f"zchunk_other_h_{crafted['10d'].rsplit('_', 1)[1]}", "admin-weekly", "s1"} <= set(names(src))
    pruned = {e["snapshot"].split("@")[1] for e in run.of("pruned") if e["host"] == "localhost"}
    assert {crafted["10d"], crafted["2d-later"]} <= pruned
    bad = zc.run("sync", src, dst, "--identifier", "g", "--keep-sync-snaps", "1,1d")
    assert bad.returncode == 2 and "INTERVALSPAN" in bad.stderr, bad.explain()


@pytest.mark.same_everywhere
def test_a_run_within_the_second_of_a_sync_snapshot_takes_the_next_second(zc: Zchunk, pools: Any) -> None:
    """Sync snapshot names go to the second: a name the source already has (a run a moment ago; here made
    for the next three seconds) is waited past, not failed on, and a dry run plans with the new name too."""
    import socket
    import time as clock

    from zchunk.plan import sync_snapshot_name

    src_pool, dst_pool = pools
    src = make_source(src_pool, 256 << 10, seed=97)
    dst = f"{dst_pool.name}/r"
    assert zc.run("sync", src, dst, "--identifier", "sec").returncode == 0
    now = clock.time()
    taken = {sync_snapshot_name("sec", socket.gethostname(), now + i) for i in range(4)}
    for short in taken - set(names(src)):  # the first run's own may already be one of them
        zfs("snapshot", f"{src}@{short}")
    dry = zc.run("sync", src, dst, "--identifier", "sec", "--dry-run", "--keep-sync-snaps", "10")
    assert dry.returncode == 0 and dry.of("would_snapshot")[0]["snapshot"].split("@")[1] not in taken, dry.explain()
    run = zc.run("sync", src, dst, "--identifier", "sec", "--keep-sync-snaps", "10")
    assert run.returncode == 0, run.explain()
    assert run.of("snapshot")[0]["snapshot"].split("@")[1] not in taken
