"""The jobs file (zchunk/service/config.py) and `zchunk config check`: every problem with file, line and key,
unknown keys refused, [defaults] under each job, every zchunk sync option under its long name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.zc import REPO
from zchunk import cli
from zchunk.service import config as cfg

GOOD = """\
max_parallel = 2

[defaults]
every = "15m"
keep = 3
ssh_config = "/etc/zchunk/ssh_config"
chunk_size = "8M"

[jobs.vm-100]
source = "rpool/data/vm-100-disk-0"
target = "backup:tank/node1/vm-100-disk-0"
cron = "*/30 8-18 * * 1-5"
every = "1h"
"""


def write(tmp_path: Path, text: str, name: str = "zchunk.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    p.chmod(0o600)
    return p


def check(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zchunk", "config", "check", "--config", str(path), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_a_good_file_gives_jobs_over_their_defaults(tmp_path: Path) -> None:
    text = GOOD.replace('every = "1h"\n', "") + """
[jobs.home]
source = "tank/home"
target = "backup:tank/node1/home"
keep_target = "10,1h1d,1d1w,1w1m"
retries = 5
retry_delay = "2m"
pre_snapshot = ["/usr/local/bin/freeze", "a b; rm -rf /"]
hook_timeout = "30s"
post_snapshot = ["/usr/local/bin/thaw"]
recursive = true
exclude = ["/tmp$"]
bwlimit = "Mon-Fri 08:00-18:00=2M, *=unlimited"
timezone = "Europe/Berlin"
enabled = false
"""
    (tmp_path / "ssh_config").write_text("Host backup\n  HostName 127.0.0.1\n")
    text = text.replace("/etc/zchunk/ssh_config", str(tmp_path / "ssh_config"))
    checked = cfg.read(write(tmp_path, text))
    assert checked.problems == [] and checked.config is not None
    c = checked.config
    assert c.max_parallel == 2 and c.history_days == 90 and sorted(c.jobs) == ["home", "vm-100"]
    vm = c.jobs["vm-100"]
    assert vm.schedule == cfg.Schedule(cron="*/30 8-18 * * 1-5") and vm.keep_source == cfg.Retention(3)
    assert vm.sync == {"ssh_config": str(tmp_path / "ssh_config"), "chunk_size": "8M"} and vm.enabled
    home = c.jobs["home"]
    assert home.schedule.every == 900 and home.schedule.tz == "Europe/Berlin" and not home.enabled
    assert home.keep_source == cfg.Retention(3), "keep from [defaults] on the side it does not override"
    day, week, month = 86400.0, 7 * 86400.0, 30 * 86400.0
    assert home.keep_target == cfg.Retention(10, ((3600.0, day), (day, week), (week, month)))
    assert home.pre_snapshot == cfg.Hook(("/usr/local/bin/freeze", "a b; rm -rf /"), 30.0), "argv, no shell"
    assert home.post_snapshot == cfg.Hook(("/usr/local/bin/thaw",), 30.0)
    assert (home.retries, home.retry_delay) == (5, 120.0)
    assert home.sync["timezone"] == "Europe/Berlin" and home.sync["recursive"] is True
    assert home.origin["chunk_size"] == ("defaults", "chunk_size") and home.origin["exclude"] == ("jobs", "home",
                                                                                                 "exclude")
    run = check(write(tmp_path, text))
    assert run.returncode == 0 and "2 job(s), no problem: home, vm-100" in run.stdout, run.stdout + run.stderr


def test_every_problem_is_said_with_file_line_and_key(tmp_path: Path) -> None:
    text = """\
max_paralel = 2

[defaults]
every = "15 minutes"

[jobs.a]
source = "rpool/a"
target = "backup:tank/a"
chunk-size = "8M"
keep = "10,1h"
pre_snapshot = "freeze && sync"

[jobs.b]
source = "rpool/b"
target = "rpool/b"
cron = "*/30 8-18 * *"
retries = -1
spool_max = "lots"
identifier = "no spaces please"
send_option = ["-R"]

