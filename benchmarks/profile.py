"""Profile one zchunk push over the lab WAN: where each of its processes spends its CPU.

    .venv/bin/pip install py-spy
    .venv/bin/python benchmarks/profile.py [--size 1G] [--rate MBIT] [--top 25] [-- EXTRA SYNC ARGS]

Builds the benchmark lab (``run.py``'s: zfs-fuse pools, the WAN, an sshd in the
"dst" namespace), writes the same dataset, and runs ``zchunk sync`` once with
``py-spy record`` on the coordinator and on each agent daemon as it appears
(they are detached, so they are found by their session directory in their
command line). Prints, per process, its CPU seconds and the functions with the
most samples of their own ("self") and with their callees ("total"); the
collapsed stacks stay in ``--out`` for a flame graph. Sampling costs a few
percent: compare runs of this script with each other, not with ``run.py``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import run as bench  # noqa: E402
from tools import PATH, Job, Zchunk  # noqa: E402

PY_SPY = Path(sys.executable).parent / "py-spy"
MiB = 1 << 20


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def find_agents(needle: str) -> dict[str, int]:
    """name -> pid of the agent processes whose command line holds ``needle``: each side's daemon
    (``agent.py start DIR``, which forks it: it owns zfs send/receive) and its channel servers
    (``agent.py serve DIR``, one per coordinator channel: they move the chunk files)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        if len(text) > 3 and text[1].endswith("agent.py") and text[2] in ("start", "serve") and needle in text[3]:
            side = "sender" if text[3].endswith("-send") else "receiver"
            kind = f"{'daemon' if text[2] == 'start' else 'serve'}-{pid}"  # the daemon is start's grandchild
            found[f"{side}-{kind}"] = int(pid)
    return found


class ChunkTrace:
    """When each chunk was spooled (source), stored (target) and fed to zfs receive: the spool
    directories and the receiver's state file, looked at every 20 ms."""

    def __init__(self, spool: Path) -> None:
        self.spool, self.t0 = spool, time.monotonic()
        self.seen: dict[tuple[str, int], float] = {}

    def look(self) -> None:
        now = time.monotonic() - self.t0
        for d in self.spool.glob("*-send/chunks"):
            for f in d.glob("*.chunk"):
                self.seen.setdefault(("spooled", int(f.stem)), now)
        for d in self.spool.glob("*-receive"):
            for f in (d / "chunks").glob("*.chunk"):
                self.seen.setdefault(("stored", int(f.stem)), now)
            try:
                fed = int(json.loads((d / "receiver.json").read_text()).get("next_seq", 0))
            except (OSError, ValueError):
                continue
            for seq in range(fed):
                self.seen.setdefault(("fed", seq), now)

    def table(self) -> str:
        seqs = sorted({seq for _, seq in self.seen})
        lines = ["  chunks (seconds from the start: spooled / stored on the target / fed to zfs receive):"]
        for seq in seqs:
            cols = [self.seen.get((k, seq)) for k in ("spooled", "stored", "fed")]
            lines.append(f"    {seq:4d}  " + "  ".join(f"{c:6.2f}" if c is not None else "     -" for c in cols))
        return "\n".join(lines)


