"""A whole tree in one run: ``zchunk sync -r`` against ``syncoid -r`` over trees of many small datasets.

    .venv/bin/python benchmarks/tree.py [--counts 10,50,200] [--runs 1] [--file 64K] [--jobs N]
                                        [--zchunk-args '--direct-max 0']

For each count N a tree ``SRC/tN`` of N datasets (the root and N-1 children, a few of them a level deeper,
each with one file of ``--file`` bytes) is made on run.py's lab source pool (zfs-fuse, the namespaced WAN,
an sshd behind it, no rate limit). Each tool then, in turn and into its own fresh target:

- ``full``: the first recursive run (each tool takes its own sync snapshots, as a user runs it);
- ``incremental``: after a tenth of the datasets got a new file, the second recursive run.

``--tools`` may also name ``pipe``: the floor of any tool that moves each dataset as its own stream. One
``zfs snapshot -r``, then per dataset ``zfs send | ssh dst zfs receive -F`` over one ssh ControlMaster
connection, ``--jobs`` of them at once (default 4), a child after its parent: no listing, no holds, no
spool, no agent, no retry. What that costs is what per-dataset streams cost on this machine.

Measured: wall time per run, and per dataset in the tree. Written: ``--out`` (JSON, every run and the
command), a Markdown table on stdout, and ``tree.png`` beside ``--out`` (time against dataset count, both
tools, both kinds of run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import run as bench  # noqa: E402
from tools import VENV_BIN  # noqa: E402

from zchunk import lab  # noqa: E402


def make_tree(root: str, count: int, file_size: int) -> list[str]:
    """``root`` and count-1 descendants: every fifth child gets a grandchild. The datasets, parents first."""
    names = [root]
    child = 0
    while len(names) < count:
        name = f"{root}/c{child:03d}"
        names.append(name)
        if child % 5 == 4 and len(names) < count:
            names.append(f"{name}/g")
        child += 1
    for name in names:
        bench.zfs("create", name)
        lab.write_dataset(bench.mountpoint(name) / "f", file_size, seed=len(name), compressible_fraction=0.5)
    return names


def change(names: list[str], file_size: int, run: int) -> list[str]:
    """A new file in every tenth dataset (at least one)."""
    changed = names[:: 10] or names[:1]
    for name in changed:
        lab.write_dataset(bench.mountpoint(name) / f"more-{run}", file_size, seed=run, compressible_fraction=0.5)
    return changed


#: syncoid 2.1.0 lists snapshots with ``zfs get -t snapshot``, which zfs-fuse lacks; its fallback for a remote
#: host runs ``ssh`` twice over (``bash: root@ADDR: command not found``), so every incremental to a remote
#: zfs-fuse fails (benchmarks/RESULTS.md). Its key on the lab sshd gets a PATH whose ``zfs`` answers that one
#: listing as OpenZFS would (the names filtered to snapshots); every other zfs command goes straight through.
ZFS_GET_T = """#!/bin/sh
case " $* " in
  *" get "*" -t snapshot "*)
    args=""; skip=0
    for a in "$@"; do
      if [ $skip = 1 ]; then skip=0; continue; fi
      if [ "$a" = "-t" ]; then skip=1; continue; fi
      args="$args $a"
    done
    /usr/sbin/zfs $args | grep '@'; exit 0 ;;
esac
exec /usr/sbin/zfs "$@"
"""


def syncoid_key(b: bench.Bench) -> Path:
    wrap = b.work / "syncoid-path"
    wrap.mkdir(exist_ok=True)
    (wrap / "zfs").write_text(ZFS_GET_T)
    (wrap / "zfs").chmod(0o755)
    return b.sshd.add_key("syncoid", options=f'environment="PATH={wrap}:{lab.SYSTEM_PATH}"')


#: The copy of zchunk/ the runs use (``main``), compiled as an installed zchunk is; None: the working tree's.
CODE: Path | None = None
# Every zchunk run's spool directory is the lab's one (``work.parent``), as a host keeps its /var/tmp/zchunk
# from run to run: the agent program the first run put there is imported by the later runs' probes.

#: More options for every zchunk run (``--zchunk-args``), e.g. ``--direct-max 0``: every stream in a session.
EXTRA: list[str] = []
TRACE = False  # --trace


def argv(tool: str, root: str, target: str, b: bench.Bench, work: Path, jobs: int | None) -> list[str]:
    if tool == "zchunk":
        cli = [sys.executable, "-m", "zchunk"] if CODE else [str(VENV_BIN / "zchunk")]
        return cli + ["sync", "-r", root, f"dst:{target}", "--ssh-config",
                str(b.far.ssh_config), "--json", "--identifier", "bench", "--spool-dir", str(work.parent / "spool"),
                "--state-dir", str(work / "state")] + (["--jobs", str(jobs)] if jobs else []) + EXTRA
    return ["syncoid", "-r", "--sshkey", str(b.syncoid_key), "--sshport", "22",
            f"--sshoption=UserKnownHostsFile={b.far.known_hosts}", "--sshoption=StrictHostKeyChecking=yes",
            "--sshoption=BatchMode=yes", root, f"root@{b.far.addr}:{target}"]


def verify(names: list[str], root: str, target: str) -> str:
    """'' when every dataset's newest snapshot is on the target with its guid and the same files."""
    for name in names:
        snaps = bench.zfs("list", "-H", "-o", "name", "-t", "snapshot", "-d", "1", name).stdout.split()
        newest = snaps[-1].split("@", 1)[1]
        there = target + name[len(root):]
        if bench.zfs_get("guid", f"{name}@{newest}") != bench.zfs_get("guid", f"{there}@{newest}"):
            return f"{there}@{newest}: guid differs or missing"
        if lab.snapshot_digest(f"{name}@{newest}") != lab.snapshot_digest(f"{there}@{newest}"):
            return f"{there}@{newest}: files differ"
    return ""


