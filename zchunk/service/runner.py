"""One run of a job: ``zchunk sync`` as a child process, watched, recorded.

A run is the job's ``zchunk sync SOURCE TARGET --json`` with the job's options (``sync_argv``), started with
its own interpreter so that it is exactly the command an admin would type. Its events tell the run's progress
(written to ``<state>/jobs/<job>.json`` for ``zchunk status``, at most once a second) and its outcome, which
goes to the history: ok (exit 0), skipped (exit 18: the pre-snapshot command failed, nothing was changed),
locked (the target is locked against replication: a failover, zchunk:locked), failed (anything else, with
the error's line), interrupted (the service stopped it, or died: the next start
continues the transfer, which the agents keep spooling meanwhile).

One run per job at a time, also across processes (``zchunk run`` from a timer beside the daemon): the run
holds ``<state>/jobs/<job>.lock`` (flock), which the kernel drops when the process holding it dies. The child
is killed when the process running it dies (PR_SET_PDEATHSIG), so a ``kill -9`` of the service leaves no
coordinator behind, only agents, which the next run reattaches to. Every event of the child goes to
``<state>/logs/<job>.jsonl`` (rotated at 16 MiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Job
from .history import History, pid_alive

SKIPPED_EXIT = 18  # errors.HookFailed: the pre-snapshot command failed, the run changed nothing
LOG_ROTATE = 16 << 20


def sync_argv(job: Job, state_dir: Path, dry_run: bool = False) -> list[str]:
    """``zchunk sync`` for the job: its options under their long names, sessions in the service's state
    directory unless the job names its own."""
    argv = [sys.executable, "-m", "zchunk", "sync", job.source, *job.all_targets]
    argv += ["--dry-run"] if dry_run else ["--json"]  # a plan is for a person: the text output
    options = {"state_dir": str(state_dir / "sessions"), **job.sync}
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    argv += ["--keep-sync-snaps", str(job.keep_source), "--keep-target-snaps", str(job.keep_target)]
    for flag, hook in (("--pre-snapshot", job.pre_snapshot), ("--post-snapshot", job.post_snapshot)):
        if hook is not None:
            argv += [flag, shlex.join(hook.argv)]
    return argv


@dataclass
class Outcome:
    """What a run came to, for the history and the caller."""

    job: str
    outcome: str  # ok | failed | skipped | interrupted | locked | busy (another process runs the job)
    exit_code: int | None = None
    error: str = ""
    wire_bytes: int = 0
    snapshots: int = 0
    outage_seconds: float = 0.0
    snapshot_time: float | None = None
    seconds: float = 0.0
    run_id: int = 0


@dataclass
class _Watch:
    """What the child's events said so far."""

    job: str
    live: Path
    started: float
    error: str = ""
    error_class: str = ""
    snapshot_time: float | None = None
    replication: dict[str, Any] | None = None
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)  # by dataset ("" without -r)
    datasets: tuple[int, int] = (0, 0)  # done, total (-r)
    wrote: float = 0.0

    def event(self, e: dict[str, Any]) -> None:
        kind = e.get("event")
        if kind == "snapshot" and self.snapshot_time is None:
            self.snapshot_time = float(e.get("time") or time.time())
        elif kind == "progress":
            self.progress[str(e.get("dataset", ""))] = e
            self.write_live()
        elif kind in ("stream_end", "dataset_done", "result") and e.get("dataset") is not None:
            self.progress.pop(str(e["dataset"]), None)
            if kind == "dataset_done":
                self.datasets = (int(e.get("done", 0)), int(e.get("total", 0)))
        elif kind == "error":
            self.error, self.error_class = str(e.get("message", "")), str(e.get("error", ""))
        elif kind == "dataset_failed" and not self.error:
            self.error = f"{e.get('source')}: {e.get('error')}"
        elif kind == "replication":
            self.replication = e

    def write_live(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.wrote < 1.0:
            return
        self.wrote = now
        streams = list(self.progress.values())
        on_target = sum(int(p.get("on_target") or 0) for p in streams)
        expected = sum(int(p.get("expected") or 0) for p in streams)
        etas = [float(p["eta"]) for p in streams if p.get("eta") is not None]
        live = {"job": self.job, "pid": os.getpid(), "started": self.started, "updated": now,
                "bytes_done": on_target, "bytes_expected": expected,
                "percent": round(100.0 * on_target / expected, 1) if expected else None,
                "rate": sum(float(p.get("rate") or 0) for p in streams),
                "eta": max(etas) if etas else None, "datasets_done": self.datasets[0],
                "datasets_total": self.datasets[1],
                "paused": any(p.get("user_paused") for p in streams),
                "link_down": sorted({h for p in streams for h in p.get("link_down") or ()})}
        _write_atomic(self.live, json.dumps(live))

    def totals(self) -> tuple[int, int, float]:
        """Bytes on the wire, snapshots received, outage seconds (from the final event; 0 without it)."""
        wire = snaps = 0
        outage = 0.0
        for o in (self.replication or {}).get("outcomes", []):
            for r in o.get("streams", []):
                t = r.get("transfer") or {}
                wire += int(t.get("wire_bytes") or 0)
                outage += float(t.get("outage_seconds") or 0)
                snaps += bool(r.get("target_snapshot")) and not r.get("up_to_date")
        if self.replication is None:
            wire = sum(int(p.get("wire_bytes") or 0) for p in self.progress.values())
        return wire, snaps, outage


def live_path(state_dir: Path, job: str) -> Path:
    return state_dir / "jobs" / f"{job}.json"


def read_live(state_dir: Path, job: str) -> dict[str, Any] | None:
    """The running job's progress, if a live process writes it."""
    try:
        live = json.loads(live_path(state_dir, job).read_text())
    except (OSError, ValueError):
        return None
    return live if isinstance(live, dict) and pid_alive(int(live.get("pid") or 0)) else None


@contextlib.contextmanager
def job_lock(state_dir: Path, job: str) -> Iterator[bool]:
    """Held (True) while this process runs the job; False when another process does."""
    path = state_dir / "jobs" / f"{job}.lock"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def locked_elsewhere(state_dir: Path, job: str) -> bool:
    with job_lock(state_dir, job) as mine:
        return not mine


class JobRun:
    """A run of ``job``: ``await run()``; ``stop()`` (the service stopping) ends the child and records the
    run interrupted. ``say`` gets one line at the start and the end."""

    def __init__(self, job: Job, state_dir: Path, history: History, say: Callable[[str], None],
                 dry_run: bool = False, argv: list[str] | None = None) -> None:
        self.job, self.state_dir, self.history, self.say, self.dry_run = job, state_dir, history, say, dry_run
        self.argv = argv or sync_argv(job, state_dir, dry_run)
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False

    def stop(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    async def run(self) -> Outcome:
        with job_lock(self.state_dir, self.job.name) as mine:
            if not mine:
                return Outcome(self.job.name, "busy", error="another zchunk process is running this job")
            return await self._run()

    async def _plan(self) -> Outcome:
        """--dry-run: the job's plan, said by zchunk sync itself on this process's stderr; nothing recorded."""
        started = time.time()
        self.say(f"{self.job.name}: the plan of: {self.job.source} -> {self.job.target}")
        proc = await asyncio.create_subprocess_exec(*self.argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=sys.stderr.fileno(), preexec_fn=_die_with_parent)
        code = await proc.wait()
        return Outcome(self.job.name, "ok" if code == 0 else "failed", code,
                       "" if code == 0 else f"zchunk sync --dry-run exited {code}", seconds=time.time() - started)

    async def _run(self) -> Outcome:
        if self.dry_run:
            return await self._plan()
        job = self.job
        started = time.time()
        run_id = self.history.begin(job.name, now=started)
        watch = _Watch(job.name, live_path(self.state_dir, job.name), started)
        self.say(f"{job.name}: starting: {job.source} -> {job.target}")
        log = _Log(self.state_dir / "logs" / f"{job.name}.jsonl")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, preexec_fn=_die_with_parent, limit=64 << 20)
            stderr_task = asyncio.ensure_future(self._stderr(log))
            assert self.proc.stdout is not None
            async for raw in self.proc.stdout:
                line = raw.decode(errors="replace").strip()
                if not line:
                    continue
                log.write(line)
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    watch.event(event)
            code = await self.proc.wait()
            stderr = await stderr_task
        except OSError as e:
            code, stderr = 70, f"cannot start zchunk sync: {e}"
        finally:
            log.close()
            with contextlib.suppress(OSError):
                watch.live.unlink()
        wire, snaps, outage = watch.totals()
        if self.stopping:
            outcome = "interrupted"
            error = "the service stopped it; the agents keep the transfer, the next start continues it"
        elif code == 0:
            outcome, error = "ok", ""
        elif watch.error_class == "TargetLocked":
            outcome, error = "locked", watch.error
        else:
            outcome = "skipped" if code == SKIPPED_EXIT else "failed"
            error = watch.error or _last_line(stderr) or (f"killed by signal {-code}" if code < 0 else
                                                          f"zchunk sync exited {code}")
        result = Outcome(job.name, outcome, code, error, wire, snaps, outage,
                         watch.snapshot_time if outcome == "ok" else None, time.time() - started, run_id)
        if outcome == "interrupted":
            self.history.interrupt(run_id, error)
        else:
            self.history.end(run_id, outcome, code, error, wire, snaps, outage, snapshot_time=result.snapshot_time)
        self.say(f"{job.name}: {outcome}" + (f" (exit {code})" if code else "") + f" in {result.seconds:.0f} s"
                 + (f", {snaps} snapshot(s), {wire} bytes on the wire" if outcome == "ok" else "")
                 + (f": {error}" if error else ""))
        return result

    async def _stderr(self, log: _Log) -> str:
        assert self.proc is not None and self.proc.stderr is not None
        text = (await self.proc.stderr.read()).decode(errors="replace")
        if text.strip():
            log.write(json.dumps({"event": "stderr", "time": round(time.time(), 3), "text": text[-20000:]}))
        return text


class _Log:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(OSError):
            if path.stat().st_size > LOG_ROTATE:
                path.replace(path.with_name(path.name + ".1"))
        self.file = path.open("a")

    def write(self, line: str) -> None:
        try:
            self.file.write(line + "\n")
            self.file.flush()
        except OSError:  # a full disk: the run goes on, the history says how it ended
            pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.startswith("zchunk: error:")]
    if lines:
        return lines[-1].removeprefix("zchunk: error:").strip()
    rest = text.strip().splitlines()
    return rest[-1] if rest else ""


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the service dies (prctl PR_SET_PDEATHSIG, Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _write_atomic(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError:
        pass

