"""Benchmark zchunk against syncoid and plain ``zfs send | ssh | zfs receive``
on real zfs-fuse pools over the lab WAN, fault-free and with faults.

    .venv/bin/python benchmarks/run.py [--size 192M] [--runs 3] [--scenarios a,b] [--tools a,b]

Needs root (zfs-fuse, namespaces, sshd) and the lab's system tools, plus
syncoid, lzop, mbuffer, pv and zstd for the peers.  One lab serves the whole
benchmark; each tool run receives into a fresh target dataset.  Results go to
benchmarks/RESULTS.md, benchmarks/results.png and benchmarks/results.json;
per-run logs to --out.  See benchmarks/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import procwatch  # noqa: E402
from faults import SCENARIOS, FaultThread, Scenario, overlap, shape_link  # noqa: E402
from procwatch import MiB, ProcWatch, Usage, wait_with_rusage, wire_counters  # noqa: E402
from tools import PATH, TOOLS, Job, Target, Tool, Zchunk  # noqa: E402

from zchunk import lab  # noqa: E402

ZFS_BUSY_RETRY_S = 120.0
PEER_PROGRAMS = ("syncoid", "lzop", "mbuffer", "pv", "zstd", "perl")


# --------------------------------------------------------------------------- records


@dataclass
class RunResult:
    """One tool run in one scenario."""

    tool: str
    scenario: str
    run: int
    ok: bool
    reason: str
    exit_code: int | None
    elapsed: float
    timeout: float
    wire_bytes: int
    cpu_s: float  # user+sys of every process of the tool, both hosts
    cpu_by: dict[str, float]  # the same split by process role and host
    daemon_cpu_s: float  # the zfs-fuse daemon over the same time (shared by both pools)
    outage_s: float  # fault time inside the run
    outages: int
    rss: dict[str, int] = field(default_factory=dict)  # role -> peak VmHWM bytes
    spool_peak: dict[str, int] = field(default_factory=dict)
    # side -> bytes the tool's processes there left for the disk: zchunk's spool files minus those
    # deleted while still in the page cache (zfs writes go through the zfs-fuse daemon, not counted)
    disk_writes: dict[str, int] = field(default_factory=dict)
    zchunk: dict[str, Any] = field(default_factory=dict)  # phases and the result event
    leftovers: list[str] = field(default_factory=list)
    log: str = ""


# --------------------------------------------------------------------------- zfs helpers


def zfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return lab.run(["zfs", *args], check=check, timeout=300)


def zfs_get(prop: str, name: str) -> str:
    return zfs("get", "-H", "-p", "-o", "value", prop, name).stdout.strip()


def exists(name: str) -> bool:
    return zfs("list", "-H", "-o", "name", "-t", "all", name, check=False).returncode == 0


def retry_busy(*args: str) -> str:
    """A zfs command that zfs-fuse may refuse as busy for a while after a receive.

    Returns "" when it worked, else the error after ``ZFS_BUSY_RETRY_S`` (seen
    once for minutes while other work hammered the shared daemon); the caller
    records it and the benchmark goes on, since every run has its own target.
    """
    deadline = time.monotonic() + ZFS_BUSY_RETRY_S
    while True:
        proc = zfs(*args, check=False)
        if proc.returncode == 0 or "does not exist" in proc.stderr:
            return ""
        if time.monotonic() > deadline:
            error = f"zfs {' '.join(args)} still failing after {ZFS_BUSY_RETRY_S:.0f} s: {proc.stderr.strip()}"
            log(f"    {error}")
            return error
        time.sleep(0.5)


def mountpoint(name: str) -> Path:
    if zfs_get("mounted", name) != "yes":
        zfs("mount", name, check=False)
    return Path(zfs_get("mountpoint", name))


def stream_size(snapshot: str, base: str | None = None) -> int:
    argv = ["zfs", "send", *(["-i", base] if base else []), snapshot]
    with subprocess.Popen(argv, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        total = 0
        while chunk := proc.stdout.read(1 << 20):
            total += len(chunk)
    if proc.returncode != 0:
        raise lab.LabError(f"{' '.join(argv)} exited {proc.returncode}")
    return total


# --------------------------------------------------------------------------- the lab


class Bench:
    """The lab (zfs-fuse, two pools, the WAN, an sshd behind it) and the runs on it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size = lab.parse_size(args.size)
        self.out = Path(args.out).resolve()
        self.work = Path(args.workdir or f"/var/tmp/zchunk-bench-{os.getpid()}")
        self.results: list[RunResult] = []
        self.meta: dict[str, Any] = {}
        self.digests: dict[str, str] = {}

    @contextlib.contextmanager
    def lab(self) -> Iterator[None]:
        tag = f"{os.getpid():x}"
        with contextlib.ExitStack() as stack:
            stack.enter_context(lab.ZfsFuse(log=self.work / "zfs-fuse.log"))
            pool_size = f"{(3 * self.size + (1 << 30)) >> 20}M"
            self.src = stack.enter_context(lab.Pool(f"bsrc{tag}", self.work / "pools", size=pool_size,
                                                    destroy_timeout=300))
            dst_size = f"{(8 * self.size + (1 << 30)) >> 20}M"
            self.dst = stack.enter_context(lab.Pool(f"bdst{tag}", self.work / "pools", size=dst_size,
                                                    destroy_timeout=300))
            zfs("set", "atime=off", self.dst.name)  # replicas are mounted: reads must not change them
            self.wan = stack.enter_context(lab.Wan(prefix="zb"))
            self.sshd = stack.enter_context(lab.Sshd(self.work / "sshd", netns=self.wan.dst_ns,
                                                     listen=self.wan.dst_addr, port=22, alias="dst"))
            self.far = Target(self.sshd.ssh_config, self.sshd.user_key, self.sshd.known_hosts,
                              self.wan.dst_addr)
            self.wire_dev = self._root_device(self.wan.gateway("dst"))
            yield

    @staticmethod
    def _root_device(addr: str) -> str:
        """The root-namespace end of the dst veth: the device holding the gateway address."""
        for link in json.loads(lab.run(["ip", "-j", "-4", "addr", "show"]).stdout):
            if any(a.get("local") == addr for a in link.get("addr_info", [])):
                return str(link["ifname"])
        raise lab.LabError(f"no device has {addr}")

    def make_source(self) -> str:
        ds = f"{self.src.name}/ds"
        zfs("create", ds)
        t0 = time.monotonic()
        lab.write_dataset(mountpoint(ds) / "data", self.size, seed=1, compressible_fraction=0.5)
        zfs("snapshot", f"{ds}@s1")
        self.digests["s1"] = lab.snapshot_digest(f"{ds}@s1")
        self.meta["stream_bytes"] = {"s1": stream_size(f"{ds}@s1")}
        log(f"source {ds}@s1: {self.size / MiB:.0f} MiB of files, "
            f"stream {self.meta['stream_bytes']['s1'] / MiB:.1f} MiB ({time.monotonic() - t0:.0f} s)")
        return ds

    def add_change(self, ds: str) -> None:
        change = lab.parse_size(self.args.change)
        lab.write_dataset(mountpoint(ds) / "more", change, seed=2, compressible_fraction=0.5)
        zfs("snapshot", f"{ds}@s2")
        self.digests["s2"] = lab.snapshot_digest(f"{ds}@s2")
        self.meta["stream_bytes"]["s1->s2"] = stream_size(f"{ds}@s2", f"{ds}@s1")

    # ----------------------------------------------------------------- one run

    def run_tool(self, tool: Tool, scenario: Scenario, job: Job, run: int, timeout: float,
                 keep_target: bool = False) -> RunResult:
        job.workdir.mkdir(parents=True, exist_ok=True)
        logbase = self.out / "logs" / f"{scenario.name}-{tool.name}-{run}"
        logbase.parent.mkdir(parents=True, exist_ok=True)
        needles = tool.needles(job, self.far)
        spool = job.workdir / "spool" if tool.name == "zchunk" else None
        wire0 = wire_counters(self.wire_dev)
        env = {**os.environ, "PATH": PATH, "LC_ALL": "C", **tool.env()}
        with open(f"{logbase}.out", "wb") as out, open(f"{logbase}.err", "wb") as err:
            launched = time.time()
            start = time.monotonic()
            proc = subprocess.Popen(tool.argv(job, self.far), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, env=env, cwd=job.workdir, start_new_session=True)
            watch = ProcWatch([proc.pid], self.sshd.pid, needles, spool)
            watch.start()
            fault = FaultThread(self.wan, scenario)
            fault.start()
            code: int | None = None
            try:
                code, tree_cpu, _ = wait_with_rusage(proc.pid, start + timeout)
                end = time.monotonic()
                wire = wire_counters(self.wire_dev) - wire0
            finally:
                if code is None:
                    self._kill_group(proc)
                proc.returncode = code if code is not None else -9
                outages = fault.stop()
                usage = watch.stop()
        stdout = Path(f"{logbase}.out").read_text(errors="replace")
        stderr = Path(f"{logbase}.err").read_text(errors="replace")
        result = RunResult(
            tool=tool.name, scenario=scenario.name, run=run, ok=False, reason="", exit_code=code,
            elapsed=round(end - start, 2), timeout=round(timeout), wire_bytes=wire,
            cpu_s=round(tree_cpu + usage.cpu_outside_tree(), 2), cpu_by=cpu_split(tree_cpu, usage),
            daemon_cpu_s=round(usage.daemon_cpu_s, 2),
            outage_s=round(overlap(outages, start, end), 1), outages=sum(a < end for a, _ in outages),
            rss=rss_summary(usage), spool_peak=usage.spool_peak,
            disk_writes={side: usage.disk_writes(side) for side in ("local", "target")},
            log=str(logbase.relative_to(self.out)))
        if tool.name == "zchunk":
            result.zchunk = zchunk_phases(stdout, launched, launched + (end - start))
        if code is None:
            result.reason = f"timed out after {timeout:.0f} s (killed)"
        elif code != 0:
            result.reason = failure_reason(code, stdout, stderr)
        else:
            result.ok, result.reason = self.verify(job)
        # A seed for the incremental is kept when it worked; an incremental's target goes back to @s1.
        result.leftovers = self.cleanup(tool, job, needles, scenario.incremental or (keep_target and result.ok))
        return result

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, 0)

    def verify(self, job: Job) -> tuple[bool, str]:
        """The target snapshot has the source's guid and the same files."""
        snap = f"{job.target}@{job.snapshot}"
        if not exists(snap):
            return False, f"exit 0 but {snap} does not exist"
        src_guid, dst_guid = zfs_get("guid", f"{job.dataset}@{job.snapshot}"), zfs_get("guid", snap)
        if src_guid != dst_guid:
            return False, f"guid differs: source {src_guid}, target {dst_guid}"
        if lab.snapshot_digest(snap) != self.digests[job.snapshot]:
            return False, "files differ from the source"
        return True, "verified (guid and file digest)"

    def cleanup(self, tool: Tool, job: Job, needles: list[str], keep_target: bool) -> list[str]:
        """Stop what the run left running (by pid: processes matching this run's needles and
        sessions under the lab sshd), then remove its target and spool; report leftovers."""
        time.sleep(1.0)  # a finishing tool's agents exit on their own within a moment
        watch = ProcWatch([], self.sshd.pid, needles)
        watch.tick()
        alive = [p for p in watch.usage_now().processes if lab.pid_alive(p.pid)]
        leftovers = [f"{p.side} {p.role}: {p.cmdline[:120]}" for p in alive]
        if not keep_target and exists(job.target) and not exists(f"{job.target}@{job.snapshot}"):
            leftovers.append(f"target {job.target} exists without @{job.snapshot} (a partial receive)")
        if alive:
            lab.stop_pids([p.pid for p in alive], grace=5.0)
        leftovers += self._destroy_partial()
        if keep_target:
            self._rollback(job)
        else:
            zfs("release", "zchunk_bench", f"{job.target}@{job.snapshot}", check=False)  # zchunk's, on its base
            if error := retry_busy("destroy", "-r", job.target):
                leftovers.append(error)
        shutil.rmtree(job.workdir / "spool", ignore_errors=True)
        return leftovers

    def _destroy_partial(self) -> list[str]:
        """Hidden clones an interrupted receive may leave (``target/%recv``)."""
        names = zfs("list", "-H", "-o", "name", "-t", "filesystem,volume", "-r", self.dst.name).stdout.split()
        return [error for name in names if "%" in name and (error := retry_busy("destroy", "-r", name))]

    def _rollback(self, job: Job) -> None:
        """Back to the incremental base so the next run sends the same increment."""
        if job.base is None:
            return
        if exists(f"{job.target}@{job.base}") and (error := retry_busy("rollback", "-r", f"{job.target}@{job.base}")):
            raise lab.LabError(error)
        snaps = zfs("list", "-H", "-o", "name", "-t", "snapshot", "-r", job.target, check=False).stdout.split()
        if snaps != [f"{job.target}@{job.base}"]:
            raise lab.LabError(f"could not reset {job.target} to @{job.base}: has {snaps}")

    # ----------------------------------------------------------------- scenarios

    def timeout(self, tool: str, scenario: Scenario) -> float:
        """3x the tool's fault-free time (its 100mbit median when measured) + outages + 120 s."""
        done = [r.elapsed for r in self.results if r.tool == tool and r.ok and r.scenario == "100mbit"]
        if scenario.incremental:
            base = lab.parse_size(self.args.change) / 12.5e6 + 10
        elif scenario.rate_mbit is None:
            base = self.size / 40e6 + 10
        else:
            base = statistics.median(done) if done else self.size * 1.1 / (scenario.rate_mbit * 1e6 / 8) + 10
        return 3 * base + scenario.outage_allowance(base) + 120

    def run_scenario(self, scenario: Scenario, ds: str, tools: list[Tool]) -> None:
        log(f"== {scenario.name}: {scenario.about}")
        if scenario.incremental:
            tools = self.seed_incremental(ds, tools)
        shape_link(self.wan, scenario)
        try:
            for run in range(1, self.args.runs + 1):
                for tool in tools:
                    job = self.job(tool, scenario, ds, run)
                    res = self.run_tool(tool, scenario, job, run, self.timeout(tool.name, scenario))
                    self.results.append(res)
                    log(f"  {tool.name:10} run {run}: {'ok ' if res.ok else 'FAIL'} {res.elapsed:7.1f} s  "
                        f"wire {res.wire_bytes / MiB:7.1f} MiB  cpu {res.cpu_s:6.1f} s  "
                        f"outage {res.outage_s:4.0f} s  {'' if res.ok else res.reason}")
                    if res.leftovers:
                        log(f"    left running after the tool exited (stopped): {res.leftovers}")
                    self.save()
        finally:
            shape_link(self.wan, SCENARIOS["nolimit"])

    def job(self, tool: Tool, scenario: Scenario, ds: str, run: int) -> Job:
        workdir = self.work / "runs" / f"{scenario.name}-{tool.name}-{run}"
        if scenario.incremental:
            return Job(ds, "s2", "s1", f"{self.dst.name}/inc-{slug(tool.name)}", workdir)
        return Job(ds, "s1", None, f"{self.dst.name}/{slug(tool.name)}-{scenario.name}-{run}", workdir)

    def seed_incremental(self, ds: str, tools: list[Tool]) -> list[Tool]:
        """Replicate @s1 with each tool (untimed, no rate limit), then make the change and @s2."""
        seeded = []
        for tool in tools:
            job = Job(ds, "s1", None, f"{self.dst.name}/inc-{slug(tool.name)}",
                      self.work / "runs" / f"incremental-seed-{tool.name}")
            res = self.run_tool(tool, SCENARIOS["nolimit"], job, 0, self.timeout(tool.name, SCENARIOS["nolimit"]),
                                keep_target=True)
            if res.ok:
                seeded.append(tool)
            else:
                log(f"  {tool.name}: could not replicate @s1 for the incremental: {res.reason}")
                res.scenario = "incremental"
                self.results.append(res)
        self.add_change(ds)
        log(f"  change: {lab.parse_size(self.args.change) / MiB:.0f} MiB of new files, incremental stream "
            f"{self.meta['stream_bytes']['s1->s2'] / MiB:.1f} MiB")
        return seeded

    def save(self) -> None:
        data = {"meta": self.meta, "runs": [asdict(r) for r in self.results]}
        path = Path(self.args.report).with_name("results.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")


