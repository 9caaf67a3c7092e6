"""The jobs file: what to replicate, when, and how, read once and checked whole.

``/etc/zchunk/zchunk.toml`` by default (``--config FILE``, or ``ZCHUNK_CONFIG``)::

    max_parallel = 4              # runs at once, to different targets
    history_days = 90             # run history kept this long
    state_dir = "/var/lib/zchunk" # history, job logs, sessions (default $XDG_STATE_HOME/zchunk)

    [defaults]                    # any job key; a job's own value wins
    ssh_config = "/etc/zchunk/ssh_config"
    every = "15m"
    keep = 3

    [jobs.vm-100]
    source = "rpool/data/vm-100-disk-0"
    target = "backup:tank/node1/vm-100-disk-0"
    cron = "*/30 8-18 * * 1-5"    # instead of every; in `timezone` (default: local time)
    retries = 3                   # a failed run is tried again after retry_delay, doubling
    pre_snapshot = ["/usr/local/bin/freeze", "vm-100"]   # argv, no shell
    post_snapshot = ["/usr/local/bin/thaw", "vm-100"]
    hook_timeout = "2m"           # either command is killed after this long (default 5m)
    keep_target = "10,1h1d,1d1w,1w1m"
    bwlimit = "Mon-Fri 08:00-18:00=2M, *=unlimited"

A job's keys are its own (``JOB_KEYS``) and every ``zchunk sync`` option under its long name with underscores
(``SYNC_KEYS``, checked against the command by a test). ``keep`` is the retention of zchunk's sync snapshots
here (``keep_source``/``keep_target`` per side): a count, or a grid as zfs_autobackup writes it, "10,1h1d,1d1w"
= the newest 10, then one per hour for a day, one per day for a week (``plan.Retention``, which
``zchunk sync --keep-sync-snaps`` takes too). ``read`` finds every problem at once, each naming file, line
and key; the values of sync options are checked by the caller (the CLI's ``sync_options``, which needs no
second table of them; ``Checked.problem`` says where one stands).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import tomllib

from .. import errors as E
from ..endpoint import parse_endpoint
from ..hooks import Hook
from ..plan import Retention

DEFAULT_PATH = Path("/etc/zchunk/zchunk.toml")
ENV = "ZCHUNK_CONFIG"

#: Top-level keys (whole numbers), with their defaults.
SERVICE_KEYS: dict[str, int] = {"max_parallel": 4, "history_days": 90}

#: A job's own keys (also in [defaults]) and what each holds.
JOB_KEYS = {
    "source": "[user@]host:pool/dataset or pool/dataset",
    "target": "where it is replicated to",
    "targets": "instead of target: two or more targets fed by one zfs send (fan-out)",
    "every": "a duration: 90s, 15m, 6h, 1d",
    "cron": "a cron expression: minute hour day-of-month month day-of-week",
    "timezone": "of cron and of a --bwlimit schedule, e.g. Europe/Berlin",
    "retries": "how often a failed run is tried again before the next scheduled one",
    "retry_delay": "the first retry's wait, doubled for each next one (a duration)",
    "pre_snapshot": "argv list, run (no shell) before the sync snapshot; failing, the run is skipped",
    "post_snapshot": "argv list, run (no shell) after the sync snapshot, whatever became of it",
    "keep": "retention of zchunk's sync snapshots on both sides: a count or a grid",
    "keep_source": "retention on the source (overrides keep)",
    "keep_target": "retention on the target (overrides keep)",
    "enabled": "false: the job is never run (zchunk disable/enable)",
}

#: ``zchunk sync`` options a job may set, under their long names, with the TOML type each takes.
SYNC_KEYS: dict[str, type] = {
    "state_dir": str, "ssh_config": str, "ssh_key": str, "ssh_port": int, "ssh_option": list, "python": str,
    "spool_dir": str, "chunk_size": str, "direct_max": str, "compress": str, "spool_max": str, "parallel": int,
    "patience": str, "connect_patience": str, "agent_idle_timeout": str, "bwlimit": str, "verbose": bool,
    "recursive": bool, "jobs": int, "exclude": list, "identifier": str, "no_sync_snap": bool, "no_stream": bool,
    "include_snaps": list, "exclude_snaps": list, "rollback": bool, "force_delete": bool,
    "create_bookmark": bool, "preserve_properties": bool, "no_raw": bool, "send_option": list,
    "recv_option": list, "set_property": list, "exclude_property": list, "hook_timeout": str, "detach_after": str,
}
#: ``zchunk sync`` options that have no job key, and why.
NOT_JOB_KEYS = {
    "source": "a job key of its own", "targets": "a job key of its own (target, or targets for a fan-out)",
    "timezone": "a job key of its own",
    "dry_run": "use `zchunk run --dry-run`", "json_out": "an output format, not a setting",
    "keep_sync_snaps": "use keep (or keep_source, keep_target)", "keep_target_snaps": "use keep_target",
    "pre_snapshot": "a job key of its own (an argv list)", "post_snapshot": "a job key of its own (an argv list)",
}
#: ``--keep`` (keep the session directories) is a debugging aid; in a job ``keep`` is the retention.

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)?$")
_DURATION_UNITS = {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Problem:
    file: str
    line: int  # 0: the file as a whole
    key: str  # dotted: jobs.NAME.KEY, defaults.KEY, or a top-level key
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.key}: {self.message}" if self.key else \
            f"{self.file}:{self.line}: {self.message}"


@dataclass(frozen=True)
class Schedule:
    """Every ``every`` seconds, or at the times of the cron expression ``cron``, in ``tz``."""

    every: float | None = None
    cron: str | None = None
    tz: str | None = None

    def next_after(self, when: datetime) -> datetime:
        """The first due time after ``when`` (an aware datetime)."""
        from datetime import timedelta

        if self.every is not None:
            return when + timedelta(seconds=self.every)
        from croniter import croniter

        local = when.astimezone(ZoneInfo(self.tz) if self.tz else None)
        nxt: datetime = croniter(self.cron, local).get_next(datetime)
        return nxt


@dataclass(frozen=True)
class Job:
    name: str
    source: str
    target: str
    schedule: Schedule
    retries: int = 3
    retry_delay: float = 60.0
    pre_snapshot: Hook | None = None
    post_snapshot: Hook | None = None
    keep_source: Retention = Retention(1)
    keep_target: Retention = Retention(1)
    enabled: bool = True
    sync: dict[str, Any] = field(default_factory=dict)  # zchunk sync options by long name, as written
    origin: dict[str, tuple[str, ...]] = field(default_factory=dict)  # sync key -> where it was written
    line: int = 0
    targets: tuple[str, ...] = ()  # fan-out: every target (``target`` then lists them, for people)

    @property
    def all_targets(self) -> tuple[str, ...]:
        """Where the job replicates to: its target, or its fan-out's targets."""
        return self.targets or (self.target,)


