"""The run history (zchunk/service/history.py): SQLite in WAL mode in the state directory; runs a crash cut
short are marked interrupted on the next start; pruned by age; a full filesystem is a clear error that
leaves what was recorded intact."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.spoolfs import Tmpfs
from zchunk import errors as E
from zchunk.service.history import History

DAY = 86400.0


def test_runs_are_recorded_and_counted(tmp_path: Path) -> None:
    h = History(tmp_path / "state" / "history.sqlite")
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert h.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    t = 1_800_000_000.0
    ok = h.begin("a", now=t)
    h.end(ok, "ok", 0, wire_bytes=123, snapshots=2, outage_seconds=4.5, now=t + 10)
    for i in range(3):
        h.end(h.begin("a", now=t + 100 + i), "failed", 12, error="zfs receive failed\nmore detail", now=t + 101 + i)
    h.end(h.begin("b", now=t), "skipped", error="pre_snapshot failed", now=t + 1)
    runs = h.runs("a")
    assert [r.outcome for r in runs] == ["failed", "failed", "failed", "ok"]
    assert runs[0].error == "zfs receive failed", "one line"
    last = h.last_success("a")
    assert last is not None and (last.wire_bytes, last.snapshots, last.outage_seconds) == (123, 2, 4.5)
    assert h.failures("a") == 3 and h.last_success("b") is None
    assert h.failures("b") == 1, "a run skipped by its failing pre-snapshot command counts: replication stopped"
    assert h.totals("a") == (4, 3, 123, 4.5) and h.totals("b") == (1, 1, 0, 0.0)
    with pytest.raises(ValueError):
        h.end(ok, "fine")


def test_lag_is_measured_from_the_newest_snapshot_a_success_left(tmp_path: Path) -> None:
    h = History(tmp_path / "history.sqlite")
    t = 1_800_000_000.0
    assert h.newest_snapshot_time("a") is None
    h.end(h.begin("a", now=t), "ok", 0, now=t + 5, snapshot_time=t + 1)
    h.end(h.begin("a", now=t + 60), "failed", 11, now=t + 70, snapshot_time=t + 61)
    assert h.newest_snapshot_time("a") == t + 1, "a failed run's snapshot is not on the target"
    assert h.runs("a")[1].seconds == 5.0


def test_disable_and_enable_are_kept_with_the_reason(tmp_path: Path) -> None:
    h = History(tmp_path / "history.sqlite")
    h.disable("a", "disk swap until Friday", now=5.0)
    assert History(tmp_path / "history.sqlite").disabled() == {"a": ("disk swap until Friday", 5.0)}
    assert h.enable("a") and not h.enable("a") and h.disabled() == {}


def test_a_database_of_the_first_version_gains_the_new_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "history.sqlite"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, job TEXT NOT NULL, started REAL NOT NULL, ended REAL, "
                "outcome TEXT NOT NULL, exit_code INTEGER, error TEXT NOT NULL DEFAULT '', wire_bytes INTEGER NOT "
                "NULL DEFAULT 0, snapshots INTEGER NOT NULL DEFAULT 0, outage_seconds REAL NOT NULL DEFAULT 0, "
                "pid INTEGER)")
    old.execute("INSERT INTO runs (job, started, ended, outcome) VALUES ('a', 1, 2, 'ok')")
    old.commit()
    old.close()
    h = History(path)
    assert h.last_success("a") is not None and h.newest_snapshot_time("a") is None


def test_a_run_cut_short_by_a_crash_is_marked_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    child = subprocess.Popen(["sleep", "60"])
    try:
        h = History(path)
        mine = h.begin("a")
        h.db.execute("UPDATE runs SET pid = ? WHERE id = ?", (child.pid, mine))  # a run the child was doing
        gone = h.begin("b")
        h.db.execute("UPDATE runs SET pid = 999999999 WHERE id = ?", (gone,))  # its process is no more
        h.close()
        again = History(path)  # the service started again
        marked = again.mark_interrupted()
        assert [r.id for r in marked] == [gone]
        assert again.runs("b")[0].outcome == "interrupted" and "kill -9" in again.runs("b")[0].error
        assert again.runs("a")[0].outcome == "running", "its process still runs it"
        assert again.failures("b") == 1
    finally:
        child.kill()
        child.wait()


def test_history_is_pruned_by_age(tmp_path: Path) -> None:
    h = History(tmp_path / "history.sqlite")
    now = 1_800_000_000.0
    for age in (100, 40, 10, 1):
        h.end(h.begin("a", now=now - age * DAY), "ok", now=now - age * DAY + 5)
    h.begin("a", now=now - 200 * DAY)  # still running, however old: kept
    assert h.prune(30, now=now) == 2
    assert len(h.runs("a")) == 3


def test_a_full_state_filesystem_is_a_clear_error_and_corrupts_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("mounting a small tmpfs needs root (as the whole suite does)")
    with Tmpfs(tmp_path / "small", 256 << 10) as fs:
        h = History(fs.path / "history.sqlite")
        for i in range(5):
            h.end(h.begin("a", now=1e9 + i), "ok", now=1e9 + i + 1)
        filler = fs.fill()
        with pytest.raises(E.HistoryError, match="full|disk") as err:
            for i in range(2000):
                h.end(h.begin("a", now=2e9 + i), "failed", error="x" * 400, now=2e9 + i + 1)
        assert err.value.exit_code == 17 and "intact" in err.value.hint
        filler.unlink()
        h.close()
        again = History(fs.path / "history.sqlite")
        assert again.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert [r.outcome for r in again.runs("a", 1000) if r.started < 2e9] == ["ok"] * 5
        assert all(r.outcome in ("failed", "running") for r in again.runs("a", 5000) if r.started >= 2e9)
        with sqlite3.connect(str(fs.path / "history.sqlite")) as db:
            assert db.execute("SELECT count(*) FROM runs").fetchone()[0] >= 5


def test_a_state_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    with pytest.raises(E.HistoryError) as e:
        History(state / "history.sqlite")
    assert "writable by others" in str(e.value) and "chmod go-w" in str(e.value)
    assert not (state / "history.sqlite").exists()


def test_a_run_that_cannot_be_recorded_stops_zchunk_run_with_the_error(tmp_path: Path, monkeypatch:
                                                                       pytest.MonkeyPatch) -> None:
    """Unit (the run itself is replaced): a HistoryError inside a run is the command's error, said once, and
    the daemon looks at that job again only after a back-off, not in a tight loop."""
    import asyncio

    from zchunk.service import daemon as service
    from zchunk.service.config import Config, Job, Schedule

    async def cannot_record(self: object) -> None:
        raise E.HistoryError(path="h", what="record the start of a run of a", why="the disk is full")

    monkeypatch.setattr(service.JobRun, "run", cannot_record)
    said: list[str] = []
    job = Job("a", "tank/a", "tank/b", Schedule(every=60.0))
    svc = service.Service(Config(tmp_path / "zchunk.toml", {"a": job}), tmp_path / "state", said.append)
    with pytest.raises(E.HistoryError):
        asyncio.run(svc.run_once())
    assert any("could not run" in line and "disk is full" in line for line in said), said
    assert svc.busy_until["a"] > 0
