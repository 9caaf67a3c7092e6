"""Small, separate spool filesystems for the source and the target, on one machine.

In the lab both "hosts" are this machine, and ``--spool-dir`` names one path
for both. To fill one side's spool and not the other's, the coordinator runs
in a private mount namespace (``PrivateMounts``) where the spool path is a
tmpfs of its own: the sender agent, a local subprocess of the coordinator,
spools there; the target's agent, started by an sshd in the root mount
namespace, spools into the root namespace's tmpfs at the same path
(``Tmpfs``). zfs does not care: zfs-fuse is reached through its socket.

Teardown is by pid and by mount point, never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.zc import Zchunk

MiB = 1 << 20


def _run(argv: list[str]) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {p.stderr.strip()}")


class Tmpfs:
    """A tmpfs of ``size`` bytes mounted on ``path`` in the root mount namespace."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size

    def __enter__(self) -> Tmpfs:
        self.path.mkdir(parents=True, exist_ok=True)
        _run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "zchunk-test-spool", str(self.path)])
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=60)

    def fill(self, leave: int = 0, name: str = "filler") -> Path:
        return fill(self.path, leave, name)


class PrivateMounts:
    """A private mount namespace, held open by a sleeping process, with its own tmpfs on ``path``.

    ``prefix`` runs a command in it; ``view(p)`` is how this (root namespace)
    process sees a path in it (``/proc/PID/root`` resolves in that namespace).
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        self.holder: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrivateMounts:
        self.path.mkdir(parents=True, exist_ok=True)
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "infinity"],
                                       start_new_session=True)
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            if time.monotonic() > deadline:
                raise RuntimeError("unshare did not make a mount namespace")
            time.sleep(0.02)
        _run([*self.prefix, "mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "zchunk-test-spool-src",
              str(self.path)])
        return self

    @property
    def prefix(self) -> list[str]:
        assert self.holder is not None
        return ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", "--"]

    def view(self, path: Path | None = None) -> Path:
        assert self.holder is not None
        return Path(f"/proc/{self.holder.pid}/root{path or self.path}")

    def fill(self, leave: int = 0) -> Path:
        return fill(self.view(), leave)

    def __exit__(self, *exc: object) -> None:
        # The namespace (and its tmpfs) goes when its last process does: the test kills its agents.
        if self.holder is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.holder.pid, signal.SIGKILL)
            self.holder.wait(10)
            self.holder = None


def fill(directory: Path, leave: int = 0, name: str = "filler") -> Path:
    """A file that takes all the room in ``directory``'s filesystem but ``leave`` bytes; returns its path."""
    filler = directory / name
    st = os.statvfs(directory)
    room = st.f_bavail * st.f_frsize - leave
    with open(filler, "wb") as f:
        block = b"\xa5" * MiB
        while room > 0:
            try:
                room -= f.write(block[: min(room, MiB)])
                f.flush()
            except OSError:
                break
    return filler


class Hog:
    """Keeps a filesystem full while it runs: whatever room appears is taken again within 50 ms
    (a disk other programs keep filling), except for the spool's own files' churn in between."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "hog"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Hog:
        self.thread.start()
        return self

    def _run(self) -> None:
        with open(self.path, "ab", buffering=0) as f:
            block = b"\x5a" * (64 << 10)
            while not self.stop.is_set():
                try:
                    while True:
                        f.write(block)
                except OSError:
                    pass
                time.sleep(0.05)

    def release(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        self.release()


class NsZchunk(Zchunk):
    """The CLI run inside a private mount namespace (its own source spool); files seen through ``view``."""

    def __init__(self, workdir: Path, mounts: PrivateMounts, **kw: Any) -> None:
        super().__init__(workdir, **kw)
        self.mounts = mounts

    def argv(self, *args: str, json_out: bool = True) -> list[str]:
        return [*self.mounts.prefix, *super().argv(*args, json_out=json_out)]

    def source_dirs(self) -> list[Path]:
        d = self.mounts.view(self.spool_dir)
        return sorted(d.glob("*")) if d.exists() else []

    def target_dirs(self) -> list[Path]:
        return super().session_dirs()

    def session_dirs(self) -> list[Path]:
        return self.source_dirs() + self.target_dirs()

    def agent_state(self, role: str) -> dict[str, Any] | None:
        import json

        for d in (self.source_dirs() if role == "send" else self.target_dirs()):
            if d.name.endswith("-" + role):
                try:
                    return dict(json.loads((d / ("sender.json" if role == "send" else "receiver.json")).read_text()))
                except (OSError, ValueError):
                    return None
        return None


@contextlib.contextmanager
def split_spools(base: Path, source_size: int, target_size: int) -> Iterator[tuple[PrivateMounts, Tmpfs]]:
    """Source spool filesystem (private namespace) and target spool filesystem (root namespace) on ``base``."""
    with Tmpfs(base, target_size) as target, PrivateMounts(base, source_size) as source:
        yield source, target
