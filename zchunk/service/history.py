"""Every run of a job, in SQLite (WAL) in the state directory: what ``zchunk status``, ``check`` and the
metrics say, and what a restarted service finds of the runs a crash cut short.

Table ``runs``: job, start, end, outcome (running, ok, failed, skipped, interrupted,
locked), exit code, the error
in one line, bytes on the wire, snapshots sent, outage seconds, the pid of the process running it, and when
the snapshot the run left on the target was taken (its lag is measured from that). Table ``disabled``: jobs
``zchunk disable`` stopped, and why.
Writes are single transactions: a full disk fails the write (``HistoryError``, said as such) and leaves
what was recorded intact.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import errors as E

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    job TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    outcome TEXT NOT NULL,
    exit_code INTEGER,
    error TEXT NOT NULL DEFAULT '',
    wire_bytes INTEGER NOT NULL DEFAULT 0,
    snapshots INTEGER NOT NULL DEFAULT 0,
    outage_seconds REAL NOT NULL DEFAULT 0,
    pid INTEGER,
    snapshot_time REAL
);
CREATE INDEX IF NOT EXISTS runs_job ON runs (job, started);
CREATE TABLE IF NOT EXISTS disabled (
    job TEXT PRIMARY KEY,
    why TEXT NOT NULL DEFAULT '',
    since REAL NOT NULL
);
"""

OUTCOMES = ("running", "ok", "failed", "skipped", "interrupted", "locked")


@dataclass(frozen=True)
class Run:
    id: int
    job: str
    started: float
    ended: float | None
    outcome: str
    exit_code: int | None
    error: str
    wire_bytes: int
    snapshots: int
    outage_seconds: float
    pid: int | None
    snapshot_time: float | None = None

    @property
    def seconds(self) -> float | None:
        return None if self.ended is None else max(0.0, self.ended - self.started)


class History:
    """The runs database at ``path`` (``<state dir>/history.sqlite``), created on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = path.parent.stat()
            if st.st_mode & 0o022 or st.st_uid not in (0, os.geteuid()):
                raise E.HistoryError(path=str(path), what="trust it", why=(
                    f"the state directory {path.parent} is writable by others or owned by uid {st.st_uid}: "
                    f"chown {os.geteuid()} and chmod go-w {path.parent}"))
            self.db = sqlite3.connect(str(path), timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(runs)")}
            if "snapshot_time" not in columns:  # a database of the first version
                self.db.execute("ALTER TABLE runs ADD COLUMN snapshot_time REAL")
        except (OSError, sqlite3.Error) as e:
            raise _error(path, "open", e) from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            raise _error(self.path, what, e) from None

    def begin(self, job: str, now: float | None = None) -> int:
        with self._write("record the start of a run of " + job) as db:
            cur = db.execute("INSERT INTO runs (job, started, outcome, pid) VALUES (?, ?, 'running', ?)",
                             (job, time.time() if now is None else now, os.getpid()))
            return int(cur.lastrowid or 0)

    def end(self, run_id: int, outcome: str, exit_code: int | None = None, error: str = "", wire_bytes: int = 0,
            snapshots: int = 0, outage_seconds: float = 0.0, now: float | None = None,
            snapshot_time: float | None = None) -> None:
        if outcome not in OUTCOMES or outcome == "running":
            raise ValueError(f"outcome {outcome!r}")
        line = error.strip().splitlines()[0] if error.strip() else ""
        with self._write("record the end of a run") as db:
            db.execute("UPDATE runs SET ended = ?, outcome = ?, exit_code = ?, error = ?, wire_bytes = ?, "
                       "snapshots = ?, outage_seconds = ?, snapshot_time = ? WHERE id = ?",
                       (time.time() if now is None else now, outcome, exit_code, line[:500], wire_bytes,
                        snapshots, outage_seconds, snapshot_time, run_id))

    def mark_interrupted(self, alive: set[int] | None = None) -> list[Run]:
        """Runs still 'running' whose process is gone (a crash, kill -9, a reboot): marked 'interrupted'.
        ``alive``: pids known to be running them (default: asked of the system). The runs marked."""
        gone = [r for r in self._select("WHERE outcome = 'running'", ())
                if not (r.pid in alive if alive is not None else pid_alive(r.pid))]
        if gone:
            with self._write("mark interrupted runs") as db:
                db.executemany("UPDATE runs SET outcome = 'interrupted', ended = started, "
                               "error = 'the process running it ended without a word (crash, kill -9, reboot)' "
                               "WHERE id = ?", [(r.id,) for r in gone])
        return gone

    def interrupt(self, run_id: int, why: str, now: float | None = None) -> None:
        """A run this process stops on purpose (the service is stopping): interrupted, to be continued."""
        with self._write("record an interrupted run") as db:
            db.execute("UPDATE runs SET outcome = 'interrupted', ended = ?, error = ? WHERE id = ?",
                       (time.time() if now is None else now, why, run_id))

    def disable(self, job: str, why: str, now: float | None = None) -> None:
        with self._write("disable " + job) as db:
            db.execute("INSERT OR REPLACE INTO disabled (job, why, since) VALUES (?, ?, ?)",
                       (job, why, time.time() if now is None else now))

    def enable(self, job: str) -> bool:
        """Whether it was disabled."""
        with self._write("enable " + job) as db:
            return db.execute("DELETE FROM disabled WHERE job = ?", (job,)).rowcount > 0

    def disabled(self) -> dict[str, tuple[str, float]]:
        """Jobs ``zchunk disable`` stopped: why and since when."""
        try:
            return {job: (why, since) for job, why, since in self.db.execute("SELECT job, why, since FROM disabled")}
        except sqlite3.Error as e:
            raise _error(self.path, "read", e) from None

    def totals(self, job: str) -> tuple[int, int, int, float]:
        """Of the runs kept: how many ended, how many failed (or were skipped), bytes on the wire, outage seconds."""
        try:
            row = self.db.execute("SELECT COUNT(*), COALESCE(SUM(outcome IN ('failed', 'skipped')), 0), "
                                  "COALESCE(SUM(wire_bytes), 0), COALESCE(SUM(outage_seconds), 0) FROM runs "
                                  "WHERE job = ? AND outcome != 'running'", (job,)).fetchone()
        except sqlite3.Error as e:
            raise _error(self.path, "read", e) from None
        return int(row[0]), int(row[1]), int(row[2]), float(row[3])

    def newest_snapshot_time(self, job: str) -> float | None:
        """When the newest snapshot a successful run left on the target was taken."""
        try:
            row = self.db.execute("SELECT MAX(snapshot_time) FROM runs WHERE job = ? AND outcome = 'ok'",
                                  (job,)).fetchone()
        except sqlite3.Error as e:
            raise _error(self.path, "read", e) from None
        return None if row[0] is None else float(row[0])

    def prune(self, days: int, now: float | None = None) -> int:
        """Runs that ended more than ``days`` days ago removed; how many."""
        cutoff = (time.time() if now is None else now) - days * 86400
        with self._write("prune the history") as db:
            return db.execute("DELETE FROM runs WHERE outcome != 'running' AND started < ?", (cutoff,)).rowcount

    def runs(self, job: str, limit: int = 20) -> list[Run]:
        """The job's runs, newest first."""
        return self._select("WHERE job = ? ORDER BY started DESC, id DESC LIMIT ?", (job, limit))

    def last_success(self, job: str) -> Run | None:
        found = self._select("WHERE job = ? AND outcome = 'ok' ORDER BY started DESC, id DESC LIMIT 1", (job,))
        return found[0] if found else None

    def failures(self, job: str) -> int:
        """Failed, skipped (a failing pre-snapshot command) or interrupted runs since the job's last success."""
        count = 0
        for r in self._select("WHERE job = ? AND outcome != 'running' ORDER BY started DESC, id DESC", (job,)):
            if r.outcome == "ok":
                break
            count += r.outcome in ("failed", "skipped", "interrupted")
        return count

    def _select(self, where: str, args: tuple[object, ...]) -> list[Run]:
        try:
            rows = self.db.execute("SELECT id, job, started, ended, outcome, exit_code, error, wire_bytes, "
                                   "snapshots, outage_seconds, pid, snapshot_time FROM runs " + where, args).fetchall()
        except sqlite3.Error as e:
            raise _error(self.path, "read", e) from None
        return [Run(*row) for row in rows]


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _error(path: Path, what: str, e: BaseException) -> E.ZchunkError:
    full = "full" in str(e).lower() or getattr(e, "errno", None) == 28
    why = "the state directory's filesystem is full" if full else str(e)
    return E.HistoryError(path=str(path), what=what, why=why)