@dataclass(frozen=True)
class Config:
    path: Path
    jobs: dict[str, Job]
    max_parallel: int = 4
    history_days: int = 90
    state_dir: Path | None = None  # the service's: history, job locks and logs, sessions (None: the default)


@dataclass(frozen=True)
class JobOptions:
    """The zchunk sync options a job sets (over [defaults]), by long name, and where each was written."""

    sync: dict[str, Any]
    origin: dict[str, tuple[str, ...]]


@dataclass
class Checked:
    """A file as read: the configuration (None when it does not parse; with problems, only the jobs without
    any), its problems, and where each key stands (``problem``: for one found later, e.g. in the value of a
    sync option, which ``options`` holds for every job)."""

    path: Path
    config: Config | None
    problems: list[Problem]
    lines: _Lines | None = None
    options: dict[str, JobOptions] = field(default_factory=dict)  # by job, also a job with problems

    def problem(self, key: tuple[str, ...], message: str) -> Problem:
        return Problem(str(self.path), self.lines.of(*key) if self.lines else 0, ".".join(key), message)


def config_path(given: str | Path | None = None) -> Path:
    """--config, else $ZCHUNK_CONFIG, else /etc/zchunk/zchunk.toml."""
    if given:
        return Path(given)
    return Path(os.environ[ENV]) if os.environ.get(ENV) else DEFAULT_PATH


