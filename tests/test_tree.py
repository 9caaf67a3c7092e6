"""A whole tree in one run (sync -r) on real parts: zfs-fuse pools, a real sshd (on loopback, or behind the
namespaced WAN). Datasets run --jobs at a time under one bandwidth budget; one whose receive fails fails
alone; every stream rides out an outage of the link."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from tests.zc import Background, Zchunk
from tests.zfsutil import assert_replica, mountpoint, snapshots, zfs
from zchunk import compat, lab
from zchunk.transport import LocalHost
from zchunk.zfs import Zfs

pytestmark = [pytest.mark.zfs]

MiB = 1 << 20
ZC_SYNC_ARGS = ("--chunk-size", "1M")
POOL_SIZE = "768M"


def make_tree(root: str, count: int, size: int, seed: int = 0) -> list[str]:
    """``root`` and ``count - 1`` descendants (every fourth child has a grandchild), each with a file of
    ``size`` bytes (incompressible). Their names, parents first."""
    names = [root]
    i = 0
    while len(names) < count:
        names.append(f"{root}/c{i:02d}")
        if i % 4 == 3 and len(names) < count:
            names.append(f"{root}/c{i:02d}/g")
        i += 1
    for name in names:
        zfs("create", name)
        lab.write_dataset(mountpoint(name) / "f", size, seed=seed + len(name) + i, compressible_fraction=0.0)
    return names


def newest(dataset: str) -> str:
    return snapshots(dataset)[-1].split("@", 1)[1]


def test_fifty_datasets_four_at_a_time_and_one_whose_receive_fails(zc: Zchunk, pools: Any,
                                                                   sshd_local: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    root = f"{src_pool.name}/big"
    names = make_tree(root, 50, 32 << 10)
    dst = f"{dst_pool.name}/big"
    where = f"local:{dst}"
    ssh = ("--ssh-config", str(sshd_local.ssh_config))
    # every stream through a session here (32 KiB datasets would go without: --direct-max, below)
    run = zc.run("sync", "-r", root, where, *ssh, "--jobs", "4", "--identifier", "big", "--direct-max", "0")
    assert run.returncode == 0, run.explain()
    done = run.of("dataset_done")
    assert len(done) == 50 and {e["status"] for e in done} == {"sent"}
    assert [e["done"] for e in done] == list(range(1, 51)) and {e["total"] for e in done} == {50}
    starts = {e["dataset"]: e["time"] for e in run.of("session")}
    ends = {e["source"]: e["time"] for e in done}
    overlapping = max(sum(starts[n] <= starts[m] < ends[n] for n in starts) for m in starts)
    assert overlapping >= 2, "datasets ran one after another"
    assert all(starts[n] >= ends[n.rsplit("/", 1)[0]] for n in names[1:]), "a child before its parent existed"
    assert len({newest(n) for n in names}) == 1
    # the agent program went to the target once for the 50 streams (the source is this machine, whose
    # agent is the coordinator's own module), and every stream's agents imported it
    assert [e["host"] for e in run.of("agent_program")] == ["local"], run.of("agent_program")
    assert len(run.of("session")) == 50
    # the target's serve processes each served one stream after another: the 50 streams took a channel
    # an earlier one left far more often than they started one
    (channels,) = run.of("channels")
    assert channels["host"] == "local" and channels["attached"] >= 50 and channels["started"] <= 20, channels
    # zfs-fuse has no receive -u: the 50 new replicas' canmount=noauto is one command at the run's end
    noauto = [e["detail"] for e in run.of("note") if "receive -u" in e["detail"]]
    assert len(noauto) == 1 and "50 new replica(s)" in noauto[0], noauto
    assert {zfs("get", "-H", "-o", "value", "canmount", dst + n[len(root):]).strip() for n in names} == {"noauto"}

    # one replica cannot take more: its receive fails (out of space), the 49 others go on. Every stream is
    # small enough to go without a session; the failed one is sent again through one, which says why
    victim = names[7]
    zfs("set", "quota=1M", dst + victim[len(root):])
    lab.write_dataset(mountpoint(victim) / "big", 2 * MiB, seed=99, compressible_fraction=0.0)
    for name in names[::5]:
        lab.write_dataset(mountpoint(name) / "more", 16 << 10, seed=7, compressible_fraction=0.0)
    run = zc.run("sync", "-r", root, where, *ssh, "--jobs", "4", "--identifier", "big")
    assert run.returncode == 15, run.explain()
    assert "1 of 50 datasets failed" in run.stderr and victim in run.stderr
    failed = run.of("dataset_failed")
    assert [e["source"] for e in failed] == [victim] and "space" in failed[0]["error"], failed
    assert len([p for p in run.of("plan") if p.get("direct")]) == 50
    assert [e["dataset"] for e in run.of("session")] == [victim], "a session for the failed direct stream only"
    statuses = {e["source"]: e["status"] for e in run.of("dataset_done")}
    assert statuses.pop(victim) == "failed" and set(statuses.values()) == {"sent"} and len(statuses) == 49
    short = newest(root)
    for name in names:
        if name != victim:
            assert_replica(name, dst + name[len(root):], short)
    assert short in [s.split("@")[1] for s in snapshots(victim)], \
        "the failed dataset's share of the tree snapshot stays (its stream started: a later run may need it)"


def test_session_streams_end_one_at_a_time_on_a_zfs_without_receive_u(zc: Zchunk, pools: Any,
                                                                       sshd_local: lab.Sshd) -> None:
    """zfs-fuse mounts what it received as zfs receive ends, and can lose a mount made at the same moment as
    another (docs/reliability.md). A receiving agent holds back the stream's end until the coordinator's
    finish, then feeds it, closes and waits under the spool base's ``.mount.lock``: the ends of a run's
    session streams, each in its own daemon, come one after another while their bytes move together."""
    src_pool, dst_pool = pools
    root = f"{src_pool.name}/ends"
    names = make_tree(root, 8, 256 << 10)
    dst = f"{dst_pool.name}/ends"
    run = zc.run("sync", "-r", root, f"local:{dst}", "--ssh-config", str(sshd_local.ssh_config), "--jobs", "4",
                 "--identifier", "ends", "--direct-max", "0", "--keep")
    assert run.returncode == 0, run.explain()
    starts = {e["dataset"]: e["time"] for e in run.of("session")}
    ends = {e["source"]: e["time"] for e in run.of("dataset_done")}
    assert len(starts) == 8 and max(sum(starts[n] <= starts[m] < ends[n] for n in starts) for m in starts) >= 2, \
        "the sessions ran one after another: nothing for the lock to order"
    kept = [json.loads(p.read_text()) for p in zc.spool_dir.glob("*/receiver.json")]
    spans = sorted(tuple(r["mount_end"]) for r in kept)
    assert len(spans) == 8 and all(r["state"] == "done" for r in kept), kept
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans
    assert (zc.spool_dir / ".mount.lock").is_file()
    short = newest(root)
    for name in names:
        assert_replica(name, dst + name[len(root):], short)


def test_the_source_trees_stream_properties_come_in_one_command_on_zfs_fuse(pools: Any) -> None:
    """zfs-fuse refuses a ``zfs get`` whose list names ``dnodesize`` (it has none): the tree's properties are
    asked again without it, so a tree run needs no ``zfs get`` per dataset, and the ZPL version is known."""
    src_pool, _ = pools
    root = f"{src_pool.name}/props"
    names = make_tree(root, 4, 4096)
    props = asyncio.run(compat.tree_props(Zfs(LocalHost()), root))
    assert set(props) == set(names), props
    assert all(p["type"] == "filesystem" and p["version"].isdigit() and "dnodesize" not in p
               for p in props.values()), props


def _wire(events: list[dict[str, Any]]) -> int:
    """Bytes the run's streams put on the link so far: each dataset's newest progress."""
    last: dict[str, int] = {}
    for e in events:
        if e["event"] == "progress":
            last[e["dataset"]] = int(e["wire_bytes"])
    return sum(last.values())


@pytest.mark.netns
def test_jobs_share_one_bandwidth_limit_and_ride_out_an_outage(zc: Zchunk, pools: Any, wan: lab.Wan,
                                                               sshd_dst: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    root = f"{src_pool.name}/t"
    names = make_tree(root, 5, 4 * MiB)
    dst = f"{dst_pool.name}/t"
    wan.rate("dst", 100)
    bg: Background = zc.start("sync", "-r", root, f"dst:{dst}", "--jobs", "3", "--bwlimit", "1M",
                              "--ssh-config", str(sshd_dst.ssh_config), "--identifier", "tj")
    try:
        bg.wait_for(lambda: len({e.get("dataset") for e in bg.events_so_far() if e["event"] == "progress"}) >= 3
                    and _wire(bg.events_so_far()) > MiB, 120, "three datasets moving")
        t0, w0 = time.monotonic(), _wire(bg.events_so_far())
        time.sleep(8)
        rate = (_wire(bg.events_so_far()) - w0) / (time.monotonic() - t0)
        assert rate <= 1.05 * MiB + 2 * MiB / 8, f"{rate / MiB:.2f} MiB/s for three streams under --bwlimit 1M"
        wan.outage("dst", 22, 10)  # every connection to the target reset, for 10 s
        run = bg.finish(600)
    finally:
        bg.stop()
    assert run.returncode == 0, run.explain()
    downs = {e["dataset"] for e in run.of("link_down")}
    assert len(downs) >= 2, f"the outage was seen by the moving streams: {downs}"
    assert {e["source"]: e["status"] for e in run.of("dataset_done")} == {n: "sent" for n in names}
    for name in names:
        assert_replica(name, dst + name[len(root):], newest(root))
