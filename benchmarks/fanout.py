"""Fan-out: what two targets cost the source, against one target and against two separate runs.

    .venv/bin/python benchmarks/fanout.py [--size 512M] [--rate 400] [--runs 2] [--kinds half,text,random,...]

On run.py's lab (zfs-fuse pools, the namespaced WAN at ``--rate`` Mbit/s, an sshd behind it) a dataset of
``--size`` per kind of ``--kinds`` (``half``: half text-like, half random, as run.py's; or datakinds.py's)
is pushed with ``zchunk sync --no-sync-snap`` of its snapshot ``s1`` into fresh targets, three ways per
run; target ``a`` is behind the lab's sshd, target ``b`` behind a second sshd in a namespace of its own, on
its own ``--rate`` link (two sites):

- ``one``: one target;
- ``fan-out``: two targets in one run (``zchunk sync SRC dst:A dst:B``);
- ``separate``: two targets one after the other (two runs: what a user without fan-out does).

Measured from the engine's own counters (``stream_end``): the ``zfs send`` processes run on the source (one per
distinct sender), the stream bytes they read, and their CPU seconds (the sender daemon with its ``zfs send``:
cutting, checksumming, compressing); the coordinator's CPU seconds (it runs on the source host: reads the
spool, encrypts for SSH, once per target by nature), and the wall time. zfs-fuse's own daemon serves both the
source and the target pool here, so its CPU is not the source's alone and is not counted. Every replica is
verified by a digest of its files. Writes ``--out`` (JSON with the command) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import datakinds  # noqa: E402
import run as bench  # noqa: E402

from zchunk import lab  # noqa: E402

MiB = 1 << 20


def sync(src: str, targets: list[str], work: Path, ssh_config: Path, compress: str) -> dict[str, Any]:
    """One ``zchunk sync`` to ``targets``: its exit, time, coordinator CPU and the senders it used."""
    work.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "zchunk", "sync", src, *targets, "--no-sync-snap", "--json", "--identifier", "bench",
            "--ssh-config", str(ssh_config), "--state-dir", str(work / "state"),
            "--spool-dir", str(work / "spool"), "--chunk-size", "8M", "--spool-max", "256M", "--patience", "10m",
            "--compress", compress]
    env = {**os.environ, "PATH": bench.PATH, "LC_ALL": "C"}
    start = time.monotonic()
    with open(work / "out.jsonl", "wb") as out, open(work / "err.txt", "wb") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=HERE.parent)
        _pid, status, usage = os.wait4(proc.pid, 0)
    took = time.monotonic() - start
    events = [json.loads(line) for line in (work / "out.jsonl").read_text().splitlines() if line.startswith("{")]
    ends = [e for e in events if e.get("event") == "stream_end"]
    senders: dict[str, dict[str, Any]] = {}
    for i, e in enumerate(ends):  # one per distinct sender: a shared one is named, a lone one is its own
        senders.setdefault(e.get("sender") or f"alone-{i}", e)
    return {"exit": os.waitstatus_to_exitcode(status), "seconds": round(took, 1),
            "coordinator_cpu": round(usage.ru_utime + usage.ru_stime, 1),
            "zfs_sends": len(senders), "send_bytes": sum(e["raw_bytes"] for e in senders.values()),
            "sender_cpu": round(sum(e.get("sender_cpu") or 0 for e in senders.values()), 1)}


def add(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(a[k] + b[k], 1) if k != "exit" else max(a[k], b[k])) for k in a}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512M")
    ap.add_argument("--rate", type=float, default=400.0, help="Mbit/s of each target's link")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--compress", default="auto", help="zchunk's --compress: auto adapts the level to how fast "
                    "the link takes chunks (two targets sharing one link take them slower), zstd:3 fixes it")
    ap.add_argument("--kinds", default="half", help="comma-separated: half (run.py's: half text-like, half "
                    "random), or datakinds.py's text, random, vmimage, smallfiles")
    ap.add_argument("--out", default=str(HERE / "fanout.json"))
    args = ap.parse_args()
    b = bench.Bench(bench.parse_args(["--size", args.size, "--out", str(HERE / "out" / "fanout")]))
    b.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": " ".join([".venv/bin/python", "benchmarks/fanout.py", *sys.argv[1:]]),
                              "size": args.size, "rate_mbit": args.rate, "compress": args.compress,
                              "kinds": args.kinds, "runs": []}
    ok = True
    with b.lab(), lab.Wan(prefix="zf") as wan2, \
            lab.Sshd(b.work / "sshd-two", netns=wan2.dst_ns, listen=wan2.dst_addr, port=22, alias="two") as two:
        ssh_config = b.work / "ssh_config"  # target a behind the lab's WAN, target b behind its own
        ssh_config.write_text(b.sshd.ssh_config.read_text() + "\n" + two.ssh_config.read_text())
        b.wan.rate("dst", args.rate)
        wan2.rate("dst", args.rate)
        for kind in args.kinds.split(","):
            ok = measure(b, args, kind, ssh_config, report) and ok
    print(table(report))
    return 0 if ok else 1


def source_of(b: bench.Bench, kind: str) -> str:
    """run.py's dataset (``half``: half text-like, half random), or one of datakinds.py's kinds."""
    if kind == "half":
        return b.make_source()
    ds = f"{b.src.name}/{kind}"
    bench.zfs("create", ds)
    datakinds.write(bench.mountpoint(ds), kind, b.size)
    bench.zfs("snapshot", f"{ds}@s1")
    return ds


def measure(b: bench.Bench, args: argparse.Namespace, kind: str, ssh_config: Path, report: dict[str, Any]) -> bool:
    """One kind of data: ``--runs`` times one target, fan-out and separate runs; every replica verified."""
    ok = True
    src = source_of(b, kind)
    digest = lab.snapshot_digest(f"{src}@s1")
    for r in range(args.runs):
        for how in ("one", "fan-out", "separate"):
            names = [f"{b.dst.name}/{kind}-r{r}-{how}-{n}" for n in (("a",) if how == "one" else ("a", "b"))]
            targets = [f"{host}:{name}" for host, name in zip(("dst", "two"), names)]
            work = b.work / f"{kind}-run{r}-{how}"
            if how == "separate":
                res = add(sync(src, targets[:1], work / "a", ssh_config, args.compress),
                          sync(src, targets[1:], work / "b", ssh_config, args.compress))
            else:
                res = sync(src, targets, work, ssh_config, args.compress)
            res.update(kind=kind, how=how, run=r, targets=len(targets),
                       verified=res["exit"] == 0 and all(lab.snapshot_digest(f"{n}@s1") == digest for n in names))
            ok = ok and res["verified"]
            report["runs"].append(res)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
            print(json.dumps(res), flush=True)
            for n, t in zip(names, targets):  # the holds first: one run's tag, or fan-out's per target
                for tag in ("zchunk_bench", f"zchunk_bench_{hashlib.sha256(t.encode()).hexdigest()[:8]}"):
                    bench.zfs("release", tag, f"{n}@s1", check=False)
                res["cleanup"] = bench.retry_busy("destroy", "-r", n) or None
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return ok


def table(report: dict[str, Any]) -> str:
    lines = ["| data | run | targets | zfs send runs | bytes zfs send gave (MiB) | sender CPU s | coordinator CPU s | "
             "time s | verified |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["runs"]:
        lines.append(f"| {r.get('kind', 'half')} | {r['how']} | {r['targets']} | {r['zfs_sends']} | "
                     f"{r['send_bytes'] / MiB:.0f} | {r['sender_cpu']} | {r['coordinator_cpu']} | {r['seconds']} | "
                     f"{r['verified']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
