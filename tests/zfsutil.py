"""Small helpers for tests on real zfs-fuse pools."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from zchunk import lab


def zfs(*args: str) -> str:
    p = subprocess.run(["zfs", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"zfs {' '.join(args)}: {p.stderr}"
    return p.stdout


def destroy_when_free(*args: str, timeout: float = 60) -> None:
    """``zfs destroy ARGS``, again while zfs-fuse says "dataset is busy" (it does for a moment after a send
    or a receive); any other failure, or busy for ``timeout`` seconds, fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        p = subprocess.run(["zfs", "destroy", *args], capture_output=True, text=True, timeout=120)
        if p.returncode == 0:
            return
        assert "busy" in p.stderr and time.monotonic() < deadline, f"zfs destroy {' '.join(args)}: {p.stderr}"
        time.sleep(0.5)


def guid(name: str) -> int:
    return int(zfs("get", "-H", "-p", "-o", "value", "guid", name).strip())


def exists(name: str) -> bool:
    return subprocess.run(["zfs", "list", name], capture_output=True).returncode == 0


def snapshots(dataset: str) -> list[str]:
    out = zfs("list", "-H", "-o", "name", "-t", "snapshot", "-r", dataset) if exists(dataset) else ""
    return [line for line in out.splitlines() if line.startswith(dataset + "@")]


def mountpoint(dataset: str) -> Path:
    return Path(zfs("get", "-H", "-o", "value", "mountpoint", dataset).strip())


def make_source(pool: lab.Pool, size: int, seed: int = 1, name: str = "ds",
                compressible: float = 0.2) -> str:
    """pool/name with ``size`` bytes of reproducible data and a first snapshot @s1."""
    ds = f"{pool.name}/{name}"
    zfs("create", ds)
    lab.write_dataset(mountpoint(ds) / "data", size, seed=seed, compressible_fraction=compressible)
    zfs("snapshot", f"{ds}@s1")
    return ds


def add_change(ds: str, size: int, seed: int, snap: str) -> None:
    lab.write_dataset(mountpoint(ds) / f"more-{seed}", size, seed=seed, compressible_fraction=0.2)
    zfs("snapshot", f"{ds}@{snap}")


def quiet_target_pool(pool: lab.Pool) -> None:
    """Replicas on zfs-fuse are mounted (no receive -u): atime=off keeps reads from changing them."""
    zfs("set", "atime=off", pool.name)


@contextlib.contextmanager
def mounted(dataset: str) -> Iterator[Path]:
    """The dataset's files (replicas are kept unmounted where zfs lacks receive -u): mount for a look."""
    was = zfs("get", "-H", "-o", "value", "mounted", dataset).strip() == "yes"
    if not was:
        zfs("mount", dataset)
    try:
        yield mountpoint(dataset)
    finally:
        if not was:
            for _ in range(30):
                if subprocess.run(["zfs", "unmount", dataset], capture_output=True).returncode == 0:
                    break
                time.sleep(1)


snapshot_digest = lab.snapshot_digest


def same_content(src: str, dst: str, snap: str) -> bool:
    return snapshot_digest(f"{src}@{snap}") == snapshot_digest(f"{dst}@{snap}")


def assert_replica(src: str, dst: str, snap: str) -> None:
    assert exists(f"{dst}@{snap}"), f"{dst}@{snap} missing; target has {snapshots(dst)}"
    assert guid(f"{dst}@{snap}") == guid(f"{src}@{snap}")
    assert same_content(src, dst, snap), "file content differs between source and replica"


def wait_until(pred, timeout: float = 60, what: str = "condition", step: float = 0.1) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")