def release_all(pool: str) -> None:
    """zchunk's holds (zfs-fuse has them too) would make the cleanup's destroy wait."""
    rows = bench.zfs("list", "-H", "-t", "snapshot", "-o", "name,userrefs", "-r", pool).stdout.splitlines()
    for name, refs in (r.split("\t") for r in rows):
        if refs.isdigit() and int(refs):
            bench.zfs("release", "zchunk_bench", name, check=False)


def destroy(name: str) -> None:
    for _ in range(60):  # zfs-fuse says "dataset is busy" a while after a run
        if not bench.exists(name) or bench.zfs("destroy", "-r", name, check=False).returncode == 0:
            return
        time.sleep(2)
    # The next tree has its own name and the pool goes with the lab: a busy one must not end the benchmark.
    print(f"warning: could not destroy {name} (zfs-fuse says busy); it goes with the lab", file=sys.stderr)


def pipe_run(kind: str, names: list[str], root: str, target: str, b: bench.Bench, work: Path, jobs: int,
             env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """The ``pipe`` floor: one ``zfs snapshot -r``, then each dataset's own send into ssh, a child after its
    parent, ``jobs`` at once, every ssh over one ControlMaster connection. The first failure is returned."""
    snap, prev = ("pipe-1", None) if kind == "full" else ("pipe-2", "pipe-1")
    ssh = ["ssh", "-F", str(b.far.ssh_config), "-o", "ControlMaster=auto", "-o", f"ControlPath={work}/ctl",
           "-o", "ControlPersist=120", "dst"]  # Target: its ssh_config has Host "dst"
    done: dict[str, threading.Event] = {n: threading.Event() for n in names}
    failures: list[subprocess.CompletedProcess[bytes]] = []

    def one(name: str) -> None:
        parent = name.rsplit("/", 1)[0]
        if parent in done:
            done[parent].wait()
        send = ["zfs", "send"] + (["-i", f"@{prev}"] if prev else []) + [f"{name}@{snap}"]
        recv = " ".join(ssh + ["zfs", "receive", "-F", target + name[len(root):]])
        try:  # a send that fails shows as a failed receive, and verify() checks every replica anyway
            proc = subprocess.run(["sh", "-c", f"{' '.join(send)} | {recv}"], env=env, capture_output=True)
            if proc.returncode:
                failures.append(proc)
        finally:
            done[name].set()  # its children must not wait forever, whatever happened

    first = subprocess.run(["zfs", "snapshot", "-r", f"{root}@{snap}"], env=env, capture_output=True)
    if first.returncode:
        return first
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, names))  # parents come first in names: a waiting child never holds up its parent
    subprocess.run(ssh[:-1] + ["-O", "exit", "dst"], env=env, capture_output=True)
    return failures[0] if failures else first