[jobs.c]
target = "backup:tank/c"
keep_sync_snaps = 3
timezone = "Mars/Olympus"
"""
    path = write(tmp_path, text)
    run = check(path)
    assert run.returncode == 16, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    expect = [
        (1, "max_paralel", "unknown key"),
        (4, "defaults.every", "a duration"),
        (9, "jobs.a.chunk-size", "did you mean chunk_size"),
        (10, "jobs.a.keep", "'1h' is not INTERVALSPAN"),
        (11, "jobs.a.pre_snapshot", "without a shell"),
        (15, "jobs.b.target", "the same as source"),
        (16, "jobs.b.cron", "five fields"),
        (17, "jobs.b.retries", "0 to 100"),
        (18, "jobs.b.spool_max", "--spool-max"),
        (19, "jobs.b.identifier", "1-40 letters"),
        (20, "jobs.b.send_option", "-R"),
        (22, "jobs.c", "no source"),
        (24, "jobs.c.keep_sync_snaps", "use keep"),
        (25, "jobs.c.timezone", "not a time zone"),
    ]
    for line, key, words in expect:
        want = f"{path}:{line}: {key}: "
        assert any(x.startswith(want) and words in x for x in lines), f"{want}... {words!r} in:\n" + "\n".join(lines)
    assert lines[-1] == f"{path}: {len(lines) - 1} problem(s)"
    js = check(path, "--json")
    doc = json.loads(js.stdout.splitlines()[-1])
    assert js.returncode == 16 and doc["event"] == "config_check" and doc["ok"] is False and doc["jobs"] == []
    assert {(p["line"], p["key"]) for p in doc["problems"]} >= {(line, key) for line, key, _ in expect}


def test_a_file_others_may_write_or_that_is_missing_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    path.chmod(0o666)
    run = check(path)
    assert run.returncode == 16 and "writable by others" in run.stdout and "chmod go-w" in run.stdout
    path.chmod(0o600)
    os.chmod(tmp_path, 0o777)
    try:
        assert "writable by others" in check(path).stdout, "its directory too"
    finally:
        os.chmod(tmp_path, 0o700)
    missing = check(tmp_path / "nope.toml")
    assert missing.returncode == 16 and "no such file" in missing.stdout
    broken = check(write(tmp_path, "[jobs.a\nsource = 1\n", "broken.toml"))
    assert broken.returncode == 16 and "broken.toml:1: not valid TOML" in broken.stdout


def test_the_config_path_comes_from_the_option_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cfg.ENV, raising=False)
    assert cfg.config_path(None) == Path("/etc/zchunk/zchunk.toml")
    monkeypatch.setenv(cfg.ENV, "/srv/z.toml")
    assert cfg.config_path(None) == Path("/srv/z.toml") and cfg.config_path("x.toml") == Path("x.toml")


def test_schedules_give_the_next_run() -> None:
    now = datetime(2026, 12, 3, 12, 10, tzinfo=timezone.utc)  # a Thursday
    assert cfg.Schedule(every=900).next_after(now) == datetime(2026, 12, 3, 12, 25, tzinfo=timezone.utc)
    nxt = cfg.Schedule(cron="*/30 8-18 * * 1-5", tz="UTC").next_after(now)
    assert nxt.astimezone(timezone.utc) == datetime(2026, 12, 3, 12, 30, tzinfo=timezone.utc)
    berlin = cfg.Schedule(cron="0 8 * * *", tz="Europe/Berlin").next_after(now)
    assert berlin.astimezone(timezone.utc) == datetime(2026, 12, 4, 7, 0, tzinfo=timezone.utc), "8:00 in Berlin"


def test_every_sync_option_has_a_job_key_or_a_reason() -> None:
    """A job sets any zchunk sync option under its long name: the table follows the command."""
    import typer.main

    command = typer.main.get_command(cli.app).commands["sync"]  # type: ignore[attr-defined]
    names = {p.name for p in command.params}
    assert names - {"keep"} == (set(cfg.SYNC_KEYS) | set(cfg.NOT_JOB_KEYS)) - {"keep"}, \
        "a new sync option needs a job key (config.SYNC_KEYS) or a reason it has none (NOT_JOB_KEYS)"
    assert "keep" in cfg.JOB_KEYS, "in a job, keep is the retention; --keep (session directories) has no key"


def test_the_readmes_example_is_a_good_jobs_file(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    checked = cfg.read(write(tmp_path, example))
    assert checked.problems == [] and checked.config is not None, checked.problems
    job = checked.config.jobs["vm-100"]
    assert job.schedule == cfg.Schedule(cron="*/30 8-18 * * 1-5", tz="Europe/Berlin")
    assert job.keep_source == cfg.Retention(3) and len(job.keep_target.grid) == 3
    assert job.sync["recursive"] is True and job.sync["timezone"] == "Europe/Berlin"


def test_hostile_strings_are_refused_or_stay_literal(tmp_path: Path) -> None:
    """Shell metacharacters: a dataset name with them is not a ZFS name (refused where written); in a command
    they are one argument of an argv, never seen by a shell (tests/test_hooks.py runs one)."""
    pwned = tmp_path / "pwned"
    text = f"""\
