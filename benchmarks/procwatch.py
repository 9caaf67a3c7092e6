"""What a tool costs while it runs: CPU seconds, peak memory, spool disk, wire bytes.

A tool is more than the process we start: ssh sessions on the target run under
sshd, zchunk's agents are detached daemons (double fork, setsid) that no
``wait`` ever reaps, and syncoid's ssh ControlMaster daemonizes itself.  So a
``ProcWatch`` thread samples ``/proc`` every ``interval`` seconds and follows

- every descendant of the tool's own process (the ``roots``);
- every descendant of the lab sshd (sessions on the target side), not sshd itself;
- every process whose command line contains one of the ``needles`` (zchunk's
  spool directory, syncoid's control socket), and their descendants;

and keeps, per process (pid + start time), its own utime+stime and VmHWM at its
last sample.  A process seen for the first time keeps being followed after it
is reparented.  Processes that live shorter than one interval are missed; the
tool's own tree is counted exactly instead by ``os.wait4``'s rusage (see
``run.py``), so only processes *outside* that tree at their last sample
(``in_tree`` False) add to the CPU total.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20


@dataclass
class ProcRecord:
    """One process as last seen."""

    pid: int
    comm: str
    cmdline: str
    side: str  # "local" (root namespace) or "target" (another network namespace)
    role: str
    cpu_s: float = 0.0
    hwm_bytes: int = 0
    in_tree: bool = False  # a descendant of a root at its last sample (counted by wait4)
    # Per thread, /proc/PID/task/TID/io at its last sample: bytes it dirtied for storage minus those it
    # truncated or unlinked before writeback (a chunk file deleted while still in the page cache never hits
    # disk). Per thread because /proc/PID/io adds the I/O of reaped children (a coordinator's would count
    # its agent's again) and of exited threads; a thread's own file has only its own.
    thread_writes: dict[int, int] = field(default_factory=dict)

    @property
    def disk_write_bytes(self) -> int:
        return sum(self.thread_writes.values())


@dataclass
class Usage:
    """What one run of a tool used, from the samples."""

    processes: list[ProcRecord] = field(default_factory=list)
    spool_peak: dict[str, int] = field(default_factory=dict)  # session dir name -> bytes
    daemon_cpu_s: float = 0.0  # the zfs-fuse daemon: does the send/receive work for every tool

    def cpu_outside_tree(self) -> float:
        return sum(p.cpu_s for p in self.processes if not p.in_tree)

    def disk_writes(self, side: str) -> int:
        """Bytes the tool's processes on ``side`` left to be written to storage (see ProcRecord).

        Summed over all of them: one process may write a file another deletes (zchunk's channel
        server stores a chunk, the receiver daemon unlinks it), so only the sum is meaningful.
        """
        return sum(p.disk_write_bytes for p in self.processes if p.side == side)

    def peak(self, role: str | None = None, side: str | None = None) -> tuple[int, str]:
        """Largest VmHWM among matching processes, and which process it was."""
        best, who = 0, ""
        for p in self.processes:
            if (role is None or p.role == role) and (side is None or p.side == side) and p.hwm_bytes > best:
                best, who = p.hwm_bytes, p.role if p.role != "other" else p.comm
        return best, who


def _stat(pid: str) -> tuple[int, int, float, str] | None:
    """(ppid, starttime, own cpu seconds, comm) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1:raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2:].split()
    # fields[0] is state (stat field 3): utime, stime are fields 14, 15; starttime 22.
    return int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / CLK_TCK, comm


