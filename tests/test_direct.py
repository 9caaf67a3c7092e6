"""Streams at --direct-max or less go without a session (zchunk.direct), on real parts: zfs-fuse pools, a
real sshd on loopback or behind the namespaced WAN with its faults. Whatever stops such a stream leaves
nothing behind, and a session sends it again."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
from typing import Any

import pytest

from tests.zc import Background, Zchunk, matching
from tests.zfsutil import assert_replica, guid, make_source, mountpoint, snapshots, zfs
from zchunk import lab
from zchunk.transport import LocalHost

pytestmark = [pytest.mark.zfs]

MiB = 1 << 20
POOL_SIZE = "512M"
ZC_SYNC_ARGS: tuple[str, ...] = ()  # zchunk's own sync snapshots, as users run it


def test_a_tree_of_small_datasets_goes_without_a_session_and_repeats(zc: Zchunk, pools: Any,
                                                                     sshd_local: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    root = f"{src_pool.name}/small"
    names = [root, f"{root}/a", f"{root}/b", f"{root}/a/x"]
    for i, name in enumerate(names):
        zfs("create", name)
        lab.write_dataset(mountpoint(name) / "f", 200 << 10, seed=i, compressible_fraction=0.5)
    dst = f"{dst_pool.name}/small"
    ssh = ("--ssh-config", str(sshd_local.ssh_config), "--identifier", "dt")
    for attempt in range(3):
        if attempt:  # a change in the parent, then in the grandchild, between runs
            changed = names[0] if attempt == 1 else names[3]
            lab.write_dataset(mountpoint(changed) / f"g{attempt}", 50 << 10, seed=10 + attempt)
        run = zc.run("sync", "-r", root, f"local:{dst}", *ssh)
        assert run.returncode == 0, run.explain()
        plans = run.of("plan")
        assert len(plans) == 4 and all(p["direct"] and p["codec"] is None for p in plans), plans
        assert {p["send_kind"] for p in plans} == {"full" if attempt == 0 else "incremental"}
        assert not run.of("session"), "no session"
        # the agent program goes to the target once, beside the first run's streams; later runs' probes
        # import it instead of being sent the agent's source (the source is this machine's own agent)
        put, found = run.of("agent_program"), run.of("preflight")[0]["target"]["program"]
        if attempt == 0:
            assert [e["host"] for e in put] == ["local"] and found == "", (put, found)
            program = put[0]["path"]
        else:
            assert not put and found == program, (put, found, program)
        assert [e["snapshot"] for e in run.of("verified")] and len(run.of("verified")) == 4
        assert all(r["session"] is None and r["transfer"]["total_chunks"] == 0
                   for o in run.of("replication")[0]["outcomes"] for r in o["streams"])
        short = snapshots(root)[-1].split("@", 1)[1]
        for name in names:
            assert_replica(name, dst + name[len(root):], short)
    assert zc.session_dirs() == [] and json.loads(zc.run("sessions", json_out=True).stdout) == []
    text = zc.run("sync", "-r", root, f"local:{dst}", *ssh, "--no-sync-snap", json_out=False)
    assert text.returncode == 0 and "up to date" in text.stderr, text.explain()


def test_a_stream_larger_than_its_estimate_is_sent_again_through_a_session(zc: Zchunk, pools: Any) -> None:
    """zfs-fuse estimates an incremental by the difference of sizes: a file replaced by one as large is 0 B."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, 6 * MiB, seed=1, compressible=0.0)
    dst = f"{dst_pool.name}/grown"
    run = zc.run("sync", src, dst, "--no-sync-snap", "--direct-max", "0")
    assert run.returncode == 0 and run.of("session"), run.explain()
    shutil.rmtree(mountpoint(src) / "data")  # and as much data in its place
    lab.write_dataset(mountpoint(src) / "other", 6 * MiB, seed=2, compressible_fraction=0.0)
    subprocess.run(["sync"], check=True)
    zfs("snapshot", f"{src}@s2")
    run = zc.run("sync", src, dst, "--no-sync-snap", "--direct-max", "1M", "--chunk-size", "1M")
    assert run.returncode == 0, run.explain()
    first, second = run.of("plan")
    assert first["direct"] and first["estimate"] <= MiB and not second.get("direct"), run.explain()
    assert any("larger than its estimate" in n["detail"] for n in run.of("note")), run.explain()
    assert len(run.of("session")) == 1 and run.result()["session"] is not None
    assert_replica(src, dst, "s2")
    assert guid(f"{dst}@s2") == guid(f"{src}@s2")


