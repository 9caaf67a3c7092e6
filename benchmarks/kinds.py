"""Per kind of data, over a limited link: zchunk's adaptive compression against fixed zstd levels, a target
whose python has no zstandard, syncoid, and the physical limit, on the same datasets in the same run.

    .venv/bin/python benchmarks/kinds.py [--size 128M] [--rate 100] [--runs 2] [--kinds text,random,...]
                                         [--no-fixed]

For each kind (benchmarks/datakinds.py: text, random, vmimage, smallfiles) a dataset of ``--size`` bytes is
written on the lab's source pool (run.py's lab: zfs-fuse, the WAN limited to ``--rate`` Mbit/s by tbf,
an sshd behind it) and sent, full, by each variant into a fresh target, the variants interleaved run by run:

- ``zchunk``: defaults (the level adapts to the link per chunk);
- ``zchunk zstd:N``: ``--compress zstd:N``, N in 1, 3, 6 (fixed levels);
- ``zchunk, target python without zstandard``: ``--python`` a venv of the system python without its
  packages on the target, as a host whose python3 lacks the module: zstd through the ``zstd`` command;
- ``syncoid``: Debian's, default pipeline (lzop when installed, mbuffer).

Measured: wall time, bytes on the WAN veth (both directions). The physical limit is the ``zfs send``
stream compressed by ``zstd -T1`` at the best level that one core sustains at the link's rate, over that
rate (no SSH, TCP or IP overhead; the best of levels 1, 3, 6, 9, 12, 15, 19). Writes ``--out`` (JSON:
every run, the limits, the command) and prints a table per kind: medians, and ratios to syncoid and to
the limit. ``--rate 0``: no limit on the link (and no physical limit computed); ``--no-fixed``: without
the fixed-level variants.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import datakinds  # noqa: E402
import run as bench  # noqa: E402
from procwatch import wire_counters  # noqa: E402
from tools import TOOLS, Job  # noqa: E402

from zchunk import lab  # noqa: E402

MiB = 1 << 20
LEVELS = (1, 3, 6, 9, 12, 15, 19)


def physical_limit(snapshot: str, rate_bytes: float, work: Path) -> dict[str, Any]:
    """The stream compressed at the best level one core sustains at ``rate_bytes``/s, over that rate."""
    stream = work / "stream.zfs"
    with open(stream, "wb") as f:
        subprocess.run(["zfs", "send", snapshot], stdout=f, check=True)
    raw = stream.stat().st_size
    best: dict[str, Any] | None = None
    levels = []
    for level in LEVELS:
        start = time.monotonic()
        out = subprocess.run(["zstd", "-q", "-c", "-T1", f"-{level}", str(stream)], capture_output=True,
                             check=True).stdout
        took = time.monotonic() - start
        size = len(out)
        sustains = size / took >= rate_bytes  # it makes compressed bytes at least as fast as the link sends
        levels.append({"level": level, "bytes": size, "seconds": round(took, 2), "sustains": sustains})
        if sustains and (best is None or size < best["bytes"]):
            best = {"level": level, "bytes": size}
        if not sustains:
            break  # higher levels are slower still
    stream.unlink()
    assert best is not None, "not even zstd -1 keeps up with the link"
    return {"stream_bytes": raw, "level": best["level"], "compressed_bytes": best["bytes"],
            "seconds": round(best["bytes"] / rate_bytes, 2), "levels": levels}


def bare_python(work: Path) -> str:
    """A venv of the system python without its packages: a python3 without zstandard and xxhash."""
    venv = work / "bare-venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    exe = str(venv / "bin" / "python3")
    assert subprocess.run([exe, "-c", "import zstandard"], capture_output=True).returncode != 0
    return exe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="128M")
    ap.add_argument("--rate", type=float, default=100.0, help="tbf limit in Mbit/s [100]; 0: none")
    ap.add_argument("--no-fixed", action="store_true", help="leave out the fixed zstd levels")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--kinds", default=",".join(datakinds.KINDS))
    ap.add_argument("--out", default=str(HERE / "kinds.json"))
    args = ap.parse_args()
    b = bench.Bench(bench.parse_args(["--size", args.size, "--out", str(HERE / "out" / "kinds")]))
    b.work.mkdir(parents=True, exist_ok=True)
    rate_bytes = args.rate * 1e6 / 8
    bare = bare_python(b.work)
    variants: list[tuple[str, str, list[str]]] = [
        ("zchunk", "zchunk", []),
        ("zchunk zstd:1", "zchunk", ["--compress", "zstd:1"]),
        ("zchunk zstd:3", "zchunk", ["--compress", "zstd:3"]),
        ("zchunk zstd:6", "zchunk", ["--compress", "zstd:6"]),
        ("zchunk, target python without zstandard", "zchunk", ["--python", bare]),
        ("syncoid", "syncoid", []),
    ]
    if args.no_fixed:
        variants = [v for v in variants if "zstd:" not in v[0]]
    report: dict[str, Any] = {"command": " ".join([".venv/bin/python", "benchmarks/kinds.py", *sys.argv[1:]]),
                              "size": args.size, "rate_mbit": args.rate, "kinds": {}}
    failed = 0
    with b.lab():
        b.wan.rate("dst", args.rate or None)
        for kind in args.kinds.split(","):
            ds = f"{b.src.name}/{kind}"
            bench.zfs("create", ds)
            datakinds.write(bench.mountpoint(ds), kind, b.size)
            bench.zfs("snapshot", f"{ds}@s1")
            b.digests["s1"] = lab.snapshot_digest(f"{ds}@s1")
            limit = physical_limit(f"{ds}@s1", rate_bytes, b.work) if rate_bytes else None
            if limit is not None:
                print(f"{kind}: stream {limit['stream_bytes'] / MiB:.1f} MiB, limit {limit['seconds']:.1f} s "
                      f"(zstd -{limit['level']}: {limit['compressed_bytes'] / MiB:.1f} MiB)", flush=True)
            runs: list[dict[str, Any]] = []
            for r in range(args.runs):
                for i, (name, tool_name, extra) in enumerate(variants):
                    tool = TOOLS[tool_name]
                    job = Job(ds, "s1", None, f"{b.dst.name}/{kind}{r}v{i}", b.work / f"{kind}-run{r}-v{i}")
                    job.workdir.mkdir(parents=True)
                    env = {**bench.os.environ, "PATH": bench.PATH, "LC_ALL": "C", **tool.env()}
                    wire0 = wire_counters(b.wire_dev)
                    start = time.monotonic()
                    proc = subprocess.run(tool.argv(job, b.far) + extra, env=env, cwd=job.workdir,
                                          capture_output=True)
                    took = time.monotonic() - start
                    wire = wire_counters(b.wire_dev) - wire0
                    ok, why = (b.verify(job) if proc.returncode == 0 else
                               (False, bench.failure_reason(proc.returncode, proc.stdout.decode(errors="replace"),
                                                            proc.stderr.decode(errors="replace"))))
                    levels = [json.loads(line).get("codec") for line in proc.stdout.decode().splitlines()
                              if line.startswith("{") and '"event": "plan"' in line]
                    runs.append({"variant": name, "run": r, "ok": ok, "seconds": round(took, 2), "wire_bytes": wire,
                                 "why": "" if ok else why, "codec": levels[0] if levels else None})
                    print(f"  {name:42s} run {r + 1}: {'ok  ' if ok else 'FAIL'} {took:7.2f} s "
                          f"{wire / MiB:8.1f} MiB" + ("" if ok else f"  {why}"), flush=True)
                    failed += not ok
                    b.cleanup(tool, job, tool.needles(job, b.far), keep_target=False)
            report["kinds"][kind] = {"limit": limit, "runs": runs}
            bench.zfs("release", "zchunk_bench", f"{ds}@s1", check=False)
            for _ in range(60):  # zfs-fuse says "dataset is busy" a while after a run
                if bench.zfs("destroy", "-r", ds, check=False).returncode == 0:
                    break
                time.sleep(2)
    shutil.rmtree(b.work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    return 1 if failed else 0


def table(report: dict[str, Any]) -> str:
    rate = f"{report['rate_mbit']:g} Mbit/s" if report["rate_mbit"] else "no rate limit"
    lines = [f"At {rate}, {report['size']} per kind; medians of the completed runs.", "",
             "| kind | variant | time s | wire MiB | / syncoid time | / limit |", "|---|---|---:|---:|---:|---:|"]
    for kind, k in report["kinds"].items():
        med: dict[str, tuple[float, float]] = {}
        for name in dict.fromkeys(r["variant"] for r in k["runs"]):
            ok = [r for r in k["runs"] if r["variant"] == name and r["ok"]]
            if ok:
                med[name] = (statistics.median(r["seconds"] for r in ok),
                             statistics.median(r["wire_bytes"] for r in ok))
        sy = med.get("syncoid", (0.0, 0.0))[0]
        lim = k["limit"]["seconds"] if k["limit"] else None
        for name, (t, w) in med.items():
            lines.append(f"| {kind} | {name} | {t:.1f} | {w / MiB:.1f} | "
                         f"{t / sy if sy else float('nan'):.2f} | {f'{t / lim:.2f}' if lim else '-'} |")
        if k["limit"]:
            lines.append(f"| {kind} | physical limit (zstd -{k['limit']['level']}, "
                         f"{k['limit']['compressed_bytes'] / MiB:.1f} MiB) | {lim:.1f} | | | 1.00 |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
