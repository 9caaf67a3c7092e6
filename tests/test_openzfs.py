"""Rules that need what only current OpenZFS has: holds, resume tokens, bookmarks, volumes,
send -nP estimates. These run in the OpenZFS VM tier (`scripts/openzfs-vm`); on the
zfs-fuse tier they are deselected by marker (-m "not openzfs"), never skipped."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.zc import Run, Zchunk, kill_matching
from tests.zfsutil import add_change, assert_replica, exists, make_source, snapshots, wait_until, zfs
from zchunk import lab

pytestmark = [pytest.mark.zfs, pytest.mark.openzfs]

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _openzfs_only(tier: str) -> None:
    assert tier == "openzfs", "select these with -m openzfs inside the OpenZFS VM (scripts/openzfs-vm)"


# the shared fixtures zc and pools (conftest.py) read these
ZC_SYNC_ARGS = ("--chunk-size", "1M")
QUIET_TARGET = False


def holds(snapshot: str) -> set[str]:
    out = zfs("holds", "-H", snapshot)
    return {line.split("\t")[1] for line in out.splitlines() if line}


def own(ds: str, ident: str) -> list[str]:
    return [s for s in snapshots(ds) if f"@zchunk_{ident}_" in s]


def test_base_is_held_on_both_sides_and_the_hold_moves_forward(zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 2 * MiB, seed=71)
    dst = f"{dst_pool.name}/r"
    assert zc.run("sync", src, dst, "--identifier", "h").returncode == 0
    first = own(src, "h")[-1]
    assert holds(first) == {"zchunk_h"} and holds(dst + "@" + first.split("@")[1]) == {"zchunk_h"}
    destroy = subprocess.run(["zfs", "destroy", first], capture_output=True, text=True)
    assert destroy.returncode != 0, "an admin's zfs destroy of the held base must fail"
    add_change(src, MiB, seed=72, snap="s2")
    run = zc.run("sync", src, dst, "--identifier", "h")
    assert run.returncode == 0, run.explain()
    second = own(src, "h")[-1]
    assert second != first and not exists(first), "the old base was released and pruned"
    assert holds(second) == {"zchunk_h"} and holds(dst + "@" + second.split("@")[1]) == {"zchunk_h"}
    assert_replica(src, dst, second.split("@")[1])


def test_estimate_from_send_nP(zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 8 * MiB, seed=73, compressible=0.0)
    run = zc.run("sync", src, f"{dst_pool.name}/r", "--no-sync-snap")
    assert run.returncode == 0, run.explain()
    est, real = run.of("plan")[0]["estimate"], run.result()["transfer"]["raw_bytes"]
    assert abs(est - real) <= 0.05 * real, (est, real)
    assert run.of("preflight")[0]["source"]["zfs"]["resume_tokens"] is True


def kill_receiver(zc: Zchunk) -> None:
    """kill -9 the receiver agent and its zfs receive (as a crash or a target reboot would)."""
    st = zc.agent_state("receive") or {}
    pid = int(st["pid"])
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for p in [pid, *map(int, children)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def sync_killing_the_receiver(zc: Zchunk, src: str, dst: str) -> Run:
    """A sync whose receiver is killed once 6 chunks went into zfs receive (-s): it goes on from the token."""
    bg = zc.start("sync", src, dst, "--no-sync-snap", "--spool-max", "2M", "--parallel", "1")
    try:
        bg.wait_for(lambda: int((zc.agent_state("receive") or {}).get("next_seq", 0)) >= 6, 600, "6 chunks")
        kill_receiver(zc)
        return bg.finish()
    finally:
        bg.stop()


def test_receive_killed_then_resumed_from_its_token(zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 24 * MiB, seed=74, compressible=0.0)
    dst = f"{dst_pool.name}/r"
    run = sync_killing_the_receiver(zc, src, dst)
    # the same run goes on from the token zfs receive -s left (issue 5, item 2), and says so
    assert run.returncode == 0, run.explain()
    restart = run.of("restart")
    assert restart and "resume token" in restart[0]["how"], run.explain()
    assert run.of("resume_token"), "the user is told the stream resumed from the token"
    sessions = run.of("session")
    assert len(sessions) == 2, run.explain()
    resumed = run.of("result")[-1]["transfer"]["raw_bytes"]
    assert resumed < 22 * MiB, f"the resumed stream is only what was missing ({resumed} bytes)"
    assert_replica(src, dst, "s1")
    assert zfs("get", "-H", "-o", "value", "receive_resume_token", dst).strip() in ("", "-")


def test_stale_token_is_discarded_with_one_line(zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 16 * MiB, seed=75, compressible=0.0)
    dst = f"{dst_pool.name}/r"
    assert zc.run("sync", src, dst, "--no-sync-snap").returncode == 0
    add_change(src, 16 * MiB, seed=76, snap="s2")
    bg = zc.start("sync", src, dst, "--no-sync-snap", "--spool-max", "2M", "--parallel", "1")
    try:
        bg.wait_for(lambda: int((zc.agent_state("receive") or {}).get("next_seq", 0)) >= 4, 600, "4 chunks")
        bg.kill9()  # the coordinator first, so it cannot go on from the token by itself
        kill_receiver(zc)
        kill_matching(str(zc.spool_dir))  # and the sender, so nothing sends s2 any more
    finally:
        bg.stop()
    wait_until(lambda: zfs("get", "-H", "-o", "value", "receive_resume_token", dst).strip() not in ("", "-"),
               30, "a resume token")
    # the token's snapshot is gone on the source (once the killed zfs send has let go of it)
    wait_until(lambda: subprocess.run(["zfs", "destroy", f"{src}@s2"], capture_output=True).returncode == 0,
               30, f"zfs destroy {src}@s2")
    add_change(src, MiB, seed=77, snap="s3")
    run = zc.run("sync", src, dst, "--no-sync-snap")
    assert run.returncode == 0, run.explain()
    assert run.of("resume_token_stale")
    assert_replica(src, dst, "s3")


def test_bookmark_serves_as_base_when_no_common_snapshot_is_left(zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 2 * MiB, seed=78)
    dst = f"{dst_pool.name}/r"
    assert zc.run("sync", src, dst, "--no-sync-snap", "--create-bookmark", "--identifier", "b").returncode == 0
    marks = zfs("list", "-H", "-t", "bookmark", "-o", "name", "-r", src).split()
    assert marks == [f"{src}#zchunk_b_s1"], marks
    zfs("release", "zchunk_b", f"{src}@s1")
    zfs("destroy", f"{src}@s1")  # no common snapshot left on the source
    add_change(src, MiB, seed=79, snap="s2")
    run = zc.run("sync", src, dst, "--no-sync-snap", "--identifier", "b")
    assert run.returncode == 0, run.explain()
    assert "#zchunk_b_s1" in run.of("plan")[0]["base"]
    assert_replica(src, dst, "s2")


def test_volumes_replicate_and_type_mismatch_is_refused(zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    vol = f"{src_pool.name}/vol"
    zfs("create", "-V", "8M", vol)  # no udev in the VM, so no /dev/zvol link to write through: empty is enough
    zfs("snapshot", f"{vol}@s1")
    run = zc.run("sync", vol, f"{dst_pool.name}/vol", "--no-sync-snap")
    assert run.returncode == 0, run.explain()
    assert zfs("get", "-H", "-o", "value", "type", f"{dst_pool.name}/vol").strip() == "volume"
    fs = make_source(dst_pool, MiB, seed=80, name="fs")
    run = zc.run("sync", vol, fs, "--no-sync-snap")
    assert run.returncode == 4 and "volume" in run.stderr and "filesystem" in run.stderr, run.explain()


DELEGATE = "zchunkdeleg"


@pytest.fixture
def delegate_user() -> Iterator[str]:
    """A non-root account in the VM (its root filesystem is a throwaway overlay); removed after."""
    if subprocess.run(["id", DELEGATE], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", DELEGATE], check=True)
    subprocess.run(["usermod", "-p", "*", DELEGATE], check=True)  # not locked: sshd with UsePAM no
    # A real host's udev rule (OpenZFS's 90-zfs.rules) makes /dev/zfs 0666; the VM has no udev.
    mode = os.stat("/dev/zfs").st_mode & 0o777
    os.chmod("/dev/zfs", 0o666)
    yield DELEGATE
    os.chmod("/dev/zfs", mode)
    subprocess.run(["pkill", "-KILL", "-u", DELEGATE], capture_output=True)
    subprocess.run(["userdel", "-r", DELEGATE], capture_output=True)


def test_a_non_root_user_with_zfs_allow_replicates_over_ssh(zc: Zchunk, pools: Any, delegate_user: str) -> None:
    """Both hosts reached as a non-root user over a real sshd (relay): refused with the `zfs allow`
    to run until delegated, then a full and an incremental replica with holds (INSTALL.md's recipe)."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, 2 * MiB, seed=91)
    zfs("create", f"{dst_pool.name}/backup")
    dst = f"{dst_pool.name}/backup/replica"
    # sshd reads AuthorizedKeysFile as the user: the lab's files must be reachable by it
    work = Path(tempfile.mkdtemp(prefix="zchunk-deleg-", dir="/var/tmp"))
    work.chmod(0o755)
    try:
        with lab.Sshd(work / "sshd", port=lab.free_port(), alias="deleg") as server:
            (work / "sshd").chmod(0o755)
            server.authorized_keys.chmod(0o644)
            config = work / "ssh_config"
            config.write_text(server.ssh_config.read_text().replace("User root", f"User {delegate_user}"))
            zc.spool_dir = Path(f"/home/{delegate_user}/spool")  # a base this user owns, not root's
            argv = ("sync", f"deleg:{src}", f"deleg:{dst}", "--ssh-config", str(config))

            refused = zc.run(*argv)
            assert refused.returncode == 7, refused.explain()
            error = refused.of("error")[0]
            assert "zfs allow -u" in error["hint"] and delegate_user in error["message"] + error["hint"], error
            assert snapshots(src) == [f"{src}@s1"] and not exists(dst), "a refusal changes nothing"

            zfs("allow", "-u", delegate_user, "send,snapshot,hold,release,destroy,mount", src)
            zfs("allow", "-u", delegate_user, "receive,create,mount,hold,release,destroy", f"{dst_pool.name}/backup")
            run = zc.run(*argv, "--identifier", "d")
            assert run.returncode == 0, run.explain()
            first = own(src, "d")[-1]
            assert_replica(src, dst, first.split("@")[1])
            assert holds(first) == {"zchunk_d"} and holds(dst + "@" + first.split("@")[1]) == {"zchunk_d"}

            add_change(src, MiB, seed=92, snap="s2")
            run = zc.run(*argv, "--identifier", "d")
            assert run.returncode == 0, run.explain()
            assert run.of("plan")[0]["send_kind"] == "incremental", run.explain()
            second = own(src, "d")[-1]
            assert_replica(src, dst, second.split("@")[1])
            assert not exists(first), "the old sync snapshot was released and pruned by the delegated user"
    finally:
        shutil.rmtree(work, ignore_errors=True)
