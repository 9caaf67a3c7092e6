"""Does zchunk's progress tell the truth? The shown ETA and rate against what really happened.

    .venv/bin/python benchmarks/eta.py [--size 200M] [--rate 30] [--runs 2] [--out benchmarks/eta.json]
                                       [--sync-args "--chunk-size 32M --parallel 4"]

Builds the benchmark lab (``run.py``'s: zfs-fuse pools, the WAN, an sshd in the "dst" namespace), writes
the dataset (half compressible, as run.py's), limits the link to ``--rate`` Mbit/s and runs one ``zchunk
sync`` push with ``--json``. From its progress events, at 25 %, 50 % and 75 % of the transfer's time
(from the ``session`` event to ``verified``) it compares the shown ETA with the time really left, and the
shown rate with the link's rate (``--rate`` Mbit/s, which carries SSH and TCP headers too, so the payload
rate is a few per cent below it). Prints a table and, with ``--out``, writes the events' summary as JSON.
Targets (issue "link control", item 3): ETA within 15 % of the real remaining time, rate within 10 % of the
link's.

Smoothness: how far the bytes on the target moved from one progress event to the next (the median and
largest step, against the chunk size), and how many events before the stream's end showed no movement:
with whole chunks counted, a bar would stand still and then jump a chunk (32 MiB with ``--sync-args
"--chunk-size 32M --parallel 4"``, the issue's case).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import run as bench  # noqa: E402
from tools import PATH, TOOLS, Job  # noqa: E402


def at(events: list[dict[str, Any]], t: float) -> dict[str, Any]:
    """The last progress event shown at or before ``t``."""
    shown = [e for e in events if e["event"] == "progress" and e["time"] <= t]
    return shown[-1]


def judge(events: list[dict[str, Any]], link: float) -> list[dict[str, Any]]:
    start = next(e["time"] for e in events if e["event"] == "session")
    end = next(e["time"] for e in events if e["event"] == "verified")
    rows = []
    for share in (0.25, 0.50, 0.75):
        t = start + share * (end - start)
        p = at(events, t)
        left = end - p["time"]
        rows.append({"share": share, "shown_at": round(p["time"] - start, 1), "eta": p["eta_seconds"],
                     "really_left": round(left, 1),
                     "eta_error": None if p["eta_seconds"] is None else round(p["eta_seconds"] / left - 1, 3),
                     "rate": p["rate"], "rate_error": round(p["rate"] / link - 1, 3), "percent": p["percent"]})
    return rows


def steps(series: list[list[float]]) -> dict[str, float]:
    """On-target steps between progress events, in MiB (the first and last events left out: before the
    first byte and where the end is in sight), and the count of events that showed no movement."""
    moves = [b[1] - a[1] for a, b in zip(series, series[1:]) if a[1] < a[3]][1:-1]
    return {"median_step_mib": round(statistics.median(moves) / 2**20, 2),
            "largest_step_mib": round(max(moves) / 2**20, 2), "standing": sum(1 for m in moves if m <= 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="200M")
    ap.add_argument("--rate", type=float, default=30.0, help="tbf limit in Mbit/s [30]")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--sync-args", default="", help="more zchunk sync arguments, e.g. \"--chunk-size 32M\"")
    args = ap.parse_args()
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(HERE.parent / "zchunk")], check=True)
    b = bench.Bench(bench.parse_args(["--size", args.size, "--out", str(HERE / "out" / "eta")]))
    b.work.mkdir(parents=True, exist_ok=True)
    link = args.rate * 1e6 / 8
    results = []
    failed = 0
    with b.lab():
        ds = b.make_source()
        b.wan.rate("dst", args.rate)
        tool = TOOLS["zchunk"]
        for r in range(args.runs):
            job = Job(ds, "s1", None, f"{b.dst.name}/eta{r}", b.work / f"run{r}")
            job.workdir.mkdir(parents=True)
            argv = [*tool.argv(job, b.far), *shlex.split(args.sync_args)]
            started = time.monotonic()
            proc = subprocess.run(argv, env={**os.environ, "PATH": PATH, "LC_ALL": "C"}, cwd=job.workdir,
                                  capture_output=True, text=True)
            took = time.monotonic() - started
            events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not any(e["event"] == "verified" for e in events):
                print(f"run {r + 1}: FAILED (exit {proc.returncode}): {proc.stderr[-500:]}")
                failed += 1
                continue
            rows = judge(events, link)
            start = next(e["time"] for e in events if e["event"] == "session")
            series = [[round(e["time"] - start, 2), e["on_target"], e["wire_bytes"], e["expected"], e["rate"]]
                      for e in events if e["event"] == "progress"]
            smooth = steps(series)
            results.append({"run": r + 1, "seconds": round(took, 1), "rows": rows, "steps": smooth,
                            "series [t, on_target, wire_bytes, expected, rate]": series})
            print(f"run {r + 1}: {took:.1f} s; on-target steps between events: median "
                  f"{smooth['median_step_mib']} MiB, largest {smooth['largest_step_mib']} MiB, "
                  f"{smooth['standing']} events without movement")
            for row in rows:
                print(f"  at {row['share']:.0%} ({row['shown_at']:5.1f} s): ETA {row['eta']} s, really "
                      f"{row['really_left']} s ({row['eta_error']:+.1%}); rate {row['rate'] / 1e6:.2f} MB/s vs "
                      f"link {link / 1e6:.2f} MB/s ({row['rate_error']:+.1%}); {row['percent']} %")
            b.cleanup(tool, job, tool.needles(job, b.far), keep_target=False)
    shutil.rmtree(b.work, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"size": args.size, "rate_mbit": args.rate, "sync_args": args.sync_args,
                                              "runs": results},
                                             indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
