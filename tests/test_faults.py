"""Faults on real parts: zfs-fuse pools, a real sshd in a namespace behind a
rate-limited veth (the WAN), connection resets, an unplugged NIC, a killed
coordinator, a corrupted chunk, a small spool, hosts missing python3 or zfs."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.zc import Zchunk, kill_matching
from tests.zfsutil import add_change, assert_replica, exists, make_source, snapshots, wait_until
from zchunk import lab

pytestmark = [pytest.mark.zfs, pytest.mark.netns]

MiB = 1 << 20


# the shared fixtures zc and pools (conftest.py) read these
POOL_SIZE = "1G"


def received(zc: Zchunk) -> int:
    st = zc.agent_state("receive") or {}
    return int(st.get("raw_bytes", 0))


def chunks_received(zc: Zchunk) -> int:
    st = zc.agent_state("receive") or {}
    return int(st.get("next_seq", 0))


def in_thread(fn: Any, *args: Any) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def push_args(sshd: lab.Sshd, *extra: str) -> list[str]:
    return ["--chunk-size", "1M", "--ssh-config", str(sshd.ssh_config), "--patience", "10m", *extra]


@pytest.mark.slow
def test_survives_three_connection_killing_outages(zc: Zchunk, pools: Any, wan: lab.Wan,
                                                   sshd_dst: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 40 * MiB, seed=21, compressible=0.0)
    dst = f"{dst_pool.name}/replica"
    wan.rate("dst", 24)
    bg = zc.start("sync", src, f"dst:{dst}", *push_args(sshd_dst))
    try:
        for i in range(1, 4):
            bg.wait_for(lambda n=i * 8 * MiB: received(zc) >= n, timeout=180, what=f"{i * 8} MiB")
            wan.outage("dst", 22, 4)  # tcp-reset on the sshd port: live connections die too
        run = bg.finish()
    finally:
        bg.stop()
    assert run.returncode == 0, run.explain()
    assert_replica(src, dst, "s1")
    downs, ups = run.of("link_down"), run.of("link_up")
    assert len(downs) >= 3 and len(ups) >= 3, run.kinds()
    assert run.of("retrying"), "a visible retrying state is reported"
    assert run.result()["transfer"]["outages"] >= 3


@pytest.mark.slow
def test_survives_unplugged_nic_for_60s(zc: Zchunk, pools: Any, wan: lab.Wan, sshd_dst: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 24 * MiB, seed=22, compressible=0.0)
    dst = f"{dst_pool.name}/replica"
    wan.rate("dst", 24)
    bg = zc.start("sync", src, f"dst:{dst}", *push_args(sshd_dst))
    try:
        bg.wait_for(lambda: received(zc) >= 6 * MiB, timeout=120, what="6 MiB received")
        at = received(zc)
        t = in_thread(wan.unplug, "dst", 60)
        time.sleep(30)
        assert received(zc) - at < 4 * MiB, "nothing much can arrive while the NIC is down"
        t.join()
        run = bg.finish()
    finally:
        bg.stop()
    assert run.returncode == 0, run.explain()
    assert_replica(src, dst, "s1")
    outage = sum(e["outage"] for e in run.of("link_up"))
    assert outage >= 30, f"outage reported {outage}s: {run.of('link_up')}"


def test_coordinator_kill9_then_rerun_and_resume(zc: Zchunk, pools: Any, wan: lab.Wan,
                                                 sshd_dst: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 24 * MiB, seed=23, compressible=0.0)
    dst = f"{dst_pool.name}/replica"
    wan.rate("dst", 24)
    args = ["sync", src, f"dst:{dst}", *push_args(sshd_dst)]
    bg = zc.start(*args)
    bg.wait_for(lambda: chunks_received(zc) >= 4, timeout=120, what="4 chunks received")
    bg.kill9()
    sid = json.loads(zc.run("sessions").stdout)[0]["id"]
    assert len(zc.session_dirs()) == 2, "the agents and their spools outlive the coordinator"
    # 1. the same command again reattaches
    bg = zc.start(*args)
    try:
        bg.wait_for(lambda: any(e["event"] == "reattach" for e in bg.events_so_far()), timeout=60,
                    what="reattach")
        at = chunks_received(zc)
        bg.wait_for(lambda: chunks_received(zc) >= at + 4, timeout=120, what="4 more chunks")
        bg.kill9()
    finally:
        bg.stop()
    # 2. zchunk resume ID (keeping the directories to read the target's journal)
    run = zc.run("resume", sid, "--ssh-config", str(sshd_dst.ssh_config), "--keep")
    assert run.returncode == 0, run.explain()
    assert_replica(src, dst, "s1")
    target_dir = next(d for d in zc.session_dirs() if d.name.endswith("-receive"))
    stored = [int(line.split()[1]) for line in (target_dir / "chunks.log").read_text().splitlines()]
    assert len(stored) == len(set(stored)), f"a chunk moved twice: {sorted(stored)}"
    assert sorted(stored) == list(range(run.result()["transfer"]["total_chunks"]))
    sessions = json.loads(zc.run("sessions").stdout)
    assert [s["state"] for s in sessions] == ["done"]


def test_corrupted_chunk_on_target_spool_is_moved_again(zc: Zchunk, pools: Any, sshd_local: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 12 * MiB, seed=24, compressible=0.0)
    dst = f"{dst_pool.name}/replica"
    bg = zc.start("sync", src, f"local:{dst}", "--chunk-size", "1M", "--ssh-config", str(sshd_local.ssh_config))
    try:
        wait_until(lambda: (zc.agent_state("receive") or {}).get("pid"), 60, "receiver daemon")
        pid = int(zc.agent_state("receive")["pid"])  # type: ignore[index]
        os.kill(pid, signal.SIGSTOP)
        try:
            chunks = lambda: sorted(next(d for d in zc.session_dirs() if d.name.endswith("-receive"))  # noqa: E731
                                    .joinpath("chunks").glob("*.chunk"))
            # The stopped receiver may hold the lowest chunks already: one being fed (a fed chunk's file goes
            # only after its progress is saved), one verified and handed over, one being verified. A chunk
            # above those has not been read yet, so its damage must be found by verification.
            wait_until(lambda: len(chunks()) >= 4, 60, "four chunks in the target spool")
            victim = chunks()[-1]
            data = bytearray(victim.read_bytes())
            data[200] ^= 0xFF
            victim.write_bytes(bytes(data))
        finally:
            os.kill(pid, signal.SIGCONT)
        run = bg.finish()
    finally:
        bg.stop()
    assert run.returncode == 0, run.explain()
    assert_replica(src, dst, "s1")
    discarded = run.of("chunk_discarded")
    assert discarded and int(victim.name.split(".")[0]) == int(
        discarded[0]["detail"].split()[1]), discarded
    assert run.result()["transfer"]["discarded_chunks"] == 1


def test_spool_cap_smaller_than_stream(zc: Zchunk, pools: Any, wan: lab.Wan, sshd_dst: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 20 * MiB, seed=25, compressible=0.0)
    dst = f"{dst_pool.name}/replica"
    wan.rate("dst", 40)
    cap = 3 * MiB
    peak = {"send": 0, "receive": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for d in zc.session_dirs():
                role = d.name.rsplit("-", 1)[-1]
                try:
                    size = sum(f.stat().st_size for f in (d / "chunks").iterdir())
                except OSError:
                    continue
                peak[role] = max(peak.get(role, 0), size)
            time.sleep(0.01)

    t = in_thread(sample)
    try:
        run = zc.run("sync", src, f"dst:{dst}", *push_args(sshd_dst, "--spool-max", "3M"))
    finally:
        stop.set()
        t.join()
    assert run.returncode == 0, run.explain()
    assert_replica(src, dst, "s1")
    assert run.result()["transfer"]["total_chunks"] >= 20
    assert 2 * MiB <= peak["send"] <= cap, f"source spool peak {peak['send']} (cap {cap})"
    assert peak["receive"] <= cap, f"target spool peak {peak['receive']} (cap {cap})"


@pytest.mark.parametrize("missing,code,text", [("python3", 6, "python3 not found"),
                                               ("zfs", 6, "zfs command not found")])
def test_host_missing_a_program(zc: Zchunk, pools: Any, sshd_local: lab.Sshd, missing: str, code: int,
                                text: str) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 1 * MiB, seed=26)
    path = sshd_local.path_without(missing)
    sshd_local.add_key("no" + missing.replace("3", ""), options=f'environment="PATH={path}"')
    alias = sshd_local.key_alias("no" + missing.replace("3", ""))
    for source, target in ((src, f"{alias}:{dst_pool.name}/r"), (f"{alias}:{src}", f"{dst_pool.name}/r")):
        run = zc.run("sync", source, target, "--ssh-config", str(sshd_local.ssh_config))
        assert run.returncode == code, run.explain()
        assert text in run.stderr and alias in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 2, "one line of error, one of fix"
        assert not exists(f"{dst_pool.name}/r")
        assert zc.session_dirs() == [] and not (zc.state_dir / "sessions").exists()


def test_unreachable_host_is_a_clear_error(zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 1 * MiB, seed=27)
    port = lab.free_port()
    run = zc.run("sync", src, f"127.0.0.1:{dst_pool.name}/r", "--ssh-port", str(port), "--connect-patience", "2s")
    assert run.returncode == 5 and "cannot reach 127.0.0.1" in run.stderr, run.explain()
    assert zc.session_dirs() == []


def test_abort_stops_agents_and_removes_everything(zc: Zchunk, pools: Any, wan: lab.Wan,
                                                   sshd_dst: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 16 * MiB, seed=28, compressible=0.0)
    dst = f"{dst_pool.name}/replica"
    wan.rate("dst", 16)
    bg = zc.start("sync", src, f"dst:{dst}", *push_args(sshd_dst))
    bg.wait_for(lambda: chunks_received(zc) >= 2, timeout=120, what="2 chunks")
    bg.kill9()
    sid = json.loads(zc.run("sessions").stdout)[0]["id"]
    run = zc.run("abort", sid, "--ssh-config", str(sshd_dst.ssh_config))
    assert run.returncode == 0, run.explain()
    assert zc.session_dirs() == []
    assert kill_matching(str(zc.spool_dir)) == [], "no agent process may survive an abort"
    wait_until(lambda: not exists(dst), 30, "the partial receive to go away")
    assert [s["state"] for s in json.loads(zc.run("sessions").stdout)] == ["aborted"]


def test_patience_exhausted_leaves_a_resumable_session(zc: Zchunk, pools: Any, wan: lab.Wan,
                                                       sshd_dst: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 12 * MiB, seed=29, compressible=0.0)
    dst = f"{dst_pool.name}/replica"
    wan.rate("dst", 16)
    bg = zc.start("sync", src, f"dst:{dst}", "--chunk-size", "1M", "--ssh-config", str(sshd_dst.ssh_config),
                  "--patience", "6s")
    try:
        bg.wait_for(lambda: chunks_received(zc) >= 2, timeout=60, what="2 chunks")
        wan.reset_port("dst", 22, True)
        run = bg.finish(timeout=120)
    finally:
        wan.reset_port("dst", 22, False)
        bg.stop()
    assert run.returncode == 11, run.explain()
    assert "no progress for" in run.stderr and "zchunk resume" in run.stderr, run.stderr
    sid = json.loads(zc.run("sessions").stdout)[0]["id"]
    assert len(zc.session_dirs()) == 2, "agents and spools stay for a resume"
    run = zc.run("resume", sid)
    assert run.returncode == 0, run.explain()
    assert_replica(src, dst, "s1")
    assert zc.session_dirs() == []


def test_rides_through_name_resolution_failures(zc: Zchunk, pools: Any, wan: lab.Wan, sshd_dst: lab.Sshd) -> None:
    """The link drops and, while it is down, the host name stops resolving (a DNS outage)."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, 12 * MiB, seed=30, compressible=0.0)
    dst = f"{dst_pool.name}/replica"
    wan.rate("dst", 16)
    cfg = sshd_dst.ssh_config
    good = cfg.read_text()
    bg = zc.start("sync", src, f"dst:{dst}", *push_args(sshd_dst))
    try:
        bg.wait_for(lambda: chunks_received(zc) >= 2, timeout=60, what="2 chunks")
        cfg.write_text(good.replace(f"HostName {sshd_dst.host}", "HostName no-such-host.invalid"))
        wan.outage("dst", 22, 1)
        time.sleep(6)
        cfg.write_text(good)
        run = bg.finish()
    finally:
        cfg.write_text(good)
        bg.stop()
    assert run.returncode == 0, run.explain()
    assert_replica(src, dst, "s1")
    reasons = " ".join(str(e.get("reason", "")) for e in run.of("retrying") + run.of("link_down"))
    assert "name resolution" in reasons or "Name or service" in reasons, reasons


