"""The service on real parts: jobs from a jobs file run by ``zchunk run`` and by ``zchunk daemon`` (started as
a process, signalled, killed with -9, started again), their state in ``zchunk status``, ``zchunk check``
(Nagios exit codes) and the Prometheus metrics (parsed by prometheus_client's own parser), replicating
between zfs-fuse pools, locally and over a real sshd behind the namespaced WAN with its faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.zc import REPO, Zchunk, matching, parse_events
from tests.zfsutil import assert_replica, make_source, snapshots, wait_until, zfs
from zchunk import lab
from zchunk.service.history import History

pytestmark = [pytest.mark.zfs]

MiB = 1 << 20


def write_jobs(tmp_path: Path, zc: Zchunk, jobs: str, defaults: str = "") -> Path:
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o700, exist_ok=True)
    path = etc / "zchunk.toml"
    path.write_text(f"""\
state_dir = "{zc.state_dir}"
max_parallel = 4

[defaults]
spool_dir = "{zc.spool_dir}"
chunk_size = "1M"
every = "10s"
{defaults}
{jobs}""")
    path.chmod(0o600)
    return path


def zchunk(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zchunk", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def status(config: Path) -> dict[str, dict[str, Any]]:
    p = zchunk("status", "--config", str(config), "--json")
    assert p.returncode == 0, p.stderr
    return {row["job"]: row for row in json.loads(p.stdout)}


def metrics(text: str) -> dict[tuple[str, str], float]:
    """(sample name, job) -> value, as Prometheus's own client library parses the exposition."""
    return {(s.name, s.labels.get("job", "")): s.value for family in text_string_to_metric_families(text)
            for s in family.samples}


def sync_snaps(dataset: str) -> list[str]:
    return [s for s in snapshots(dataset) if "@zchunk_" in s]


