"""``zchunk run`` (the due jobs once) and ``zchunk daemon`` (the schedule forever).

Both start each due job as a ``runner.JobRun``: up to ``max_parallel`` runs at once, one per job, and one
per target dataset at a time (two jobs into one target would only refuse each other). The daemon wakes when
a job is due or a run ends; SIGHUP reloads the jobs file (a file with problems keeps the old configuration,
and says why); SIGTERM and SIGINT stop taking new runs, end the running ones' coordinators (their agents keep
spooling) and record them interrupted, so that the next start continues each transfer where it stands; a
``kill -9`` of the daemon takes its children with it (PR_SET_PDEATHSIG), and the next start finds their runs
without a process and marks them interrupted the same way. The history is pruned at start and daily.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

from .. import errors as E
from .config import Config, Job
from .history import History
from .runner import JobRun, Outcome
from .status import next_run

PRUNE_EVERY = 86400.0
BUSY_BACKOFF = 30.0  # a job another process runs is looked at again after this long
IDLE_WAKE = 60.0  # the schedule is looked at at least this often (a clock change, a cron minute)


def due_jobs(config: Config, history: History, now: float, names: list[str] | None = None) -> list[Job]:
    """The jobs to run now: the named ones (enabled or not: asked for), else the enabled ones that are due,
    soonest first."""
    if names:
        return [config.jobs[n] for n in names]
    disabled = history.disabled()
    due = []
    for job in config.jobs.values():
        if not job.enabled or job.name in disabled:
            continue
        runs = history.runs(job.name, 1)
        if runs and runs[0].outcome == "running":
            continue
        at = next_run(job, runs[0] if runs else None, history.failures(job.name), now)
        if at <= now:
            due.append((at, job))
    return [job for _, job in sorted(due, key=lambda d: d[0])]


class Service:
    """The runs of one process: ``run_once`` (zchunk run) or ``serve`` (zchunk daemon)."""

    def __init__(self, config: Config, state_dir: Path, say: Callable[[str], None],
                 load: Callable[[], Config] | None = None) -> None:
        self.config, self.state_dir, self.say, self.load = config, state_dir, say, load
        self.history = History(state_dir / "history.sqlite")
        self.running: dict[str, tuple[JobRun, asyncio.Task[Outcome]]] = {}
        self.busy_until: dict[str, float] = {}
        self.stopping = False
        self.wake = asyncio.Event()
        self.outcomes: list[Outcome] = []
        self.errors: list[BaseException] = []  # runs that could not even be recorded

    def _start(self, job: Job, dry_run: bool = False) -> bool:
        """Started, unless the job runs already, its target is busy, or the runs are at max_parallel."""
        busy = {t for r, _ in self.running.values() for t in r.job.all_targets}
        if job.name in self.running or busy & set(job.all_targets) or len(self.running) >= self.config.max_parallel:
            return False
        run = JobRun(job, self.state_dir, self.history, self.say, dry_run)
        task = asyncio.ensure_future(run.run())
        self.running[job.name] = (run, task)

        def ended(t: asyncio.Task[Outcome]) -> None:
            self.running.pop(job.name, None)
            if not t.cancelled() and t.exception() is not None:  # the history could not be written (a full
                # disk): said, and the job looked at again later, not in a tight loop
                self.busy_until[job.name] = time.time() + BUSY_BACKOFF
                self.say(f"{job.name}: could not run: {t.exception()}; looking again in {BUSY_BACKOFF:.0f} s")
                self.errors.append(t.exception())  # type: ignore[arg-type]
            elif not t.cancelled():
                outcome = t.result()
                self.outcomes.append(outcome)
                if outcome.outcome == "busy":
                    self.busy_until[job.name] = time.time() + BUSY_BACKOFF
                    self.say(f"{job.name}: another zchunk process is running it; looking again in "
                             f"{BUSY_BACKOFF:.0f} s")
            self.wake.set()

        task.add_done_callback(ended)
        return True

    async def run_once(self, names: list[str] | None = None, dry_run: bool = False) -> list[Outcome]:
        """The due jobs (or the named ones), each once; returns when every run has ended."""
        self._recover()
        if not dry_run:
            self.history.prune(self.config.history_days)
        pending = due_jobs(self.config, self.history, time.time(), names)
        if not pending:
            self.say("no job is due")
        while pending or self.running:
            pending = [job for job in pending if not self._start(job, dry_run)]
            self.wake.clear()
            if self.running:
                await self.wake.wait()
        if self.errors:
            raise self.errors[0]
        return self.outcomes

    async def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """The schedule, until SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._recover()
        pruned = 0.0
        self.say(f"started: {len(self.config.jobs)} job(s) from {self.config.path}, up to "
                 f"{self.config.max_parallel} at once, state in {self.state_dir}")
        if on_ready is not None:
            on_ready()
        while not self.stopping:
            now = time.time()
            if now - pruned > PRUNE_EVERY:
                self.history.prune(self.config.history_days)
                pruned = now
            wait = self._start_due(now)
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), max(0.2, wait))
            except asyncio.TimeoutError:
                pass
        runs = list(self.running.values())
        for run, _ in runs:
            run.stop()
        if runs:
            await asyncio.gather(*(task for _, task in runs), return_exceptions=True)
        self.say(f"stopped ({len(runs)} run(s) interrupted: their agents keep the transfers, the next start "
                 "continues them)" if runs else "stopped")

    def _start_due(self, now: float) -> float:
        """Starts what is due (and may run now); the seconds until the next job is due."""
        soonest = IDLE_WAKE
        for job in due_jobs(self.config, self.history, now):
            if self.busy_until.get(job.name, 0) > now:
                soonest = min(soonest, self.busy_until[job.name] - now)
                continue
            self._start(job)
        disabled = self.history.disabled()
        for job in self.config.jobs.values():
            if job.enabled and job.name not in disabled and job.name not in self.running:
                runs = self.history.runs(job.name, 1)
                if runs and runs[0].outcome != "running":
                    at = next_run(job, runs[0], self.history.failures(job.name), now)
                    soonest = min(soonest, max(0.0, at - now) or IDLE_WAKE)
        return soonest

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if not self.stopping:
            self.say(f"{signal.Signals(sig).name}: taking no new runs; stopping {len(self.running)} running")
        self.stopping = True
        self.wake.set()

    def reload(self) -> None:
        if self.load is None:
            return
        try:
            config = self.load()
        except E.ZchunkError as e:
            self.say(f"SIGHUP: the jobs file was NOT reloaded, the old one stays: {e}")
            return
        added = sorted(set(config.jobs) - set(self.config.jobs))
        gone = sorted(set(self.config.jobs) - set(config.jobs))
        self.config = config
        self.say(f"SIGHUP: reloaded {config.path}: {len(config.jobs)} job(s)"
                 + (f", new: {', '.join(added)}" if added else "") + (f", gone: {', '.join(gone)}" if gone else ""))
        self.wake.set()

    def _recover(self) -> None:
        for run in self.history.mark_interrupted():
            self.say(f"{run.job}: its run of {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(run.started))} "
                     "ended without a word (crash, kill -9, reboot): continuing it now")

