"""Full disks (issue 5, item 7), for real: small filesystems filled while a transfer runs.

- source spool filesystem full: ``zfs send`` pauses (never fails), the user is
  warned once, nothing corrupt is spooled, and the transfer completes once
  there is room again;
- target spool filesystem full: chunks wait in the source spool, the user is
  warned once, and the transfer completes once there is room again;
- target *pool* full during ``zfs receive``: one clear error naming what the
  stream needs and what the target has, the source untouched, no partial
  dataset and no session directory left; the same command completes once the
  pool has room.

The two spools are separate tmpfs filesystems at the same path
(``tests/spoolfs.py``): the coordinator, and with it the sender agent, runs in
a private mount namespace.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need_root
from tests.spoolfs import Hog, NsZchunk, PrivateMounts, Tmpfs, split_spools
from tests.zc import Run, Zchunk, kill_matching
from tests.zfsutil import assert_replica, exists, make_source, quiet_target_pool, zfs
from zchunk import lab

pytestmark = [pytest.mark.zfs]

MiB = 1 << 20


@pytest.fixture
def spools(tmp_path: Path) -> Iterator[tuple[PrivateMounts, Tmpfs]]:
    need_root("unshare", "nsenter", "mount")
    with split_spools(tmp_path / "spoolfs", source_size=24 * MiB, target_size=24 * MiB) as both:
        yield both


@pytest.fixture
def zc(tmp_path: Path, spools: tuple[PrivateMounts, Tmpfs], pool_factory: Any) -> Iterator[NsZchunk]:
    """(After pool_factory, so its agents are killed before the pools are destroyed.)"""
    z = NsZchunk(tmp_path, spools[0], sync_args=("--no-sync-snap",))
    z.spool_dir = tmp_path / "spoolfs" / "zchunk"
    yield z
    kill_matching(str(z.spool_dir))


def events_of(run: Run, kind: str, words: str) -> list[dict[str, Any]]:
    return [e for e in run.of(kind) if words in str(e.get("detail", ""))]


def assert_clean(zc: NsZchunk) -> None:
    assert zc.session_dirs() == [], zc.session_dirs()
    assert kill_matching(str(zc.spool_dir) + "/") == [], "an agent outlived its session"


def test_source_spool_full_pauses_zfs_send_then_completes(zc: NsZchunk, pools: Any, spools: Any,
                                                          sshd_local: lab.Sshd) -> None:
    source_fs, _ = spools
    src_pool, dst_pool = pools
    src = make_source(src_pool, 16 * MiB, seed=51, compressible=0.0)
    dst = f"{dst_pool.name}/replica"
    bg = zc.start("sync", src, f"local:{dst}", "--chunk-size", "1M", "--spool-max", "4M", "--parallel", "2",
                  "--bwlimit", "4M", "--ssh-config", str(sshd_local.ssh_config))  # still running when filled
    try:
        bg.wait_for(lambda: (zc.agent_state("receive") or {}).get("next_seq", 0) >= 2, 60, "2 chunks received")
        with Hog(source_fs.view()):
            bg.wait_for(lambda: (zc.agent_state("send") or {}).get("paused") == "no-space", 60,
                        "the sender to pause for lack of room")
            at = (zc.agent_state("send") or {}).get("chunks", 0)
            time.sleep(3)
            sender = zc.agent_state("send") or {}
            assert sender.get("state") == "running" and sender.get("paused") == "no-space", sender
            assert sender.get("chunks", 0) <= at + 1, "no chunk can be spooled while the disk is full"
            assert not list(zc.source_dirs()[0].joinpath("chunks").glob("*.tmp")), "no half-written chunk stays"
        run = bg.finish()
    finally:
        bg.stop()
    assert run.returncode == 0, run.explain()
    assert_replica(src, dst, "s1")
    assert len(events_of(run, "warning", "source spool filesystem is full")) == 1, run.kinds()
    assert events_of(run, "note", "source spool filesystem has room again"), run.kinds()
    assert not run.of("chunk_discarded") and run.result()["transfer"]["discarded_chunks"] == 0
    assert not run.of("link_down"), "a full disk is not a link failure"
    assert_clean(zc)


def test_target_spool_full_holds_chunks_back_then_completes(zc: NsZchunk, pools: Any, spools: Any,
                                                            sshd_local: lab.Sshd) -> None:
    _, target_fs = spools
    src_pool, dst_pool = pools
    src = make_source(src_pool, 16 * MiB, seed=52, compressible=0.0)
    dst = f"{dst_pool.name}/replica"
    bg = zc.start("sync", src, f"local:{dst}", "--chunk-size", "1M", "--spool-max", "4M", "--parallel", "2",
                  "--bwlimit", "4M", "--ssh-config", str(sshd_local.ssh_config))  # still running when filled
    try:
        bg.wait_for(lambda: (zc.agent_state("receive") or {}).get("next_seq", 0) >= 2, 60, "2 chunks received")
        with Hog(target_fs.path):
            bg.wait_for(lambda: events_of(Run([], 0, "", "", bg.events_so_far()), "warning",
                                          "target spool filesystem is full"), 60, "the target-full warning")
            time.sleep(3)
            receiver = zc.agent_state("receive") or {}
            assert receiver.get("state") == "running", receiver
        run = bg.finish()
    finally:
        bg.stop()
    assert run.returncode == 0, run.explain()
    assert_replica(src, dst, "s1")
    assert len(events_of(run, "warning", "target spool filesystem is full")) == 1, run.kinds()
    assert events_of(run, "note", "target spool filesystem has room again"), run.kinds()
    assert not run.of("chunk_discarded") and run.result()["transfer"]["discarded_chunks"] == 0
    assert not run.of("link_down"), "a full disk is not a link failure"
    assert_clean(zc)


@pytest.fixture
def plain_zc(tmp_path: Path, pool_factory: Any) -> Iterator[Zchunk]:
    z = Zchunk(tmp_path, sync_args=("--no-sync-snap",))
    yield z
    kill_matching(str(z.spool_dir))


def test_target_pool_full_is_one_clear_error_and_a_rerun_completes(plain_zc: Zchunk, pool_factory: Any,
                                                                   sshd_local: lab.Sshd, tmp_path: Path) -> None:
    zc = plain_zc
    src_pool, dst_pool = pool_factory(size="512M"), pool_factory(size="64M")
    quiet_target_pool(dst_pool)
    src = make_source(src_pool, 96 * MiB, seed=53, compressible=0.0)
    zfs("snapshot", f"{src_pool.name}@untouched")
    dst = f"{dst_pool.name}/replica"
    source_before = zfs("list", "-H", "-r", "-t", "all", "-o", "name,guid", src_pool.name)
    target_before = zfs("list", "-H", "-r", "-t", "all", "-o", "name", dst_pool.name)
    args = ["sync", src, f"local:{dst}", "--chunk-size", "4M", "--ssh-config", str(sshd_local.ssh_config)]

    run = zc.run(*args)
    assert run.returncode == 12, run.explain()
    error, fix = run.stderr.strip().splitlines()[-2:]
    assert "no space to receive" in error and dst in error, error
    needs = float(error.split("needs about ")[1].split(" MiB")[0])
    free = float(error.split(" has ")[1].split(" MiB free")[0])
    assert needs >= 90 and free < 64, error
    assert "free space on" in fix and "run the same command again" in fix, fix
    assert json.loads(run.stdout.splitlines()[-1])["error"] == "TargetFull"
    # the source untouched, no partial dataset, nothing left behind
    assert zfs("list", "-H", "-r", "-t", "all", "-o", "name,guid", src_pool.name) == source_before
    assert zfs("list", "-H", "-r", "-t", "all", "-o", "name", dst_pool.name) == target_before
    assert not exists(dst)
    assert zc.session_dirs() == [] and kill_matching(str(zc.spool_dir) + "/") == []
    assert [s["state"] for s in json.loads(zc.run("sessions").stdout)] == ["failed"]

    # room on the target: the same command completes
    extra = tmp_path / "pools" / f"{dst_pool.name}-extra.pool"
    with open(extra, "xb") as f:
        f.truncate(256 * MiB)
    subprocess.run(["zpool", "add", dst_pool.name, str(extra)], check=True, capture_output=True)
    run = zc.run(*args)
    assert run.returncode == 0, run.explain()
    assert_replica(src, dst, "s1")
    assert zc.session_dirs() == []
    shutil.rmtree(zc.spool_dir, ignore_errors=True)


def install_sender(spool: Path, tmp_path: Path) -> Path:
    """A sender session directory under ``spool``, made by the agent's ``install`` (with its ballast), whose
    ``zfs send`` never ends (the daemon must be up, not done)."""
    from zchunk import agent

    fake_zfs = tmp_path / "fake-zfs"
    fake_zfs.write_text("#!/bin/sh\nexec sleep 60\n")
    fake_zfs.chmod(0o755)
    cfg = {"id": "20250101T000000Z-full", "role": "send", "codec": "zlib", "level": None,
           "checksum": "blake2b-128", "chunk_size": MiB, "spool_max": MiB, "zfs": str(fake_zfs),
           "send": {"snapshot": "pool/ds@s1", "base": None, "flags": []}}
    p = subprocess.run([sys.executable, "-c", agent.BOOTSTRAP, "install", str(spool), "s-send", json.dumps(cfg)],
                       input=Path(agent.__file__).read_bytes(), capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return Path(json.loads(p.stdout)["path"])


def test_a_daemon_started_on_a_full_spool_still_reports_itself(tmp_path: Path) -> None:
    """The spool filesystem fills up between install and start: the daemon still writes its state (from
    the ballast install left), so the coordinator sees it running and paused rather than forever "starting"."""
    need_root("mount")
    from zchunk import agent

    with Tmpfs(tmp_path / "small", 2 * MiB) as fs:
        session = install_sender(fs.path / "spool", tmp_path)
        filler = fs.fill()
        started = subprocess.run([sys.executable, str(session / "agent.py"), "start", str(session)],
                                 capture_output=True, timeout=60)
        pid = json.loads(started.stdout)["pid"]
        try:
            deadline = time.monotonic() + 10
            while not (session / "sender.json").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            state = json.loads((session / "sender.json").read_text())
            assert state["pid"] == pid and state["state"] == "running", state
            assert (session / "reserve").stat().st_size == agent.RESERVE_BYTES - agent.RESERVE_SLICE, \
                "a slice of the ballast was given up for the state file"
        finally:
            filler.unlink()
            subprocess.run([sys.executable, str(session / "agent.py"), "remove", str(session)], capture_output=True,
                           timeout=60)
        assert not session.exists()


def test_every_pause_on_a_full_spool_is_still_reported(tmp_path: Path) -> None:
    """Another program takes whatever room appears (as ``Hog`` does): the first pause a daemon saves on
    the full filesystem must leave ballast for the next. A state write the coordinator acts on (a new pause
    or state, until the file says it) gives up one slice of the ballast; a mere progress count waits for
    room. So the "no-space" pause the coordinator warns about is written after a "spool-full" one, and the
    ballast grows back once there is room. (CI saw that warning never come: "spool-full" had taken it all.)"""
    need_root("mount")
    import signal

    from zchunk import agent

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}  # the Daemon sets its own
    with Tmpfs(tmp_path / "small", 2 * MiB) as fs:
        session = install_sender(fs.path / "spool", tmp_path)
        try:
            daemon = agent.Daemon(agent.Session(str(session)))
            state = lambda: json.loads((session / "sender.json").read_text())  # noqa: E731
            fs.fill(name="filler-1")
            assert daemon.save(paused="spool-full") and state()["paused"] == "spool-full"
            fs.fill(name="filler-2")  # the room the write left over is taken at once
            assert not daemon.save(chunks=3), "a progress count is not worth the ballast"
            assert daemon.save(paused="no-space"), "the pause the coordinator warns about was not written"
            assert state()["paused"] == "no-space" and state()["chunks"] == 3, state()
            fs.fill(name="filler-3")
            assert daemon.save(paused=None) and state()["paused"] is None
            assert (session / "reserve").stat().st_size == agent.RESERVE_SLICE, "one slice is left"
            fs.fill(name="filler-4")
            assert daemon.save(paused="spool-full") and not (session / "reserve").exists()
            fs.fill(name="filler-5")
            assert not daemon.save(paused="no-space"), "no ballast is left"
            (fs.path / "filler-1").unlink()
            daemon.make_reserve()
            assert (session / "reserve").stat().st_size == agent.RESERVE_BYTES, "the ballast grows back"
            fs.fill(name="filler-6")
            assert daemon.save(chunks=4), "a pause the file does not show yet is worth the ballast"
            assert state()["paused"] == "no-space" and state()["chunks"] == 4, state()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
