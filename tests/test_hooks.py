"""--pre-snapshot / --post-snapshot (a job's pre_snapshot / post_snapshot) on real zfs-fuse pools: run
without a shell, around the sync snapshot and only around it; a failing or hanging pre-snapshot command skips
the run and changes nothing; a failing post-snapshot command is a warning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.zc import Zchunk, matching
from tests.zfsutil import assert_replica, exists, make_source, snapshots, wait_until, zfs

pytestmark = [pytest.mark.zfs]

ZC_SYNC_ARGS = ("--chunk-size", "1M")

# Records, for each call: which hook, its first argument as received, whether the snapshot exists yet.
HOOK = """#!/bin/sh
if zfs list -H -o name "$ZCHUNK_SNAPSHOT" >/dev/null 2>&1; then there=taken; else there=absent; fi
printf '%s|%s|%s|%s|%s\\n' "$1" "$2" "$ZCHUNK_SOURCE" "$ZCHUNK_SNAPSHOT" "$there" >> "{log}"
echo "said $1"
exit "${{3:-0}}"
"""


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def hook(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "hooks.log"
    script = tmp_path / "hook"
    script.write_text(HOOK.format(log=log))
    script.chmod(0o755)
    return script, log


def test_hooks_run_around_the_snapshot_without_a_shell(zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 1 << 20)
    zfs("create", f"{src}/child")
    dst = f"{dst_pool.name}/ds"
    script, log = hook(tmp_path)
    hostile = tmp_path / "pwned"
    run = zc.run("sync", "-r", src, dst, "--pre-snapshot", f"{script} pre 'a b; touch {hostile}'",
                 "--post-snapshot", f"{script} post x")
    assert run.returncode == 0, run.explain()
    calls = [line.split("|") for line in log.read_text().splitlines()]
    snap = run.of("snapshot")[0]["snapshot"]
    assert calls == [["pre", f"a b; touch {hostile}", src, snap, "absent"],
                     ["post", "x", src, snap, "taken"]], "one call each, pre before and post after the snapshot"
    assert not hostile.exists(), "the argument was never given to a shell"
    assert [(e["which"], e["status"], e["output"]) for e in run.of("hook")] == [
        ("pre-snapshot", 0, "said pre"), ("post-snapshot", 0, "said post")]
    short = snap.split("@", 1)[1]
    assert_replica(src, dst, short)
    assert_replica(f"{src}/child", f"{dst}/child", short)


def test_a_failing_pre_snapshot_command_skips_the_run(zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 1 << 20)
    dst = f"{dst_pool.name}/ds"
    script, log = hook(tmp_path)
    before = snapshots(src)
    run = zc.run("sync", src, dst, "--pre-snapshot", f"{script} pre db-busy 3", "--post-snapshot", f"{script} post")
    assert run.returncode == 18, run.explain()
    err = run.error()
    assert err["error"] == "HookFailed" and "exit status 3: said pre" in err["message"], err
    assert "nothing was snapshotted or sent" in err["hint"]
    assert snapshots(src) == before and not exists(dst), "nothing changed on either side"
    assert [line.split("|")[0] for line in log.read_text().splitlines()] == ["pre"], "post never ran"
    assert zc.session_dirs() == []

    # one that hangs is killed with its whole process group, after --hook-timeout
    sleeper = tmp_path / "sleeper"
    sleeper.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {tmp_path}/sleep.pid\nwait\n")
    sleeper.chmod(0o755)
    run = zc.run("sync", src, dst, "--pre-snapshot", str(sleeper), "--hook-timeout", "2s", timeout=60)
    assert run.returncode == 18 and "after its timeout of 2 s: killed" in run.error()["message"], run.explain()
    child = int((tmp_path / "sleep.pid").read_text())
    wait_until(lambda: not _alive(child), 10, "the hook's children killed too")
    assert not matching(str(sleeper)), "and the hook itself"
    assert snapshots(src) == before

    # a command that is not there, and a command line that cannot be split, are said as such
    run = zc.run("sync", src, dst, "--pre-snapshot", str(tmp_path / "missing"))
    assert run.returncode == 18 and "cannot run it" in run.error()["message"], run.explain()
    run = zc.run("sync", src, dst, "--pre-snapshot", "freeze 'unclosed")
    assert run.returncode == 2 and "--pre-snapshot" in run.error()["message"], run.explain()
    assert snapshots(src) == before and not exists(dst)


def test_a_failing_post_snapshot_command_is_a_warning(zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 1 << 20)
    dst = f"{dst_pool.name}/ds"
    script, _ = hook(tmp_path)
    run = zc.run("sync", src, dst, "--post-snapshot", f"{script} post thaw-failed 1")
    assert run.returncode == 0, run.explain()
    warnings = [e["detail"] for e in run.of("warning")]
    assert any("post-snapshot command" in w and "exit status 1" in w for w in warnings), warnings
    snap = run.of("snapshot")[0]["snapshot"]
    assert_replica(src, dst, snap.split("@", 1)[1])