[defaults]
every = "15m"

[jobs.a]
source = "tank/a; touch {pwned}"
target = "backup:tank/$(touch {pwned})"
pre_snapshot = ["/bin/echo", "$(touch {pwned})", "`touch {pwned}`"]
"""
    run = check(write(tmp_path, text))
    assert run.returncode == 16, run.stdout
    lines = run.stdout.splitlines()
    assert any(":5: jobs.a.source: invalid dataset name" in line and "contains ';'" in line for line in lines), lines
    assert any(":6: jobs.a.target: invalid dataset name" in line and "contains '$('" in line for line in lines)
    assert not any("pre_snapshot" in line for line in lines), "a command's arguments may hold anything"
    assert not pwned.exists()


def test_a_fan_out_job_lists_its_targets_and_bad_lists_are_refused(tmp_path: Path) -> None:
    """``targets = [...]``: the job runs ``zchunk sync SOURCE T1 T2`` (one zfs send for both); a list of one,
    a target named twice, the source among them, target and targets together, or -r are refused at their
    line; a runbook given the job by name asks for the one target."""
    good = """\
[jobs.fan]
source = "rpool/data"
targets = ["b1:tank/data", "b2:tank/data"]
every = "1h"
detach_after = "10m"
"""
    checked = cfg.read(write(tmp_path, good))
    assert checked.problems == [] and checked.config is not None, checked.problems
    job = checked.config.jobs["fan"]
    assert job.all_targets == ("b1:tank/data", "b2:tank/data") and job.target == "b1:tank/data, b2:tank/data"
    from zchunk.service.runner import sync_argv

    argv = sync_argv(job, tmp_path)
    assert argv[3:7] == ["sync", "rpool/data", "b1:tank/data", "b2:tank/data"], argv
    assert argv[argv.index("--detach-after") + 1] == "10m"
    doctor = subprocess.run([sys.executable, "-m", "zchunk", "doctor", "fan", "--config",
                             str(write(tmp_path, good))], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert doctor.returncode == 2 and "several targets" in doctor.stderr, doctor.stderr
    bad = """\
[defaults]
every = "1h"

[jobs.one]
source = "rpool/a"
targets = ["b1:tank/a"]

[jobs.twice]
source = "rpool/b"
targets = ["b1:tank/b", "b1:tank/b"]

[jobs.both]
source = "rpool/c"
target = "b1:tank/c"
targets = ["b1:tank/c", "b2:tank/c"]

[jobs.self]
source = "rpool/d"
targets = ["rpool/d", "b2:tank/d"]

[jobs.tree]
source = "rpool/e"
targets = ["b1:tank/e", "b2:tank/e"]
recursive = true

[jobs.late]
source = "rpool/f"
targets = ["b1:tank/f", "b2:tank/f"]
detach_after = "soon"
"""
    path = write(tmp_path, bad)
    run = check(path)
    assert run.returncode == 16, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    for line, key, words in ((6, "jobs.one.targets", "two or more"), (10, "jobs.twice.targets", "named twice"),
                             (15, "jobs.both.targets", "not both"), (19, "jobs.self.targets", "the source"),
                             (23, "jobs.tree.targets", "recursive with several targets"),
                             (29, "jobs.late.detach_after", "a duration")):
        want = f"{path}:{line}: {key}: "
        assert any(x.startswith(want) and words in x for x in lines), f"{want}... {words!r} in:\n" + "\n".join(lines)
