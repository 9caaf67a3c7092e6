"""One chunk's move: out of the source spool (a ``get_chunk`` channel, or the file itself on this machine)
into the target spool (``put_chunk``), forwarded piece by piece as it arrives."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from . import agent
from .client import ReceiverClient, SenderClient
from .errors import ProtocolError, from_remote


class ChannelChunks:
    """Chunk data from the source agent's spool through its ``serve`` channel (``get_chunk``)."""

    def __init__(self, sender: SenderClient) -> None:
        self.sender = sender
        self.req_id = 0

    @property
    def host(self) -> str:
        return self.sender.host

    async def open(self, seq: int, offset: int) -> tuple[int, int]:
        """Start chunk ``seq`` at ``offset``: (bytes that will follow, the chunk file's size)."""
        self.req_id, length, total = await self.sender.get_chunk(seq, offset)
        return length, total

    async def read(self) -> bytes:
        return await self.sender.read_data(self.req_id)

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


async def relay_chunk(src: ChunkSource, dst: ReceiverClient, seq: int, offset: int,
                      on_bytes: Callable[[int], None] | None = None,
                      turn: Callable[[], Awaitable[None]] | None = None,
                      pace: Callable[[int], Awaitable[None]] | None = None) -> bool:
    """Stream chunk ``seq`` from ``offset`` out of the source spool into the target spool.

    Data is forwarded as it arrives (bounded memory: one 1 MiB piece); ``turn``, if given, is
    awaited before each piece is read (the engine's ordering of parallel moves), ``pace`` with the
    piece's size before it is sent (a bandwidth limit), ``on_bytes`` told of each piece once it is on
    its way. True when the target holds the complete, verified chunk.
    """
    try:
        length, total = await src.open(seq, offset)

        async def pieces() -> AsyncIterator[bytes]:
            moved = 0
            while moved < length:
                if turn is not None:
                    await turn()
                payload = await src.read()
                moved += len(payload)
                if moved > length:
                    raise ProtocolError(host=src.host, reason=f"chunk {seq}: more data than announced")
                if pace is not None:
                    await pace(len(payload))
                yield payload
                if on_bytes is not None:
                    on_bytes(len(payload))

        return await dst.put_chunk(seq, offset, length, total, pieces())
    finally:
        src.close()
