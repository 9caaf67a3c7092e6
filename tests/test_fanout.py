"""Fan-out (issue 17, item 2) on real parts: zfs-fuse pools, real sshd's (on loopback, and in two
namespaces behind their own rate-limited veths), one target unplugged for a while.

``zchunk sync SOURCE T1 T2``: one sync snapshot, one ``zfs send`` (one sender daemon: the ``sender``
named in both targets' ``stream_end``), one source spool whose chunks are hard links per target; each
target has its own session, retries, verification and holds."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.zc import Background, Run, Zchunk, kill_matching
from tests.zfsutil import add_change, assert_replica, make_source, snapshots, zfs
from zchunk import lab

pytestmark = [pytest.mark.zfs]

MiB = 1 << 20
POOL_SIZE = "1G"
ZC_SYNC_ARGS: tuple[str, ...] = ()  # replication: sync snapshots


def by_target(run: Run | list[dict[str, Any]], kind: str) -> dict[str, list[dict[str, Any]]]:
    """The ``kind`` events of each target (their ``to``)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for e in run.of(kind) if isinstance(run, Run) else [e for e in run if e["event"] == kind]:
        out.setdefault(e.get("fanout_target", ""), []).append(e)
    return out


def one_sender(run: Run, targets: list[str]) -> None:
    """Each stream of the targets came from one sender daemon that fed them all (its n-th stream_end names
    the same sender for every target), which read the stream once."""
    ends = by_target(run, "stream_end")
    assert sorted(ends) == sorted(targets), run.explain()
    counts = {len(ends[t]) for t in targets}
    assert len(counts) == 1, ends
    for i in range(counts.pop()):
        streams = [ends[t][i] for t in targets]
        senders = {e["sender"] for e in streams}
        assert len(senders) == 1 and None not in senders, f"stream {i}: one shared sender: {senders}\n{ends}"
        assert len({e["raw_bytes"] for e in streams}) == 1, streams
    groups = [e.get("fanout") for e in run.of("session")]
    assert None not in groups and len(groups) == len(targets) * len(set(groups)), groups


def wait_until_on_targets(bg: Background, targets: list[str], nbytes: int) -> None:
    """Until every target's last progress event shows ``nbytes`` on it (a fan-out run in the background)."""
    def moved() -> bool:
        got = by_target(bg.events_so_far(), "progress")
        return all(got.get(t) and got[t][-1]["on_target"] >= nbytes for t in targets)

    bg.wait_for(moved, timeout=120, what=f"{nbytes // MiB} MiB on every target")


def held_by(snapshot: str) -> int:
    return int(zfs("get", "-H", "-o", "value", "userrefs", snapshot))


def test_two_targets_share_one_stream_and_repeat(zc: Zchunk, pools: Any, sshd_local: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 16 * MiB, seed=61, compressible=0.5)
    t1, t2 = f"local:{dst_pool.name}/one", f"local:{dst_pool.name}/two"
    args = ["--chunk-size", "1M", "--spool-max", "6M", "--ssh-config", str(sshd_local.ssh_config)]
    before = snapshots(src)
    plan = zc.run("sync", src, t1, t2, *args, "--dry-run")
    assert plan.returncode == 0, plan.explain()
    assert len(plan.of("would_snapshot")) == 1 and sorted(by_target(plan, "dataset_plan")) == sorted([t1, t2])
    assert snapshots(src) == before and "one" not in zfs("list", "-H", "-o", "name"), "a dry run changes nothing"
    run = zc.run("sync", src, t1, t2, *args)
    assert run.returncode == 0, run.explain()
    assert len(run.of("snapshot")) == 1, "one sync snapshot for both targets"
    one_sender(run, [t1, t2])
    snap = snapshots(src)[-1].split("@")[1]
    for t in (t1, t2):
        assert_replica(src, t.split(":")[1], snap)
    assert held_by(f"{src}@{snap}") == 2, "each target holds its base on the source under its own tag"
    assert zc.session_dirs() == [], "the group's directory and every member's are gone"
    # again, after a change: both incremental, from one stream again; the old sync snapshot pruned
    add_change(src, 4 * MiB, seed=62, snap="s2")
    time.sleep(1.1)
    again = zc.run("sync", src, t1, t2, *args)
    assert again.returncode == 0, again.explain()
    assert {e["send_kind"] for e in again.of("plan")} == {"incremental"}, again.explain()
    one_sender(again, [t1, t2])
    newest = snapshots(src)[-1].split("@")[1]
    for t in (t1, t2):
        assert_replica(src, t.split(":")[1], newest)
    assert f"{src}@{snap}" not in snapshots(src), "the old sync snapshot is pruned once neither target needs it"
    assert held_by(f"{src}@{newest}") == 2


