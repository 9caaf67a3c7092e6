"""Concurrency gap (issue 5, item 6): a second coordinator that does not share the first one's state.

tests/test_faults.py covers a second run from the same state directory (the
target lock, an flock) and a dead run's leftovers. Two coordinators with their
own state directories (two admins, two machines) share no lock: the second one
must still refuse, from what the target host itself says (a live receiver
agent for that dataset in the spool directory), and change nothing.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.zc import Run, Zchunk, kill_matching
from tests.zfsutil import add_change, assert_replica, make_source, quiet_target_pool, snapshots, zfs
from zchunk import lab

pytestmark = [pytest.mark.zfs]

MiB = 1 << 20


@pytest.fixture
def coordinators(tmp_path: Path, pool_factory: Any) -> Iterator[tuple[Zchunk, Zchunk]]:
    first = Zchunk(tmp_path / "first", sync_args=("--no-sync-snap",))
    second = Zchunk(tmp_path / "second")  # a plain `zchunk sync`: it would take a sync snapshot
    for z in (first, second):
        z.workdir.mkdir()
        z.spool_dir = tmp_path / "spool"  # the same hosts, the same (default-like) spool directory
    yield first, second
    kill_matching(str(first.spool_dir))


@dataclass
class Outcome:
    second: Run  # the refused run
    snapshots_before: list[str]
    snapshots_after_refusal: list[str]
    live_dirs_untouched: bool
    receiver_pid: Any


def second_run_during_first(first: Zchunk, second: Zchunk, pool_factory: Any, sshd_local: lab.Sshd,
                            kind: str) -> Outcome:
    """The first coordinator receives a full or incremental stream; the second runs the same sync meanwhile.
    The first must then complete as if nothing happened."""
    src_pool, dst_pool = pool_factory(size="512M"), pool_factory(size="512M")
    quiet_target_pool(dst_pool)
    dst = f"{dst_pool.name}/replica"
    # --bwlimit: the first run is still moving when the second one has been refused, on any machine
    args = ["sync", "--chunk-size", "256K", "--spool-max", "1M", "--parallel", "1", "--bwlimit", "2M",
            "--ssh-config", str(sshd_local.ssh_config)]
    if kind == "full":
        src = make_source(src_pool, 16 * MiB, seed=81, compressible=0.0)
        snap = "s1"
    else:
        src = make_source(src_pool, 1 * MiB, seed=81, compressible=0.0)
        assert first.run(*args, src, f"local:{dst}").returncode == 0
        add_change(src, 16 * MiB, seed=82, snap="s2")
        snap = "s2"
    args += [src, f"local:{dst}"]
    before = snapshots(src)
    bg = first.start(*args)
    try:
        bg.wait_for(lambda: int((first.agent_state("receive") or {}).get("next_seq", 0)) >= 2, 60, "2 chunks")
        dirs = first.session_dirs()
        receiver_pid = (first.agent_state("receive") or {}).get("pid")
        run = second.run(*args)
        outcome = Outcome(run, before, snapshots(src), first.session_dirs() == dirs, receiver_pid)
        assert bg.proc.poll() is None, "the live run goes on"
        first_run = bg.finish()
    finally:
        bg.stop()
    assert first_run.returncode == 0, first_run.explain()
    assert_replica(src, dst, snap)
    assert zfs("list", "-H", "-o", "name", "-r", dst_pool.name).split() == [dst_pool.name, dst]
    return outcome


@pytest.mark.parametrize("kind", ["full", "incremental"])
def test_a_coordinator_with_its_own_state_refuses_a_target_another_one_is_receiving(
        coordinators: tuple[Zchunk, Zchunk], pool_factory: Any, sshd_local: lab.Sshd, kind: str) -> None:
    out = second_run_during_first(*coordinators, pool_factory, sshd_local, kind)
    run = out.second
    assert run.returncode == 9, run.explain()
    error = [line for line in run.stderr.splitlines() if line.startswith("zchunk: error:")]
    assert len(error) == 1 and "already being replicated by session" in error[0], run.stderr
    assert f"pid {out.receiver_pid}" in error[0], "names the live agent's pid"
    assert out.live_dirs_untouched, "the refused run touched nothing of the live session"


@pytest.mark.parametrize("kind", ["full", "incremental"])
def test_a_refused_second_coordinator_takes_no_snapshot(coordinators: tuple[Zchunk, Zchunk], pool_factory: Any,
                                                       sshd_local: lab.Sshd, kind: str) -> None:
    out = second_run_during_first(*coordinators, pool_factory, sshd_local, kind)
    assert out.second.returncode != 0
    assert out.snapshots_after_refusal == out.snapshots_before, "a refused run takes no snapshot"


# -- a coordinator killed between installing an agent and recording it -----------------------------


def orphan(spool: Path, name: str, role: str, dataset: str, idle: float) -> Path:
    """A session directory installed exactly as zchunk.client.HostAgent.install does, whose daemon never started
    and whose coordinator never recorded it (killed in between); heartbeat ``idle`` seconds old."""
    import json
    import os
    import sys

    from zchunk import agent

    cfg: dict[str, Any] = {"id": name, "role": role, "codec": "zlib", "level": None, "checksum": "blake2b-128",
                           "chunk_size": 1 << 20, "spool_max": 4 << 20, "idle_timeout": 86400}
    if role == "receive":
        cfg["receive"] = {"target": dataset, "flags": []}
    else:
        cfg["send"] = {"snapshot": dataset + "@s1", "base": None, "intermediates": True, "flags": []}
    p = subprocess.run([sys.executable, "-c", agent.BOOTSTRAP, "install", str(spool), f"{name}-{role}",
                        json.dumps(cfg)], input=Path(agent.__file__).read_bytes(), capture_output=True, timeout=60)
    path = Path(json.loads(p.stdout)["path"])
    then = time.time() - idle
    os.utime(path / "heartbeat", (then, then))
    return path


def test_an_orphaned_session_directory_does_not_block_the_target(tmp_path: Path, pool_factory: Any,
                                                                 sshd_local: lab.Sshd) -> None:
    """Its daemon never wrote a state: after a minute without contact it is dead, cleaned by the next run
    (it used to look "starting" forever, so every later run refused: "already being replicated (pid None)")."""
    zc = Zchunk(tmp_path, sync_args=("--no-sync-snap",))
    src_pool, dst_pool = pool_factory(size="256M"), pool_factory(size="256M")
    quiet_target_pool(dst_pool)
    src = make_source(src_pool, 2 * MiB, seed=83)
    dst = f"{dst_pool.name}/replica"
    left = orphan(zc.spool_dir, "20250101T000000Z-0bad0bad", "receive", dst, idle=300)
    try:
        run = zc.run("sync", src, f"local:{dst}", "--chunk-size", "256K", "--ssh-config", str(sshd_local.ssh_config))
        assert run.returncode == 0, run.explain()
        assert [e["path"] for e in run.of("stale_cleaned")] == [str(left)]
        assert_replica(src, dst, "s1")
        assert zc.session_dirs() == []
    finally:
        kill_matching(str(zc.spool_dir))


def killed_while_installing(zc: Zchunk, sshd: lab.Sshd, src: str, dst: str, sid: str, state: str = "starting",
                            roles: tuple[str, ...] = ("receive", "send")) -> list[Path]:
    """A session of ``zc``'s state as a coordinator killed between install and recording leaves it: the
    record (no directory in it) and the directories install made on the hosts, their daemons never started."""
    from zchunk.session import SessionRecord, StateStore

    rec = SessionRecord(id=sid, source=src, target=f"local:{dst}", snapshot=f"{src}@s1", snapshot_guid=1, base=None,
                        target_dataset=dst, source_dir="", target_dir="", spool_base=str(zc.spool_dir),
                        codec="zlib", checksum="blake2b-128", chunk_size=1 << 20, spool_max=4 << 20, estimate=0,
                        ssh={"config": str(sshd.ssh_config), "key": None, "port": None, "options": {}},
                        state=state)
    StateStore(zc.state_dir).save(rec)
    return [orphan(zc.spool_dir, sid, role, dst if role == "receive" else src, idle=0) for role in roles]


def test_abort_removes_the_directories_of_a_session_killed_while_installing(tmp_path: Path, pool_factory: Any,
                                                                          sshd_local: lab.Sshd) -> None:
    zc = Zchunk(tmp_path, sync_args=("--no-sync-snap",))
    src_pool, dst_pool = pool_factory(size="256M"), pool_factory(size="256M")
    src = make_source(src_pool, 1 * MiB, seed=84)
    dst = f"{dst_pool.name}/replica"
    sid = "20250101T000000Z-1dead1ed"
    dirs = killed_while_installing(zc, sshd_local, src, dst, sid)
    run = zc.run("abort", sid, "--ssh-config", str(sshd_local.ssh_config))
    assert run.returncode == 0, run.explain()
    assert [d for d in dirs if d.exists()] == [], "zchunk abort left the session's directories behind"


@pytest.mark.parametrize("state", ["starting", "failed"])
def test_a_rerun_cleans_a_session_killed_while_installing(tmp_path: Path, pool_factory: Any, sshd_local: lab.Sshd,
                                                          state: str) -> None:
    """Chaos seed 17: the rerun reattached to the never-started session, said its agents were gone, then
    refused with "already being replicated by session <that same one> (pid None)": the receive directory
    install had made was in no record, its heartbeat was fresh, so it looked "starting". ``failed``: the
    session was already given up (the install finished on the host after the rerun had looked)."""
    zc = Zchunk(tmp_path, sync_args=("--no-sync-snap",))
    src_pool, dst_pool = pool_factory(size="256M"), pool_factory(size="256M")
    quiet_target_pool(dst_pool)
    src = make_source(src_pool, 2 * MiB, seed=85)
    dst = f"{dst_pool.name}/replica"
    sid = "20250101T000000Z-2dead2ed"
    roles = ("receive", "send") if state == "starting" else ("receive",)
    dirs = killed_while_installing(zc, sshd_local, src, dst, sid, state, roles)
    try:
        start = time.monotonic()
        run = zc.run("sync", src, f"local:{dst}", "--chunk-size", "256K", "--ssh-config", str(sshd_local.ssh_config))
        assert run.returncode == 0, run.explain()
        assert time.monotonic() - start < 40, "cleaned at once, not after the never-started minute"
        if state == "starting":
            assert [e["session"] for e in run.of("reattach")] == [sid]
        else:
            assert [e["path"] for e in run.of("stale_cleaned")] == [str(dirs[0])]
        assert [d for d in dirs if d.exists()] == []
        assert_replica(src, dst, "s1")
        assert zc.session_dirs() == []
    finally:
        kill_matching(str(zc.spool_dir))


def test_a_session_killed_while_cleaning_up_is_cleaned_by_the_next_run(tmp_path: Path, pool_factory: Any,
                                                                      sshd_local: lab.Sshd) -> None:
    """Chaos seed 17 again: the coordinator was killed while removing a failed session's directories (the
    removal was waiting out an outage). The record said "failed", so `zchunk abort` of the unfinished
    sessions skipped it and its directories stayed. The record now says ``dirs_left`` until a removal of
    both succeeded; `zchunk sessions` shows it, and the next run removes both sides' directories first."""
    from zchunk.session import StateStore

    zc = Zchunk(tmp_path, sync_args=("--no-sync-snap",))
    src_pool, dst_pool = pool_factory(size="256M"), pool_factory(size="256M")
    quiet_target_pool(dst_pool)
    src = make_source(src_pool, 2 * MiB, seed=86)
    dst = f"{dst_pool.name}/replica"
    sid = "20250101T000000Z-3dead3ed"
    dirs = killed_while_installing(zc, sshd_local, src, dst, sid, "failed")
    store = StateStore(zc.state_dir)
    rec = store.load(sid)
    rec.target_dir, rec.source_dir, rec.dirs_left = str(dirs[0]), str(dirs[1]), True
    store.save(rec)
    try:
        listed = zc.run("sessions", json_out=False)
        assert "directories left" in listed.stdout and f"zchunk abort {sid}" in listed.stdout, listed.stdout
        run = zc.run("sync", src, f"local:{dst}", "--chunk-size", "256K", "--ssh-config", str(sshd_local.ssh_config))
        assert run.returncode == 0, run.explain()
        assert [e["session"] for e in run.of("leftovers")] == [sid]
        assert [d for d in dirs if d.exists()] == [], "both sides' directories are gone"
        assert store.load(sid).state == "failed" and not store.load(sid).dirs_left
        assert_replica(src, dst, "s1")
        assert zc.session_dirs() == []
    finally:
        kill_matching(str(zc.spool_dir))