def test_agents_exit_after_idle_timeout(zc: Zchunk, pools: Any, wan: lab.Wan, sshd_dst: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 12 * MiB, seed=31, compressible=0.0)
    dst = f"{dst_pool.name}/replica"
    wan.rate("dst", 8)
    bg = zc.start("sync", src, f"dst:{dst}", *push_args(sshd_dst, "--agent-idle-timeout", "4s",
                                                        "--spool-max", "2M"))
    bg.wait_for(lambda: chunks_received(zc) >= 1, timeout=60, what="a chunk")
    bg.kill9()
    wait_until(lambda: all((zc.agent_state(r) or {}).get("state") == "aborted" for r in ("send", "receive")),
               60, "both agents to give up")
    assert "no coordinator contact" in (zc.agent_state("send") or {}).get("reason", "")
    wait_until(lambda: kill_matching(str(zc.spool_dir) + "/") == [], 10, "agent processes to exit")
    wait_until(lambda: not exists(dst), 30, "the partial receive to be gone")


def test_second_run_on_the_same_target_refuses_and_a_dead_runs_lock_is_taken_over(
        zc: Zchunk, pools: Any, wan: lab.Wan, sshd_dst: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 12 * MiB, seed=32, compressible=0.0)
    dst = f"{dst_pool.name}/replica"
    wan.rate("dst", 12)
    args = ["sync", src, f"dst:{dst}", *push_args(sshd_dst)]
    bg = zc.start(*args)
    try:
        bg.wait_for(lambda: chunks_received(zc) >= 1, timeout=60, what="a chunk")
        second = zc.run(*args)
        assert second.returncode == 9, second.explain()
        assert "already being replicated by session" in second.stderr and f"pid {bg.proc.pid}" in second.stderr
        bg.kill9()
    finally:
        bg.stop()
    run = zc.run(*args)  # the dead run's lock is free again (flock), its session is reattached
    assert run.returncode == 0, run.explain()
    assert run.of("reattach")
    assert_replica(src, dst, "s1")


