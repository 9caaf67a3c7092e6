"""The coordinator's side of the agent protocol (docs/protocol.md): frames over one channel.

Frames and their bounds are defined once, in the agent (``zchunk/agent.py``),
and imported here so both sides share the same constants and encoder. One
``AgentChannel`` talks to one ``agent.py serve`` process; a channel carries
one request at a time (parallelism comes from several channels). An
``InProcessChannel`` answers the same requests from the agent's own code in
this process. Which requests exist and what they take is written once, in
``client.py``; this module only carries them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import agent
from .errors import CapabilityMismatch, ProtocolError, from_remote
from .transport import AgentPipe, LinkDown

log = logging.getLogger("zchunk.protocol")

COORDINATOR_CAPS = ["chunk-v1", "resume-offset-v1", "zstd-v1", "zlib-v1", "none-v1",
                    "xxh3-128-v1", "blake2b-128-v1"]

#: Requests carried without data frames, which an ``InProcessChannel`` answers too.
NO_DATA_OPS = {"status", "release", "finish", "cleanup", "abort"}


@dataclass(frozen=True)
class Hello:
    protocol: int
    capabilities: list[str]
    role: str
    session: str | None
    host: str


class AgentChannel:
    """A framed request/response channel to one agent server process."""

    def __init__(self, pipe: AgentPipe, host: str, stall_timeout: float) -> None:
        self.pipe, self.host, self.stall = pipe, host, stall_timeout
        self._ids = itertools.count(1)
        self.hello: Hello | None = None
        # Whether the server waits for a request with nothing owed either way: the channel may then serve
        # another session (``attach``). False from a request's start to its last reply, or for good once
        # anything failed on it or the server said it will exit.
        self.between = False
        self._owed = 0  # data bytes of a get_chunk still to read
        self.origin: object = None  # the Host it was opened on, where it may wait for the next stream

    async def _read(self) -> tuple[int, int, bytes]:
        self.between = False  # till what is read is known to end a request (``reply``, ``read_data``)
        try:
            hdr = await asyncio.wait_for(self.pipe.readexactly(agent.FRAME_HEADER.size), self.stall)
            try:
                ftype, req_id, length = agent.parse_frame_header(hdr)
            except agent.AgentError as e:
                raise ProtocolError(host=self.host, reason=e.reason) from e
            payload = await asyncio.wait_for(self.pipe.readexactly(length), self.stall) if length else b""
        except asyncio.TimeoutError as e:
            raise LinkDown(self.host, f"no data from the agent for {self.stall:.0f}s") from e
        return ftype, req_id, payload

    def _message(self, payload: bytes) -> dict[str, Any]:
        try:
            return agent.decode_message(payload)
        except agent.AgentError as e:
            raise ProtocolError(host=self.host, reason=e.reason) from e

    async def handshake(self, need: list[str]) -> Hello:
        ftype, _, payload = await self._read()
        if ftype != agent.FRAME_HELLO:
            raise ProtocolError(host=self.host, reason=f"expected hello, got frame type {ftype}")
        msg = self._message(payload)
        if msg.get("protocol") != agent.PROTOCOL_VERSION:
            raise ProtocolError(host=self.host, reason=f"agent speaks protocol {msg.get('protocol')!r}, "
                                f"coordinator {agent.PROTOCOL_VERSION}")
        theirs = [str(c) for c in msg.get("capabilities", [])]
        missing = [c for c in need if c not in theirs]
        if missing:
            raise CapabilityMismatch(what=", ".join(missing), ours=need, theirs=theirs, host=self.host)
        self.hello = Hello(int(msg["protocol"]), theirs, str(msg.get("role")), msg.get("session"),
                           str(msg.get("host", "")))
        self.pipe.write(agent.encode_message(agent.FRAME_HELLO, 0, {
            "protocol": agent.PROTOCOL_VERSION, "capabilities": COORDINATOR_CAPS}))
        await self.pipe.drain()
        self.between = True
        return self.hello

    async def attach(self, session_dir: str, need: list[str], wait: bool = False) -> Hello:
        """This channel's server answers for ``session_dir`` from now on (``wait``: once install has made
        it); checked as a handshake is. Only on a channel ``between`` requests."""
        assert self.hello is not None and self.between
        self.between = False
        req_id = next(self._ids)
        self.pipe.write(agent.encode_message(agent.FRAME_REQUEST, req_id,
                                             {"op": "attach", "dir": session_dir, "wait": wait}))
        await self.pipe.drain()
        msg = await self.reply(req_id)
        theirs = [str(c) for c in msg.get("capabilities", [])]
        missing = [c for c in need if c not in theirs]
        if missing:
            raise CapabilityMismatch(what=", ".join(missing), ours=need, theirs=theirs, host=self.host)
        self.hello = Hello(self.hello.protocol, theirs, str(msg.get("role")), msg.get("session"), self.hello.host)
        return self.hello

    def begin(self, op: str, **fields: Any) -> int:
        """Write request ``op`` (not yet drained): its id, for ``reply`` and the data frames that go with it."""
        role = self.hello.role if self.hello else ""
        if op not in agent.OPS.get(role, ()):
            raise ProtocolError(host=self.host, reason=f"operation {op!r} is not allowed for a {role} agent")
        req_id = next(self._ids)
        self.between = False
        self.pipe.write(agent.encode_message(agent.FRAME_REQUEST, req_id, dict(fields, op=op)))
        return req_id

    async def reply(self, req_id: int) -> dict[str, Any]:
        """The answer to request ``req_id``; an agent's error frame raised as our error class."""
        ftype, rid, payload = await self._read()
        if rid != req_id or ftype not in (agent.FRAME_REPLY, agent.FRAME_ERROR):
            raise ProtocolError(host=self.host, reason=f"expected reply to {req_id}, got type {ftype} id {rid}")
        msg = self._message(payload)
        self.between = True  # an answer, an error among them, ends the request: the server waits for the next
        if ftype == agent.FRAME_ERROR:
            raise from_remote(self.host, msg)
        unknown = set(msg) - _KNOWN_FIELDS
        if unknown:
            log.debug("%s: ignoring unknown reply fields %s", self.host, sorted(unknown))
        return msg

    def owe(self, length: int) -> None:
        """``length`` data bytes (a get_chunk's) follow the reply just read: not between requests till read."""
        self._owed = length
        self.between = length <= 0

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        req_id = self.begin(op, **fields)
        await self.pipe.drain()
        return await self.reply(req_id)

    async def drain(self) -> None:
        """Until what was written is on its way (the pipe's buffer below its mark)."""
        await self.pipe.drain()

    async def read_data(self, req_id: int) -> bytes:
        """The next data frame of request ``req_id`` (a chunk coming from the agent)."""
        ftype, rid, payload = await self._read()
        if ftype != agent.FRAME_DATA or rid != req_id:
            raise ProtocolError(host=self.host, reason=f"expected chunk data, got type {ftype} id {rid}")
        self._owed -= len(payload)
        self.between = self._owed <= 0
        return payload

    async def write_data(self, req_id: int, payload: bytes) -> None:
        """``payload`` of request ``req_id`` (a chunk going to the agent) as data frames of at most
        ``agent.PUT_FRAME`` bytes, drained."""
        step = agent.PUT_FRAME
        parts = [payload] if len(payload) <= step else [payload[at:at + step] for at in range(0, len(payload), step)]
        for part in parts:
            self.pipe.write(agent.frame_header(agent.FRAME_DATA, req_id, len(part)))
            self.pipe.write(part)  # apart, not header + part: that copied every forwarded byte once more
        await self.pipe.drain()

    def drop_connection(self) -> None:
        """The link under this channel failed: its connection is not used again (by any channel)."""
        self.between = False
        self.pipe.drop_connection()

    async def close(self) -> None:
        self.between = False
        await self.pipe.close()