def summarize(collapsed: Path, top: int) -> list[str]:
    """Self and total sample counts per function from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1] if " (" in f else f for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    if not samples:
        return ["    (no samples)"]
    lines = [f"    {samples} samples; self:"]
    lines += [f"      {100 * n / samples:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("    total (with callees):")
    lines += [f"      {100 * n / samples:5.1f}%  {f}" for f, n in total.most_common(top)]
    return lines


def timeline(stdout: Path) -> str:
    """zchunk's --json events, one line each, in seconds from the first."""
    lines, t0 = [], None
    for raw in stdout.read_text(errors="replace").splitlines():
        try:
            ev = json.loads(raw)
        except ValueError:
            continue
        if "time" not in ev:
            continue
        t0 = ev["time"] if t0 is None else t0
        what = ev["event"]
        if what == "progress":
            what += (f" {ev['raw_bytes'] / MiB:.0f} MiB received; chunks spooled {ev['chunks_spooled']}, "
                     f"moved {ev['chunks_moved']}, received {ev['chunks_received']}")
        lines.append(f"    {ev['time'] - t0:6.2f}  {what}")
    return "\n".join(["  timeline:", *lines])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rate", type=float, default=None, help="tbf limit in Mbit/s (default: none)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=str(HERE / "out" / "profile"))
    ap.add_argument("--no-spy", action="store_true", help="run without py-spy (CPU seconds only)")
    ap.add_argument("extra", nargs="*", help="more zchunk sync arguments (after --)")
    args = ap.parse_args()
    if not args.no_spy and not PY_SPY.exists():
        print(f"profile: {PY_SPY} not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    b = bench.Bench(bench.parse_args(["--size", args.size, "--out", str(out)]))
    b.work.mkdir(parents=True, exist_ok=True)
    try:
        with b.lab():
            ds = b.make_source()
            b.wan.rate("dst", args.rate)
            job = Job(ds, "s1", None, f"{b.dst.name}/prof", b.work / "run")
            job.workdir.mkdir(parents=True)
            tool = bench.TOOLS["zchunk"]
            assert isinstance(tool, Zchunk)
            argv = [*tool.argv(job, b.far), *args.extra]
            spy = [] if args.no_spy else [str(PY_SPY), "record", "--format", "raw", "--rate", "200",
                                          "--nonblocking", "-o"]
            env = {**os.environ, "PATH": PATH, "LC_ALL": "C"}
            daemon = int(subprocess.run(["pgrep", "-x", "zfs-fuse"], capture_output=True, text=True).stdout.split()[0])
            daemon_cpu0 = cpu_seconds(daemon)
            t0 = time.monotonic()
            coord = subprocess.Popen(spy + [str(out / "coordinator.txt"), "--"] + argv if spy else argv,
                                     stdout=open(out / "zchunk.out", "wb"), stderr=open(out / "zchunk.err", "wb"),
                                     env=env, cwd=job.workdir)
            spies: dict[str, subprocess.Popen[bytes]] = {}
            cpu: dict[str, float] = {}
            agents: dict[str, int] = {}
            coord_pid = 0
            trace = ChunkTrace(tool.spool(job))
            while coord.poll() is None:
                trace.look()
                if not coord_pid:  # under py-spy, the coordinator is its child
                    kids = subprocess.run(["pgrep", "-P", str(coord.pid)], capture_output=True, text=True)
                    coord_pid = int(kids.stdout.split()[0]) if spy and kids.stdout.split() else (
                        0 if spy else coord.pid)
                if coord_pid:
                    cpu["coordinator"] = max(cpu.get("coordinator", 0.0), cpu_seconds(coord_pid))
                for role, pid in find_agents(str(tool.spool(job))).items():
                    agents.setdefault(role, pid)
                    if spy and role not in spies:
                        spies[role] = subprocess.Popen(
                            [str(PY_SPY), "record", "--format", "raw", "--rate", "200", "--nonblocking",
                             "-o", str(out / f"{role}.txt"), "--pid", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for role, pid in agents.items():
                    cpu[role] = max(cpu.get(role, 0.0), cpu_seconds(pid))
                time.sleep(0.02)
            elapsed = time.monotonic() - t0
            daemon_cpu = cpu_seconds(daemon) - daemon_cpu0
            for p in spies.values():
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.terminate()
            ok = coord.returncode == 0
            print(f"zchunk sync {args.size}, rate {args.rate or 'none'}: exit {coord.returncode} in {elapsed:.1f} s")
            groups = ["coordinator", "sender-daemon", "sender-serve", "receiver-daemon", "receiver-serve"]
            print(timeline(out / "zchunk.out"))
            print(trace.table())
            print(f"  zfs-fuse daemon (both pools, shared): {daemon_cpu:.2f} CPU s")
            for group in groups:
                names = [n for n in cpu if n == group or n.startswith(group + "-")]
                cpu_s = sum(cpu[n] for n in names)
                print(f"  {group}" + (f": {cpu_s:.2f} CPU s in {len(names)} process(es)" if names else ""))
                merged = out / f"{group}.merged"
                with open(merged, "w") as fh:
                    for n in [group, *names]:
                        if (out / f"{n}.txt").exists():
                            fh.write((out / f"{n}.txt").read_text(errors="replace"))
                print("\n".join(summarize(merged, args.top)))
            print(f"  (stdout/stderr and collapsed stacks in {out})")
            b.cleanup(tool, job, tool.needles(job, b.far), keep_target=False)
            return 0 if ok else 1
    finally:
        shutil.rmtree(b.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