def test_run_status_check_and_metrics_on_local_pools(zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    a = make_source(src_pool, MiB, seed=1, name="a")
    b = make_source(src_pool, MiB, seed=2, name="b")
    c = make_source(src_pool, MiB, seed=3, name="c")
    d = make_source(src_pool, MiB, seed=4, name="d")
    config = write_jobs(tmp_path, zc, f"""
[jobs.a]
source = "{a}"
target = "{dst_pool.name}/a"
keep = 2

[jobs.b]
source = "{b}"
target = "{dst_pool.name}/b"
keep_source = 1
keep_target = "3"

[jobs.c]
source = "{c}"
target = "{dst_pool.name}/c"
pre_snapshot = ["/bin/sh", "-c", "echo database busy >&2; exit 4"]

[jobs.never]
source = "{d}"
target = "{dst_pool.name}/d"
cron = "0 0 1 1 *"
timezone = "UTC"
""")
    cfg = ("--config", str(config))
    # named jobs run now; the failing pre-snapshot command skips c (exit 18) and changes nothing
    run = zchunk("run", "a", "b", "c", *cfg, "--json")
    assert run.returncode == 18, run.stdout + run.stderr
    ran = {e["job"]: e for e in parse_events(run.stdout) if e["event"] == "job_run"}
    assert {j: e["outcome"] for j, e in ran.items()} == {"a": "ok", "b": "ok", "c": "skipped"}
    assert "database busy" in ran["c"]["error"] and sync_snaps(c) == []
    for src, dst in ((a, "a"), (b, "b")):
        assert_replica(src, f"{dst_pool.name}/{dst}", sync_snaps(src)[-1].split("@")[1])
    assert ran["a"]["snapshots"] == 2, "@s1 (full), then the sync snapshot (incremental)"
    assert ran["a"]["wire_bytes"] > MiB // 2
    log = (zc.state_dir / "logs" / "a.jsonl").read_text()
    assert '"event": "verified"' in log, "each run's events are kept in the job's log"

    rows = status(config)
    assert {j: r["state"] for j, r in rows.items()} == {"a": "ok", "b": "ok", "c": "failed", "never": "pending"}
    assert 0 <= rows["a"]["lag_seconds"] < 60 and rows["a"]["last_success"].endswith("Z")
    assert rows["c"]["failures"] == 1 and "database busy" in rows["c"]["last_error"]
    assert rows["c"]["last_success"] is None and rows["c"]["lag_seconds"] is None
    assert rows["a"]["next_run"] is not None and rows["never"]["next_run"].endswith("-01-01T00:00:00Z"), \
        "a cron job never run waits for its time"
    text = zchunk("status", *cfg)
    assert text.returncode == 0 and text.stdout.splitlines()[0].split()[:3] == ["JOB", "STATE", "LAST"]
    assert "database busy" in text.stdout

    # nothing is due right after: no run, exit 0
    again = zchunk("run", *cfg)
    assert again.returncode == 0 and "no job is due" in again.stderr, again.stderr
    # a dry run says each job's plan and changes and records nothing
    plan = zchunk("run", "a", "--dry-run", *cfg)
    assert plan.returncode == 0 and "would" in plan.stderr and f"{dst_pool.name}/a" in plan.stderr, plan.stderr
    assert len(History(zc.state_dir / "history.sqlite").runs("a")) == 1 and len(sync_snaps(a)) == 1
    # ... until the schedule (10 s) comes round: a and b run again, c too (its retry_delay, 60 s, is later)
    time.sleep(10)
    again = zchunk("run", *cfg, "--json")
    outcomes = {e["job"]: e["outcome"] for e in parse_events(again.stdout) if e["event"] == "job_run"}
    assert outcomes == {"a": "ok", "b": "ok", "c": "skipped"}, again.stderr
    time.sleep(10)
    zchunk("run", "a", "b", *cfg)
    # retention per side: a keeps 2 on both, b 1 on the source and 3 on the target
    assert (len(sync_snaps(a)), len(sync_snaps(f"{dst_pool.name}/a"))) == (2, 2)
    assert (len(sync_snaps(b)), len(sync_snaps(f"{dst_pool.name}/b"))) == (1, 3)

    # Nagios: exit code and first word by state; perfdata
    ok = zchunk("check", "a", *cfg)
    assert ok.returncode == 0 and ok.stdout.startswith("ZCHUNK OK - a: lag "), ok.stdout
    assert " | lag=" in ok.stdout and ";3600;14400;0 failures=0;1;3;0" in ok.stdout
    time.sleep(2)
    assert zchunk("check", "a", "--warn", "1s", "--crit", "1h", *cfg).returncode == 1
    crit = zchunk("check", "a", "b", "--warn", "1s", "--crit", "1s", *cfg)
    assert crit.returncode == 2 and crit.stdout.startswith("ZCHUNK CRITICAL") and "a_lag=" in crit.stdout
    assert zchunk("check", "c", *cfg).returncode == 1, "failing, no replica yet: WARNING"
    assert zchunk("check", "c", "--crit-failures", "2", *cfg).returncode == 2
    never = zchunk("check", "never", *cfg)
    assert never.returncode == 3 and "never replicated yet" in never.stdout, never.stdout
    assert zchunk("check", "--all", *cfg).returncode == 1, "the worst: c's WARNING (over never's UNKNOWN)"
    unknown = zchunk("check", "nosuch", *cfg)
    assert unknown.returncode == 3 and unknown.stdout.startswith("ZCHUNK UNKNOWN"), unknown.stdout
    assert "no job 'nosuch'" in unknown.stdout
    assert zchunk("check", *cfg).returncode == 3, "nothing to check"
    assert zchunk("check", "a", "--config", str(tmp_path / "missing.toml")).returncode == 3

    # disable / enable
    off = zchunk("disable", "b", "--why", "disk swap until Friday", *cfg)
    assert off.returncode == 0, off.stderr
    row = status(config)["b"]
    assert row["state"] == "disabled" and row["disabled_why"] == "disk swap until Friday"
    warn = zchunk("check", "b", *cfg)
    assert warn.returncode == 1 and "disabled (disk swap until Friday)" in warn.stdout
    time.sleep(10)
    zchunk("run", *cfg)
    assert len(History(zc.state_dir / "history.sqlite").runs("b")) == 3, "a disabled job is not run"
    assert zchunk("enable", "b", *cfg).returncode == 0 and status(config)["b"]["state"] == "ok"

    # Prometheus: the exposition parsed by prometheus_client; the textfile written whole
    m = zchunk("metrics", *cfg)
    assert m.returncode == 0, m.stderr
    values = metrics(m.stdout)
    history = History(zc.state_dir / "history.sqlite")
    assert values[("zchunk_job_runs_total", "a")] == len(history.runs("a")) == 4
    assert values[("zchunk_job_failures_total", "c")] == 3 and values[("zchunk_job_consecutive_failures", "c")] == 3
    assert values[("zchunk_job_wire_bytes_total", "a")] == sum(r.wire_bytes for r in history.runs("a")) > MiB // 2
    assert 0 < values[("zchunk_job_lag_seconds", "a")] < 120 and values[("zchunk_job_running", "a")] == 0
    assert ("zchunk_job_lag_seconds", "c") not in values, "no replica, no lag (not a made-up 0)"
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    assert zchunk("metrics", *cfg, "--textfile", str(textfile)).returncode == 0
    assert metrics((textfile / "zchunk.prom").read_text())[("zchunk_job_runs_total", "a")] == 4
    assert [p.name for p in textfile.iterdir()] == ["zchunk.prom"], "no temporary file left"

    # bad input: a job that is not there, a jobs file with a problem: exit 2 / 16, nothing run
    assert zchunk("run", "nosuch", *cfg).returncode == 2
    config.write_text(config.read_text() + "\n[jobs.e]\nsource = \"x/y\"\ntarget = \"x/z\"\nevry = \"5m\"\n")
    bad = zchunk("run", *cfg)
    assert bad.returncode == 16 and "evry" in bad.stderr, bad.stderr
    assert len(History(zc.state_dir / "history.sqlite").runs("a")) == 4


def test_a_locked_target_is_refused_and_its_job_shows_locked(zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, MiB, seed=11, name="t")
    zfs("create", f"{src}/child")
    zfs("create", f"{src}/other")
    dst = f"{dst_pool.name}/t"
    config = write_jobs(tmp_path, zc, f"""
[jobs.t]
source = "{src}"
target = "{dst}"
recursive = true
""")
    cfg = ("--config", str(config))
    assert zchunk("run", *cfg).returncode == 0
    before = {ds: snapshots(ds) for ds in (src, f"{src}/child", f"{src}/other")}

    # one child of the replica locked (a failover of that dataset): it fails alone, the others go on
    lock = "root@backup 2026-12-03T16:00:00Z: failover test of vm-101"
    zfs("set", f"zchunk:locked={lock}", f"{dst}/child")
    run = zc.run("sync", "-r", src, dst)
    assert run.returncode == 15, run.explain()
    failed = run.of("dataset_failed")
    assert [e["source"] for e in failed] == [f"{src}/child"] and lock in failed[0]["error"], failed
    assert snapshots(f"{src}/child") == before[f"{src}/child"], "its share of the tree snapshot given back"
    assert snapshots(f"{dst}/child")[-1].split("@")[1] == before[f"{src}/child"][-1].split("@")[1]
    newest = sync_snaps(src)[-1].split("@")[1]
    assert_replica(f"{src}/other", f"{dst}/other", newest)

    # the replica's root locked: refused before anything is taken, exit 9, naming the lock
    zfs("inherit", "zchunk:locked", f"{dst}/child")
    zfs("set", f"zchunk:locked={lock}", dst)
    taken = {ds: snapshots(ds) for ds in (src, f"{src}/child", f"{src}/other")}
    run = zc.run("sync", "-r", src, dst)
    assert run.returncode == 9 and run.error()["error"] == "TargetLocked", run.explain()
    assert lock in run.error()["message"] and "zfs inherit zchunk:locked" in run.error()["hint"]
    assert {ds: snapshots(ds) for ds in taken} == taken, "nothing taken on the source"

    # the job: skipped and shown locked, a WARNING for monitoring, not a failed run
    time.sleep(10)
    ran = zchunk("run", *cfg, "--json")
    assert ran.returncode == 0, ran.stderr
    assert [e["outcome"] for e in parse_events(ran.stdout) if e["event"] == "job_run"] == ["locked"]
    row = status(config)["t"]
    assert row["state"] == "locked" and lock in row["last_error"] and row["failures"] == 0, row
    check = zchunk("check", "t", *cfg)
    assert check.returncode == 1 and "locked (" in check.stdout and lock in check.stdout, check.stdout

    # unlocked: the job runs again
    zfs("inherit", "zchunk:locked", dst)
    assert zchunk("run", "t", *cfg).returncode == 0 and status(config)["t"]["state"] == "ok"
    newest = sync_snaps(src)[-1].split("@")[1]
    for ds in ("", "/child", "/other"):
        assert_replica(src + ds, dst + ds, newest)


def test_an_unreachable_target_fails_its_job_only(zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    ok = make_source(src_pool, MiB, seed=12, name="ok")
    lost = make_source(src_pool, MiB, seed=13, name="lost")
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(f"Host gone\n  HostName 127.0.0.1\n  Port {lab.free_port()}\n")  # nobody listens
    config = write_jobs(tmp_path, zc, f"""
[jobs.ok]
source = "{ok}"
target = "{dst_pool.name}/ok"

[jobs.lost]
source = "{lost}"
target = "gone:{dst_pool.name}/lost"
ssh_config = "{ssh_config}"
connect_patience = "2s"
""")
    run = zchunk("run", "--config", str(config), "--json")
    assert run.returncode == 5, run.stderr
    outcomes = {e["job"]: (e["outcome"], e["exit_code"]) for e in parse_events(run.stdout) if e["event"] == "job_run"}
    assert outcomes == {"ok": ("ok", 0), "lost": ("failed", 5)}, run.stderr
    assert_replica(ok, f"{dst_pool.name}/ok", sync_snaps(ok)[-1].split("@")[1])
    rows = status(config)
    assert rows["ok"]["state"] == "ok" and rows["lost"]["state"] == "failed"
    assert "cannot reach gone" in rows["lost"]["last_error"], rows["lost"]
    assert sync_snaps(lost) == [], "nothing taken for the job that could not reach its target"


class Daemon:
    """``zchunk daemon`` as a process: its log in a file, killed by pid (and its process group) at the end."""

    def __init__(self, config: Path, log: Path, port: int | None = None) -> None:
        self.log_path = log
        self.log = log.open("a")
        argv = [sys.executable, "-m", "zchunk", "daemon", "--config", str(config)]
        if port is not None:
            argv += ["--metrics-listen", f"127.0.0.1:{port}"]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=self.log, stderr=self.log, start_new_session=True)

    def said(self) -> str:
        return self.log_path.read_text()

    def wait_said(self, text: str, timeout: float = 120, after: int = 0) -> None:
        wait_until(lambda: text in self.said()[after:] or self.proc.poll() is not None, timeout, f"daemon: {text}")
        assert text in self.said()[after:], f"the daemon exited ({self.proc.returncode}):\n{self.said()[-3000:]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self.log.close()


def scrape(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return metrics(r.read().decode())


def runs(zc: Zchunk, job: str) -> list[Any]:
    return History(zc.state_dir / "history.sqlite").runs(job, 100)[::-1]


@pytest.mark.netns
def test_the_daemon_schedules_survives_kill9_reloads_and_stops(zc: Zchunk, pools: Any, wan: lab.Wan,
                                                                sshd_dst: lab.Sshd, tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    small = make_source(src_pool, MiB, seed=5, name="small")
    big = make_source(src_pool, 24 * MiB, seed=6, name="big", compressible=0.0)
    config = write_jobs(tmp_path, zc, f"""
[jobs.small]
source = "{small}"
target = "dst:{dst_pool.name}/small"

[jobs.big]
source = "{big}"
target = "dst:{dst_pool.name}/big"
bwlimit = "1M"
every = "1h"
""", defaults=f'ssh_config = "{sshd_dst.ssh_config}"\n')
    port = lab.free_port()
    daemon = Daemon(config, tmp_path / "daemon.log", port)
    try:
        # both start at once; small runs again on its schedule while big is still moving
        wait_until(lambda: sum(r.outcome == "ok" for r in runs(zc, "small")) >= 2, 90, "small: two runs")
        first, second = runs(zc, "small")[:2]
        assert 9 <= second.started - first.started <= 20, "every = 10s"
        # the live transfer in status and on /metrics
        wait_until(lambda: (status(config)["big"].get("live") or {}).get("bytes_done", 0) > 4 * MiB, 90,
                   "big: 4 MiB moved")
        row = status(config)["big"]
        assert row["state"] == "running" and 0 < row["live"]["percent"] < 100 and row["live"]["rate"] > 0
        # one run per job: a zchunk run (a timer, an admin) leaves it to the daemon
        busy = zchunk("run", "big", "--config", str(config), "--json")
        assert busy.returncode == 0, busy.stderr
        assert [e["outcome"] for e in parse_events(busy.stdout) if e["event"] == "job_run"] == ["busy"]
        scraped = scrape(port)
        assert scraped[("zchunk_job_running", "big")] == 1 and scraped[("zchunk_job_transfer_bytes_done", "big")] > 0
        assert scraped[("zchunk_job_runs_total", "small")] >= 2

        # kill -9 mid-transfer: the coordinator it ran goes with it, the agents stay
        sessions = str(zc.state_dir / "sessions")
        assert matching(sessions), "a zchunk sync of the daemon is running"
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(10)
        wait_until(lambda: not matching(sessions), 10, "the daemon's zchunk sync gone with it")
        assert matching(str(zc.spool_dir)), "the agents keep spooling"
        wire_before = _last_wire(zc, "big")
        daemon.stop()

        daemon = Daemon(config, tmp_path / "daemon.log", port)
        daemon.wait_said("big: its run of")
        wait_until(lambda: any(r.outcome == "ok" for r in runs(zc, "big")), 180, "big: done after the restart")
        big_runs = runs(zc, "big")
        assert [r.outcome for r in big_runs[:2]] == ["interrupted", "ok"], big_runs
        assert "without a word" in big_runs[0].error
        resumed = big_runs[1]
        log = (zc.state_dir / "logs" / "big.jsonl").read_text()
        assert '"event": "reattach"' in log, "the restarted run continued the session"
        moved = wire_before + resumed.wire_bytes
        # (the killed run's last progress event is up to a second, 1 MiB at --bwlimit 1M, behind its bytes)
        assert 22 * MiB <= moved <= 24 * MiB * 1.03 + 2 * MiB, \
            f"every chunk moved once: {wire_before} + {resumed.wire_bytes} bytes for a 24 MiB stream"
        assert_replica(big, f"{dst_pool.name}/big", sync_snaps(big)[0].split("@")[1])

        # SIGHUP: a file with a problem keeps the old jobs; a good one adds a job
        late = make_source(src_pool, 16 * MiB, seed=8, name="late", compressible=0.0)
        good = config.read_text()
        config.write_text(good + "\n[jobs.late]\nsource = \"x\"\n")
        mark = len(daemon.said())
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_said("NOT reloaded", after=mark)
        config.write_text(good + f'\n[jobs.late]\nsource = "{late}"\ntarget = "dst:{dst_pool.name}/late"\n'
                          'bwlimit = "1M"\n')
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_said("new: late", after=mark)
        wait_until(lambda: (status(config)["late"].get("live") or {}).get("bytes_done", 0) > MiB, 90,
                   "the new job moving")

        # SIGTERM: no new runs; the running one recorded interrupted (its agents keep it); exit 0
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(30) == 0, daemon.said()[-2000:]
        assert "SIGTERM: taking no new runs" in daemon.said() and not matching(sessions)
        stopped = runs(zc, "late")[-1]
        assert stopped.outcome == "interrupted" and "service stopped" in stopped.error, stopped
        assert status(config)["late"]["next_run"] is not None
    finally:
        daemon.stop()


def _last_wire(zc: Zchunk, job: str) -> int:
    """Bytes the job's newest run had put on the link, by its last progress event."""
    wire = 0
    for e in parse_events((zc.state_dir / "logs" / f"{job}.jsonl").read_text()):
        if e["event"] == "session":
            wire = 0
        elif e["event"] == "progress":
            wire = int(e["wire_bytes"])
    return wire


@pytest.mark.netns
def test_retries_carry_a_job_through_an_outage_longer_than_its_patience(zc: Zchunk, pools: Any, wan: lab.Wan,
                                                                        sshd_dst: lab.Sshd,
                                                                        tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 12 * MiB, seed=7, name="r", compressible=0.0)
    config = write_jobs(tmp_path, zc, f"""
[jobs.r]
source = "{src}"
target = "dst:{dst_pool.name}/r"
every = "1h"
patience = "5s"
connect_patience = "3s"
retries = 6
retry_delay = "2s"
bwlimit = "1M"
""", defaults=f'ssh_config = "{sshd_dst.ssh_config}"\n')
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        wait_until(lambda: (status(config)["r"].get("live") or {}).get("bytes_done", 0) > 2 * MiB, 90, "moving")
        wan.outage("dst", 22, 20)  # every connection to the target reset for 20 s: four patiences
        wait_until(lambda: any(r.outcome == "ok" for r in runs(zc, "r")), 240, "the job succeeded")
        outcomes = [(r.outcome, r.exit_code) for r in runs(zc, "r")]
        assert outcomes[-1] == ("ok", 0) and len(outcomes) >= 2, outcomes
        assert all(o == "failed" and code in (5, 11) for o, code in outcomes[:-1]), outcomes
        gaps = [b.started - a.ended for a, b in zip(runs(zc, "r"), runs(zc, "r")[1:])]
        assert all(g >= 1.5 for g in gaps), f"each retry after its back-off: {gaps}"
        moved = sum(r.wire_bytes for r in runs(zc, "r"))
        assert 10 * MiB <= moved <= 12 * MiB * 1.03 + 2 * MiB, f"{moved} bytes for a 12 MiB stream"
        assert_replica(src, f"{dst_pool.name}/r", sync_snaps(src)[-1].split("@")[1])
        row = status(config)["r"]
        assert row["state"] == "ok" and row["failures"] == 0 and row["next_run"] is not None
    finally:
        daemon.stop()


def test_metrics_listen_on_loopback_unless_an_address_is_given() -> None:
    from zchunk import errors as E
    from zchunk.cli import _listen_address

    assert _listen_address("9187") == ("127.0.0.1", 9187)
    assert _listen_address(":9187") == ("127.0.0.1", 9187)
    assert _listen_address("0.0.0.0:9187") == ("0.0.0.0", 9187)
    assert _listen_address("[::1]:9187") == ("::1", 9187)
    for bad in ("", "host", "1.2.3.4:99999", "1.2.3.4:x"):
        with pytest.raises(E.UsageError):
            _listen_address(bad)
