"""zchunk doctor on real parts (zfs-fuse pools, a real sshd on loopback): every finding in its order with
PASS / WARN / FAIL and the exit code 0 / 1 / 2, and nothing changed on either host (zpool history, every
dataset's and snapshot's properties, the spool directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.test_service import write_jobs, zchunk
from tests.zc import Zchunk
from tests.zfsutil import make_source, zfs
from zchunk import lab

pytestmark = [pytest.mark.zfs]

MiB = 1 << 20


def state(*pools: lab.Pool) -> list[str]:
    """What any change on the pools would show: their command history, every dataset and snapshot with its
    guid, holds and user properties."""
    out = []
    for pool in pools:
        out += lab.run(["zpool", "history", pool.name]).stdout.splitlines()
        out += zfs("get", "-H", "-r", "-o", "name,property,value",
                   "guid,userrefs,zchunk:locked,mounted", pool.name).splitlines()
    return out


def findings(run: Any) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for e in run.of("doctor"):
        out.setdefault(e["check"], []).append((e["status"], e["evidence"]))
    return out


def test_doctor_finds_each_problem_and_changes_nothing(zc: Zchunk, pools: Any, sshd_local: lab.Sshd,
                                                       tmp_path: Path, tier: str) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, MiB, seed=31, name="app")
    dst = f"{dst_pool.name}/app"
    ssh = ("--ssh-config", str(sshd_local.ssh_config))
    assert zc.run("sync", src, f"local:{dst}", *ssh).returncode == 0
    spool = sorted(zc.spool_dir.rglob("*")) if zc.spool_dir.exists() else []
    before = state(src_pool, dst_pool)

    def doctor(target: str, *extra: str) -> Any:
        return zc.run("doctor", src, target, *ssh, "--spool-dir", str(zc.spool_dir), *extra)

    # healthy: every check passes, in the order an admin looks
    run = doctor(f"local:{dst}")
    assert run.returncode == 0, run.explain()
    seen = findings(run)
    order = [e["check"] for e in run.of("doctor")]
    assert order[:3] == ["python3 and zfs", "ssh", "python3 and zfs"], order  # this machine, then the target
    assert order.index("clock") < order.index("pool") < order.index("common snapshot") < order.index("space")
    assert all(status == "PASS" for checks in seen.values() for status, _ in checks), seen
    assert "round trip" in seen["link"][0][1] and "Mbit/s" in seen["link"][0][1]
    assert "MTU 65536 on both ends (lo here, lo there)" in seen["mtu"][0][1], seen["mtu"]
    assert "newest on the target and on the source" in seen["common snapshot"][0][1]
    unchanged = seen["target unchanged"][0][1]
    if tier == "openzfs":
        assert "was not written since" in unchanged, unchanged
    else:
        assert "cannot tell" in unchanged, "zfs-fuse has no `written`: no probe snapshot taken"

    # a JOB: its hosts reached as the job reaches them, and its last success said
    config = write_jobs(tmp_path, zc, f'[jobs.app]\nsource = "{src}"\ntarget = "local:{dst}"\n',
                        defaults=f'ssh_config = "{sshd_local.ssh_config}"\n')
    never = zc.run("doctor", "app", "--config", str(config))
    assert never.returncode == 1 and findings(never)["job"][0][0] == "WARN", never.explain()
    assert zchunk("run", "--config", str(config)).returncode == 0
    ran = zc.run("doctor", "app", "--config", str(config))
    assert ran.returncode == 0 and "last success 0.0 h ago" in findings(ran)["job"][0][1], ran.explain()
    before = state(src_pool, dst_pool)
    spool = sorted(zc.spool_dir.rglob("*"))

    # the target's newest is not the source's (a @vzdump made on the target) and it is locked: warnings
    zfs("snapshot", f"{dst}@vzdump")
    zfs("set", "zchunk:locked=root@dr 2026-12-03T10:00:00Z: failover test", dst)
    mid = state(src_pool, dst_pool)
    run = doctor(f"local:{dst}")
    assert run.returncode == 1, run.explain()
    seen = findings(run)
    status, evidence = seen["common snapshot"][0]
    assert status == "WARN" and "vzdump" in evidence and "nearest common" in evidence, evidence
    assert seen["lock"][0][0] == "WARN" and "failover test" in seen["lock"][0][1]
    assert any(e["fix"] for e in run.of("doctor") if e["status"] == "WARN"), "every warning says its fix"

    # no common snapshot at all: a failure, exit 2
    other = f"{dst_pool.name}/other"
    zfs("create", other)
    zfs("snapshot", f"{other}@own")
    mid = state(src_pool, dst_pool)
    run = doctor(f"local:{other}")
    assert run.returncode == 2, run.explain()
    assert findings(run)["common snapshot"][0][0] == "FAIL" and "--force-delete" in run.stdout
    text = zc.run("doctor", src, f"local:{other}", *ssh, json_out=False)
    assert text.returncode == 2 and "FAIL  common snapshot" in text.stdout and "fix: " in text.stdout
    assert text.stdout.rstrip().endswith("a check failed: see above")

    # an unreachable host: that check fails, the ones that need it are not run
    dead = tmp_path / "dead_config"
    dead.write_text(f"Host dead\n  HostName 127.0.0.1\n  Port {lab.free_port()}\n")
    run = zc.run("doctor", src, f"dead:{dst}", "--ssh-config", str(dead), "--connect-patience", "2s")
    assert run.returncode == 2 and findings(run)["ssh"][0][0] == "FAIL", run.explain()
    assert "common snapshot" not in findings(run)

    assert state(src_pool, dst_pool) == mid, "doctor changed nothing on either pool"
    assert before != mid, "(the test's own changes show up: the comparison can fail)"
    assert (sorted(zc.spool_dir.rglob("*")) if zc.spool_dir.exists() else []) == spool


@pytest.mark.netns
def test_an_mtu_mismatch_on_the_path_is_a_warning(zc: Zchunk, pools: Any, wan: lab.Wan,
                                                  sshd_dst: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, MiB, seed=32, name="m")
    dst = f"{dst_pool.name}/m"
    ssh = ("--ssh-config", str(sshd_dst.ssh_config))
    run = zc.run("doctor", src, f"dst:{dst}", *ssh)
    assert [f[0] for f in findings(run)["mtu"]] == ["PASS"], run.explain()
    wan.run_in("dst", ["ip", "link", "set", "dev", "wan0", "mtu", "1400"])
    run = zc.run("doctor", src, f"dst:{dst}", *ssh)
    status, evidence = findings(run)["mtu"][0]
    assert status == "WARN" and "MTU 1500 here" in evidence and "1400 there (wan0)" in evidence, evidence
    assert run.returncode == 1 and "path MTU discovery" in run.stdout
