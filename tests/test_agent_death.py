"""Agent death on zfs-fuse (issue 5, item 2): the receiver agent ``kill -9``-ed mid-stream.

zfs-fuse has no resume tokens, so the stream restarts from the common base (or
from nothing, for a first full stream) and the partial receive must be gone:
the user is told so in one ``restart`` event. Both a full stream and an
incremental one, pushed over the namespaced WAN. (The sender's death is in
tests/test_faults.py; the resume-token case is in tests/test_openzfs.py.)
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from tests.zc import Zchunk, kill_matching
from tests.zfsutil import add_change, assert_replica, guid, make_source, quiet_target_pool, snapshots, zfs
from zchunk import lab

pytestmark = [pytest.mark.zfs, pytest.mark.netns]

MiB = 1 << 20


@pytest.mark.parametrize("kind", ["full", "incremental"])
def test_receiver_agent_killed_restarts_from_the_base_and_says_so(zc: Zchunk, pool_factory: Any, wan: lab.Wan,
                                                                  sshd_dst: lab.Sshd, tier: str, kind: str) -> None:
    src_pool, dst_pool = pool_factory(size="1G"), pool_factory(size="1G")
    quiet_target_pool(dst_pool)
    dst = f"{dst_pool.name}/replica"
    args = ["--chunk-size", "1M", "--spool-max", "3M", "--ssh-config", str(sshd_dst.ssh_config),
            "--patience", "5m"]
    if kind == "full":
        src = make_source(src_pool, 12 * MiB, seed=61, compressible=0.0)
        snap = "s1"
    else:
        src = make_source(src_pool, 2 * MiB, seed=61, compressible=0.0)
        first = zc.run("sync", src, f"dst:{dst}", *args)
        assert first.returncode == 0, first.explain()
        add_change(src, 12 * MiB, seed=62, snap="s2")
        snap = "s2"
    target_before = [(s, guid(s)) for s in snapshots(dst)]
    wan.rate("dst", 16)
    bg = zc.start("sync", src, f"dst:{dst}", *args)
    try:
        bg.wait_for(lambda: int((zc.agent_state("receive") or {}).get("next_seq", 0)) >= 3, 120,
                    "3 chunks fed to zfs receive")
        os.kill(int((zc.agent_state("receive") or {})["pid"]), signal.SIGKILL)
        run = bg.finish()
    finally:
        bg.stop()
    assert run.returncode == 0, run.explain()
    restarts = run.of("restart")
    assert len(restarts) == 1, restarts
    said = restarts[0]
    if tier == "zfs-fuse":
        assert "common snapshot" in said["how"] and "partial receive was discarded" in said["how"], said
    else:
        assert "resume token" in said["how"], said
    assert "receive agent" in said["reason"] and "gone" in said["reason"], said
    assert_replica(src, dst, snap)
    after = snapshots(dst)
    assert [(s, guid(s)) for s in after if s in dict(target_before)] == target_before, \
        "the snapshots the target had are untouched"
    assert [s.split("@")[1] for s in after] == [s.split("@")[1] for s in snapshots(src)]
    assert not [n for n in zfs("list", "-H", "-r", "-t", "all", "-o", "name", dst_pool.name).split()
                if "%" in n], "no partial receive (%recv clone) left"
    assert zc.session_dirs() == [] and kill_matching(str(zc.spool_dir) + "/") == []


def test_a_daemon_that_never_started_is_an_agent_death_not_a_wait_for_patience() -> None:
    """A daemon that died before writing any state looks "starting" forever: after start_timeout it is dead
    (so the stream restarts) instead of a stall until --patience (24 h by default) runs out."""
    import time

    from zchunk.client import AgentStatus
    from zchunk.engine import AgentSide, EngineOptions, Transfer
    from zchunk.errors import AgentDied
    from zchunk.scheduler import Reports

    def daemons(sender: dict[str, Any], receiver: dict[str, Any]) -> Reports:
        return Reports(AgentStatus("send", sender, frozenset(), {}, 0, 0),
                       AgentStatus("receive", receiver, frozenset(), {}, 0, 0))

    class NoHost:
        name = "target"

    def side(role: str) -> AgentSide:
        return AgentSide(NoHost(), f"/spool/s-{role}", role, [])  # type: ignore[arg-type]

    t = Transfer(side("send"), side("receive"), session_id="s", chunk_size=1 << 20, spool_max=1 << 22,
                 estimate=0, opts=EngineOptions(start_timeout=0.2), emit=lambda *a, **k: None)
    t.reports = daemons({"pid": 42, "state": "running"}, {"state": "starting"})
    t._check_daemons()  # just seen: give it time
    time.sleep(0.3)
    with pytest.raises(AgentDied) as e:
        t._check_daemons()
    assert "never started" in str(e.value) and "receive" in str(e.value)
    t.reports = daemons({"pid": 42, "state": "running"}, {"pid": 43, "state": "running"})
    t._check_daemons()  # a daemon that wrote its state is fine