# -- a daemon that ends while its status is read ----------------------------------------------------


def test_a_daemon_ending_between_status_read_and_pid_check_is_not_dead(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The status read the state file ("running", pid), then found the pid gone: the daemon had written
    "done" and exited in between. Reported "dead", the coordinator restarted a finished stream (OpenZFS VM
    in CI: a session recorded failed, the rerun found the snapshot there). The file is read again."""
    import json
    import sys

    from zchunk import agent

    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    path = orphan(spool, "20260101T000000Z-0e0d0e0d", "receive", "pool/replica", idle=0)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer exists
    state_file = path / "receiver.json"
    state_file.write_text(json.dumps({"state": "running", "pid": gone.pid, "next_seq": 3}))
    real = agent.pid_is_ours

    def daemon_finishes_meanwhile(pid: int, session_path: str) -> bool:
        state_file.write_text(json.dumps({"state": "done", "pid": pid, "next_seq": 4, "zfs_exit": 0}))
        return real(pid, session_path)

    monkeypatch.setattr(agent, "pid_is_ours", daemon_finishes_meanwhile)
    assert agent.Session(str(path)).state()["state"] == "done"
    monkeypatch.setattr(agent, "pid_is_ours", real)
    state_file.write_text(json.dumps({"state": "running", "pid": gone.pid}))
    assert agent.Session(str(path)).state()["state"] == "dead", "a daemon gone without a final state is dead"
