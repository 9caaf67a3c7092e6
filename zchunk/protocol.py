"""The coordinator's side of the agent protocol (docs/protocol.md).

Frames and their bounds are defined once, in the agent (``helpers/zchunk_agent``),
and imported here so both sides share the same constants and encoder. One
``AgentChannel`` talks to one ``agent.py serve`` process; a channel carries
one request at a time (parallelism comes from several channels).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from helpers import zchunk_agent as wire

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
            hdr = await asyncio.wait_for(self.pipe.readexactly(wire.FRAME_HEADER.size), self.stall)
            try:
                ftype, req_id, length = wire.parse_frame_header(hdr)
            except wire.AgentError as e:
                raise ProtocolError(host=self.host, reason=e.reason) from e
            payload = await asyncio.wait_for(self.pipe.readexactly(length), self.stall) if length else b""
        except asyncio.TimeoutError as e:
            raise LinkDown(self.host, f"no data from the agent for {self.stall:.0f}s") from e
        return ftype, req_id, payload

    def _message(self, payload: bytes) -> dict[str, Any]:
        try:
            return wire.decode_message(payload)
        except wire.AgentError as e:
            raise ProtocolError(host=self.host, reason=e.reason) from e

    async def handshake(self, need: list[str]) -> Hello:
        ftype, _, payload = await self._read()
        if ftype != wire.FRAME_HELLO:
            raise ProtocolError(host=self.host, reason=f"expected hello, got frame type {ftype}")
        msg = self._message(payload)
        if msg.get("protocol") != wire.PROTOCOL_VERSION:
            raise ProtocolError(host=self.host, reason=f"agent speaks protocol {msg.get('protocol')!r}, "
                                f"coordinator {wire.PROTOCOL_VERSION}")
        theirs = [str(c) for c in msg.get("capabilities", [])]
        missing = [c for c in need if c not in theirs]
        if missing:
            raise CapabilityMismatch(what=", ".join(missing), ours=need, theirs=theirs, host=self.host)
        self.hello = Hello(int(msg["protocol"]), theirs, str(msg.get("role")), msg.get("session"),
                           str(msg.get("host", "")))
        self.pipe.write(wire.encode_message(wire.FRAME_HELLO, 0, {
            "protocol": wire.PROTOCOL_VERSION, "capabilities": COORDINATOR_CAPS}))
        await self.pipe.drain()
        return self.hello

    def _send_request(self, op: str, fields: dict[str, Any]) -> int:
        role = self.hello.role if self.hello else ""
        if op not in ALLOWED_OPS.get(role, set()):
            raise ProtocolError(host=self.host, reason=f"operation {op!r} is not allowed for a {role} agent")
        req_id = next(self._ids)
        self.pipe.write(wire.encode_message(wire.FRAME_REQUEST, req_id, dict(fields, op=op)))
        return req_id

    async def _reply(self, req_id: int) -> dict[str, Any]:
        ftype, rid, payload = await self._read()
        if rid != req_id or ftype not in (wire.FRAME_REPLY, wire.FRAME_ERROR):
            raise ProtocolError(host=self.host, reason=f"expected reply to {req_id}, got type {ftype} id {rid}")
        msg = self._message(payload)
        if ftype == wire.FRAME_ERROR:
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


_KNOWN_FIELDS = {"role", "daemon", "chunks", "parts", "spool_bytes", "spool_max", "seq", "offset",
                 "length", "total", "stored", "have", "released", "removed", "ok"}


async def relay_chunk(src: AgentChannel, dst: AgentChannel, seq: int, offset: int,
                      on_bytes: Any = None, turn: Callable[[], Awaitable[None]] | None = None) -> bool:
    """Stream chunk ``seq`` from ``offset`` out of the source spool into the target spool.

    Data frames are forwarded as they arrive (bounded memory: one frame); ``turn``, if given, is
    awaited before each one is read (the engine's ordering of parallel moves).
    Returns True when the target holds the complete, verified chunk.
    """
    src_id = src._send_request("get_chunk", {"seq": seq, "offset": offset})
    await src.pipe.drain()
    head = await src._reply(src_id)
    length, total = int(head["length"]), int(head["total"])
    dst_id = dst._send_request("put_chunk", {"seq": seq, "offset": offset, "length": length,
                                             "total": total})
    moved = 0
    while moved < length:
        if turn is not None:
            await turn()
        ftype, rid, payload = await src._read()
        if ftype != wire.FRAME_DATA or rid != src_id:
            raise ProtocolError(host=src.host, reason=f"expected chunk data, got type {ftype} id {rid}")
        moved += len(payload)
        if moved > length:
            raise ProtocolError(host=src.host, reason=f"chunk {seq}: more data than announced")
        dst.pipe.write(wire.frame_header(wire.FRAME_DATA, dst_id, len(payload)))
        dst.pipe.write(payload)  # apart, not header + payload: that copied every forwarded byte once more
        await dst.pipe.drain()
        if on_bytes is not None:
            on_bytes(len(payload))
    reply = await dst._reply(dst_id)
    return bool(reply.get("stored"))


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