def test_bad_target_lists_are_refused_and_change_nothing(zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 1 * MiB, seed=63)
    before = snapshots(src)
    for targets, words in (([f"{dst_pool.name}/a", f"{dst_pool.name}/a"], "named twice"),
                           ([f"{dst_pool.name}/a", src], "also one of the TARGETs")):
        run = zc.run("sync", src, *targets)
        assert run.returncode == 2 and words in run.error()["message"], run.explain()
    run = zc.run("sync", "-r", src, f"{dst_pool.name}/a", f"{dst_pool.name}/b")
    assert run.returncode == 2 and "-r with several targets" in run.error()["message"], run.explain()
    assert snapshots(src) == before
    assert not any(n.startswith(f"{dst_pool.name}/") for n in zfs("list", "-H", "-o", "name").split())


@pytest.mark.netns
def test_one_target_unplugged_for_a_while_and_one_left_behind(zc: Zchunk, pools: Any, wan: lab.Wan,
                                                              tmp_path: Path) -> None:
    """Two namespaced targets behind their own 16 Mbit links. (1) Target two unplugged for 15 s mid-stream
    with a spool that holds the whole stream: target one keeps moving, two rides out its outage, both
    verified, one sender. (2) A change, then target two unplugged for 25 s with a 4 MiB spool and
    --detach-after 8s: one finishes, two is left behind (exit 15, "fell behind"), its base still held
    and not pruned; (3) the next run brings it up to date incrementally from its own base."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, 20 * MiB, seed=64, compressible=0.0)
    with lab.Wan() as wan2, \
            lab.Sshd(tmp_path / "sshd-one", netns=wan.dst_ns, listen=wan.dst_addr, port=22, alias="one") as one, \
            lab.Sshd(tmp_path / "sshd-two", netns=wan2.dst_ns, listen=wan2.dst_addr, port=22, alias="two") as two:
        config = tmp_path / "ssh_config"
        config.write_text(one.ssh_config.read_text() + "\n" + two.ssh_config.read_text())
        wan.rate("dst", 16)
        wan2.rate("dst", 16)
        t1, t2 = f"one:{dst_pool.name}/one", f"two:{dst_pool.name}/two"
        args = ["--chunk-size", "1M", "--ssh-config", str(config), "--patience", "10m"]

        def received(target: str) -> int:
            progress = by_target(bg.events_so_far(), "progress").get(target) or [{}]
            return int(progress[-1].get("on_target", 0))

        bg = zc.start("sync", src, t1, t2, *args, "--spool-max", "32M")
        try:
            bg.wait_for(lambda: received(t2) >= 3 * MiB, timeout=120, what="3 MiB on target two")
            unplug = threading.Thread(target=wan2.unplug, args=("dst", 15), daemon=True)
            unplug.start()
            time.sleep(2)
            at, at2 = received(t1), received(t2)
            time.sleep(8)
            assert received(t1) - at >= 4 * MiB, "target one keeps moving while two is unplugged"
            assert received(t2) - at2 < MiB, "nothing much reaches target two while it is unplugged"
            unplug.join()
            run = bg.finish()
        finally:
            bg.stop()
        assert run.returncode == 0, run.explain()
        one_sender(run, [t1, t2])
        elapsed = {o["target"]: o["streams"][0]["transfer"]["elapsed"] for o in run.of("replication")[-1]["outcomes"]}
        assert elapsed[t2] >= elapsed[t1] + 8, f"target two waited out its outage alone: {elapsed}"
        base = snapshots(src)[-1].split("@")[1]
        for t in (t1, t2):
            assert_replica(src, t.split(":")[1], base)

        add_change(src, 16 * MiB, seed=65, snap="s2")
        time.sleep(1.1)
        bg = zc.start("sync", src, t1, t2, *args, "--spool-max", "4M", "--detach-after", "8s")
        try:
            bg.wait_for(lambda: received(t2) >= 2 * MiB, timeout=120, what="2 MiB on target two")
            unplug = threading.Thread(target=wan2.unplug, args=("dst", 25), daemon=True)
            unplug.start()
            unplug.join()
            run = bg.finish()
        finally:
            bg.stop()
        assert run.returncode == 15, run.explain()
        outcomes = {o["target"]: o for o in run.of("replication")[-1]["outcomes"]}
        assert outcomes[t1]["status"] == "sent" and outcomes[t2]["status"] == "failed", outcomes
        assert "fell behind" in outcomes[t2]["error"], outcomes[t2]
        newest = snapshots(src)[-1].split("@")[1]
        assert_replica(src, t1.split(":")[1], newest)
        assert f"{src}@{base}" in snapshots(src) and held_by(f"{src}@{base}") == 1, \
            "the base of the target left behind stays, held by its tag alone"
        assert zc.session_dirs() == []

        third = zc.run("sync", src, t1, t2, *args)
        assert third.returncode == 0, third.explain()
        plans = by_target(third, "plan")
        assert plans[t2][0]["base"] == f"{src}@{base}", plans
        last = snapshots(src)[-1].split("@")[1]
        for t in (t1, t2):
            assert_replica(src, t.split(":")[1], last)
        assert f"{src}@{base}" not in snapshots(src)


def test_a_fan_out_job_runs_and_an_unreachable_target_fails_it_alone(zc: Zchunk, pools: Any,
                                                                     tmp_path: Path) -> None:
    """A job with ``targets = [...]`` run by the service's runner (``zchunk run``): the reachable target is
    replicated, the unreachable one is the job's failure (exit 15, status failed naming it)."""
    from tests.test_service import status, write_jobs, zchunk

    src_pool, dst_pool = pools
    src = make_source(src_pool, 2 * MiB, seed=66)
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(f"Host gone\n  HostName 127.0.0.1\n  Port {lab.free_port()}\n")  # nobody listens
    near, far = f"{dst_pool.name}/near", f"gone:{dst_pool.name}/far"
    config = write_jobs(tmp_path, zc, f"""
[jobs.fan]
source = "{src}"
targets = ["{near}", "{far}"]
ssh_config = "{ssh_config}"
connect_patience = "2s"
""")
    run = zchunk("run", "--config", str(config), "--json")
    assert run.returncode == 15, run.stdout[-3000:] + run.stderr
    assert_replica(src, near, snapshots(src)[-1].split("@")[1])
    row = status(config)["fan"]
    assert row["state"] == "failed" and "1 of 2 targets failed" in row["last_error"], row
    assert far in row["last_error"], row


