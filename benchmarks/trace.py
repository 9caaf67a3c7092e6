"""Timeline of zchunk runs over the benchmark lab: when each host command, channel and poll happened.

    .venv/bin/python benchmarks/trace.py [--size 192M] [--runs 2] [--rate MBIT] [-- EXTRA SYNC ARGS]

Builds ``run.py``'s lab (zfs-fuse pools, the WAN, an sshd in the "dst" namespace), writes the dataset,
and runs ``zchunk sync`` (a push, as run.py's zchunk) with ``benchmarks/tracing`` first on PYTHONPATH:
its ``sitecustomize`` prints, for the coordinator only, each host command, channel, chunk move and
change in the poller's view with its start (seconds since the interpreter started) and duration. This
is how the fixed costs in README.md ("Hot path", second round) were found: what waits on what before
the first chunk moves and after the last one. Tracing costs a little time itself: compare traces with
traces, and times with ``compare.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import run as bench  # noqa: E402
from tools import PATH, TOOLS, Job  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="192M")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--rate", type=float, default=None, help="tbf limit in Mbit/s (default: none)")
    ap.add_argument("extra", nargs="*", help="extra `zchunk sync` arguments (after --)")
    args = ap.parse_args()
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(HERE.parent / "zchunk")],  # as installed
                   check=True)
    b = bench.Bench(bench.parse_args(["--size", args.size, "--out", str(HERE / "out" / "trace")]))
    b.work.mkdir(parents=True, exist_ok=True)
    tool = TOOLS["zchunk"]
    env = {**os.environ, "PATH": PATH, "LC_ALL": "C", "ZCHUNK_TRACE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE / "tracing"), str(HERE.parent)])}
    failed = 0
    with b.lab():
        ds = b.make_source()
        b.wan.rate("dst", args.rate)
        for r in range(args.runs):
            job = Job(ds, "s1", None, f"{b.dst.name}/trace{r}", b.work / f"run{r}")
            job.workdir.mkdir(parents=True)
            start = time.monotonic()
            proc = subprocess.run(tool.argv(job, b.far) + args.extra, env=env, cwd=job.workdir,
                                  capture_output=True, text=True)
            took = time.monotonic() - start
            print(f"run {r + 1}: exit {proc.returncode}, {took:.2f} s", flush=True)
            lines = [line for line in proc.stderr.splitlines() if line.startswith("TRACE ")]
            print("\n".join(lines) if lines else proc.stderr[-3000:], flush=True)
            failed += proc.returncode != 0
            b.cleanup(tool, job, tool.needles(job, b.far), keep_target=False)
    shutil.rmtree(b.work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
