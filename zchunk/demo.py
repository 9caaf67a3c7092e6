"""``zchunk demo``: a real replication over a flaky simulated WAN, in under a minute (44 s measured).

Builds a throwaway lab (zfs-fuse pools on sparse files, a "target host" in a
network namespace running its own sshd, a rate-limited veth as the WAN),
seeds a dataset, replicates it with the normal engine while the link is cut
several times (TCP resets on the sshd port), verifies the replica by guid and
content, and tears everything down (``keep`` leaves it up to explore).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import lab
from .errors import UsageError
from .events import Sink
from .replicate import ReplicateOptions, replicate
from .stream import SyncOptions, SyncResult
from .transport import SshOptions


@dataclass
class DemoOptions:
    size: int = 160 << 20
    rate_mbit: float = 60.0
    outages: int = 3
    outage_seconds: float = 5.0
    keep: bool = False


@dataclass
class DemoResult:
    result: SyncResult
    source: str
    target: str
    digest: str
    lab_dir: Path | None  # set when kept


def run_demo(opts: DemoOptions, emit: Sink) -> DemoResult:
    missing = lab.lab_prerequisites()
    if missing:
        raise UsageError(reason=f"the demo cannot run here: {'; '.join(missing)}. "
                         "Run scripts/demo as root (it installs what is missing)")
    workdir = Path(tempfile.mkdtemp(prefix="zchunk-demo-"))
    stack = contextlib.ExitStack()
    try:
        return _run(opts, emit, workdir, stack)
    except lab.LabError as e:
        raise UsageError(reason=f"demo lab: {e}") from e
    finally:
        if opts.keep:
            stack.pop_all()
            emit("demo_step", {"text": f"lab kept under {workdir} (see the commands above); "
                               "remove it with: zpool destroy, ip netns del, kill the sshd pid"})
        else:
            emit("demo_step", {"text": "tearing the lab down"})
            stack.close()
            subprocess.run(["rm", "-rf", str(workdir)], check=False)


def _run(opts: DemoOptions, emit: Sink, workdir: Path, stack: contextlib.ExitStack) -> DemoResult:
    step = lambda text: emit("demo_step", {"text": text})  # noqa: E731
    step("starting zfs-fuse and creating two throwaway pools on sparse files")
    stack.enter_context(lab.ZfsFuse())
    src_pool = stack.enter_context(lab.Pool("zcdemosrc", workdir / "pools", size="1G"))
    dst_pool = stack.enter_context(lab.Pool("zcdemodst", workdir / "pools", size="1G"))
    subprocess.run(["zfs", "set", "atime=off", dst_pool.name], check=True)
    step(f"building the WAN: a namespace for the target host behind a {opts.rate_mbit:g} Mbit link, with sshd")
    wan = stack.enter_context(lab.Wan(prefix="zd"))
    sshd = stack.enter_context(lab.Sshd(workdir / "sshd", netns=wan.dst_ns, listen=wan.dst_addr, port=22,
                                        alias="target"))
    wan.rate("dst", opts.rate_mbit)
    source = f"{src_pool.name}/data"
    subprocess.run(["zfs", "create", source], check=True)
    step(f"seeding {source} with {opts.size >> 20} MiB (half random, half text) and taking @seed")
    lab.write_dataset(src_pool.mountpoint / "data", opts.size, seed=42, compressible_fraction=0.5)
    subprocess.run(["zfs", "snapshot", f"{source}@seed"], check=True)
    target = f"{dst_pool.name}/data"
    step(f"replicating {source} -> target:{target}; the link will be cut {opts.outages} times "
         f"for {opts.outage_seconds:g}s (TCP resets on the target's sshd port)")

    received = {"bytes": 0}
    started = threading.Event()

    def on_event(kind: str, fields: dict[str, Any]) -> None:
        if kind == "progress":
            received["bytes"] = int(fields["raw_bytes"])
            started.set()
        emit(kind, fields)

    finished = threading.Event()
    cutter = threading.Thread(target=_cut_link, args=(wan, opts, received, started, finished), daemon=True)
    cutter.start()
    sopts = SyncOptions(spool_dir=str(workdir / "spool"), state_dir=workdir / "state", chunk_size=8 << 20,
                        ssh=SshOptions(config=sshd.ssh_config), patience=600)
    try:
        outcome = asyncio.run(replicate(source, f"target:{target}", sopts, ReplicateOptions(sync_snap=False),
                                        on_event)).outcomes[0]
    finally:
        finished.set()
        cutter.join(timeout=opts.outage_seconds + 2)
    # the replica stays unmounted (receive -u, or its emulation on zfs-fuse): its snapshot is read through a clone
    src_digest = lab.snapshot_digest(f"{source}@seed")
    dst_digest = lab.snapshot_digest(f"{target}@seed")
    if src_digest != dst_digest:
        raise UsageError(reason=f"demo replica content differs: {src_digest} != {dst_digest}")
    step(f"content verified: every file on the replica matches (sha256 {src_digest[:16]}...)")
    if opts.keep:
        step(f"explore: ssh -F {sshd.ssh_config} target zfs list -t all; "
             f"ip netns exec {wan.dst_ns} ss -tn; zfs list -t all -r {src_pool.name} {dst_pool.name}")
    return DemoResult(outcome.streams[-1], source, target, src_digest, workdir if opts.keep else None)


def _cut_link(wan: lab.Wan, opts: DemoOptions, received: dict[str, int], started: threading.Event,
              finished: threading.Event) -> None:
    """Cut the link at evenly spaced points of the transfer."""
    started.wait(120)
    for i in range(1, opts.outages + 1):
        mark = opts.size * i // (opts.outages + 1)
        while received["bytes"] < mark:
            if finished.wait(0.2):
                return
        wan.outage("dst", 22, opts.outage_seconds)
