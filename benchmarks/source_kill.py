"""The source side killed mid-seed, on zfs-fuse (no resume tokens): what crosses the WAN again.

    .venv/bin/python benchmarks/source_kill.py [--size 1G] [--at 0.8] [--rate 100] [--runs 1]

On run.py's lab (zfs-fuse pools, the namespaced WAN at ``--rate`` Mbit/s, an sshd behind it) one dataset of
``--size`` (half text-like, half random, as run.py's) is pushed with ``zchunk sync`` twice into fresh targets:
once without a fault, and once with everything zchunk runs on the source killed (``kill -9`` of the sender
daemon, its ``zfs send`` and the source's serve processes, as a reboot would) when ``zfs send`` has given
``--at`` of the stream (``--spool-max 128M`` keeps the sender near the link, as a slow link does). Both
replicas are verified by a digest of their files. Measured, from the engine's own counters (the ``result``
event): bytes on the wire with the kill against without it, in chunks, and the time. Writes ``--out`` (JSON
with the command) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import run as bench  # noqa: E402

from zchunk import lab  # noqa: E402

MiB = 1 << 20
CHUNK = 32 * MiB


def state(spool: Path, role: str) -> dict[str, Any]:
    for d in spool.glob(f"*-{role}"):
        try:
            return dict(json.loads((d / ("sender.json" if role == "send" else "receiver.json")).read_text()))
        except (OSError, ValueError):
            return {}
    return {}


def one_run(b: bench.Bench, src: str, target: str, work: Path, kill_at: float | None) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    spool = work / "spool"
    argv = [sys.executable, "-m", "zchunk", "sync", src, f"dst:{target}", "--no-sync-snap", "--json",
            "--ssh-config", str(b.sshd.ssh_config), "--state-dir", str(work / "state"), "--spool-dir", str(spool),
            "--chunk-size", "32M", "--spool-max", "128M", "--patience", "10m"]
    env = {**os.environ, "PATH": bench.PATH, "LC_ALL": "C"}
    start = time.monotonic()
    out, err = open(work / "out.jsonl", "wb"), open(work / "err.txt", "wb")
    proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=HERE.parent)
    killed_at = None
    try:
        while kill_at is not None and proc.poll() is None and killed_at is None:
            sender, receiver = state(spool, "send"), state(spool, "receive")
            read = sender.get("raw_bytes", 0) / b.meta["stream_bytes"]["s1"]
            if sender.get("state") == "running" and read >= kill_at:
                try:  # the daemon and its zfs send (its process group), then the source's serve processes
                    os.killpg(os.getpgid(int(sender["pid"])), signal.SIGKILL)
                except ProcessLookupError:
                    continue  # it finished meanwhile: look again
                for d in spool.glob("*-send"):
                    subprocess.run(["pkill", "-9", "-f", str(d)], check=False)
                killed_at = f"{sender.get('chunks')} cut, {receiver.get('next_seq')} fed"
            time.sleep(0.1)
        proc.wait(timeout=7200)
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
        err.close()
    took = time.monotonic() - start
    events = [json.loads(line) for line in (work / "out.jsonl").read_text().splitlines() if line.startswith("{")]
    result = next((e for e in reversed(events) if e.get("event") == "result"), {})
    transfer = result.get("transfer") or {}
    return {"fault": kill_at is not None, "exit": proc.returncode, "seconds": round(took, 1),
            "killed_at_chunk": killed_at, "wire_bytes": transfer.get("wire_bytes"),
            "raw_bytes": transfer.get("raw_bytes"), "total_chunks": transfer.get("total_chunks"),
            "sender_restarts": sum(e.get("event") == "sender_restart" for e in events),
            "stream_restarts": sum(e.get("event") == "restart" for e in events)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--at", type=float, default=0.8, help="fraction of the stream read when the source dies")
    ap.add_argument("--rate", type=float, default=100.0, help="Mbit/s of the WAN")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "source_kill.json"))
    args = ap.parse_args()
    b = bench.Bench(bench.parse_args(["--size", args.size, "--out", str(HERE / "out" / "source_kill")]))
    b.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": " ".join([".venv/bin/python", "benchmarks/source_kill.py", *sys.argv[1:]]),
                              "size": args.size, "at": args.at, "rate_mbit": args.rate, "runs": []}
    with b.lab():
        b.wan.rate("dst", args.rate)
        src = b.make_source()
        for r in range(args.runs):
            for kill_at in (None, args.at):
                target = f"{b.dst.name}/r{r}{'k' if kill_at else 'c'}"
                res = one_run(b, src, target, b.work / f"run{r}-{'kill' if kill_at else 'clean'}", kill_at)
                ok = res["exit"] == 0 and lab.snapshot_digest(f"{src}@s1") == lab.snapshot_digest(f"{target}@s1")
                res["verified"] = ok
                report["runs"].append(res)
                Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
                print(json.dumps(res), flush=True)
                subprocess.run(["zfs", "destroy", "-r", target], check=False, capture_output=True)
    print(table(report))
    return 0 if all(r["verified"] for r in report["runs"]) else 1


def table(report: dict[str, Any]) -> str:
    lines = ["| run | killed at | time s | wire MiB | extra on the wire | sender restarts | stream restarts |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    clean = [r for r in report["runs"] if not r["fault"] and r["wire_bytes"]]
    base = clean[0]["wire_bytes"] if clean else None
    for r in report["runs"]:
        extra = (f"{(r['wire_bytes'] - base) / CHUNK:+.2f} chunks" if base and r["wire_bytes"] else "-")
        lines.append(f"| {'kill' if r['fault'] else 'clean'} | {r['killed_at_chunk'] or '-'} | {r['seconds']} | "
                     f"{(r['wire_bytes'] or 0) / MiB:.1f} | {extra} | {r['sender_restarts']} | "
                     f"{r['stream_restarts']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