def test_the_source_side_killed_mid_stream_regenerates_and_resends_at_most_a_chunk(
        zc: Zchunk, pools: Any, wan: lab.Wan, sshd_dst: lab.Sshd) -> None:
    """Issue 17, item 3, on zfs-fuse (no resume tokens): everything zchunk runs on the source (the sender
    daemon, its zfs send, the serve processes) killed as a reboot would, while zfs receive still runs. The
    sender is started again, runs zfs send anew, checks each chunk it cut before by its raw checksum and
    skips it; the same zfs receive gets the rest. Bytes on the wire: at most one chunk more than the
    stream's chunks (the engine's own counter)."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, 12 * MiB, seed=33, compressible=0.0)
    dst = f"{dst_pool.name}/replica"
    wan.rate("dst", 16)
    bg = zc.start("sync", src, f"dst:{dst}", *push_args(sshd_dst, "--spool-max", "2M"))
    try:
        bg.wait_for(lambda: chunks_received(zc) >= 7, timeout=90, what="7 chunks fed to zfs receive")
        send_dir = next(d for d in zc.session_dirs() if d.name.endswith("-send"))
        # the daemon and its zfs send: its process group (setsid'ed when it was started)
        os.killpg(os.getpgid(int((zc.agent_state("send") or {})["pid"])), signal.SIGKILL)
        kill_matching(str(send_dir))  # and the source's serve processes
        run = bg.finish()
    finally:
        bg.stop()
    assert run.returncode == 0, run.explain()
    assert len(run.of("sender_restart")) == 1 and not run.of("restart"), run.explain()
    assert_replica(src, dst, "s1")
    t = run.result()["transfer"]
    chunk_bytes = t["raw_bytes"] + 60 * t["total_chunks"]  # incompressible: stored as it is, plus headers
    assert t["wire_bytes"] <= chunk_bytes + MiB + 60, f"{t['wire_bytes'] - chunk_bytes} bytes more than the stream"
    assert zc.session_dirs() == [] and kill_matching(str(zc.spool_dir) + "/") == []


def test_leftovers_of_a_dead_run_are_found_and_cleaned(zc: Zchunk, pools: Any, sshd_local: lab.Sshd,
                                                       tmp_path: Path) -> None:
    """Another coordinator (its own state dir) died along with its agents: its directory is cleaned."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, 8 * MiB, seed=34, compressible=0.0)
    dst = f"{dst_pool.name}/replica"
    (tmp_path / "other-coordinator").mkdir()
    other = Zchunk(tmp_path / "other-coordinator", sync_args=("--no-sync-snap",))
    other.spool_dir = zc.spool_dir
    bg = other.start("sync", src, f"local:{dst}", "--chunk-size", "1M", "--spool-max", "2M",
                     "--bwlimit", "2M", "--ssh-config", str(sshd_local.ssh_config))  # not done when killed
    bg.wait_for(lambda: chunks_received(zc) >= 1, timeout=60, what="a chunk")
    bg.kill9()
    kill_matching(str(zc.spool_dir) + "/")  # the agents die too (e.g. the hosts rebooted)
    assert len(zc.session_dirs()) == 2
    run = zc.run("sync", src, f"local:{dst}", "--chunk-size", "1M", "--ssh-config", str(sshd_local.ssh_config))
    assert run.returncode == 0, run.explain()
    assert run.of("stale_cleaned")
    assert_replica(src, dst, "s1")


