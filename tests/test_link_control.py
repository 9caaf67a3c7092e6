"""The link under the user's control, on real parts: zfs-fuse pools, a real sshd in a namespace behind the
namespaced WAN. --bwlimit caps the bytes zchunk puts on the link; `zchunk pause` stops the chunks (agents,
zfs pipes and spools stay) and survives a killed coordinator; `zchunk limit` changes a session's limit,
also while the link is down; `zchunk resume` continues."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.zc import Background, Zchunk
from tests.zfsutil import assert_replica, make_source
from zchunk import lab

pytestmark = [pytest.mark.zfs, pytest.mark.netns]

MiB = 1 << 20


def progress(bg: Background) -> list[dict[str, Any]]:
    return [e for e in bg.events_so_far() if e["event"] == "progress"]


def wire(bg: Background) -> int:
    events = progress(bg)
    return int(events[-1]["wire_bytes"]) if events else 0


def link_rate(bg: Background, seconds: float) -> float:
    """Bytes/s zchunk put on the link over the next ``seconds``, from its own progress events."""
    start = progress(bg)[-1]
    time.sleep(seconds)
    end = progress(bg)[-1]
    return (end["wire_bytes"] - start["wire_bytes"]) / (end["time"] - start["time"])


def session_of(zc: Zchunk) -> dict[str, Any]:
    views = json.loads(zc.run("sessions", json_out=True).stdout)
    active = [v for v in views if v["state"] in ("starting", "running")]
    assert len(active) == 1, views
    return dict(active[0])


def test_bwlimit_pause_and_resume_across_a_killed_coordinator(zc: Zchunk, pools: Any, wan: lab.Wan,
                                                              sshd_dst: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 80 * MiB, seed=71, compressible=0.0)  # incompressible: wire ~ stream bytes
    dst = f"{dst_pool.name}/replica"
    wan.rate("dst", 100)  # the link could carry ~12 MB/s: the limit, not the link, decides
    bg = zc.start("sync", src, f"dst:{dst}", "--bwlimit", "3M", "--chunk-size", "4M",
                  "--ssh-config", str(sshd_dst.ssh_config))
    try:
        bg.wait_for(lambda: wire(bg) > 4 * MiB, 120, "chunks moving")
        assert any(e["event"] == "limit" and e["rate"] == 3 * MiB for e in bg.events_so_far())
        rate = link_rate(bg, 15)
        assert 0.85 * 3 * MiB <= rate <= 1.05 * 3 * MiB + MiB / 15, f"{rate / MiB:.2f} MiB/s under --bwlimit 3M"
        sid = session_of(zc)["id"]

        paused = zc.run("pause", sid)
        assert paused.returncode == 0, paused.explain()
        bg.wait_for(lambda: any(e["event"] == "paused" for e in bg.events_so_far()), 5, "the paused event")
        time.sleep(3)  # a piece already being written may still arrive, and be reported
        before = wire(bg)
        time.sleep(4)
        assert wire(bg) == before, "chunks moved while paused"
        assert progress(bg)[-1]["user_paused"] is True
        view = session_of(zc)
        assert view["paused"] is True and view["running"] is True and view["limit"] == "3M"

        bg.kill9()  # the coordinator dies while paused: the session stays paused, its agents stay
        assert session_of(zc)["running"] is False
        limited = zc.run("limit", sid, "unlimited")
        assert limited.returncode == 0, limited.explain()
        resumed = zc.run("resume", sid, "--ssh-config", str(sshd_dst.ssh_config))
        assert resumed.returncode == 0, resumed.explain()
        assert "unpaused" not in resumed.kinds() and "paused" not in resumed.kinds(), "resumed unpaused at once"
        assert all(e["limit"] is None for e in resumed.of("progress")), "zchunk limit unlimited applies"
        assert_replica(src, dst, "s1")
    finally:
        bg.stop()


def test_limit_changes_take_effect_while_running_and_while_the_link_is_down(zc: Zchunk, pools: Any, wan: lab.Wan,
                                                                          sshd_dst: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 48 * MiB, seed=72, compressible=0.0)
    dst = f"{dst_pool.name}/replica"
    bg = zc.start("sync", src, f"dst:{dst}", "--bwlimit", "1M", "--chunk-size", "2M",
                  "--ssh-config", str(sshd_dst.ssh_config))
    try:
        bg.wait_for(lambda: wire(bg) > 2 * MiB, 120, "chunks moving")
        sid = session_of(zc)["id"]
        slow = link_rate(bg, 6)
        assert slow <= 1.05 * MiB + MiB / 6, f"{slow / MiB:.2f} MiB/s under --bwlimit 1M"
        wan.reset_port("dst", 22, True)  # every connection to the target reset: an outage
        try:
            bg.wait_for(lambda: any(e["event"] == "link_down" for e in bg.events_so_far()), 90, "the outage")
            changed = zc.run("limit", sid, "4M")
            assert changed.returncode == 0, changed.explain()
            bg.wait_for(lambda: any(e["event"] == "limit" and e["rate"] == 4 * MiB for e in bg.events_so_far()),
                        3, "the new limit, within 2 s, during the outage")
        finally:
            wan.reset_port("dst", 22, False)
        bg.wait_for(lambda: any(e["event"] == "link_up" for e in bg.events_so_far()), 90, "the link back")
        fast = link_rate(bg, 4)
        assert fast > 2 * slow, f"{fast / MiB:.2f} MiB/s after zchunk limit 4M (was {slow / MiB:.2f})"
        run = bg.finish()
        assert run.returncode == 0, run.explain()
        assert_replica(src, dst, "s1")
    finally:
        bg.stop()


def test_bad_limits_are_refused_and_change_nothing(zc: Zchunk, tmp_path: Any) -> None:
    bad = zc.run("sync", "pool/a", "pool/b", "--bwlimit", "Mon-Fry=1M")
    assert bad.returncode == 2 and "'mon-fry' is not a day" in bad.stderr, bad.explain()
    bad = zc.run("sync", "pool/a", "pool/b", "--bwlimit", "1M", "--timezone", "Mars/Olympus")
    assert bad.returncode == 2 and "not a time zone" in bad.stderr, bad.explain()
    for cmd in (("limit", "nosuch", "1M"), ("pause", "nosuch"), ("resume", "nosuch")):
        missing = zc.run(*cmd)
        assert missing.returncode == 9 and "no session nosuch" in missing.stderr, missing.explain()
    assert not zc.state_dir.exists() or not list((zc.state_dir / "sessions").glob("*"))
