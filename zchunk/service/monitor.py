"""The jobs' state for monitoring systems: a Nagios/Icinga plugin's verdict (``zchunk check``) and the
Prometheus text exposition (``zchunk metrics``, ``zchunk daemon --metrics-listen``), written by the field's
own library, prometheus_client, so that its format is the one Prometheus parses."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .status import JobStatus

NAGIOS = ("OK", "WARNING", "CRITICAL", "UNKNOWN")
RANK = {0: 0, 3: 1, 1: 2, 2: 3}  # several jobs: the worst state wins, CRITICAL over WARNING over UNKNOWN


@dataclass(frozen=True)
class Thresholds:
    warn: float = 3600.0  # lag, seconds
    crit: float = 4 * 3600.0
    warn_failures: int = 1  # consecutive failed runs
    crit_failures: int = 3


def verdict(row: JobStatus, t: Thresholds) -> tuple[int, str]:
    """One job's Nagios state (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN) and why, in a few words."""
    lag = row.lag_seconds
    said = f"lag {_human(lag)}" if lag is not None else "no replica yet"
    if row.failures:
        said += f", {row.failures} failed run(s) in a row: {row.last_error}"
    if row.state == "disabled":
        return 1, f"disabled ({row.disabled_why}), {said}"
    if row.state == "locked":
        return 1, f"locked ({row.last_error}), {said}"
    if lag is None:
        if row.failures >= t.crit_failures:
            return 2, said
        if row.state == "running":
            return 0, "first run in progress" + (f", {row.live['percent']}%" if row.live and
                                                  row.live.get("percent") is not None else "")
        return (1, said) if row.failures else (3, "never replicated yet")
    code = 2 if lag >= t.crit or row.failures >= t.crit_failures else \
        1 if lag >= t.warn or row.failures >= t.warn_failures else 0
    return code, said + (", running" if row.state == "running" else "")


def check(rows: list[JobStatus], t: Thresholds) -> tuple[int, str]:
    """The plugin's exit code and its one line: the worst state, each job's words, and perfdata
    (``lag=123s;3600;14400`` for one job, ``JOB_lag=...`` for several; ``failures=N;W;C``)."""
    if not rows:
        return 3, "UNKNOWN - no job to check"
    judged = [(row, *verdict(row, t)) for row in rows]
    worst = max((code for _, code, _ in judged), key=RANK.__getitem__)
    text = "; ".join(f"{row.job}: {why}" for row, _, why in judged)
    perf = []
    for row, _, _ in judged:
        prefix = "" if len(rows) == 1 else _label(row.job) + "_"
        lag = "U" if row.lag_seconds is None else f"{row.lag_seconds:.0f}s"
        perf += [f"{prefix}lag={lag};{t.warn:.0f};{t.crit:.0f};0",
                 f"{prefix}failures={row.failures};{t.warn_failures};{t.crit_failures};0"]
    return worst, f"ZCHUNK {NAGIOS[worst]} - {text} | {' '.join(perf)}"


def _label(job: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in job)


def _human(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 86400}d{s % 86400 // 3600}h" if s >= 86400 else f"{s // 3600}h{s % 3600 // 60:02d}m" \
        if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class JobsCollector(Collector):
    """Every job's metrics, read afresh at each scrape (``rows()``: the status rows now)."""

    def __init__(self, rows: Callable[[], list[JobStatus]]) -> None:
        self.rows = rows

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        return iter(families(self.rows()))


def families(rows: Iterable[JobStatus]) -> list[GaugeMetricFamily | CounterMetricFamily]:
    g = {name: GaugeMetricFamily(f"zchunk_job_{name}", doc, labels=["job"]) for name, doc in (
        ("last_success_timestamp_seconds", "When the snapshot the last successful run left on the target was "
         "taken (Unix time)"),
        ("lag_seconds", "Now minus the creation of the newest snapshot the target holds"),
        ("last_run_duration_seconds", "How long the last finished run took"),
        ("consecutive_failures", "Failed runs since the last success"),
        ("running", "1 while a run of the job is going on"),
        ("enabled", "0 when disabled (jobs file or zchunk disable)"),
        ("next_run_timestamp_seconds", "When the job is due next (Unix time)"),
        ("transfer_bytes_done", "A running transfer: chunk bytes on the target so far"),
        ("transfer_bytes_expected", "A running transfer: chunk bytes it will move (an estimate until zfs "
         "send ends)"),
        ("transfer_rate_bytes_per_second", "A running transfer: its smoothed rate on the link"))}
    c = {name: CounterMetricFamily(f"zchunk_job_{name}", doc, labels=["job"]) for name, doc in (
        ("runs", "Runs that ended (of the history kept)"),
        ("failures", "Runs that failed or were skipped (of the history kept)"),
        ("wire_bytes", "Bytes put on the link by the job's runs (of the history kept)"),
        ("outage_seconds", "Seconds the link was down during the job's runs (of the history kept)"))}
    for row in rows:
        label = [row.job]
        if row.last_success is not None:
            g["last_success_timestamp_seconds"].add_metric(label, row.last_success)
        if row.lag_seconds is not None:
            g["lag_seconds"].add_metric(label, row.lag_seconds)
        if row.last_duration is not None:
            g["last_run_duration_seconds"].add_metric(label, row.last_duration)
        if row.next_run is not None:
            g["next_run_timestamp_seconds"].add_metric(label, row.next_run)
        g["consecutive_failures"].add_metric(label, row.failures)
        g["running"].add_metric(label, float(row.state == "running"))
        g["enabled"].add_metric(label, float(row.state != "disabled"))
        if row.live is not None:
            g["transfer_bytes_done"].add_metric(label, float(row.live.get("bytes_done") or 0))
            g["transfer_bytes_expected"].add_metric(label, float(row.live.get("bytes_expected") or 0))
            g["transfer_rate_bytes_per_second"].add_metric(label, float(row.live.get("rate") or 0))
        c["runs"].add_metric(label, row.runs_total)
        c["failures"].add_metric(label, row.failures_total)
        c["wire_bytes"].add_metric(label, row.wire_bytes_total)
        c["outage_seconds"].add_metric(label, row.outage_seconds_total)
    return [*g.values(), *c.values()]


def registry(rows: Callable[[], list[JobStatus]]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(JobsCollector(rows))
    return reg


def exposition(rows: list[JobStatus]) -> bytes:
    return generate_latest(registry(lambda: rows))


def write_textfile(path: str, rows: list[JobStatus]) -> None:
    """For node_exporter's textfile collector: written to a temporary file and renamed (atomic)."""
    write_to_textfile(path, registry(lambda: rows))
