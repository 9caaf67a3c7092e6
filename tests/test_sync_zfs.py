"""zchunk sync on real zfs-fuse pools, in every mode: local, push and pull over a
real sshd on loopback, relay between two namespaced hosts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.zc import Zchunk
from tests.zfsutil import (
    add_change,
    assert_replica,
    exists,
    make_source,
    mounted,
    snapshots,
)
from zchunk import lab

pytestmark = [pytest.mark.zfs]

MiB = 1 << 20


# the shared fixtures zc and pools (conftest.py) read these
POOL_SIZE = "1G"


def combined_config(tmp_path: Path, *servers: lab.Sshd) -> Path:
    cfg = tmp_path / "ssh_config_all"
    cfg.write_text("".join(s.ssh_config.read_text() for s in servers))
    return cfg


@pytest.fixture(params=["local", "push", "pull"])
def route(request: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """How SOURCE and TARGET are written for each mode, given dataset names."""
    mode = request.param
    if mode == "local":
        yield {"mode": mode, "src": lambda d: d, "dst": lambda d: d, "args": []}
        return
    sshd = request.getfixturevalue("sshd_local")
    remote = lambda d: f"{sshd.alias}:{d}"  # noqa: E731
    yield {"mode": mode, "src": remote if mode == "pull" else (lambda d: d),
           "dst": remote if mode == "push" else (lambda d: d),
           "args": ["--ssh-config", str(sshd.ssh_config)]}


def test_full_then_incremental(zc: Zchunk, pools: tuple[lab.Pool, lab.Pool], route: dict[str, Any]) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 6 * MiB, seed=3)
    dst = f"{dst_pool.name}/replica"
    args = ["--chunk-size", "1M", *route["args"]]

    run = zc.run("sync", route["src"](src), route["dst"](dst), *args)
    assert run.returncode == 0, run.explain()
    assert_replica(src, dst, "s1")
    res = run.result()
    assert res["transfer"]["total_chunks"] >= 6
    assert run.of("plan")[0]["send_kind"] == "full"
    assert run.of("verified")[0]["guid"] == res["guid"]
    assert zc.session_dirs() == [], "session directories must be removed"
    progress = run.of("progress")
    assert progress and all(p["raw_bytes"] <= p["estimate"] for p in progress), "percent never above 100"
    for p in progress:  # the link's view: bytes on the target of those the stream will move
        assert 0 <= p["on_target"] <= p["expected"] and 0 <= p["percent"] <= 100, p
        assert p["percent"] < 100 or p["exact"], f"100 % before the total is known: {p}"
        assert p["eta_seconds"] == p["eta"] and (p["eta"] is None or p["eta"] >= 0), p
    times = [p["time"] for p in progress]
    assert all(b - a >= 0.9 for a, b in zip(times, times[1:])), f"progress at most once a second: {times}"

    add_change(src, 2 * MiB, seed=4, snap="s2")
    add_change(src, 1 * MiB, seed=5, snap="s3")
    run = zc.run("sync", route["src"](src), route["dst"](dst), *args)
    assert run.returncode == 0, run.explain()
    plan = run.of("plan")[0]
    assert plan["send_kind"] == "incremental" and plan["base"] == f"{src}@s1"
    assert plan["direct"] and run.result()["session"] is None, "3 MiB: within --direct-max, no session"
    assert_replica(src, dst, "s3")
    assert [s.split("@")[1] for s in snapshots(dst)] == ["s1", "s2", "s3"], "-I sends intermediates"

    run = zc.run("sync", route["src"](src), route["dst"](dst), *args)
    assert run.returncode == 0 and run.of("up_to_date"), run.explain()
    sessions = json.loads(zc.run("sessions", json_out=True).stdout)
    assert [s["state"] for s in sessions] == ["done"], (
        [(s["id"], s["state"], s.get("reason")) for s in sessions], run.explain())


def test_relay_between_two_remote_hosts(zc: Zchunk, pools: tuple[lab.Pool, lab.Pool], sshd_src: lab.Sshd,
                                        sshd_dst: lab.Sshd, tmp_path: Path) -> None:
    """Both hosts remote (two namespaced sshds): the data passes through the coordinator."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, 5 * MiB, seed=7)
    dst = f"{dst_pool.name}/relayed"
    cfg = combined_config(tmp_path, sshd_src, sshd_dst)
    run = zc.run("sync", f"src:{src}", f"dst:{dst}", "--chunk-size", "1M", "--ssh-config", str(cfg))
    assert run.returncode == 0, run.explain()
    assert_replica(src, dst, "s1")
    pre = run.of("preflight")[0]
    assert pre["source"]["host"] == "src" and pre["target"]["host"] == "dst"