def test_a_fan_out_outlives_its_coordinator(zc: Zchunk, pools: Any, sshd_local: lab.Sshd) -> None:
    """kill -9 of the coordinator mid-stream: the shared sender and both receivers go on; the same command
    again reattaches to both targets' sessions (no stream starts anew) and finishes them from the same
    group, then brings both to the new sync snapshot in one shared stream."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, 12 * MiB, seed=67, compressible=0.0)
    t1, t2 = f"local:{dst_pool.name}/one", f"local:{dst_pool.name}/two"
    args = ["--chunk-size", "1M", "--ssh-config", str(sshd_local.ssh_config), "--bwlimit", "2M"]
    bg = zc.start("sync", src, t1, t2, *args)
    try:
        wait_until_on_targets(bg, [t1, t2], 2 * MiB)
        first = bg.events_so_far()
        bg.kill9()
    finally:
        bg.stop()
    groups = {e["fanout"] for e in first if e["event"] == "session"}
    assert len(groups) == 1, first
    again = zc.run("sync", src, t1, t2, *args)
    assert again.returncode == 0, again.explain()
    assert sorted(by_target(again, "reattach")) == sorted([t1, t2]) and not again.of("restart"), again.explain()
    ends = by_target(again, "stream_end")
    assert {ends[t][0]["sender"].rsplit("/", 1)[1] for t in (t1, t2)} == groups, "the first run's group finished"
    one_sender(again, [t1, t2])
    newest = snapshots(src)[-1].split("@")[1]
    for t in (t1, t2):
        assert_replica(src, t.split(":")[1], newest)
    assert zc.session_dirs() == []


def test_a_fan_out_sender_killed_mid_stream_is_started_again_once(zc: Zchunk, pools: Any,
                                                                   sshd_local: lab.Sshd) -> None:
    """The shared sender daemon and its zfs send killed (as a reboot of the source would) while both
    targets' zfs receive run: the targets' engines both see it dead and ask for it again; the group's
    daemon lock lets one start happen, whose daemon runs zfs send anew, skips what it cut before and feeds
    both targets. One stream per target, both replicas verified, nothing left behind."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, 12 * MiB, seed=68, compressible=0.0)
    t1, t2 = f"local:{dst_pool.name}/one", f"local:{dst_pool.name}/two"
    args = ["--chunk-size", "1M", "--spool-max", "3M", "--ssh-config", str(sshd_local.ssh_config),
            "--bwlimit", "2M"]
    bg = zc.start("sync", src, t1, t2, *args)
    try:
        wait_until_on_targets(bg, [t1, t2], 3 * MiB)
        group = next(d for d in zc.session_dirs() if d.name.startswith("fanout-"))
        pid = int(json.loads((group / "sender.json").read_text())["pid"])
        os.killpg(os.getpgid(pid), signal.SIGKILL)  # the daemon and its zfs send (setsid'ed at its start)
        run = bg.finish()
    finally:
        bg.stop()
    assert run.returncode == 0, run.explain()
    restarts = by_target(run, "sender_restart")
    assert restarts and sum(len(r) for r in restarts.values()) <= 2, run.explain()
    assert not run.of("restart"), "no target's stream started anew"
    one_sender(run, [t1, t2])
    ends = by_target(run, "stream_end")
    assert {ends[t][0]["sender"].rsplit("/", 1)[1] for t in (t1, t2)} == {group.name}, "the killed group finished"
    snap = snapshots(src)[-1].split("@")[1]
    for t in (t1, t2):
        assert_replica(src, t.split(":")[1], snap)
    assert zc.session_dirs() == [] and kill_matching(str(zc.spool_dir) + "/") == []