def commit() -> str:
    """HEAD's short hash, with ``+dirty`` when zchunk/ has changes not committed."""
    git = ["git", "-C", str(HERE.parent)]
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "zchunk"], capture_output=True, text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def one_run(tool: str, kind: str, count: int, root: str, target: str, b: bench.Bench, work: Path,
            jobs: int | None, names: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PATH": bench.PATH, "LC_ALL": "C", **({"PYTHONPATH": str(CODE)} if CODE else {})}
    if TRACE and tool == "zchunk":  # trace.py's timeline, into the run's .err file
        env.update(ZCHUNK_TRACE="1", PYTHONPATH=os.pathsep.join([str(HERE / "tracing"), env.get("PYTHONPATH", "")]))
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    if tool == "pipe":
        proc = pipe_run(kind, names, root, target, b, work, jobs or 4, env)
    else:
        proc = subprocess.run(argv(tool, root, target, b, work, jobs), env=env, cwd=work, capture_output=True,
                              timeout=3600)
    took = time.monotonic() - start
    (work / f"{tool}-{kind}.out").write_bytes(proc.stdout)
    (work / f"{tool}-{kind}.err").write_bytes(proc.stderr)
    why = (f"exit {proc.returncode}: {bench.last_line(proc.stderr.decode(errors='replace'))}"
           if proc.returncode else "")
    return {"tool": tool, "kind": kind, "datasets": count, "seconds": round(took, 2),
            "per_dataset": round(took / count, 3), "ok": not why, "why": why}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="10,50,200")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--file", default="64K", help="bytes written per dataset, and per changed dataset [64K]")
    ap.add_argument("--tools", default="zchunk,syncoid", help="of zchunk, syncoid, pipe [zchunk,syncoid]")
    ap.add_argument("--jobs", type=int, help="zchunk --jobs (default: zchunk's own), pipe's (default 4)")
    ap.add_argument("--zchunk-args", default="", help="more options for every zchunk run, e.g. '--direct-max 0'")
    ap.add_argument("--trace", action="store_true",
                    help="each zchunk run's timeline (benchmarks/tracing) in its .err file under benchmarks/out/tree")
    ap.add_argument("--out", default=str(HERE / "tree.json"))
    ap.add_argument("--report-only", action="store_true", help="the table and plot again from --out")
    args = ap.parse_args()
    if args.report_only:
        report = json.loads(Path(args.out).read_text())
        print(table(report))
        plot(report, Path(args.out).with_suffix(".png"))
        return 0
    file_size = lab.parse_size(args.file)
    b = bench.Bench(bench.parse_args(["--size", "256M", "--out", str(HERE / "out" / "tree")]))
    b.work.mkdir(parents=True, exist_ok=True)
    # zchunk runs from a copy of zchunk/ taken now and compiled, as run.py's do: edits made meanwhile do not
    # reach it, and no run compiles the coordinator's modules anew (as one would under PYTHONDONTWRITEBYTECODE
    # or with sources newer than their .pyc: 0.07 s a run here, which an installed zchunk never pays)
    global CODE, EXTRA, TRACE
    EXTRA, TRACE = shlex.split(args.zchunk_args), args.trace
    code = bench.snapshot_code(b.work / "code")
    CODE = b.work / "code"
    report: dict[str, Any] = {"command": " ".join([".venv/bin/python", "benchmarks/tree.py", *sys.argv[1:]]),
                              "file": args.file, "zchunk_args": EXTRA, "zchunk_commit": commit(), "zchunk_code": code,
                              "runs": []}
    failed = 0
    with b.lab():
        b.syncoid_key = syncoid_key(b)  # type: ignore[attr-defined]
        for count in (int(c) for c in args.counts.split(",")):
            for r in range(args.runs):
                for tool in args.tools.split(","):
                    root = f"{b.src.name}/t{count}{tool[0]}{r}"
                    names = make_tree(root, count, file_size)
                    target = f"{b.dst.name}/t{count}{tool[0]}{r}"
                    work = b.work / f"{tool}-{count}-{r}"
                    for kind in ("full", "incremental"):
                        if kind == "incremental":
                            change(names, file_size, r)
                        res = one_run(tool, kind, count, root, target, b, work, args.jobs, names)
                        if res["ok"] and (bad := verify(names, root, target)):
                            res.update(ok=False, why=bad)
                        report["runs"].append(res)
                        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")  # kept if stopped later
                        failed += not res["ok"]
                        print(f"{tool:8s} {count:4d} datasets {kind:11s} {'ok  ' if res['ok'] else 'FAIL'} "
                              f"{res['seconds']:7.1f} s  {res['per_dataset']:6.3f} s/dataset  {res['why']}",
                              flush=True)
                        if not res["ok"]:
                            break
                    release_all(b.src.name)
                    release_all(b.dst.name)
                    destroy(target)
                    destroy(root)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    plot(report, Path(args.out).with_suffix(".png"))
    return 1 if failed else 0


def table(report: dict[str, Any]) -> str:
    lines = ["| tool | datasets | run | time s | s per dataset | / syncoid |", "|---|---:|---|---:|---:|---:|"]
    runs = [r for r in report["runs"] if r["ok"]]
    for r in runs:
        peer = [p["seconds"] for p in runs if p["tool"] == "syncoid" and p["kind"] == r["kind"]
                and p["datasets"] == r["datasets"]]
        ratio = f"{r['seconds'] / min(peer):.2f}" if peer else "-"
        lines.append(f"| {r['tool']} | {r['datasets']} | {r['kind']} | {r['seconds']:.1f} | "
                     f"{r['per_dataset']:.3f} | {ratio} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for tool in dict.fromkeys(r["tool"] for r in report["runs"]):
        for kind, style in (("full", "-o"), ("incremental", "--s")):
            times: dict[int, list[float]] = {}
            for r in report["runs"]:
                if r["ok"] and r["tool"] == tool and r["kind"] == kind:
                    times.setdefault(r["datasets"], []).append(r["seconds"])
            pts = sorted((count, statistics.median(ts)) for count, ts in times.items())  # of --runs
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{tool} {kind}")
    ax.set_xlabel("datasets in the tree")
    ax.set_ylabel("seconds per recursive run")
    ax.set_title(f"sync -r over a tree of small datasets ({report['file']} each), zfs-fuse, namespaced WAN")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
