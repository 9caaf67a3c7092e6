"""The replication tools compared, as command lines against the benchmark lab.

Each tool sends the same snapshot from the local source pool to the target
pool on the far side of the lab WAN (push mode: ``zfs send`` here, ``zfs
receive`` behind the lab sshd in the "dst" namespace), so every byte crosses
the veth where the faults are made.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from zchunk import lab

VENV_BIN = Path(sys.executable).parent
#: The PATH of an admin's root shell, not a developer's (pyenv shims and the
#: like).  zchunk itself is started from the venv by path; its local agent runs
#: under the coordinator's interpreter, the remote one under the target's
#: /usr/bin/python3 (with Debian's python3-zstandard and python3-xxhash).
PATH = lab.SYSTEM_PATH


@dataclass
class Target:
    """Where the lab's far side is and how to reach it."""

    ssh_config: Path  # has Host "dst"
    user_key: Path
    known_hosts: Path
    addr: str  # the sshd's address in the dst namespace


@dataclass
class Job:
    """One replication: send ``snapshot`` (incrementally from ``base`` if set) to ``target``."""

    dataset: str  # source dataset
    snapshot: str  # short name, e.g. "s1"
    base: str | None  # short name of the incremental base, or None for a full stream
    target: str  # target dataset
    workdir: Path  # fresh per run: its state directory lives here (the spool is the lab's: Zchunk.spool)


class Tool:
    name = ""
    #: Substrings of command lines of processes the tool leaves detached (for
    #: measuring them and, after a failed run, stopping them by pid).
    def needles(self, job: Job, far: Target) -> list[str]:
        return []

    def argv(self, job: Job, far: Target) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {}

    def describe(self, far: Target) -> str:
        """The command line in the report, with placeholders for the per-run parts."""
        job = Job("SRCPOOL/ds", "s1", None, "DSTPOOL/TARGET", Path("RUN"))
        return shlex.join(self.argv(job, far))


class Zchunk(Tool):
    name = "zchunk"
    #: A copy of zchunk/ to run instead of the working tree, which
    #: other people edit while a benchmark runs (set by run.py; None: the venv's).
    code: Path | None = None

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.code)} if self.code else {}

    def spool(self, job: Job) -> Path:
        """The lab's one spool directory (beside the runs' own directories), as a host keeps its
        /var/tmp/zchunk from run to run: the agent program the first run put there is imported by the
        later runs' probes. Session directories in it are the run's own and go with it."""
        return job.workdir.parent / "spool"

    def needles(self, job: Job, far: Target) -> list[str]:
        return [str(self.spool(job))]

    def argv(self, job: Job, far: Target) -> list[str]:
        # --no-sync-snap: send the newest existing snapshot, as syncoid --no-sync-snap
        # and the pipes do, so every tool moves the same stream (@s1, or @s1 -> @s2).
        cli = [sys.executable, "-m", "zchunk"] if self.code else [str(VENV_BIN / "zchunk")]
        return [*cli, "sync", job.dataset, f"dst:{job.target}", "--no-sync-snap",
                "--ssh-config", str(far.ssh_config), "--json",
                "--spool-dir", str(self.spool(job)), "--state-dir", str(job.workdir / "state"),
                "--patience", "30m", "--identifier", "bench"]  # its holds: tag zchunk_bench (cleanup)


class Syncoid(Tool):
    """syncoid 2.1.0 as Debian ships it, default pipeline (pv | lzop | mbuffer | ssh).

    ``--no-sync-snap`` sends the newest existing snapshot (as the other tools do)
    instead of making its own; on zfs-fuse syncoid warns that there are no
    resume tokens and carries on without them; sizes show as UNKNOWN.
    """

    name = "syncoid"

    def needles(self, job: Job, far: Target) -> list[str]:
        return [f"/tmp/syncoid-root@{far.addr}-"]  # its ControlMaster socket (ssh -M -S)

    def argv(self, job: Job, far: Target) -> list[str]:
        return ["syncoid", "--no-sync-snap", "--sshkey", str(far.user_key), "--sshport", "22",
                f"--sshoption=UserKnownHostsFile={far.known_hosts}",
                "--sshoption=StrictHostKeyChecking=yes", "--sshoption=BatchMode=yes",
                job.dataset, f"root@{far.addr}:{job.target}"]


class Pipe(Tool):
    """The textbook ``zfs send | ssh | zfs receive``."""

    name = "pipe"

    def send(self, job: Job) -> str:
        snap = f"{job.dataset}@{job.snapshot}"
        if job.base:
            return shlex.join(["zfs", "send", "-i", f"@{job.base}", snap])
        return shlex.join(["zfs", "send", snap])

    def remote(self, job: Job) -> str:
        return shlex.join(["zfs", "receive", job.target])

    def argv(self, job: Job, far: Target) -> list[str]:
        ssh = shlex.join(["ssh", "-F", str(far.ssh_config), "dst", self.remote(job)])
        return ["bash", "-o", "pipefail", "-c", f"{self.send(job)} | {ssh}"]


class PipeZstd(Pipe):
    """The pipe with zstd -3 on all cores in front of ssh."""

    name = "pipe+zstd"

    def remote(self, job: Job) -> str:
        return f"zstd -d -q | {super().remote(job)}"

    def argv(self, job: Job, far: Target) -> list[str]:
        ssh = shlex.join(["ssh", "-F", str(far.ssh_config), "dst", self.remote(job)])
        return ["bash", "-o", "pipefail", "-c", f"{self.send(job)} | zstd -3 -T0 -q | {ssh}"]


TOOLS: dict[str, Tool] = {t.name: t for t in (Zchunk(), Syncoid(), Pipe(), PipeZstd())}
