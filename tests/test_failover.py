"""zchunk failover on real zfs-fuse pools (seed 002, section 6): a test failover makes the replica usable
and locks it against replication (the lock on the dataset itself), ``--end`` shows what the test wrote and,
with ``--yes``, discards it, restores the replica and replication continues incrementally; a real failover
cannot be ended by a rollback; every refusal and dry run changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.test_service import status, sync_snaps, write_jobs, zchunk
from tests.zc import Zchunk
from tests.zfsutil import assert_replica, destroy_when_free, exists, guid, make_source, mountpoint, snapshots, zfs

pytestmark = [pytest.mark.zfs]

MiB = 1 << 20


def props(dataset: str, *names: str) -> dict[str, str]:
    out = zfs("get", "-H", "-o", "property,value,source", ",".join(names), dataset)
    return {line.split("\t")[0]: "\t".join(line.split("\t")[1:]) for line in out.splitlines()}


def test_a_test_failover_and_its_end(zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, MiB, seed=21, name="vm")
    dst = f"{dst_pool.name}/vm"
    config = write_jobs(tmp_path, zc, f'[jobs.vm]\nsource = "{src}"\ntarget = "{dst}"\n')
    cfg = ("--config", str(config))
    assert zchunk("run", *cfg).returncode == 0
    replicated = snapshots(dst)
    settings = props(dst, "canmount", "readonly", "mountpoint", "mounted")
    assert settings["mounted"].startswith("no"), "zchunk keeps replicas unmounted"

    # a dry run says the steps and changes nothing
    dry = zchunk("failover", "vm", "--test", *cfg, "--dry-run")
    assert dry.returncode == 0 and "would lock it against replication" in dry.stderr, dry.stderr
    assert props(dst, "canmount", "readonly", "mountpoint", "mounted") == settings
    assert zfs("get", "-H", "-o", "value", "zchunk:locked", dst).strip() == "-"

    run = zchunk("failover", "vm", "--test", "--why", "DR drill", *cfg)
    assert run.returncode == 0, run.stderr
    lock = zfs("get", "-H", "-o", "value", "zchunk:locked", dst).strip()
    assert "failover test: DR drill" in lock and "@" in lock, lock
    now = props(dst, "canmount", "mounted")
    assert now["canmount"].startswith("on") and now["mounted"].startswith("yes")
    (mountpoint(dst) / "written-by-the-test").write_bytes(b"x" * 100_000)
    zfs("snapshot", f"{dst}@drill")
    row = status(config)["vm"]
    assert row["state"] == "disabled" and "failed over (test): DR drill" in row["disabled_why"]

    # replication into it refuses, naming the lock; failing over again too; the source is untouched
    before = snapshots(src)
    refused = zc.run("sync", src, dst)
    assert refused.returncode == 9 and "DR drill" in refused.error()["message"], refused.explain()
    assert snapshots(src) == before
    again = zchunk("failover", "vm", *cfg)
    assert again.returncode == 9 and "locked against replication" in again.stderr

    # --end without --yes: the plan, nothing changed
    plan = zchunk("failover", "vm", "--end", *cfg)
    assert plan.returncode == 0, plan.stderr
    assert f"{dst}@drill" in plan.stderr and "nothing changed" in plan.stderr
    assert (mountpoint(dst) / "written-by-the-test").exists() and "DR drill" in zfs("get", "-H", "-o", "value",
                                                                                       "zchunk:locked", dst)
    # with --yes: the test's writes and snapshot discarded, settings back, unlocked, the job enabled
    done = zchunk("failover", "vm", "--end", "--yes", *cfg)
    assert done.returncode == 0, done.stderr
    assert snapshots(dst) == replicated
    assert props(dst, "canmount", "readonly", "mountpoint", "mounted") == settings
    assert zfs("get", "-H", "-o", "value,source", "zchunk:locked,zchunk:failover", dst).split() == ["-", "-", "-",
                                                                                                     "-"]
    assert status(config)["vm"]["state"] == "ok"
    # and replication continues incrementally from where it was
    seeded = guid(f"{dst}@s1")
    assert zchunk("run", "vm", *cfg).returncode == 0
    assert guid(f"{dst}@s1") == seeded, "the replica was not re-seeded"
    log = (zc.state_dir / "logs" / "vm.jsonl").read_text().splitlines()
    assert '"send_kind": "incremental"' in [line for line in log if '"event": "plan"' in line][-1]
    newest = sync_snaps(src)[-1].split("@")[1]
    assert_replica(src, dst, newest)


def test_a_real_failover_is_not_ended_by_a_rollback(zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, MiB, seed=22, name="db")
    dst = f"{dst_pool.name}/db"
    assert zc.run("sync", src, dst).returncode == 0
    where = tmp_path / "mnt"
    run = zchunk("failover", dst, "--mountpoint", str(where))
    assert run.returncode == 0, run.stderr
    assert zfs("get", "-H", "-o", "value", "mountpoint", dst).strip() == str(where) and any(where.iterdir())
    (where / "production").write_bytes(b"y" * 1000)
    end = zchunk("failover", dst, "--end", "--yes")
    assert end.returncode == 2 and "zchunk failback" in end.stderr, end.stderr
    assert (where / "production").exists(), "nothing rolled back"

    # bad input: a dataset that is not there, a replica without a snapshot, a job that is not there
    assert zchunk("failover", f"{dst_pool.name}/nothing").returncode == 3
    zfs("create", f"{dst_pool.name}/empty")
    empty = zchunk("failover", f"{dst_pool.name}/empty")
    assert empty.returncode == 3 and "no snapshot" in empty.stderr
    assert zfs("get", "-H", "-o", "value", "zchunk:locked", f"{dst_pool.name}/empty").strip() == "-"
    assert zchunk("failover", "nosuchjob", "--config", str(tmp_path / "none.toml")).returncode == 16
    assert exists(dst)


def test_a_disaster_failover_then_failback_then_replication_as_before(zc: Zchunk, pools: Any,
                                                                      tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, MiB, seed=23, name="app")
    dst = f"{dst_pool.name}/app"
    config = write_jobs(tmp_path, zc, f'[jobs.app]\nsource = "{src}"\ntarget = "{dst}"\n')
    cfg = ("--config", str(config))
    assert zchunk("run", *cfg).returncode == 0
    replica_settings = props(dst, "canmount", "readonly", "mountpoint")

    # the source host is lost: the replica takes over and is written to in production
    assert zchunk("failover", "app", "--why", "node1 is down", *cfg).returncode == 0
    (mountpoint(dst) / "orders-1").write_bytes(b"o" * 300_000)
    # a test's end is not for a real failover, and a failback of a test is refused too
    assert zchunk("failover", "app", "--end", "--yes", *cfg).returncode == 2

    # node1 is back: the plan first (nothing changed), then a pass while the application still runs there
    before = (snapshots(src), snapshots(dst))
    plan = zchunk("failback", "app", *cfg)
    assert plan.returncode == 0 and "would send" in plan.stderr and "nothing changed" in plan.stderr, plan.stderr
    assert (snapshots(src), snapshots(dst)) == before
    first = zchunk("failback", "app", "--yes", *cfg)
    assert first.returncode == 0, first.stderr
    home = snapshots(dst)[-1].split("@")[1]
    assert_replica(dst, src, home)

    # the application stops on the replica; the last pass makes the source primary again
    (mountpoint(dst) / "orders-2").write_bytes(b"p" * 200_000)
    final = zchunk("failback", "app", "--final", "--yes", *cfg)
    assert final.returncode == 0 and "primary again" in final.stderr, final.stderr
    last = snapshots(dst)[-1].split("@")[1]
    assert_replica(dst, src, last)
    assert props(src, "mounted")["mounted"].startswith("yes") and (mountpoint(src) / "orders-2").exists()
    assert props(dst, "canmount", "readonly", "mountpoint") == replica_settings
    assert zfs("get", "-H", "-o", "value", "zchunk:locked", dst).strip() == "-"
    assert status(config)["app"]["state"] != "disabled", "the job is enabled again"

    # and replication runs source -> replica as before, incrementally
    (mountpoint(src) / "orders-3").write_bytes(b"q" * 100_000)
    again = zchunk("run", "app", *cfg)
    assert again.returncode == 0, again.stderr
    log = (zc.state_dir / "logs" / "app.jsonl").read_text().splitlines()
    assert '"send_kind": "incremental"' in [line for line in log if '"event": "plan"' in line][-1]
    assert_replica(src, dst, sync_snaps(src)[-1].split("@")[1])


def test_failback_of_a_test_failover_is_refused(zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, MiB, seed=24, name="t")
    dst = f"{dst_pool.name}/t"
    assert zc.run("sync", src, dst).returncode == 0
    assert zchunk("failover", dst, "--test").returncode == 0
    before = (snapshots(src), snapshots(dst))
    refused = zchunk("failback", dst, src, "--yes")
    assert refused.returncode == 2 and "failover --end" in refused.stderr, refused.stderr
    assert (snapshots(src), snapshots(dst)) == before


def test_a_failback_onto_a_rebuilt_empty_source(zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    """The source's pool was lost and rebuilt empty: the first failback pass is a full stream from the
    replica, the last one makes the new dataset primary, and the job replicates from it incrementally."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, MiB, seed=25, name="db")
    dst = f"{dst_pool.name}/db"
    config = write_jobs(tmp_path, zc, f'[jobs.db]\nsource = "{src}"\ntarget = "{dst}"\n')
    cfg = ("--config", str(config))
    assert zchunk("run", *cfg).returncode == 0
    assert zchunk("failover", "db", "--why", "node1's pool lost", *cfg).returncode == 0
    (mountpoint(dst) / "rows-1").write_bytes(b"r" * 300_000)
    for snap in sync_snaps(src):  # the pool is lost, its holds with it
        zfs("release", f"zchunk_{snap.split('@')[1].split('_')[1]}", snap)
    destroy_when_free("-r", "-f", src)  # the rebuilt pool: no such dataset

    before = snapshots(dst)
    plan = zchunk("failback", "db", *cfg)
    assert plan.returncode == 0 and "would send full" in plan.stderr, plan.stderr
    assert not exists(src) and snapshots(dst) == before
    first = zchunk("failback", "db", "--yes", *cfg)
    assert first.returncode == 0, first.stderr
    assert_replica(dst, src, snapshots(dst)[-1].split("@")[1])
    assert zfs("get", "-H", "-o", "value", "zchunk:locked", src).strip() == "-", "the lock stays on the replica"

    (mountpoint(dst) / "rows-2").write_bytes(b"s" * 200_000)
    final = zchunk("failback", "db", "--final", "--yes", *cfg)
    assert final.returncode == 0 and "primary again" in final.stderr, final.stderr
    assert_replica(dst, src, snapshots(dst)[-1].split("@")[1])
    assert (mountpoint(src) / "rows-2").read_bytes() == b"s" * 200_000

    (mountpoint(src) / "rows-3").write_bytes(b"t" * 100_000)
    again = zchunk("run", "db", *cfg)
    assert again.returncode == 0, again.stderr
    log = (zc.state_dir / "logs" / "db.jsonl").read_text().splitlines()
    assert '"send_kind": "incremental"' in [line for line in log if '"event": "plan"' in line][-1]
    assert_replica(src, dst, sync_snaps(src)[-1].split("@")[1])