def test_refusals_change_nothing(zc: Zchunk, pools: tuple[lab.Pool, lab.Pool]) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 1 * MiB, seed=9)
    # unknown source dataset
    run = zc.run("sync", f"{src_pool.name}/nope", f"{dst_pool.name}/x")
    assert run.returncode == 3 and "does not exist" in run.stderr, run.explain()
    # target parent missing
    run = zc.run("sync", src, f"{dst_pool.name}/no/such/parent")
    assert run.returncode == 3 and "does not exist" in run.stderr, run.explain()
    # target exists with no common snapshot
    other = make_source(dst_pool, 1 * MiB, seed=10, name="other")
    run = zc.run("sync", src, other)
    assert run.returncode == 4 and "shares no snapshot" in run.stderr, run.explain()
    assert snapshots(other) == [f"{other}@s1"]
    # a hostile name never reaches a shell
    run = zc.run("sync", src, f"{dst_pool.name}/x;touch /tmp/zchunk-canary")
    assert run.returncode == 2 and not Path("/tmp/zchunk-canary").exists(), run.explain()
    assert not exists(f"{dst_pool.name}/x")
    assert zc.session_dirs() == [] and not (zc.state_dir / "sessions").exists()


def test_receive_failure_is_reported_with_zfs_stderr(zc: Zchunk, pools: tuple[lab.Pool, lab.Pool]) -> None:
    """The replica is written to after planning, before the stream's first bytes reach zfs receive (a slow
    link: the first chunk takes seconds): zfs receive refuses ("destination ... has been modified"), and
    zchunk reports its stderr and cleans up. (Written before the run, it is refused at planning: exit 4,
    tests/test_replicate.py.) A session's: a direct stream's receive would start before anything is written."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, 2 * MiB, seed=11)
    dst = f"{dst_pool.name}/replica"
    assert zc.run("sync", src, dst).returncode == 0
    add_change(src, 1 * MiB, seed=12, snap="s2")
    bg = zc.start("sync", src, dst, "--bwlimit", "128K", "--direct-max", "0")
    try:
        bg.wait_for(lambda: zc.agent_state("receive") is not None, 120, "the receiver agent")
        with mounted(dst) as files:
            (files / "local-change").write_bytes(b"written on the replica")
        run = bg.finish()
    finally:
        bg.stop()
    assert run.returncode == 12, run.explain()
    assert "zfs receive failed" in run.stderr and "modified" in run.stderr, run.stderr
    assert snapshots(dst) == [f"{dst}@s1"] and snapshots(src) == [f"{src}@s1", f"{src}@s2"]
    assert zc.session_dirs() == []
    assert [s["state"] for s in json.loads(zc.run("sessions").stdout)] == ["failed"]  # the first: direct


def test_no_chunk_moves_twice_without_faults(zc: Zchunk, pools: tuple[lab.Pool, lab.Pool]) -> None:
    """The target's journal of stored chunks has each chunk exactly once (a status taken while the
    receiver consumed a chunk once made the coordinator move it again)."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, 24 * MiB, seed=13, compressible=0.5)
    dst = f"{dst_pool.name}/replica"
    run = zc.run("sync", src, dst, "--chunk-size", "512K", "--keep")
    assert run.returncode == 0, run.explain()
    journal = next(d for d in zc.session_dirs() if d.name.endswith("-receive")) / "chunks.log"
    stored = [int(line.split()[1]) for line in journal.read_text().splitlines()]
    assert sorted(stored) == list(range(run.result()["transfer"]["total_chunks"])), stored
    assert run.result()["transfer"]["wire_bytes"] <= sum(int(x.split()[2]) for x in journal.read_text().splitlines())


def test_verbose_names_each_hosts_zfs_features(zc: Zchunk, pools: tuple[lab.Pool, lab.Pool], tier: str) -> None:
    """`zchunk sync -v` says which ZFS each host runs and which optional features it has (issue 3, item 2)."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, 1 * MiB, seed=7)
    run = zc.run("sync", src, f"{dst_pool.name}/replica", "-v", "--dry-run", json_out=False)
    assert run.returncode == 0, run.explain()
    shown = run.stdout + run.stderr  # the text renderer writes to stderr
    lines = [line for line in shown.splitlines() if line.startswith(("source ", "target "))]
    assert len(lines) == 2, shown
    for line in lines:
        if tier == "openzfs":
            assert "OpenZFS zfs-2.3" in line and "has holds, bookmarks, resume tokens" in line, line
            assert "large blocks (-L)" in line.split("lacks")[0], line
        else:
            assert "legacy ZFS" in line and "resume tokens" in line.split("lacks")[1], line
            assert "holds" in line.split("lacks")[0], "zfs-fuse (pool v23) has user holds: " + line
    assert not exists(f"{dst_pool.name}/replica"), "a dry run changes nothing"