def _read(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _hwm(pid: int) -> int:
    for line in _read(f"/proc/{pid}/status").split("\n"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _disk_writes(pid: int) -> dict[int, int]:
    """write_bytes - cancelled_write_bytes of each live thread, from /proc/PID/task/TID/io (only its own)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        fields = {}
        for line in _read(f"/proc/{pid}/task/{tid}/io").split("\n"):
            name, _, value = line.partition(":")
            if value.strip().isdigit():
                fields[name] = int(value)
        if "write_bytes" in fields:
            out[int(tid)] = fields["write_bytes"] - fields.get("cancelled_write_bytes", 0)
    return out


def _netns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return ""


def daemon_pid(comm: str = "zfs-fuse") -> int | None:
    """Pid of the (single) process named ``comm``, to read its CPU time; never signalled."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(entry)) is not None and st[3] == comm:
            return int(entry)
    return None


def cpu_seconds(pid: int | None) -> float:
    st = _stat(str(pid)) if pid else None
    return st[2] if st else 0.0


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


class ProcWatch(threading.Thread):
    """Sample the processes of one tool run until ``stop()``; then read ``usage``."""

    def __init__(self, roots: list[int], sshd_pid: int | None, needles: list[str],
                 spool: Path | None = None, interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="procwatch")
        self.roots = set(roots)
        self.sshd_pid = sshd_pid
        self.needles = [n for n in needles if n]
        self.spool = spool
        self.interval = interval
        self.usage = Usage()
        self._records: dict[tuple[int, int], ProcRecord] = {}
        self._cmdlines: dict[tuple[int, int], str] = {}
        self._own_ns = _netns(os.getpid())
        self._daemon = daemon_pid()
        self._daemon_cpu0 = cpu_seconds(self._daemon)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.tick()
            self._halt.wait(self.interval)

    def stop(self) -> Usage:
        self._halt.set()
        self.join()
        self.tick()
        self.usage.processes = list(self._records.values())
        self.usage.daemon_cpu_s = cpu_seconds(self._daemon) - self._daemon_cpu0
        return self.usage

    def usage_now(self) -> Usage:
        """What the samples so far saw (for a one-off ``tick()`` without the thread)."""
        return Usage(processes=list(self._records.values()), spool_peak=dict(self.usage.spool_peak))

    # -- one sample
    def tick(self) -> None:
        stats: dict[int, tuple[int, int, float, str]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (st := _stat(entry)) is not None:
                stats[int(entry)] = st
        children: dict[int, list[int]] = {}
        for pid, st in stats.items():
            children.setdefault(st[0], []).append(pid)
        in_tree = self._below(self.roots, children) | (self.roots & stats.keys())
        followed = set(in_tree)
        if self.sshd_pid:
            followed |= self._below({self.sshd_pid}, children)
        matched = {pid for pid, st in stats.items() if self._matches(pid, st[1])}
        followed |= matched | self._below(matched, children)
        followed |= {pid for (pid, start) in self._records if stats.get(pid, (0, -1))[1] == start}
        for pid in followed:
            self._update(pid, stats[pid], pid in in_tree, matched, stats)
        if self.spool is not None:
            self._sample_spool()

    @staticmethod
    def _below(tops: set[int], children: dict[int, list[int]]) -> set[int]:
        found, todo = set(), list(tops)
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return found

    def _matches(self, pid: int, start: int) -> bool:
        if not self.needles:
            return False
        key = (pid, start)
        if key not in self._cmdlines:
            self._cmdlines[key] = _read(f"/proc/{pid}/cmdline")
        return any(n in self._cmdlines[key] for n in self.needles)

    def _update(self, pid: int, st: tuple[int, int, float, str], in_tree: bool, matched: set[int],
                stats: dict[int, tuple[int, int, float, str]]) -> None:
        key = (pid, st[1])
        rec = self._records.get(key)
        if rec is None:
            cmdline = self._cmdlines.get(key) or _read(f"/proc/{pid}/cmdline")
            side = "local" if _netns(pid) == self._own_ns else "target"
            rec = ProcRecord(pid, st[3], cmdline[:2000], side, "other")
            self._records[key] = rec
        # A forked daemon keeps its parent's command line but not its role: classify each time.
        rec.role = self._role(pid, rec, matched, stats)
        rec.cpu_s = max(rec.cpu_s, st[2])
        rec.hwm_bytes = max(rec.hwm_bytes, _hwm(pid))
        rec.thread_writes.update(_disk_writes(pid))
        rec.in_tree = in_tree

    def _role(self, pid: int, rec: ProcRecord, matched: set[int],
              stats: dict[int, tuple[int, int, float, str]]) -> str:
        if pid in self.roots:
            return "coordinator"
        # agent.py start|serve DIR, or a daemon forked by `python3 -c BOOTSTRAP install BASE ID-ROLE ...`
        if pid in matched and ("agent.py" in rec.cmdline or " install " in rec.cmdline):
            words = rec.cmdline.split()
            if "-send/agent.py" in rec.cmdline or any(w.endswith("-send") for w in words):
                return "sender agent"
            if "-receive/agent.py" in rec.cmdline or any(w.endswith("-receive") for w in words):
                return "receiver agent"
        return rec.comm if rec.role in ("other", rec.comm) else rec.role

    def _sample_spool(self) -> None:
        assert self.spool is not None
        try:
            entries = list(os.scandir(self.spool))
        except OSError:
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                size = dir_bytes(Path(entry.path))
                if size > self.usage.spool_peak.get(entry.name, 0):
                    self.usage.spool_peak[entry.name] = size


def wire_counters(dev: str) -> int:
    """Bytes sent plus received on a network device of this namespace."""
    base = Path("/sys/class/net") / dev / "statistics"
    return int((base / "tx_bytes").read_text()) + int((base / "rx_bytes").read_text())


def wait_with_rusage(pid: int, deadline: float, poll: float = 0.05) -> tuple[int | None, float, int]:
    """Wait for our child ``pid`` until ``deadline`` (monotonic).

    Returns (exit status or None on timeout, user+sys CPU seconds of it and its
    reaped descendants, its largest maxrss in bytes).  ``os.wait4`` gives the
    rusage of exactly this child tree, unlike RUSAGE_CHILDREN deltas, which
    would also count the fault threads' iptables and tc commands.
    """
    while True:
        got, status, ru = os.wait4(pid, os.WNOHANG)
        if got == pid:
            return os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024
        if time.monotonic() > deadline:
            return None, 0.0, 0
        time.sleep(poll)
