"""What each job's state is, from the jobs file, the history and a live run's progress: when it runs next
(the schedule, retries with back-off, an interrupted transfer at once), its lag, and the rows of
``zchunk status``, ``zchunk check`` and the metrics. Pure reads: nothing here changes anything."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import Config, Job
from .history import History, Run, pid_alive
from .runner import locked_elsewhere, read_live


def next_run(job: Job, last: Run | None, failures: int, now: float) -> float:
    """When the job is due: a job never run or whose last run was interrupted, now (a cron job never run:
    at its next time, this minute included); after a failure, ``retry_delay`` doubling per consecutive
    failure up to ``retries`` times, but never later than the schedule; else the schedule after the last
    run's start."""
    if last is None:
        if job.schedule.cron is None:
            return now
        minute = datetime.fromtimestamp(now - now % 60 - 1, timezone.utc)
        return job.schedule.next_after(minute).timestamp()
    if last.outcome == "interrupted":
        return now
    scheduled = job.schedule.next_after(datetime.fromtimestamp(last.started, timezone.utc)).timestamp()
    if last.outcome in ("failed", "skipped") and 1 <= failures <= job.retries:
        return min(scheduled, (last.ended or last.started) + job.retry_delay * 2 ** (failures - 1))
    return scheduled


@dataclass
class JobStatus:
    job: str
    source: str
    target: str
    state: str  # ok | failed | running | disabled | locked (its target: zchunk:locked) | pending (never run)
    last_success: float | None  # when the snapshot the newest success left on the target was taken
    lag_seconds: float | None
    last_duration: float | None
    next_run: float | None
    failures: int
    last_error: str
    disabled_why: str = ""
    live: dict[str, Any] | None = None  # a running job's progress: percent, rate, eta, bytes_done
    runs_total: int = 0
    failures_total: int = 0
    wire_bytes_total: int = 0
    outage_seconds_total: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("last_success", "next_run"):
            d[key] = _iso(d[key])
        return d


def job_status(config: Config, history: History, state_dir: Path, now: float) -> list[JobStatus]:
    disabled = history.disabled()
    rows = []
    for job in config.jobs.values():
        runs = history.runs(job.name, 1)
        last = runs[0] if runs else None
        failures = history.failures(job.name)
        snap = history.newest_snapshot_time(job.name)
        if snap is None and (ok := history.last_success(job.name)) is not None:
            snap = ok.started  # a success whose snapshot time is unknown (--no-sync-snap): at least as old
        live = read_live(state_dir, job.name)
        running = live is not None or locked_elsewhere(state_dir, job.name) or (
            last is not None and last.outcome == "running" and pid_alive(last.pid))
        why = "" if job.enabled else "enabled = false in the jobs file"
        if job.name in disabled:
            why = disabled[job.name][0] or "zchunk disable"
        state = ("disabled" if why else "running" if running else "locked" if last and last.outcome == "locked"
                 else "failed" if failures else "ok" if snap is not None else "pending")
        done = next((r for r in history.runs(job.name, 5) if r.ended is not None), None)
        total, failed, wire, outage = history.totals(job.name)
        rows.append(JobStatus(
            job.name, job.source, job.target, state, snap, None if snap is None else max(0.0, now - snap),
            done.seconds if done else None, None if why or running else next_run(job, last, failures, now),
            failures, last.error if last is not None and last.outcome != "ok" else "", why, live,
            total, failed, wire, outage))
    return rows


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