@contextlib.contextmanager
def as_remote(host: str, what: str) -> Iterator[None]:
    """The agent's own code run in this process: its failures raised as a remote agent's would be
    (``AgentError`` by its code, an ``OSError`` as the agent's ``os-error``)."""
    try:
        yield
    except agent.AgentError as e:
        raise from_remote(host, e.to_dict()) from e
    except OSError as e:
        raise from_remote(host, agent.AgentError("os-error", f"{what}: {e}", errno=e.errno).to_dict()) from e


class InProcessChannel:
    """The requests without data frames (status, release, finish, cleanup) of a session on this machine,
    answered in this process by the agent's own ``Server`` on a thread, as a ``serve`` process would.

    The status poller's channel to a local agent: a ``serve`` process costs an interpreter start (a
    quarter of a second while the daemon's compression has both cores) before the first chunk can
    move. The coordinator runs as the agent's user here (``LocalSpoolChunks``, in-process ``remove``).
    """

    def __init__(self, session_dir: str, host: str) -> None:
        self.session_dir, self.host = session_dir, host
        self._server: agent.Server | None = None
        self._ids = itertools.count(1)

    def _serving(self) -> agent.Server:
        if self._server is None:
            self._server = agent.Server(agent.Session(self.session_dir), None, None)  # type: ignore[arg-type]
        return self._server

    def _answer(self, op: str, fields: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        server = self._serving()
        role = server.sess.role
        if op not in agent.OPS.get(role, ()) or op not in NO_DATA_OPS:
            raise ProtocolError(host=self.host, reason=f"operation {op!r} is not answered in process "
                                f"for a {role} agent")
        return server.answer(next(self._ids), dict(fields, op=op))

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        wait, known = float(fields.pop("wait", 0) or 0), int(fields.pop("known", 0) or 0)
        with as_remote(self.host, op):  # the session directory itself (Session's checks)
            if op == "status" and wait > 0:
                await self._until_spooled(known, min(wait, agent.STATUS_WAIT_MAX))
            out = await asyncio.to_thread(self._answer, op, fields)
        assert out is not None
        ftype, msg = out
        if ftype == agent.FRAME_ERROR:
            raise from_remote(self.host, msg)
        return msg

    async def _until_spooled(self, known: int, wait: float) -> None:
        """The agent's ``until_spooled``, waited for here on the event loop: a thread of the loop's executor
        held for the whole wait would hold up the local chunk reads that are queued behind it (relay.py)."""
        server = await asyncio.to_thread(self._serving)
        if server.sess.role != "send":
            return
        deadline, seen = time.monotonic() + wait, None
        while True:
            over, seen = server.spooled_past(known, seen)
            if over or time.monotonic() >= deadline:
                return
            await asyncio.sleep(agent.STATUS_WAIT_STEP)

    def drop_connection(self) -> None:
        return None

    async def close(self) -> None:
        return None


_KNOWN_FIELDS = {"role", "daemon", "chunks", "parts", "spool_bytes", "spool_max", "seq", "offset",
                 "length", "total", "stored", "have", "released", "removed", "ok", "stays", "session",
                 "capabilities"}