def test_a_link_reset_ends_the_direct_stream_on_both_hosts_and_a_session_sends_it(zc: Zchunk, pools: Any,
                                                                                  wan: lab.Wan,
                                                                                  sshd_dst: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 3 * MiB, seed=6, compressible=0.0)
    dst = f"{dst_pool.name}/cut"
    bg: Background = zc.start("sync", src, f"dst:{dst}", "--no-sync-snap", "--bwlimit", "256K",
                              "--ssh-config", str(sshd_dst.ssh_config))
    try:
        bg.wait_for(lambda: any(e["event"] == "plan" for e in bg.events_so_far()), 60, "the plan")
        time.sleep(3)  # 3 MiB at 256 KiB/s: mid-stream
        receives = [p for p, cmd in matching(f"receive {dst}").items() if "zfs" in cmd]
        assert receives, "the direct stream's zfs receive runs on the target"
        outage = threading.Thread(target=wan.outage, args=("dst", 22, 6))
        outage.start()
        outage.join()
        run = bg.finish(300)
    finally:
        bg.stop()
    assert run.returncode == 0, run.explain()
    first, second = run.of("plan")
    assert first["direct"] and not second.get("direct")
    assert any("link to dst failed" in n["detail"] for n in run.of("note")), run.explain()
    assert not [w for w in run.of("warning") if "direct stream" in w["detail"]], run.explain()
    assert all(pid not in matching("zfs") for pid in receives), "the cut receive was ended by its pid"
    assert_replica(src, dst, "s1")


def test_a_started_command_streams_and_says_its_status_and_stderr() -> None:
    """``Host.start`` on this machine, the pipes a direct stream is made of (over SSH: the tests above)."""
    async def main() -> None:
        host = LocalHost()
        cat = await host.start(["cat"])
        await cat.write(b"x" * (1 << 20))
        cat.close_stdin()
        got = b""
        while piece := await cat.read(1 << 16):
            got += piece
        res = await cat.wait()
        assert (res.status, len(got)) == (0, 1 << 20)
        failing = await host.start(["sh", "-c", "echo refused >&2; exit 3"])
        assert await failing.read(10) == b""
        res = await failing.wait()
        assert (res.status, res.err_text) == (3, "refused")
        sleeper = await host.start(["sleep", "60"])
        sleeper.abandon()  # terminated: a direct stream's local side after a failure
        assert (await asyncio.wait_for(sleeper.wait(), 10)).status != 0
        other = await asyncio.create_subprocess_exec("sleep", "60")  # Host.stop: what ends a remote one
        assert await host.stop(other.pid, patience=10)
        assert await other.wait() != 0

    asyncio.run(main())


class _Logged(LocalHost):
    """This machine, noting when each started command's stdin closes and when it has exited."""

    def __init__(self, log: list[tuple[float, str, str]]) -> None:
        super().__init__()
        self.log = log

    async def start(self, argv: list[str]) -> Any:
        proc = await super().start(argv)
        name, close, wait = argv[-1], proc.close_stdin, proc.wait

        def closing() -> None:
            self.log.append((time.monotonic(), "close", name))
            close()

        async def waiting() -> Any:
            res = await wait()
            self.log.append((time.monotonic(), "exit", name))
            return res

        proc.close_stdin, proc.wait = closing, waiting  # type: ignore[method-assign]
        return proc


def test_on_a_zfs_without_receive_u_the_receives_end_one_at_a_time(pools: Any) -> None:
    """zfs-fuse mounts what it received as zfs receive ends, and can lose a mount made at the same moment as
    another (every access to it then hangs: docs/reliability.md). Four full direct streams at once: the
    bytes move together, but each receive's end, from its last piece to its exit, comes after the other's."""
    from zchunk.direct import run_direct
    from zchunk.events import Emitter

    src_pool, dst_pool = pools
    sources = [make_source(src_pool, 256 << 10, seed=60 + i, name=f"m{i}") for i in range(4)]
    log: list[tuple[float, str, str]] = []

    async def main() -> list[Any]:
        src, dst = LocalHost(), _Logged(log)
        return list(await asyncio.gather(*(
            run_direct(src, dst, f"{s}@s1", guid(f"{s}@s1"), f"{dst_pool.name}/m{i}@s1",
                       {"snapshot": f"{s}@s1", "base": None, "intermediates": False, "flags": [], "token": None,
                        "exclude": []},
                       {"target": f"{dst_pool.name}/m{i}", "flags": [], "props": {}, "excluded": []},
                       256 << 10, 4 * MiB, None, None, 60.0, None, Emitter(None))
            for i, s in enumerate(sources))))

    results = asyncio.run(main())
    assert all(r is not None for r in results), results
    closed = {name: t for t, what, name in log if what == "close"}
    exited = {name: t for t, what, name in log if what == "exit"}
    spans = sorted((closed[name], exited[name]) for name in closed)
    assert len(spans) == 4 and set(closed) == set(exited), log
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans
    for i, s in enumerate(sources):
        assert_replica(s, f"{dst_pool.name}/m{i}", "s1")