def read(path: Path) -> Checked:
    """The file read and checked, every problem at once (the values of sync options are the caller's to
    check: ``Checked.problem`` names where one stands)."""
    name = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Checked(path, None, [Problem(name, 0, "", f"no such file (write it, or give --config FILE "
                                                          f"or set {ENV})")])
    except (OSError, UnicodeDecodeError) as e:
        return Checked(path, None, [Problem(name, 0, "", f"cannot read it: {e}")])
    problems = _ownership(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        return Checked(path, None, problems + [Problem(name, int(m.group(1)) if m else 0, "",
                                                       f"not valid TOML: {e}")])
    lines = _Lines(text)
    checker = _Checker(name, lines)
    config = checker.config(path, data)
    return Checked(path, config, problems + checker.problems, lines, checker.options)


def _ownership(path: Path) -> list[Problem]:
    """The jobs file runs commands as the service's user: refused when anyone else may write it (or its
    directory), as sshd's StrictModes refuses an authorized_keys file."""
    out = []
    for p in (path, path.resolve().parent):
        try:
            st = p.stat()
        except OSError:
            continue
        if st.st_mode & 0o022 or st.st_uid not in (0, os.geteuid()):
            what = "file" if p == path else "directory"
            out.append(Problem(str(path), 0, "", f"the {what} {p} is writable by others or owned by uid "
                               f"{st.st_uid}: its commands would run as uid {os.geteuid()}; "
                               f"chown root and chmod go-w {p}"))
    return out


class _Lines:
    """Where each table and key stands in the text (tomllib says nothing of positions): a scan of the lines
    for ``[table]`` headers and ``key =`` (bare, quoted or dotted keys)."""

    _HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
    _KEY = re.compile(r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)"
                      r"\s*=")

    def __init__(self, text: str) -> None:
        self.where: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for n, line in enumerate(text.splitlines(), 1):
            if (h := self._HEADER.match(line)) is not None:
                table = self._split(h.group(1))
                self.where.setdefault(table, n)
            elif (k := self._KEY.match(line)) is not None:
                self.where.setdefault(table + self._split(k.group(1)), n)

    @staticmethod
    def _split(dotted: str) -> tuple[str, ...]:
        return tuple(p.strip().strip("\"'") for p in re.findall(r"\"[^\"]*\"|'[^']*'|[^.]+", dotted))

    def of(self, *key: str) -> int:
        """The line of ``key``, else of the nearest table around it, else 0."""
        for n in range(len(key), 0, -1):
            if key[:n] in self.where:
                return self.where[key[:n]]
        return 0


