"""The coordinator's side of the agent protocol (docs/protocol.md).

Frames and their bounds are defined once, in the agent (``zchunk/agent.py``),
and imported here so both sides share the same constants and encoder. One
``AgentChannel`` talks to one ``agent.py serve`` process; a channel carries
one request at a time (parallelism comes from several channels).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import agent
from .errors import CapabilityMismatch, ProtocolError, from_remote
from .transport import AgentPipe, LinkDown

log = logging.getLogger("zchunk.protocol")

COORDINATOR_CAPS = ["chunk-v1", "resume-offset-v1", "zstd-v1", "zlib-v1", "none-v1",
                    "xxh3-128-v1", "blake2b-128-v1"]

# What each side of a session may ask of an agent; anything else is refused locally.
ALLOWED_OPS = {
    "send": {"status", "get_chunk", "release", "cleanup", "abort"},
    "receive": {"status", "put_chunk", "finish", "cleanup", "abort"},
}


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

    async def _read(self) -> tuple[int, int, bytes]:
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
        return self.hello

    def _send_request(self, op: str, fields: dict[str, Any]) -> int:
        role = self.hello.role if self.hello else ""
        if op not in ALLOWED_OPS.get(role, set()):
            raise ProtocolError(host=self.host, reason=f"operation {op!r} is not allowed for a {role} agent")
        req_id = next(self._ids)
        self.pipe.write(agent.encode_message(agent.FRAME_REQUEST, req_id, dict(fields, op=op)))
        return req_id

    async def _reply(self, req_id: int) -> dict[str, Any]:
        ftype, rid, payload = await self._read()
        if rid != req_id or ftype not in (agent.FRAME_REPLY, agent.FRAME_ERROR):
            raise ProtocolError(host=self.host, reason=f"expected reply to {req_id}, got type {ftype} id {rid}")
        msg = self._message(payload)
        if ftype == agent.FRAME_ERROR:
            raise from_remote(self.host, msg)
        unknown = set(msg) - _KNOWN_FIELDS
        if unknown:
            log.debug("%s: ignoring unknown reply fields %s", self.host, sorted(unknown))
        return msg

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        req_id = self._send_request(op, fields)
        await self.pipe.drain()
        return await self._reply(req_id)

    async def close(self) -> None:
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

    def _answer(self, op: str, fields: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        if self._server is None:
            self._server = agent.Server(agent.Session(self.session_dir), None, None)  # type: ignore[arg-type]
        role = self._server.sess.role
        if op not in ALLOWED_OPS.get(role, set()) or op in ("get_chunk", "put_chunk"):
            raise ProtocolError(host=self.host, reason=f"operation {op!r} is not answered in process "
                                f"for a {role} agent")
        return self._server.answer(next(self._ids), dict(fields, op=op))

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        with as_remote(self.host, op):  # the session directory itself (Session's checks)
            out = await asyncio.to_thread(self._answer, op, fields)
        assert out is not None
        ftype, msg = out
        if ftype == agent.FRAME_ERROR:
            raise from_remote(self.host, msg)
        return msg

    async def close(self) -> None:
        return None


_KNOWN_FIELDS = {"role", "daemon", "chunks", "parts", "spool_bytes", "spool_max", "seq", "offset",
                 "length", "total", "stored", "have", "released", "removed", "ok"}


class ChannelChunks:
    """Chunk data from the source agent's spool through its ``serve`` channel (``get_chunk``)."""

    def __init__(self, channel: AgentChannel) -> None:
        self.ch = channel
        self.req_id = 0

    @property
    def host(self) -> str:
        return self.ch.host

    async def open(self, seq: int, offset: int) -> tuple[int, int]:
        """Start chunk ``seq`` at ``offset``: (bytes that will follow, the chunk file's size)."""
        self.req_id = self.ch._send_request("get_chunk", {"seq": seq, "offset": offset})
        await self.ch.pipe.drain()
        head = await self.ch._reply(self.req_id)
        return int(head["length"]), int(head["total"])

    async def read(self) -> bytes:
        ftype, rid, payload = await self.ch._read()
        if ftype != agent.FRAME_DATA or rid != self.req_id:
            raise ProtocolError(host=self.host, reason=f"expected chunk data, got type {ftype} id {rid}")
        return payload

    def close(self) -> None:
        return None


class LocalSpoolChunks:
    """Chunk data read straight from a source spool on this machine.

    The coordinator runs as the agent's user here, so it reads the chunk file
    itself, by the agent's own rules (``Session`` checks the directory,
    ``open_nofollow`` the file), instead of through a ``serve`` process and a
    pipe: two copies and a process fewer per byte. Reads run on a thread (a
    chunk may have left the page cache). Errors are the agent's, as the
    channel would have answered them.
    """

    def __init__(self, session_dir: str, host: str) -> None:
        self.session_dir, self.host = session_dir, host
        self._sess: agent.Session | None = None
        self._file: Any = None
        self._left = 0

    async def open(self, seq: int, offset: int) -> tuple[int, int]:
        self.close()
        try:
            self._file, total = await asyncio.to_thread(self._open, seq, offset)
        except agent.AgentError as e:
            raise from_remote(self.host, e.to_dict()) from e
        self._left = total - offset
        return total - offset, total

    def _open(self, seq: int, offset: int) -> tuple[Any, int]:
        if self._sess is None:
            self._sess = agent.Session(self.session_dir)
        try:
            fd = agent.open_nofollow(self._sess.chunk_path(seq), os.O_RDONLY)
        except FileNotFoundError:
            raise agent.AgentError("no-chunk", f"chunk {seq} is not in the source spool") from None
        f = os.fdopen(fd, "rb")
        total = os.fstat(fd).st_size
        if offset > total:
            f.close()
            raise agent.AgentError("bad-request", f"offset {offset} beyond chunk {seq}'s {total} bytes")
        f.seek(offset)
        return f, total

    async def read(self) -> bytes:
        piece = await asyncio.to_thread(self._file.read, min(agent.DATA_PIECE, self._left))
        if not piece and self._left:
            raise from_remote(self.host, {"code": "no-chunk", "reason": "chunk file shrank while being read"})
        self._left -= len(piece)
        return bytes(piece)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


ChunkSource = ChannelChunks | LocalSpoolChunks


async def relay_chunk(src: ChunkSource, dst: AgentChannel, seq: int, offset: int,
                      on_bytes: Any = None, turn: Callable[[], Awaitable[None]] | None = None) -> bool:
    """Stream chunk ``seq`` from ``offset`` out of the source spool into the target spool.

    Data is forwarded as it arrives (bounded memory: one 1 MiB piece); ``turn``, if given, is
    awaited before each piece is read (the engine's ordering of parallel moves).
    Returns True when the target holds the complete, verified chunk.
    """
    try:
        length, total = await src.open(seq, offset)
        dst_id = dst._send_request("put_chunk", {"seq": seq, "offset": offset, "length": length,
                                                 "total": total})
        moved = 0
        while moved < length:
            if turn is not None:
                await turn()
            payload = await src.read()
            moved += len(payload)
            if moved > length:
                raise ProtocolError(host=src.host, reason=f"chunk {seq}: more data than announced")
            dst.pipe.write(agent.frame_header(agent.FRAME_DATA, dst_id, len(payload)))
            dst.pipe.write(payload)  # apart, not header + payload: that copied every forwarded byte once more
            await dst.pipe.drain()
            if on_bytes is not None:
                on_bytes(len(payload))
    finally:
        src.close()
    reply = await dst._reply(dst_id)
    return bool(reply.get("stored"))


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