# --------------------------------------------------------------------------- small helpers


def slug(name: str) -> str:
    return name.replace("+", "-")


def failure_reason(code: int, stdout: str, stderr: str) -> str:
    """The line that says why a tool failed: zchunk's own error sentence (with the
    exception behind an internal error), syncoid's CRITICAL ERROR (without the
    pipeline it quotes, with the line before it), else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    ours = [i for i, line in enumerate(lines) if line.startswith("zchunk:")]
    if ours:
        i = ours[-1]
        cause = next((lines[j] for j in range(i - 1, -1, -1) if re.match(r"^[\w.]+(Error|Down|Exception)\b", lines[j])),
                     "")
        why = lines[i] + (f" <- {cause}" if cause and "internal error" in lines[i] else "")
    elif critical := [i for i, line in enumerate(lines) if line.startswith("CRITICAL ERROR")]:
        i = critical[-1]
        before = f"{lines[i - 1]}; " if i > 0 else ""
        why = before + re.sub(r"CRITICAL ERROR:\s+.*\sfailed:", "CRITICAL ERROR: the send pipeline failed:", lines[i])
    else:
        why = last_line(stderr) or last_line(stdout)
    return f"exit {code}: {why[:400]}"


def refresh_reasons(data: dict[str, Any], out: Path) -> None:
    """Re-derive failure reasons from the kept logs (for --report-only after a change here)."""
    for r in data["runs"]:
        err, std = out / f"{r['log']}.err", out / f"{r['log']}.out"
        if not r["ok"] and r["exit_code"] not in (None, 0) and err.exists():
            r["reason"] = failure_reason(r["exit_code"], std.read_text(errors="replace"),
                                         err.read_text(errors="replace"))


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def rss_summary(usage: Usage) -> dict[str, int]:
    """Peak VmHWM by role (zchunk's coordinator and agents) and per side."""
    out: dict[str, int] = {}
    for role in ("coordinator", "sender agent", "receiver agent"):
        peak, _ = usage.peak(role=role)
        if peak:
            out[role] = peak
    for side in ("local", "target"):
        peak, who = usage.peak(side=side)
        if peak:
            out[f"{side} max"] = peak
            out[f"{side} max is"] = who  # type: ignore[assignment]
    return out


def cpu_split(tree_cpu: float, usage: Usage) -> dict[str, float]:
    """CPU seconds of the tool's own process tree (from wait4) and of each other role and host."""
    split: dict[str, float] = {"local: command and its children": round(tree_cpu, 2)}
    for p in usage.processes:
        if not p.in_tree:
            key = f"{p.side}: {p.role}"
            split[key] = round(split.get(key, 0.0) + p.cpu_s, 2)
    return dict(sorted(split.items(), key=lambda kv: -kv[1]))


def zchunk_phases(stdout: str, launched: float, ended: float) -> dict[str, Any]:
    """Where zchunk's wall time went, from its --json events (epoch times)."""
    times: dict[str, float] = {}
    result: dict[str, Any] = {}
    link_downs, codec, pythons = 0, "", ""
    for line in stdout.splitlines():
        with contextlib.suppress(ValueError):
            ev = json.loads(line)
            if ev.get("event") == "result":
                result = ev
            elif ev.get("event") == "plan":
                codec = f"{ev.get('codec')}/{ev.get('checksum')}"
            elif ev.get("event") == "preflight":
                pythons = f"{ev.get('source', {}).get('python')} / {ev.get('target', {}).get('python')}"
            elif ev.get("event") == "link_down":
                link_downs += 1
            if "time" in ev:
                times.setdefault(str(ev["event"]), float(ev["time"]))
    marks = [("start", launched), ("preflight", times.get("preflight")), ("session", times.get("session")),
             ("stream_end", times.get("stream_end")), ("verified", times.get("verified")), ("exit", ended)]
    phases = {}
    names = {"preflight": "connect+preflight", "session": "plan+install agents",
             "stream_end": "send (until zfs send done)", "verified": "drain+receive+verify",
             "exit": "cleanup+exit"}
    prev = launched
    for name, t in marks[1:]:
        if t is not None:
            phases[names[name]] = round(t - prev, 2)
            prev = t
    transfer = result.get("transfer") or {}
    return {"phases": phases, "codec": codec, "agent_pythons": pythons, "link_downs": link_downs,
            "raw_bytes": transfer.get("raw_bytes"), "chunk_bytes": transfer.get("wire_bytes"),
            "outages": transfer.get("outages"), "outage_seconds": transfer.get("outage_seconds"),
            "discarded_chunks": transfer.get("discarded_chunks")}


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    def out(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, env={"PATH": PATH})
            return (proc.stdout.strip() or proc.stderr.strip()).split("\n")[0]
        return "?"
    repo = HERE.parent
    return {
        "command": " ".join([".venv/bin/python", "benchmarks/run.py", *map(shlex.quote, sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "kernel": os.uname().release, "cpus": os.cpu_count(),
        "zchunk_commit": out(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]),
        "zchunk_dirty": bool(out(["git", "-C", str(repo), "status", "--porcelain", "zchunk"]).strip()),
        "syncoid": out(["syncoid", "--version"]), "openssh": out(["ssh", "-V"]),
        "zstd": out(["zstd", "--version"]),
        "size": args.size, "change": args.change, "runs": args.runs,
        "loadavg_start": os.getloadavg(),
    }


def snapshot_code(dest: Path) -> str:
    """Copy zchunk/ as it is now and run zchunk from the copy, so one
    benchmark measures one version even while people edit the working tree."""
    repo = HERE.parent
    digest = hashlib.sha256()
    for package in ("zchunk",):
        shutil.copytree(repo / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
        for path in sorted((dest / package).rglob("*.py")):
            digest.update(path.relative_to(dest).as_posix().encode() + b"\0" + path.read_bytes())
    # Compiled once, as `pip install` does for an installed zchunk: otherwise every run would compile
    # the coordinator's modules anew (PYTHONDONTWRITEBYTECODE, or a copy nobody compiled yet).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(dest)], check=True)
    zchunk_tool = TOOLS["zchunk"]
    assert isinstance(zchunk_tool, Zchunk)
    zchunk_tool.code = dest
    return f"copy of zchunk/ taken at the start, sha256 {digest.hexdigest()[:12]}, compiled"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="192M", help="dataset size (files), e.g. 192M, 4G [192M]")
    p.add_argument("--change", default="8M", help="new data for the incremental scenario [8M]")
    p.add_argument("--runs", type=int, default=3, help="runs per tool and scenario; the median is reported [3]")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    p.add_argument("--tools", default=",".join(TOOLS), help=f"comma list of {', '.join(TOOLS)}")
    p.add_argument("--out", default=str(HERE / "out"), help="per-run logs [benchmarks/out]")
    p.add_argument("--report", default=str(HERE / "RESULTS.md"),
                   help="the report; results.png and results.json go beside it [benchmarks/RESULTS.md]")
    p.add_argument("--workdir", help="pools, spools, sshd (default /var/tmp/zchunk-bench-PID, removed after)")
    p.add_argument("--live-code", action="store_true",
                   help="run zchunk from the working tree as it changes, not from a copy taken at the start")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from results.json")
    args = p.parse_args(argv)
    for kind, chosen, known in (("scenario", args.scenarios, SCENARIOS), ("tool", args.tools, TOOLS)):
        bad = [x for x in chosen.split(",") if x not in known]
        if bad:
            p.error(f"unknown {kind} {', '.join(bad)}: choose from {', '.join(known)}")
    return args


def preflight(tools: list[Tool]) -> None:
    missing = lab.lab_prerequisites()
    peers = [t.name for t in tools if t.name != "zchunk"]
    if peers:
        needed = PEER_PROGRAMS if "syncoid" in peers else ("zstd",)
        missing += [f"{p} is not installed (needed by {', '.join(peers)})" for p in needed
                    if shutil.which(p, path=PATH) is None]
    if missing:
        sys.exit("benchmark prerequisites: " + "; ".join(missing))


def main(argv: list[str] | None = None) -> int:
    import report  # matplotlib is only needed here

    args = parse_args(argv)
    report_path = Path(args.report)
    if args.report_only:
        data = json.loads(report_path.with_name("results.json").read_text())
        refresh_reasons(data, Path(args.out))
        report_path.with_name("results.json").write_text(json.dumps(data, indent=1) + "\n")
        report.write(data, report_path)
        return 0
    tools = [TOOLS[t] for t in args.tools.split(",")]
    # The incremental scenario changes the source, so it runs last.
    scenarios = [SCENARIOS[s] for s in SCENARIOS if s in args.scenarios.split(",")]
    preflight(tools)
    bench = Bench(args)
    bench.meta.update(environment(args))
    bench.meta["tools"] = {t.name: t.describe(Target(Path("SSH_CONFIG"), Path("KEY"), Path("KNOWN_HOSTS"),
                                                     "10.231.x.2")) for t in tools}
    bench.meta["scenarios"] = {s.name: s.about for s in scenarios}
    bench.work.mkdir(parents=True, exist_ok=True)
    if not args.live_code:
        bench.meta["zchunk_code"] = snapshot_code(bench.work / "code")
    started = time.monotonic()
    daemon = procwatch.daemon_pid()

    def terminated(signum: int, frame: Any) -> None:  # kill PID: tear the lab down as ^C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    try:
        with bench.lab():
            ds = bench.make_source()
            for scenario in scenarios:
                bench.run_scenario(scenario, ds, tools)
    except lab.LabError:
        if daemon and not lab.pid_alive(daemon):
            log(f"the zfs-fuse daemon (pid {daemon}, started by someone else) went away during the "
                f"benchmark; results so far are in {Path(args.report).with_name('results.json')}")
        log(f"kept {bench.work}: pools that could not be destroyed live there")
        raise
    else:
        if not args.workdir:
            shutil.rmtree(bench.work, ignore_errors=True)
    finally:
        bench.meta["total_s"] = round(time.monotonic() - started)
        bench.meta["loadavg_end"] = os.getloadavg()
        bench.save()
        # Written also when tearing the lab down failed after the runs (zfs-fuse's "pool is busy").
        if bench.results:
            report.write({"meta": bench.meta, "runs": [asdict(r) for r in bench.results]}, report_path)
            log(f"wrote {report_path} in {bench.meta['total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