class _Checker:
    def __init__(self, file: str, lines: _Lines) -> None:
        self.file, self.lines = file, lines
        self.problems: list[Problem] = []
        self.options: dict[str, JobOptions] = {}

    def bad(self, key: tuple[str, ...], message: str) -> None:
        problem = Problem(self.file, self.lines.of(*key), ".".join(key), message)
        if problem not in self.problems:  # a problem in [defaults] is found once per job
            self.problems.append(problem)

    def config(self, path: Path, data: dict[str, Any]) -> Config:
        service: dict[str, int] = {}
        state_dir: Path | None = None
        for key, value in data.items():
            if key in SERVICE_KEYS:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    self.bad((key,), f"{value!r}: a whole number, at least 1")
                else:
                    service[key] = value
            elif key == "state_dir":
                if not isinstance(value, str) or not value.startswith("/"):
                    self.bad((key,), f"{value!r}: an absolute path, e.g. \"/var/lib/zchunk\"")
                else:
                    state_dir = Path(value)
            elif key not in ("defaults", "jobs"):
                self.bad((key,), "unknown key (top level: max_parallel, history_days, state_dir, [defaults], "
                         "[jobs.NAME])")
        defaults = data.get("defaults", {})
        if not isinstance(defaults, dict):
            self.bad(("defaults",), "must be a table: [defaults]")
            defaults = {}
        self.keys(("defaults",), defaults)
        jobs_table = data.get("jobs", {})
        if not isinstance(jobs_table, dict):
            self.bad(("jobs",), "must be tables: [jobs.NAME]")
            jobs_table = {}
        if not jobs_table:
            self.bad(("jobs",), "no job: add a [jobs.NAME] table with source and target")
        jobs = {}
        for name, table in jobs_table.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
                self.bad(("jobs", name), "a job name is 1-64 letters, digits, '.', '_' or '-', first a letter "
                         "or digit")
                continue
            if not isinstance(table, dict):
                self.bad(("jobs", name), "must be a table: [jobs.NAME]")
                continue
            self.keys(("jobs", name), table)
            inherited = {k: v for k, v in defaults.items()
                         if not (k in ("every", "cron") and ("every" in table or "cron" in table))}
            job = self.job(name, {**inherited, **table}, table)
            if job is not None:
                jobs[name] = job
        return Config(path, jobs, service.get("max_parallel", SERVICE_KEYS["max_parallel"]),
                      service.get("history_days", SERVICE_KEYS["history_days"]), state_dir)

    def keys(self, where: tuple[str, ...], table: dict[str, Any]) -> None:
        """Unknown keys and values of the wrong TOML type, where they are written."""
        for key, value in table.items():
            if key in SYNC_KEYS:
                kind = SYNC_KEYS[key]
                ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
                if ok and kind is list:
                    ok = all(isinstance(v, str) for v in value)
                if not ok:
                    self.bad(where + (key,), f"{value!r}: expected {_kind(kind)} (zchunk sync "
                             f"--{key.replace('_', '-')})")
            elif key in NOT_JOB_KEYS and key not in JOB_KEYS:
                self.bad(where + (key,), f"not a job key: {NOT_JOB_KEYS[key]}")
            elif key not in JOB_KEYS:
                near = [k for k in list(JOB_KEYS) + list(SYNC_KEYS) if _close(k, key)]
                self.bad(where + (key,), "unknown key" + (f" (did you mean {near[0]}?)" if near else ""))

    def job(self, name: str, merged: dict[str, Any], own: dict[str, Any]) -> Job | None:
        """One job from its keys over [defaults] (problems are named where the value was written)."""
        def at(key: str) -> tuple[str, ...]:
            return ("jobs", name, key) if key in own else ("defaults", key)

        before = len(self.problems)
        sync = {k: v for k, v in merged.items() if k in SYNC_KEYS}
        origin = {k: at(k) for k in sync}
        if isinstance(merged.get("timezone"), str):  # the job's time zone is its --bwlimit schedule's too
            sync["timezone"], origin["timezone"] = merged["timezone"], at("timezone")
        self.options[name] = JobOptions(sync, origin)
        source, target = merged.get("source"), merged.get("target")
        targets: tuple[str, ...] = ()
        if "targets" in merged:
            targets = self.fan_out(merged, at, target, source)
            target = ", ".join(targets)
        for key, value in (("source", source), ("target", target)):
            if key == "target" and "targets" in merged:
                continue
            if value is None:
                self.bad(("jobs", name), f"no {key}")
            elif not isinstance(value, str):
                self.bad(at(key), f"{value!r}: a dataset, [user@]host:pool/dataset or pool/dataset")
            else:
                try:
                    parse_endpoint(value)
                except E.ZchunkError as e:
                    self.bad(at(key), str(e))
        if isinstance(source, str) and source == target:
            self.bad(at("target"), "the same as source")
        tz = merged.get("timezone")
        if tz is not None:
            try:
                ZoneInfo(str(tz))
            except (ValueError, ZoneInfoNotFoundError):
                self.bad(at("timezone"), f"{tz!r}: not a time zone (e.g. Europe/Berlin, UTC)")
                tz = None
        schedule = self.schedule(merged, at, tz)
        retries = merged.get("retries", 3)
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 100:
            self.bad(at("retries"), f"{retries!r}: a whole number from 0 to 100")
        retry_delay = self.duration(merged, "retry_delay", at, 60.0)
        timeout = self.duration(merged, "hook_timeout", at, 300.0)
        hooks = {k: self.hook(merged[k], at(k), timeout) if k in merged else None
                 for k in ("pre_snapshot", "post_snapshot")}
        keep = {}
        for side in ("source", "target"):
            key = f"keep_{side}" if f"keep_{side}" in merged else "keep"
            try:
                keep[side] = Retention.parse(merged.get(key, 1))
            except ValueError as e:
                self.bad(at(key), str(e))
        enabled = merged.get("enabled", True)
        if not isinstance(enabled, bool):
            self.bad(at("enabled"), f"{enabled!r}: true or false")
        if len(self.problems) > before or schedule is None:
            return None
        if tz is None:
            sync.pop("timezone", None)
        return Job(name, str(source), str(target), schedule, int(retries), retry_delay, hooks["pre_snapshot"],
                   hooks["post_snapshot"], keep["source"], keep["target"], bool(enabled), sync, origin,
                   self.lines.of("jobs", name), targets)

    def fan_out(self, merged: dict[str, Any], at: Any, target: Any, source: Any) -> tuple[str, ...]:
        """``targets = [...]``: two or more distinct endpoints, not the source, not with ``target`` or -r."""
        value = merged["targets"]
        if target is not None:
            self.bad(at("targets"), "give target or targets, not both")
        if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) for v in value):
            self.bad(at("targets"), f"{value!r}: a list of two or more targets, e.g. [\"backup1:tank/x\", "
                     "\"backup2:tank/x\"] (one target: use target)")
            return ()
        for v in value:
            try:
                parse_endpoint(v)
            except E.ZchunkError as e:
                self.bad(at("targets"), str(e))
        if len(set(value)) != len(value):
            self.bad(at("targets"), "a target is named twice")
        if source in value:
            self.bad(at("targets"), "the source is one of them")
        if merged.get("recursive"):
            self.bad(at("targets"), "recursive with several targets is not supported yet: one job per target")
        return tuple(value)

    def schedule(self, merged: dict[str, Any], at: Any, tz: str | None) -> Schedule | None:
        every, cron = merged.get("every"), merged.get("cron")
        if every is not None and cron is not None:
            self.bad(at("cron"), "give every or cron, not both")
            return None
        if cron is not None:
            from croniter import croniter

            if not isinstance(cron, str) or not croniter.is_valid(cron) or len(cron.split()) != 5:
                self.bad(at("cron"), f"{cron!r}: a cron expression of five fields, minute hour day-of-month "
                         "month day-of-week, e.g. \"*/30 8-18 * * 1-5\"")
                return None
            return Schedule(cron=cron, tz=tz)
        if every is None:
            self.bad(at("every"), "no schedule: give every = \"15m\" or cron = \"*/15 * * * *\" (here or in "
                     "[defaults])")
            return None
        seconds = self.duration(merged, "every", at, None)
        if seconds is None:
            return None
        if seconds < 10:
            self.bad(at("every"), f"{every!r}: at least 10s")
            return None
        return Schedule(every=seconds, tz=tz)

    def duration(self, merged: dict[str, Any], key: str, at: Any, default: float | None) -> Any:
        if key not in merged:
            return default
        value = merged[key]
        m = _DURATION.match(value.strip()) if isinstance(value, str) else None
        if m is None:
            self.bad(at(key), f"{value!r}: a duration like \"90s\", \"15m\", \"6h\", \"1d\"")
            return default
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]

    def hook(self, value: Any, key: tuple[str, ...], timeout: float) -> Hook | None:
        if not isinstance(value, list) or not value or not all(isinstance(a, str) and a for a in value):
            self.bad(key, f"{value!r}: the command as a list of its arguments, run without a shell, e.g. "
                     "[\"/usr/local/bin/freeze\", \"vm-100\"]")
            return None
        return Hook(tuple(value), timeout)


def _kind(kind: type) -> str:
    return {str: "a string", int: "a whole number", bool: "true or false", list: "a list of strings"}[kind]


def _close(a: str, b: str) -> bool:
    """One edit apart, or the same with - for _ (a key written as the option is)."""
    b = b.replace("-", "_")
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) <= 1
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))
