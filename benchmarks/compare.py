"""Before/after: zchunk variants (another checkout, other options) against syncoid, on one lab.

    .venv/bin/python benchmarks/compare.py [--size 1G] [--runs 5] [--rate MBIT] [--kind KIND] VARIANT...

A VARIANT is ``syncoid``, or zchunk given as extra ``zchunk sync`` arguments,
optionally starting with ``code=DIR`` to run zchunk from another checkout
(``git worktree add /tmp/before COMMIT``), e.g.::

    benchmarks/compare.py --size 1G "code=/tmp/before" "" syncoid
    benchmarks/compare.py "" "--compress zstd:3" "--parallel 1"

Builds the benchmark lab once (``run.py``'s: zfs-fuse pools, the WAN, an
sshd in the "dst" namespace), writes the dataset, then runs the variants
interleaved (run 1 of each, then run 2, ...) so that a burst of load on the
machine does not fall on one of them, each into a fresh target. Prints each
run's wall time and, per variant, the median. Unlike ``run.py`` it measures
nothing else and writes no report: it is for deciding whether a change helps.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import datakinds  # noqa: E402
import run as bench  # noqa: E402
from tools import PATH, TOOLS, Job, Target, Tool  # noqa: E402

from zchunk import lab  # noqa: E402


def command(variant: str, job: Job, far: Target) -> tuple[list[str], dict[str, str], Tool]:
    env = {**os.environ, "PATH": PATH, "LC_ALL": "C"}
    if variant == "syncoid":
        tool = TOOLS["syncoid"]
        return tool.argv(job, far), env, tool
    tool = TOOLS["zchunk"]
    words = shlex.split(variant)
    if words and words[0].startswith("code="):
        env["PYTHONPATH"] = str(Path(words.pop(0)[5:]).resolve())
    return tool.argv(job, far) + words, env, tool


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rate", type=float, default=None, help="tbf limit in Mbit/s (default: none)")
    ap.add_argument("--kind", help="the dataset as benchmarks/datakinds.py writes this kind (default: run.py's, "
                    "half text, half random)")
    ap.add_argument("variants", nargs="+")
    args = ap.parse_args()
    # every variant's modules compiled once, as an installed zchunk's are (else each run compiles them)
    trees = [HERE.parent] + [Path(w[5:]) for v in args.variants for w in shlex.split(v)[:1] if w.startswith("code=")]
    for tree in trees:
        # (a tree from before the agent moved into zchunk/ has it in helpers/)
        packages = [str(tree / d) for d in ("zchunk", "helpers") if (tree / d).is_dir()]
        subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], check=True)
    b = bench.Bench(bench.parse_args(["--size", args.size, "--out", str(HERE / "out" / "compare")]))
    b.work.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    failed = 0
    with b.lab():
        if args.kind:
            ds = f"{b.src.name}/{args.kind}"
            bench.zfs("create", ds)
            datakinds.write(bench.mountpoint(ds), args.kind, b.size)
            bench.zfs("snapshot", f"{ds}@s1")
            b.digests["s1"] = lab.snapshot_digest(f"{ds}@s1")
        else:
            ds = b.make_source()
        b.wan.rate("dst", args.rate)
        for r in range(args.runs):
            for i, variant in enumerate(args.variants):
                job = Job(ds, "s1", None, f"{b.dst.name}/cmp{r}v{i}", b.work / f"run{r}-v{i}")
                job.workdir.mkdir(parents=True)
                argv, env, tool = command(variant, job, b.far)
                start = time.monotonic()
                proc = subprocess.run(argv, env=env, cwd=job.workdir, capture_output=True)
                took = time.monotonic() - start
                ok, why = (b.verify(job) if proc.returncode == 0
                           else (False, bench.failure_reason(proc.returncode, proc.stdout.decode(errors="replace"),
                                                             proc.stderr.decode(errors="replace"))))
                print(f"{variant or '(zchunk defaults)':40s} run {r + 1}: {'ok  ' if ok else 'FAIL'} {took:6.2f} s"
                      + ("" if ok else f"  {why}"), flush=True)
                if ok:
                    times[variant].append(took)
                else:
                    failed += 1
                b.cleanup(tool, job, tool.needles(job, b.far), keep_target=False)
    shutil.rmtree(b.work, ignore_errors=True)  # kept when the lab could not be torn down (run.py's rule)
    print()
    for variant, ts in times.items():
        median = f"{statistics.median(ts):6.2f} s" if ts else "     –  "
        print(f"{variant or '(zchunk defaults)':40s} median {median}  runs {' '.join(f'{t:.2f}' for t in ts)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