def test_replication_steps_ride_through_a_flapping_link(zc: Zchunk, pools: Any, wan: lab.Wan,
                                                       sshd_dst: lab.Sshd, tmp_path: Path) -> None:
    """Not only chunk moves: planning, holds, unmount, guid checks and pruning also retry through outages."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, 4 * MiB, seed=35, compressible=0.0)
    dst = f"{dst_pool.name}/replica"
    wan.rate("dst", 16)
    replication = Zchunk(tmp_path / "repl", sync_args=())
    (tmp_path / "repl").mkdir()
    args = ["sync", src, f"dst:{dst}", "--chunk-size", "1M", "--ssh-config", str(sshd_dst.ssh_config),
            "--patience", "5m"]
    assert replication.run(*args).returncode == 0
    stop = threading.Event()

    def flap() -> None:
        while not stop.wait(2.5):
            wan.outage("dst", 22, 1.5)

    for i in range(2):
        add_change(src, MiB, seed=36 + i, snap=f"c{i}")
        t = in_thread(flap)
        try:
            run = replication.run(*args)
        finally:
            stop.set()
            t.join()
            stop.clear()
        assert run.returncode == 0, run.explain()
        newest = [s for s in snapshots(src) if "@zchunk_" in s][-1].split("@")[1]
        assert_replica(src, dst, newest)
    kill_matching(str(replication.spool_dir))
