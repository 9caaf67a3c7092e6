"""Coordinator session records: what a rerun or ``zchunk resume`` needs to reattach.

One JSON file per session under the state directory (default
``$XDG_STATE_HOME/zchunk/sessions``), replaced atomically (temp -> fsync ->
rename) at every state change, so ``kill -9`` of the coordinator loses at most
the chunk in flight: everything else is on the hosts' spools.

Beside it, ``<id>.control.json`` holds what the user asked of a session while
it runs (``zchunk limit``, ``pause``, ``resume`` from another terminal): only
those commands write it, and the coordinator running the session reads it.
``<id>.lock`` is held (flock) by the coordinator running the session.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import SessionNotFound

ACTIVE_STATES = ("starting", "running")


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "zchunk"


def new_session_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


@dataclass
class SessionRecord:
    id: str
    source: str  # endpoint as given: [user@]host:pool/ds
    target: str
    snapshot: str  # source snapshot being sent
    snapshot_guid: int
    base: str | None  # incremental base (source name), None for a full stream
    target_dataset: str
    source_dir: str  # session directory on the source host
    target_dir: str
    spool_base: str
    codec: str
    checksum: str
    chunk_size: int
    spool_max: int
    estimate: int
    ssh: dict[str, Any] = field(default_factory=dict)  # how to reconnect (config, key, port, options)
    state: str = "starting"
    reason: str = ""
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    raw_bytes: int = 0
    chunks_received: int = 0
    total_chunks: int | None = None
    # Its directories may exist on the hosts: from before the install until a removal of both succeeded
    # (a coordinator killed while cleaning up leaves a finished or failed session with them).
    dirs_left: bool = False
    bwlimit: str | None = None  # --bwlimit as given: a rate or a schedule (link.Bandwidth)
    timezone: str | None = None  # --timezone for the schedule; None: the coordinator's local time
    # the interpreter the agents run with on a remote host (preflight may pick one with zstandard/xxhash):
    # a resume must use it too, since the session's codec and checksum need it
    source_python: str | None = None
    target_python: str | None = None
    fanout: str | None = None  # the fan-out group whose one zfs send feeds this session (zchunk.fanout)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def leftover(self) -> bool:
        """Ended, but its session directories may still be on the hosts."""
        return not self.active and self.dirs_left

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _record(data: dict[str, Any]) -> SessionRecord:
    """A record from JSON; fields written by a newer zchunk are ignored."""
    known = {f.name for f in fields(SessionRecord)}
    return SessionRecord(**{k: v for k, v in data.items() if k in known})


class TargetLock:
    """One coordinator per target dataset (per state directory): an flock the kernel releases when the
    process dies, so a lock left by a ``kill -9``-ed run is simply free again."""

    def __init__(self, state_dir: Path, target: str) -> None:
        import hashlib

        self.path = state_dir / "locks" / (hashlib.sha256(target.encode()).hexdigest()[:16] + ".lock")
        self.target = target
        self.fd: int | None = None

    def acquire(self, session: str = "") -> None:
        import fcntl
        import socket

        from .errors import AlreadyRunning

        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").split("\t")
            os.close(fd)
            holder += ["?"] * 3
            raise AlreadyRunning(target=self.target, session=holder[0] or "?", pid=holder[1],
                                 host=holder[2]) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{session}\t{os.getpid()}\t{socket.gethostname()}".encode())
        self.fd = fd

    def note_session(self, session: str) -> None:
        import socket

        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{session}\t{os.getpid()}\t{socket.gethostname()}".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class SessionControl:
    """What the user asked of a running session: a limit replacing its --bwlimit (None: keep that one),
    and whether it is paused."""

    limit: str | None = None
    paused: bool = False
    updated: float = 0.0


class SessionLock:
    """Held by the coordinator running a session (an flock: free again when that process dies)."""

    def __init__(self, state_dir: Path, sid: str) -> None:
        self.path = state_dir / "sessions" / f"{sid}.lock"
        self.fd: int | None = None

    def acquire(self) -> bool:
        """True when this process now holds it; False when another process does."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def held_elsewhere(self) -> bool:
        """Whether another process runs the session now (asked without keeping the lock)."""
        if not self.acquire():
            return True
        self.release()
        return False

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "sessions"

    def _path(self, sid: str) -> Path:
        return self.dir / f"{sid}.json"

    def save(self, rec: SessionRecord) -> None:
        rec.updated = time.time()
        self._write(self._path(rec.id), rec.to_json())

    def _write(self, path: Path, data: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _control_path(self, sid: str) -> Path:
        return self.dir / f"{sid}.control.json"

    def control(self, sid: str) -> SessionControl:
        """What the user asked of session ``sid`` (defaults when nothing was asked, or the file is damaged)."""
        try:
            data = json.loads(self._control_path(sid).read_text())
            known = {f.name for f in fields(SessionControl)}
            return SessionControl(**{k: v for k, v in data.items() if k in known})
        except (OSError, ValueError, TypeError):
            return SessionControl()

    def control_changed(self, sid: str) -> float:
        """The control file's mtime (0: none), for a cheap "did anything change" per poll."""
        try:
            return self._control_path(sid).stat().st_mtime
        except OSError:
            return 0.0

    def set_control(self, sid: str, **changes: Any) -> SessionControl:
        ctl = self.control(sid)
        for k, v in changes.items():
            setattr(ctl, k, v)
        ctl.updated = time.time()
        self._write(self._control_path(sid), asdict(ctl))
        return ctl

    def load(self, sid: str) -> SessionRecord:
        path = self._path(sid)
        if "/" in sid or not path.is_file():
            raise SessionNotFound(session=sid, state_dir=str(self.dir))
        return _record(json.loads(path.read_text()))

    def all(self) -> list[SessionRecord]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in sorted(self.dir.glob("*.json")):
            if p.name.endswith(".control.json"):
                continue
            try:
                out.append(_record(json.loads(p.read_text())))
            except (ValueError, TypeError):
                continue  # a foreign or damaged file is not ours to interpret
        # oldest first by creation time: ids tell only the second, and two sessions may share one
        return sorted(out, key=lambda r: (r.created, r.id))

    def find_active(self, source: str, target: str) -> SessionRecord | None:
        for rec in reversed(self.all()):
            if rec.active and rec.source == source and rec.target == target:
                return rec
        return None

    def active_under(self, source: str, target: str) -> list[SessionRecord]:
        """Unfinished sessions of this pair or of their children (a recursive run), oldest first."""
        def under(name: str, root: str) -> bool:
            return name == root or name.startswith(root + "/")

        return [r for r in self.all() if r.active and under(r.source, source) and under(r.target, target)]

    def leftovers_under(self, source: str, target: str) -> list[SessionRecord]:
        """Ended sessions of this pair or of their children whose directories may still be on the hosts."""
        def under(name: str, root: str) -> bool:
            return name == root or name.startswith(root + "/")

        return [r for r in self.all() if r.leftover and under(r.source, source) and under(r.target, target)]

    def remove(self, sid: str) -> None:
        for path in (self._path(sid), self._control_path(sid), self.dir / f"{sid}.lock"):
            path.unlink(missing_ok=True)
