"""zchunk resync on real zfs-fuse pools: seed 000's broken chain (a @vzdump on the target, the target's newest
snapshot pruned on the source, only an older snapshot in common) repaired after its plan; no common snapshot
(a re-seed, only with --reseed --yes, refused when the pool cannot hold it); the source gone (nothing changed,
the replica renamed out of the way on request). Every plan and refusal changes nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.test_service import write_jobs
from tests.zc import Zchunk
from tests.zfsutil import add_change, assert_replica, destroy_when_free, exists, make_source, snapshots, zfs

pytestmark = [pytest.mark.zfs]

MiB = 1 << 20


def names(ds: str) -> list[str]:
    return [s.split("@", 1)[1] for s in snapshots(ds)]


def test_seed_000_a_vzdump_and_only_an_older_snapshot_in_common(zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, MiB, seed=61, name="vm-100-disk-0")
    zfs("rename", f"{src}@s1", f"{src}@autosnap_daily1")
    dst = f"{dst_pool.name}/vm-100-disk-0"
    assert zc.run("sync", src, dst, "--no-sync-snap").returncode == 0
    add_change(src, MiB, seed=62, snap="autosnap_daily2")
    run = zc.run("sync", src, dst, "--no-sync-snap")
    assert run.returncode == 0, run.explain()
    # the source's retention prunes daily2 (past zchunk's hold on it: an admin's zfs release), a new daily3
    # comes; a backup job snapshots the replica
    zfs("release", f"zchunk_{run.of('preflight')[0]['identifier']}", f"{src}@autosnap_daily2")
    destroy_when_free(f"{src}@autosnap_daily2")
    add_change(src, MiB, seed=63, snap="autosnap_daily3")
    zfs("snapshot", f"{dst}@vzdump")
    refused = zc.run("sync", src, dst, "--no-sync-snap")
    assert refused.returncode == 4, refused.explain()
    state = (names(src), names(dst))

    plan = zc.run("resync", src, dst, json_out=False)
    assert plan.returncode == 0, plan.explain()
    assert f"would roll the target back to {dst}@autosnap_daily1, destroying {dst}@autosnap_daily2, {dst}@vzdump" \
        in plan.stderr, plan.stderr
    assert "would send" in plan.stderr and "nothing changed: run again with --yes" in plan.stderr
    assert (names(src), names(dst)) == state

    config = write_jobs(zc.workdir, zc, f'[jobs.vm]\nsource = "{src}"\ntarget = "{dst}"\n')
    by_job = zc.run("resync", "vm", "--config", str(config), json_out=False)
    assert by_job.returncode == 0 and f"would roll the target back to {dst}@autosnap_daily1" in by_job.stderr
    assert (names(src), names(dst)) == state
    done = zc.run("resync", src, dst, "--yes")
    assert done.returncode == 0, done.explain()
    assert names(dst)[:2] == ["autosnap_daily1", "autosnap_daily3"] and "vzdump" not in names(dst)
    assert_replica(src, dst, names(src)[-1])
    assert zc.run("sync", src, dst).returncode == 0, "the chain works again"


def test_no_common_snapshot_means_a_reseed_only_when_asked_and_when_it_fits(zc: Zchunk, pools: Any,
                                                                           pool_factory: Any) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, MiB, seed=64, name="db")
    other = make_source(dst_pool, MiB, seed=65, name="db")  # same name, nothing in common
    state = (names(src), names(other))
    run = zc.run("resync", src, other)
    assert run.returncode == 4 and run.error()["error"] == "ReseedNeeded" and "--reseed" in run.error()["hint"]
    plan = zc.run("resync", src, other, "--reseed", json_out=False)
    assert plan.returncode == 0 and "would DESTROY the target" in plan.stderr, plan.explain()
    assert (names(src), names(other)) == state
    done = zc.run("resync", src, other, "--reseed", "--yes")
    assert done.returncode == 0, done.explain()
    assert_replica(src, other, names(src)[-1])

    # a pool that cannot hold the stream: refused before anything is destroyed
    big = make_source(src_pool, 96 * MiB, seed=66, name="big", compressible=0.0)
    small = pool_factory(size="128M")
    tiny = make_source(small, MiB, seed=67, name="big")
    zfs("set", "quota=64M", tiny)
    before = names(tiny)
    run = zc.run("resync", big, tiny, "--reseed", "--yes")
    assert run.returncode == 12 and run.error()["error"] == "TargetFull", run.explain()
    assert "nothing was changed" in run.error()["message"] and names(tiny) == before


def test_a_source_gone_changes_nothing_and_the_replica_can_be_renamed(zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, MiB, seed=68, name="old-vm")
    dst = f"{dst_pool.name}/old-vm"
    run = zc.run("sync", src, dst, "--no-sync-snap")
    assert run.returncode == 0, run.explain()
    zfs("release", f"zchunk_{run.of('preflight')[0]['identifier']}", f"{src}@s1")  # the admin destroys it all
    destroy_when_free("-r", src)
    run = zc.run("resync", src, dst)
    assert run.returncode == 3 and run.error()["error"] == "SourceGone", run.explain()
    assert "--rename-target NEW" in run.error()["hint"] and exists(dst)
    plan = zc.run("resync", src, dst, "--rename-target", f"{dst_pool.name}/old-vm.orphan", json_out=False)
    assert plan.returncode == 0 and "would rename" in plan.stderr and exists(dst), plan.explain()
    done = zc.run("resync", src, dst, "--rename-target", f"{dst_pool.name}/old-vm.orphan", "--yes")
    assert done.returncode == 0, done.explain()
    assert not exists(dst) and exists(f"{dst_pool.name}/old-vm.orphan")
    for bad in ("no such; name", f"{src_pool.name}/elsewhere"):  # not a name; another pool
        refused = zc.run("resync", src, f"{dst_pool.name}/old-vm.orphan", "--rename-target", bad, "--yes")
        assert refused.returncode == 2 and exists(f"{dst_pool.name}/old-vm.orphan"), refused.explain()


def test_seed_002_the_target_holds_120_121_the_source_120_124_and_the_target_was_written(
        zc: Zchunk, pools: Any) -> None:
    """Seed 002's troubleshooting case: the replica stopped at 121 and was then changed; the source went on
    to 124. resync rolls the replica back over its writes to 121 and sends 122-124."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, MiB, seed=70, name="fs1")
    zfs("rename", f"{src}@s1", f"{src}@zfsrepl-120")
    dst = f"{dst_pool.name}/fs1"
    add_change(src, 256 << 10, seed=71, snap="zfsrepl-121")
    assert zc.run("sync", src, dst, "--no-sync-snap").returncode == 0
    for n in (122, 123, 124):
        add_change(src, 256 << 10, seed=n, snap=f"zfsrepl-{n}")
    zfs("set", "canmount=on", dst)
    zfs("mount", dst)
    (Path(zfs("get", "-H", "-o", "value", "mountpoint", dst).strip()) / "changed-on-the-target").write_bytes(b"x")
    zfs("snapshot", f"{dst}@local-change")  # what zfs-fuse can show of it: its own snapshot after 121
    state = (names(src), names(dst))
    assert zc.run("sync", src, dst, "--no-sync-snap").returncode == 4, "the plain sync refuses, as the seed's did"
    plan = zc.run("resync", src, dst, json_out=False)
    assert plan.returncode == 0 and f"would roll the target back to {dst}@zfsrepl-121" in plan.stderr, plan.stderr
    assert (names(src), names(dst)) == state
    assert zc.run("resync", src, dst, "--yes").returncode == 0
    assert names(dst)[:5] == [f"zfsrepl-{n}" for n in range(120, 125)]
    assert_replica(src, dst, "zfsrepl-124")


def test_seed_001_the_target_lost_its_newest_snapshots_and_the_source_pruned_its_oldest(
        zc: Zchunk, pools: Any) -> None:
    """Seed 001's "most recent snapshot does not match incremental source": the target holds 07:30 and 08:00
    (its newer ones deleted by hand), the source 08:00 to 09:00 (07:30 pruned). The base a job recorded is
    gone from the target; by guid the common one is 08:00, and the repair is a plain incremental from it."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, MiB, seed=80, name="vm-102-disk-0")
    zfs("rename", f"{src}@s1", f"{src}@replicate_07-30")
    dst = f"{dst_pool.name}/vm-102-disk-0"
    add_change(src, 256 << 10, seed=81, snap="replicate_08-00")
    add_change(src, 256 << 10, seed=82, snap="replicate_08-30")
    run = zc.run("sync", src, dst, "--no-sync-snap")
    assert run.returncode == 0, run.explain()
    zfs("release", f"zchunk_{run.of('preflight')[0]['identifier']}", f"{dst}@replicate_08-30")
    destroy_when_free(f"{dst}@replicate_08-30")  # "someone deleted snapshots on the target"
    destroy_when_free(f"{src}@replicate_07-30")  # the source's retention
    add_change(src, 256 << 10, seed=83, snap="replicate_08-45")
    add_change(src, 256 << 10, seed=84, snap="replicate_09-00")
    # what the seed's tool ran: an incremental from the base it recorded, which the target no longer has
    sent = subprocess.run(f"zfs send -i {src}@replicate_08-30 {src}@replicate_09-00 | zfs receive {dst}",
                          shell=True, capture_output=True, text=True, timeout=120)
    assert sent.returncode != 0 and names(dst) == ["replicate_07-30", "replicate_08-00"], sent.stderr
    state = (names(src), names(dst))

    doctor = zc.run("doctor", src, dst)
    common = [e for e in doctor.of("doctor") if e["check"] == "common snapshot"]
    assert common and "replicate_08-00" in common[0]["evidence"], doctor.explain()
    plan = zc.run("resync", src, dst, json_out=False)
    assert plan.returncode == 0, plan.explain()
    assert "would send incremental -I replicate_08-00 -> " in plan.stderr, plan.stderr
    assert "destroying" not in plan.stderr, "no target snapshot is in the way"
    assert (names(src), names(dst)) == state
    assert zc.run("resync", src, dst, "--yes").returncode == 0
    assert names(dst)[:5] == ["replicate_07-30", "replicate_08-00", "replicate_08-30", "replicate_08-45",
                              "replicate_09-00"]
    assert_replica(src, dst, names(src)[-1])
