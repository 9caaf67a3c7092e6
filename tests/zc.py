"""Running the real ``zchunk`` CLI from tests and reading what it reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zchunk import agent

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    events: list[dict[str, Any]] = field(default_factory=list)

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    def result(self) -> dict[str, Any]:
        res = self.of("result")
        assert res, f"no result event; stderr:\n{self.stderr}"
        return res[-1]

    def error(self) -> dict[str, Any]:
        """The run's error event (``--json``): error, message, hint, exit_code."""
        errors = self.of("error")
        assert errors, f"no error event; exit {self.returncode}; stderr:\n{self.stderr}"
        return errors[-1]

    def explain(self) -> str:
        return (f"$ {' '.join(self.argv)}\nexit {self.returncode}\n"
                f"stdout:\n{self.stdout[-4000:]}\nstderr:\n{self.stderr[-4000:]}")


def parse_events(stdout: str) -> list[dict[str, Any]]:
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


class Zchunk:
    """The CLI with a test's own state and spool directories.

    ``sync_args`` are added to every ``sync``: engine tests pass
    ``--no-sync-snap`` (send the test's own snapshot, as issue "transfer
    engine" specifies); replication tests pass none.
    """

    def __init__(self, workdir: Path, netns: str | None = None, sync_args: tuple[str, ...] = ()) -> None:
        self.sync_args = list(sync_args)
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.spool_dir = workdir / "spool"
        self.netns = netns

    def argv(self, *args: str, json_out: bool = True) -> list[str]:
        cmd = [sys.executable, "-m", "zchunk", *args]
        if args and args[0] in ("sync", "resume", "abort", "sessions", "limit", "pause", "resync"):
            cmd += ["--state-dir", str(self.state_dir)]
        if args and args[0] in ("sync", "resume", "resync"):
            cmd += ["--spool-dir", str(self.spool_dir)]
        if args and args[0] == "sync":
            cmd += self.sync_args
        if json_out:
            cmd.append("--json")
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        return cmd

    def run(self, *args: str, timeout: float = 600, json_out: bool = True) -> Run:
        argv = self.argv(*args, json_out=json_out)
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        return Run(argv, p.returncode, p.stdout, p.stderr, parse_events(p.stdout))

    def start(self, *args: str) -> Background:
        return Background(self.argv(*args), self.workdir)

    def session_dirs(self) -> list[Path]:
        """What the runs left in the spool directory, but the agent program (``.agent``: kept for the next
        run, see docs/protocol.md ``program``) and the receives' mount lock (``.mount.lock``)."""
        if not self.spool_dir.exists():
            return []
        return sorted(p for p in self.spool_dir.iterdir() if p.name not in (agent.PROGRAM_DIR, agent.MOUNT_LOCK))

    def agent_state(self, role: str) -> dict[str, Any] | None:
        for d in self.session_dirs():
            if d.name.endswith("-" + role):
                f = d / ("sender.json" if role == "send" else "receiver.json")
                try:
                    return json.loads(f.read_text())
                except (OSError, ValueError):
                    return None
        return None


class Background:
    """A zchunk run in the background (for killing it, or faults while it runs).

    Output goes to files, never to a pipe nobody reads (a full pipe would stall zchunk).
    """

    _n = 0

    def __init__(self, argv: list[str], logdir: Path) -> None:
        Background._n += 1
        self.argv = argv
        self.out_path = logdir / f"bg{Background._n}.out"
        self.err_path = logdir / f"bg{Background._n}.err"
        self._out = self.out_path.open("w")
        self._err = self.err_path.open("w")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=self._err, text=True,
                                     cwd=REPO, start_new_session=True)

    def events_so_far(self) -> list[dict[str, Any]]:
        return parse_events(self.out_path.read_text())

    def wait_for(self, pred: Any, timeout: float = 120, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"zchunk exited ({self.proc.returncode}) before {what}:\n"
                                     f"{self.err_path.read_text()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def finish(self, timeout: float = 600) -> Run:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._out.close()
        self._err.close()
        out, err = self.out_path.read_text(), self.err_path.read_text()
        return Run(self.argv, self.proc.returncode, out, err, parse_events(out))

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


def matching(needle: str) -> dict[int, str]:
    """Processes (but this one) whose command line mentions ``needle``: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return {pid: cmd for pid, cmd in found.items() if needle in cmd}


def kill_matching(needle: str) -> list[int]:
    """SIGKILL every process whose command line mentions ``needle`` (a test's spool dir):
    teardown for agents of a test that failed before zchunk could clean them up."""
    killed = []
    for pid in matching(needle):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed
