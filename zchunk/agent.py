#!/usr/bin/env python3
"""zchunk agent: the part of zchunk that runs on a ZFS host.

Standard library only (zstandard and xxhash are used when importable), and
Python 3.9+, because it runs on the plain ``python3`` of a Debian, Proxmox or
TrueNAS host. The coordinator uploads this single file into a private session
directory and runs it in one of these roles:

``install``  (bootstrap, source on stdin) create the session directory safely,
             write ``agent.py`` and ``session.json`` into it.
``probe``    (bootstrap) print what this host can do, as JSON.
``start``    fork a detached daemon (sender or receiver, from session.json)
             that outlives every SSH connection; print its pid.
``serve``    speak the framed protocol (docs/protocol.md) on stdin/stdout for
             one coordinator channel; lives as long as that channel.
``sessions`` (bootstrap) list session directories under a base directory.

Session directory layout (the spool; docs/chunk-format.md has the bytes)::

    <base>/<session-id>/          mode 0700, created with mkdir (atomic)
        agent.py                  this program
        session.json              parameters, written once by ``install``
        sender.json | receiver.json   daemon state, replaced atomically
        end.json                  stream end as announced by the coordinator
        chunks.log                target: one line per chunk stored ("stored SEQ BYTES")
        heartbeat                 mtime = last coordinator contact
        daemon.log                the detached daemon's log (its pid is in the state file)
        zfs.stderr                stderr of zfs send / zfs receive
        reserve                   ballast the daemon frees, a slice at a time, to save its state on a full filesystem
        chunks/00000000000000000042.chunk   a complete chunk (header + payload)
        chunks/...42.part         a chunk being received (target only)
        chunks/...42.chunk.<pid>.tmp  a chunk being written (source only)

Fan-out (one ``zfs send`` for several targets): each target's sender directory is a *member* (``member_of``
in its session.json, no daemon of its own); the *group*'s directory (``fanout``: its members) runs the daemon,
which hard-links each chunk into every member's ``chunks/`` and copies its state into their ``sender.json``.

State files are written temp file -> fsync -> rename -> fsync dir. Chunk files
are written temp -> rename without fsync: they must be atomic, not durable (a
host crash kills the zfs pipe they belong to, and a chunk is verified against
its checksums before any of its bytes reach ``zfs receive``). A ``.tmp`` or
``.part`` file is never taken for a chunk. Every file is opened without
following symlinks and must be a regular file; new files are created with
O_EXCL (``open_nofollow``, docs/chunk-format.md "Safety rules").
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple

try:  # pragma: no cover - depends on the host
    import zstandard  # type: ignore
except ImportError:  # pragma: no cover
    zstandard = None  # type: ignore[assignment]
try:  # pragma: no cover - depends on the host
    import xxhash  # type: ignore
except ImportError:  # pragma: no cover
    xxhash = None  # type: ignore[assignment]


class ZstdCommand:
    """zstd through the ``zstd`` command, for a python without the zstandard module (a pyenv or venv
    python3, an appliance's) on a host that has the command (Debian and Proxmox do): the subset of
    zstandard's API the agent uses, each call one ``zstd`` process fed and drained through pipes. The
    frames are standard zstd, so either side may have the module and the other the command."""

    def __init__(self, path: str) -> None:
        self.path = path

    def ZstdCompressor(self, level: int = 3) -> "ZstdCommand._Compressor":  # noqa: N802 - zstandard's name
        return ZstdCommand._Compressor([self.path, "-q", "-c", "-%d" % max(1, min(19, level))])

    def ZstdDecompressor(self) -> "ZstdCommand._Decompressor":  # noqa: N802
        return ZstdCommand._Decompressor([self.path, "-q", "-d", "-c"])

    class _Pipe:
        """One zstd process: what is written goes in, what it prints is collected by a thread."""

        def __init__(self, argv: List[str]) -> None:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, close_fds=True)
            self.out: List[bytes] = []
            self.lock = threading.Lock()
            self.reader = threading.Thread(target=self._drain, daemon=True)
            self.reader.start()

        def _drain(self) -> None:
            assert self.proc.stdout is not None
            while True:
                data = self.proc.stdout.read(1 << 20)
                if not data:
                    return
                with self.lock:
                    self.out.append(data)

        def take(self) -> bytes:
            with self.lock:
                data, self.out = b"".join(self.out), []
            return data

        def write(self, data: Any) -> None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(data)
            except BrokenPipeError:
                raise AgentError("unsupported", "the zstd command exited early") from None

        def close(self) -> bytes:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.reader.join()
            if self.proc.wait() != 0:
                raise AgentError("unsupported", "the zstd command failed (exit %d)" % self.proc.returncode)
            return self.take()

    class _Compressor:
        def __init__(self, argv: List[str]) -> None:
            self.argv = argv

        def compress(self, data: bytes) -> bytes:
            pipe = ZstdCommand._Pipe(self.argv)
            pipe.write(data)
            return pipe.close()

        def compressobj(self) -> "ZstdCommand._Stream":
            return ZstdCommand._Stream(self.argv)

    class _Stream:
        def __init__(self, argv: List[str]) -> None:
            self.pipe = ZstdCommand._Pipe(argv)

        def compress(self, data: bytes) -> bytes:
            self.pipe.write(data)
            return self.pipe.take()

        def flush(self) -> bytes:
            return self.pipe.close()

    class _Decompressor:
        def __init__(self, argv: List[str]) -> None:
            self.argv = argv

        def stream_reader(self, source: Any, read_size: int = 1 << 20, closefd: bool = True) -> "ZstdCommand._Reader":
            return ZstdCommand._Reader(self.argv, source, read_size)

    class _Reader:
        """``read(n)`` of what zstd decompresses from ``source`` (bytes, or a file read to its end by a
        thread); leaving the ``with`` stops the process whether or not everything was read."""

        def __init__(self, argv: List[str], source: Any, read_size: int) -> None:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, close_fds=True)
            self.writer = threading.Thread(target=self._feed, args=(source, read_size), daemon=True)
            self.writer.start()

        def _feed(self, source: Any, read_size: int) -> None:
            assert self.proc.stdin is not None
            try:
                if isinstance(source, (bytes, bytearray, memoryview)):
                    self.proc.stdin.write(source)
                else:
                    while True:
                        data = source.read(read_size)
                        if not data:
                            break
                        self.proc.stdin.write(data)
            except (BrokenPipeError, ValueError):  # zstd stopped (bad frame, or we stopped reading)
                pass
            finally:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass

        def read(self, n: int) -> bytes:
            assert self.proc.stdout is not None
            return self.proc.stdout.read(n)

        def __enter__(self) -> "ZstdCommand._Reader":
            return self

        def __exit__(self, *exc: Any) -> None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.writer.join()
            assert self.proc.stdout is not None
            self.proc.stdout.close()


#: How this interpreter does zstd: "module" (zstandard), "command" (the zstd command, ZstdCommand), or None.
ZSTD_VIA: Optional[str] = "module" if zstandard is not None else None
if zstandard is None:  # pragma: no cover - depends on the host
    import shutil as _shutil

    _zstd_path = _shutil.which("zstd")
    if _zstd_path:
        zstandard = ZstdCommand(_zstd_path)  # type: ignore[assignment]
        ZSTD_VIA = "command"

AGENT_VERSION = "0.1.0"
PROTOCOL_VERSION = 1

# --------------------------------------------------------------------------
# Capabilities: codecs and checksums
# --------------------------------------------------------------------------

CODEC_NONE, CODEC_ZLIB, CODEC_ZSTD = 0, 1, 2
CODEC_IDS = {"none": CODEC_NONE, "zlib": CODEC_ZLIB, "zstd": CODEC_ZSTD}
CODEC_CAPS = {"none": "none-v1", "zlib": "zlib-v1", "zstd": "zstd-v1"}
HASH_BLAKE2B, HASH_XXH3 = 1, 2
HASH_IDS = {"blake2b-128": HASH_BLAKE2B, "xxh3-128": HASH_XXH3}
HASH_CAPS = {"blake2b-128": "blake2b-128-v1", "xxh3-128": "xxh3-128-v1"}
BASE_CAPS = ["chunk-v1", "resume-offset-v1"]


def capabilities() -> List[str]:
    caps = list(BASE_CAPS) + ["none-v1", "zlib-v1", "blake2b-128-v1"]
    if zstandard is not None:
        caps.append("zstd-v1")
    if xxhash is not None:
        caps.append("xxh3-128-v1")
    return caps


def new_hasher(alg: int) -> Any:
    if alg == HASH_XXH3:
        if xxhash is None:
            raise AgentError("unsupported", "xxh3-128 requested but xxhash is not importable")
        return xxhash.xxh3_128()
    if alg == HASH_BLAKE2B:
        import hashlib  # here: its import loads OpenSSL (~10 ms of every agent start) for blake2b only

        return hashlib.blake2b(digest_size=16)
    raise AgentError("unsupported", "unknown checksum id %d" % alg)


def digest(alg: int, data: Any) -> bytes:
    h = new_hasher(alg)
    h.update(data)
    return h.digest()


def compress(codec: int, level: Optional[int], data: bytes) -> bytes:
    if codec == CODEC_ZSTD:
        if zstandard is None:
            raise AgentError("unsupported", "zstd requested but zstandard is not importable")
        return zstandard.ZstdCompressor(level=3 if level is None else level).compress(data)
    if codec == CODEC_ZLIB:
        return zlib.compress(data, 3 if level is None else level)
    if codec == CODEC_NONE:
        return data
    raise AgentError("unsupported", "unknown codec id %d" % codec)


def decompress(codec: int, data: Any, raw_len: int) -> bytes:
    # Bounded by raw_len whatever the payload claims (a zstd frame may declare any size).
    if raw_len <= 0:  # an empty chunk is always stored uncompressed
        if codec == CODEC_NONE and not data:
            return b""
        raise AgentError("chunk-corrupt", "chunk declares no raw bytes but carries a compressed payload")
    if codec == CODEC_ZSTD:
        if zstandard is None:
            raise AgentError("unsupported", "chunk is zstd but zstandard is not importable")
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            return reader.read(raw_len + 1)
    if codec == CODEC_ZLIB:
        return zlib.decompressobj().decompress(data, raw_len + 1)
    if codec == CODEC_NONE:
        return data
    raise AgentError("unsupported", "unknown codec id %d" % codec)


# --------------------------------------------------------------------------
# Chunk format (docs/chunk-format.md)
# --------------------------------------------------------------------------

CHUNK_MAGIC = b"ZCHK"
CHUNK_VERSION = 1
# magic, version, codec, hash, flags, seq, raw_len, stored_len, raw_hash, stored_hash
_CHUNK_BODY = struct.Struct(">4sBBBBQII16s16s")
CHUNK_HEADER = struct.Struct(">56sI")  # body + crc32(body)
CHUNK_HEADER_SIZE = CHUNK_HEADER.size  # 60
MAX_CHUNK_RAW = 256 * 1024 * 1024


class ChunkHeader:
    __slots__ = ("codec", "hash_alg", "seq", "raw_len", "stored_len", "raw_hash", "stored_hash")

    def __init__(self, codec: int, hash_alg: int, seq: int, raw_len: int, stored_len: int,
                 raw_hash: bytes, stored_hash: bytes) -> None:
        self.codec, self.hash_alg, self.seq = codec, hash_alg, seq
        self.raw_len, self.stored_len = raw_len, stored_len
        self.raw_hash, self.stored_hash = raw_hash, stored_hash

    def pack(self) -> bytes:
        body = _CHUNK_BODY.pack(CHUNK_MAGIC, CHUNK_VERSION, self.codec, self.hash_alg, 0, self.seq,
                                self.raw_len, self.stored_len, self.raw_hash, self.stored_hash)
        return CHUNK_HEADER.pack(body, zlib.crc32(body))

    @classmethod
    def unpack(cls, data: bytes) -> "ChunkHeader":
        if len(data) < CHUNK_HEADER_SIZE:
            raise AgentError("chunk-corrupt", "chunk header truncated (%d bytes)" % len(data))
        body, crc = CHUNK_HEADER.unpack(data[:CHUNK_HEADER_SIZE])
        if zlib.crc32(body) != crc:
            raise AgentError("chunk-corrupt", "chunk header checksum mismatch")
        magic, version, codec, alg, _flags, seq, raw_len, stored_len, rh, sh = _CHUNK_BODY.unpack(body)
        if magic != CHUNK_MAGIC or version != CHUNK_VERSION:
            raise AgentError("chunk-corrupt", "not a zchunk v1 chunk")
        if raw_len > MAX_CHUNK_RAW or stored_len > MAX_CHUNK_RAW + 65536:
            raise AgentError("chunk-corrupt", "chunk sizes out of bounds")
        return cls(codec, alg, seq, raw_len, stored_len, rh, sh)


def encode_chunk(seq: int, raw: bytes, codec: int, level: Optional[int], hash_alg: int) -> bytes:
    """Header + payload for one chunk; falls back to no compression when it doesn't help."""
    stored = compress(codec, level, raw)
    if len(stored) >= len(raw):
        codec, stored = CODEC_NONE, raw
    hdr = ChunkHeader(codec, hash_alg, seq, len(raw), len(stored), digest(hash_alg, raw),
                      digest(hash_alg, stored))
    return hdr.pack() + stored


#: A chunk whose first piece's sample compresses to more than this share of its size is stored as it
#: is: an already compressed stream (``zfs send -c`` of lz4/zstd blocks, encrypted ``-w`` blocks, media)
#: gains under 2 %, and compressing it would only cost the CPU that zfs and the transfer need.
STORE_ABOVE = 0.98
SAMPLE = 64 * 1024


def looks_incompressible(piece: bytes, codec: int) -> bool:
    """Three slices of the piece, compressed at level 1: cheap (~0.2 ms per MiB piece). A first piece can
    mislead (a VM image's random extent before a run of zeros), so the sender asks only after a chunk that
    did not compress either (SenderDaemon.run)."""
    if codec == CODEC_NONE or len(piece) < 4 * SAMPLE:
        return False
    step = (len(piece) - SAMPLE) // 2
    sample = b"".join(piece[i * step:i * step + SAMPLE] for i in range(3))
    return len(compress(codec, 1, sample)) > STORE_ABOVE * len(sample)


class ChunkEncoder:
    """Builds one chunk from pieces as they arrive: the raw and stored checksums and the
    compressed payload are computed incrementally, so the raw chunk is never held whole.
    Its first piece decides: one that does not compress (``looks_incompressible``) makes the
    whole chunk stored as it is (codec none); otherwise the codec is kept even if it ends up
    not helping (zstd and zlib store incompressible blocks nearly as-is)."""

    def __init__(self, codec: int, level: Optional[int], hash_alg: int, skip_incompressible: bool = True) -> None:
        self.codec, self.level, self.hash_alg = codec, level, hash_alg
        self.skip = skip_incompressible
        self.raw_hash, self.stored_hash = new_hasher(hash_alg), new_hasher(hash_alg)
        self.raw_len = 0
        self.out: List[bytes] = []
        self._c: Any = None

    def _start(self, first: bytes) -> None:
        codec, level = self.codec, self.level
        if self.skip and looks_incompressible(first, codec):
            self.codec = CODEC_NONE
        elif codec == CODEC_ZSTD:
            if zstandard is None:
                raise AgentError("unsupported", "zstd requested but zstandard is not importable")
            self._c = zstandard.ZstdCompressor(level=3 if level is None else level).compressobj()
        elif codec == CODEC_ZLIB:
            self._c = zlib.compressobj(3 if level is None else level)

    def _emit(self, data: bytes) -> None:
        if data:
            self.stored_hash.update(data)
            self.out.append(data)

    def update(self, piece: bytes) -> None:
        if self.raw_len == 0:
            self._start(piece)
        self.raw_hash.update(piece)
        self.raw_len += len(piece)
        self._emit(self._c.compress(piece) if self._c is not None else piece)

    def finish(self, seq: int) -> List[bytes]:
        """[header, payload pieces...]"""
        if self._c is not None:
            self._emit(self._c.flush())
        elif self.raw_len == 0:
            self.codec = CODEC_NONE  # an empty chunk is always stored uncompressed
        stored_len = sum(len(p) for p in self.out)
        hdr = ChunkHeader(self.codec, self.hash_alg, seq, self.raw_len, stored_len, self.raw_hash.digest(),
                          self.stored_hash.digest())
        return [hdr.pack()] + self.out


def check_stored(blob: bytes) -> ChunkHeader:
    """Verify a whole chunk file's framing and stored-bytes checksum (cheap: no decompression)."""
    check = StoredCheck()
    check.update(blob)
    return check.result()


class StoredCheck:
    """``check_stored`` over a chunk that arrives in pieces: header first, then the payload's
    checksum as it goes by, so a chunk written to the spool need not be read back to be checked."""

    def __init__(self) -> None:
        self.head = b""
        self.hdr: Optional[ChunkHeader] = None
        self.hasher: Any = None
        self.payload_len = 0
        self.error: Optional[AgentError] = None

    def update(self, data: Any) -> None:
        if self.error is not None:
            return
        view = memoryview(data)
        if self.hdr is None:
            need = CHUNK_HEADER_SIZE - len(self.head)
            self.head += bytes(view[:need])
            view = view[need:]
            if len(self.head) < CHUNK_HEADER_SIZE:
                return
            try:
                self.hdr = ChunkHeader.unpack(self.head)
                self.hasher = new_hasher(self.hdr.hash_alg)
            except AgentError as e:
                self.error = e
                return
        self.hasher.update(view)
        self.payload_len += len(view)

    def result(self) -> ChunkHeader:
        if self.error is not None:
            raise self.error
        if self.hdr is None:
            return ChunkHeader.unpack(self.head)  # raises: truncated
        hdr = self.hdr
        if self.payload_len != hdr.stored_len:
            raise AgentError("chunk-corrupt", "chunk %d: payload is %d bytes, header says %d"
                             % (hdr.seq, self.payload_len, hdr.stored_len))
        if self.hasher.digest() != hdr.stored_hash:
            raise AgentError("chunk-corrupt", "chunk %d: stored bytes checksum mismatch" % hdr.seq)
        return hdr


def raw_pieces(hdr: ChunkHeader, source: Any, piece: int = 1 << 20) -> Any:
    """The chunk's raw bytes, decompressed piece by piece from ``source`` (a file positioned at the
    payload, or anything with ``read(n)``); bounded: never more than ``raw_len`` + 1 in all."""
    left = hdr.raw_len + 1
    if hdr.codec == CODEC_NONE:
        for out in _pieces_of(source, left, piece):
            yield out
        return
    if hdr.codec == CODEC_ZSTD:
        if zstandard is None:
            raise AgentError("unsupported", "chunk is zstd but zstandard is not importable")
        with zstandard.ZstdDecompressor().stream_reader(source, read_size=piece, closefd=False) as reader:
            for out in _pieces_of(reader, left, piece):
                yield out
        return
    if hdr.codec == CODEC_ZLIB:
        d = zlib.decompressobj()
        data = b""
        while left > 0:
            if not data:
                data = source.read(piece)
                if not data:
                    return
            out = d.decompress(data, min(piece, left))
            data = d.unconsumed_tail
            if not out:
                if d.eof:
                    return
                continue
            left -= len(out)
            yield out
        return
    raise AgentError("unsupported", "unknown codec id %d" % hdr.codec)


def _pieces_of(reader: Any, left: int, piece: int) -> Any:
    """``reader.read`` in pieces of at most ``piece`` bytes until ``left`` bytes or the end."""
    while left > 0:
        out = reader.read(min(piece, left))
        if not out:
            return
        left -= len(out)
        yield out


class _HashingReader:
    """Reads ``source`` and checksums what went by (the stored bytes, while they are decompressed)."""

    def __init__(self, source: Any, hasher: Any) -> None:
        self.source, self.hasher, self.count = source, hasher, 0

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        self.hasher.update(data)
        self.count += len(data)
        return data


class _BufferReader:
    """``read(n)`` over a buffer already in memory."""

    def __init__(self, buf: Any) -> None:
        self.view, self.pos = memoryview(buf), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n < 0 else min(len(self.view), self.pos + n)
        out = bytes(self.view[self.pos:end])
        self.pos = end
        return out


def verify_chunk(source: Any, size: int, expect_seq: int) -> ChunkHeader:
    """Check a chunk end to end without holding it: framing, the seq, and one pass over the payload
    that checksums both the stored bytes and their decompression. ``source`` is at the chunk's
    start, ``size`` its length; afterwards ``raw_pieces`` (from the payload again) yields the very
    bytes that were checked."""
    hdr = ChunkHeader.unpack(source.read(CHUNK_HEADER_SIZE))
    if hdr.seq != expect_seq:
        raise AgentError("chunk-corrupt", "chunk file holds seq %d, expected %d" % (hdr.seq, expect_seq))
    if size - CHUNK_HEADER_SIZE != hdr.stored_len:
        raise AgentError("chunk-corrupt", "chunk %d: payload is %d bytes, header says %d"
                         % (hdr.seq, size - CHUNK_HEADER_SIZE, hdr.stored_len))
    stored = _HashingReader(source, new_hasher(hdr.hash_alg))
    raw, n = new_hasher(hdr.hash_alg), 0
    try:
        for out in raw_pieces(hdr, stored):
            raw.update(out)
            n += len(out)
        while stored.read(1 << 20):  # what the decompressor left unread is part of the stored bytes
            pass
    except AgentError:
        raise
    except Exception as e:
        raise AgentError("chunk-corrupt", "chunk %d: decompression failed: %s" % (hdr.seq, e)) from e
    if stored.hasher.digest() != hdr.stored_hash:
        raise AgentError("chunk-corrupt", "chunk %d: stored bytes checksum mismatch" % hdr.seq)
    if n != hdr.raw_len or raw.digest() != hdr.raw_hash:
        raise AgentError("chunk-corrupt", "chunk %d: raw bytes checksum mismatch" % hdr.seq)
    return hdr


def verified_chunk(blob: bytes, expect_seq: int) -> ChunkHeader:
    """``verify_chunk`` over a chunk held in memory."""
    return verify_chunk(_BufferReader(blob), len(blob), expect_seq)


def decode_chunk(blob: bytes, expect_seq: int) -> bytes:
    """Verify a chunk end to end and return its raw bytes (those zfs send wrote)."""
    hdr = check_stored(blob)
    if hdr.seq != expect_seq:
        raise AgentError("chunk-corrupt", "chunk file holds seq %d, expected %d" % (hdr.seq, expect_seq))
    try:
        raw = decompress(hdr.codec, memoryview(blob)[CHUNK_HEADER_SIZE:], hdr.raw_len)  # no payload copy
    except AgentError:
        raise
    except Exception as e:
        raise AgentError("chunk-corrupt", "chunk %d: decompression failed: %s" % (hdr.seq, e)) from e
    if len(raw) != hdr.raw_len or digest(hdr.hash_alg, raw) != hdr.raw_hash:
        raise AgentError("chunk-corrupt", "chunk %d: raw bytes checksum mismatch" % hdr.seq)
    return raw


# --------------------------------------------------------------------------
# Framing (docs/protocol.md)
# --------------------------------------------------------------------------

FRAME_MAGIC = b"ZC"
FRAME_HEADER = struct.Struct(">2sBBII")  # magic, version, type, request id, payload length
FRAME_HELLO, FRAME_REQUEST, FRAME_REPLY, FRAME_ERROR, FRAME_DATA = 1, 2, 3, 4, 5
FRAME_TYPES = (FRAME_HELLO, FRAME_REQUEST, FRAME_REPLY, FRAME_ERROR, FRAME_DATA)
MAX_JSON_FRAME = 1024 * 1024
MAX_DATA_FRAME = 4 * 1024 * 1024
DATA_PIECE = 1024 * 1024
# A chunk going to a receiver is framed in quarters of a piece: the receiver reads a whole frame before
# writing it to its .part file, so this is the step in which the bytes on the target (progress) move.
PUT_FRAME = 256 * 1024


def frame_header(ftype: int, req_id: int, length: int) -> bytes:
    return FRAME_HEADER.pack(FRAME_MAGIC, PROTOCOL_VERSION, ftype, req_id, length)


def encode_frame(ftype: int, req_id: int, payload: bytes) -> bytes:
    return frame_header(ftype, req_id, len(payload)) + payload


def encode_message(ftype: int, req_id: int, msg: Dict[str, Any]) -> bytes:
    return encode_frame(ftype, req_id, json.dumps(msg, separators=(",", ":")).encode())


def parse_frame_header(hdr: bytes) -> Tuple[int, int, int]:
    """Validate a frame header and return (type, id, length); bounds checked before allocating."""
    magic, version, ftype, req_id, length = FRAME_HEADER.unpack(hdr)
    if magic != FRAME_MAGIC:
        raise AgentError("protocol", "bad frame magic %r" % magic)
    if version != PROTOCOL_VERSION:
        raise AgentError("protocol", "frame version %d, this side speaks %d" % (version, PROTOCOL_VERSION))
    if ftype not in FRAME_TYPES:
        raise AgentError("protocol", "unknown frame type %d" % ftype)
    limit = MAX_DATA_FRAME if ftype == FRAME_DATA else MAX_JSON_FRAME
    if length > limit:
        raise AgentError("protocol", "frame of %d bytes exceeds the %d-byte limit" % (length, limit))
    return ftype, req_id, length


def decode_message(payload: bytes) -> Dict[str, Any]:
    try:
        msg = json.loads(payload.decode("utf-8"))
    except Exception as e:
        raise AgentError("protocol", "frame payload is not JSON: %s" % e) from e
    if not isinstance(msg, dict):
        raise AgentError("protocol", "message is not a JSON object")
    return msg


def read_exact(f: BinaryIO, n: int) -> bytes:
    piece = f.read(n)  # a buffered reader returns all n at once, unless the peer closed
    if len(piece) == n:
        return piece  # the hot path: no copy (a 1 MiB data frame was copied twice here)
    buf = bytearray(piece)
    while len(buf) < n:
        piece = f.read(n - len(buf))
        if not piece:
            raise EOFError("peer closed the channel")
        buf += piece
    return bytes(buf)


def read_frame(f: BinaryIO) -> Tuple[int, int, bytes]:
    ftype, req_id, length = parse_frame_header(read_exact(f, FRAME_HEADER.size))
    return ftype, req_id, read_exact(f, length)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class AgentError(Exception):
    """An error with a code the coordinator maps back to its own error classes."""

    def __init__(self, code: str, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.code, self.reason, self.details = code, reason, details

    def to_dict(self) -> Dict[str, Any]:
        return {"code": self.code, "reason": self.reason, "details": self.details}


# --------------------------------------------------------------------------
# Files: atomic and non-following
# --------------------------------------------------------------------------

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
PIPE_SIZE = 1 << 20
#: (receive without ``-u``) the stream's last bytes, held back from zfs receive until its end: far more than
#: the END record (312 bytes) that makes zfs receive finish, and mount.
HELD_TAIL = 64 << 10
#: Seconds a receive waits for the host's mount lock before it ends without it (``ReceiverDaemon.ending``).
MOUNT_LOCK_WAIT = 120


def widen_pipe(fd: int) -> None:
    """1 MiB instead of 64 KiB in a pipe (Linux; best effort): a 1 MiB piece then crosses in one
    write and one read instead of sixteen of each, with as many fewer wake-ups of the other side."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
    except (ImportError, OSError, ValueError):
        pass


def open_nofollow(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that never follows a symlink and only ever opens a regular file.

    A symlink, FIFO, device or directory in the place of one of our files means
    someone else has been in the session directory: refused as ``session-dir``
    (O_NONBLOCK keeps a planted FIFO from blocking the open; regular files
    ignore it).
    """
    try:
        fd = os.open(path, flags | O_NOFOLLOW | O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise AgentError("session-dir", "%s is a symlink: refusing to follow it" % path) from None
        if e.errno == errno.ENXIO:
            raise AgentError("session-dir", "%s is not a regular file" % path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AgentError("session-dir", "%s is not a regular file" % path)
    return fd


def write_atomic(path: str, data: Any, durable: bool = True) -> None:
    """temp file (O_EXCL|O_NOFOLLOW) -> fsync -> rename -> fsync dir.

    ``data`` is bytes or a sequence of buffers (written in order, no joining copy).
    ``durable=False`` skips the fsyncs: for chunk files, which need to be atomic
    (never half a chunk under the final name) but not durable — a host crash
    kills the zfs pipe they belong to anyway, and every chunk is verified
    against its checksums before use.
    """
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW, 0o600)
    except FileExistsError:  # left by a dead process of the same pid, or planted: unlink, never follow
        os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in ([data] if isinstance(data, (bytes, bytearray, memoryview)) else data):
                f.write(part)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(os.path.dirname(path))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, obj: Dict[str, Any], durable: bool = True) -> None:
    write_atomic(path, json.dumps(obj, sort_keys=True).encode(), durable=durable)


def read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_JSON_FRAME + 1)
    if len(data) > MAX_JSON_FRAME:
        raise AgentError("state", "%s is larger than %d bytes" % (path, MAX_JSON_FRAME))
    return json.loads(data.decode())


def read_file_nofollow(path: str, limit: int) -> bytes:
    fd = open_nofollow(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise AgentError("chunk-corrupt", "%s is larger than %d bytes" % (path, limit))
        data = f.read(size)  # one allocation of the file's size, not of the limit
    return data


def check_private_dir(path: str, what: str) -> None:
    """A directory we own, not a symlink, not writable by group or others."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise AgentError("session-dir", "%s %s does not exist" % (what, path)) from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise AgentError("session-dir", "%s %s is not a directory (symlink or file in its place)"
                         % (what, path))
    if st.st_uid != os.geteuid():
        raise AgentError("session-dir", "%s %s is owned by uid %d, not by uid %d"
                         % (what, path, st.st_uid, os.geteuid()))
    if st.st_mode & 0o022:
        raise AgentError("session-dir", "%s %s is writable by group or others (mode %o)"
                         % (what, path, stat.S_IMODE(st.st_mode)))


# --------------------------------------------------------------------------
# Session directory and spool
# --------------------------------------------------------------------------


def chunk_name(seq: int) -> str:
    return "%020d" % seq


class Session:
    """One session directory on this host (see the module docstring for the layout)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        check_private_dir(self.path, "session directory")
        self.chunks = os.path.join(self.path, "chunks")
        check_private_dir(self.chunks, "chunks directory")
        cfg = read_json(os.path.join(self.path, "session.json"))
        if cfg is None:
            raise AgentError("session-dir", "%s has no session.json" % self.path)
        self.cfg = cfg
        self.role = cfg["role"]
        self.codec = CODEC_IDS[cfg["codec"]]
        self.level = cfg.get("level")
        self.hash_alg = HASH_IDS[cfg["checksum"]]
        self.chunk_size = int(cfg["chunk_size"])
        # Chunk n holds min(chunk_size, first_chunk * 2**n) raw bytes (absent: all chunk_size), so the
        # first bytes reach zfs receive after a small chunk, not after a whole chunk_size one.
        self.first_chunk = max(1, min(self.chunk_size, int(cfg.get("first_chunk", self.chunk_size))))
        # The stream's expected size (raw bytes; 0: unknown): the last chunks get smaller towards it.
        self.expected = max(0, int(cfg.get("expected_bytes") or 0))
        self.spool_max = int(cfg["spool_max"])
        self.idle_timeout = float(cfg.get("idle_timeout", 86400))
        self.state_path = os.path.join(self.path, "sender.json" if self.role == "send" else "receiver.json")
        # Fan-out (one zfs send for several targets): a sender directory per target ("member"), whose chunks
        # are hard links the group's daemon makes from its own directory, which names them (``fanout``).
        self.member_of = cfg.get("member_of")  # (member) the group's directory name, beside this one
        self.fanout = list(cfg.get("fanout") or [])  # (group) the members' directory names
        for name in self.fanout + ([self.member_of] if self.member_of else []):
            if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
                raise AgentError("bad-request", "bad fan-out directory name %r" % (name,))

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def sibling(self, name: str) -> str:
        """Another name under the same base: a fan-out group or member, the mount lock."""
        return os.path.join(os.path.dirname(self.path), name)

    def released_upto(self) -> int:
        """(Sender) chunks below this were fed to zfs receive and released from the spool (``released.json``)."""
        st = read_json(self.file("released.json")) or {}
        return int(st.get("upto", 0))

    def chunk_limit(self, seq: int, done: int = 0) -> int:
        """Raw bytes of chunk ``seq``, ``done`` raw bytes into the stream (the last chunk may be shorter).

        Up: 1, 2, 4, ... x ``first_chunk`` to ``chunk_size``, so zfs receive starts early. Down, when
        the stream's size is expected: at most half of what is expected to be left (at least
        4 x ``first_chunk``), so the chunk that is still on its way when zfs send ends is a small
        one. Past the expected size, an eighth of the bytes so far counts as "left".
        """
        limit = self.chunk_size if seq >= 63 else min(self.chunk_size, self.first_chunk << seq)
        if self.expected:
            left = self.expected - done if done < self.expected else done // 8
            limit = min(limit, max(4 * self.first_chunk, left // 2))
        return max(1, limit)

    def chunk_path(self, seq: int, suffix: str = ".chunk") -> str:
        return os.path.join(self.chunks, chunk_name(seq) + suffix)

    def oldest_chunk_age(self) -> float:
        """Seconds the oldest complete chunk in the spool has been there (0 when there is none)."""
        oldest = None
        with os.scandir(self.chunks) as it:
            for e in it:
                if e.name.endswith(".chunk"):
                    try:
                        mtime = e.stat(follow_symlinks=False).st_mtime
                    except FileNotFoundError:
                        continue
                    oldest = mtime if oldest is None else min(oldest, mtime)
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

    def spool_listing(self) -> Tuple[Dict[int, int], Dict[int, int], int]:
        """({seq: size} of complete chunks, {seq: size} of partial ones, total bytes on disk)."""
        done: Dict[int, int] = {}
        parts: Dict[int, int] = {}
        total = 0
        with os.scandir(self.chunks) as it:
            for e in it:
                name, _, suffix = e.name.partition(".")
                if not name.isdigit():
                    continue
                try:
                    size = e.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
                total += size
                if suffix == "chunk":
                    done[int(name)] = size
                elif suffix == "part":
                    parts[int(name)] = size
        return done, parts, total

    def state(self) -> Dict[str, Any]:
        st = read_json(self.state_path)
        if st is None:  # the daemon has not written its state (yet)
            if self.idle_for() < NEVER_STARTED_AFTER:
                return {"state": "starting"}
            # installed but never started: its coordinator died in between (or the daemon at once)
            return {"state": "dead", "reason": "its daemon never started"}
        pid = st.get("pid")
        owner = self.daemon_dir(st)
        if st.get("state") in ("starting", "running") and pid and not pid_is_ours(pid, owner):
            # It may have written its final state and exited between the read and the check (a daemon
            # always saves its end before it exits): only what the file says now, of a pid gone, is dead.
            st = read_json(self.state_path) or st
            now_pid = st.get("pid")
            if st.get("state") in ("starting", "running") and not (
                    now_pid and now_pid != pid and pid_is_ours(now_pid, owner)):
                st["state"] = "dead"
        return st

    def daemon_dir(self, st: Dict[str, Any]) -> str:
        """The directory whose daemon runs this session: its own, or (a fan-out member) its group's."""
        if self.member_of and st.get("daemon_dir") == self.sibling(self.member_of):
            return self.sibling(self.member_of)
        return self.path

    def touch_heartbeat(self) -> None:
        path = self.file("heartbeat")
        try:
            os.utime(path, None, follow_symlinks=False)
        except FileNotFoundError:
            os.close(open_nofollow(path, os.O_WRONLY | os.O_CREAT))

    def idle_for(self) -> float:
        try:
            return time.time() - os.lstat(self.file("heartbeat")).st_mtime
        except FileNotFoundError:
            return 0.0


#: A session directory whose daemon wrote no state and that had no coordinator contact for this long
#: is dead: a live coordinator starts the daemon right after install (and touches the heartbeat).
NEVER_STARTED_AFTER = 60.0
#: How long ``serve DIR wait`` waits for install to make DIR, and how often it looks.
INSTALL_WAIT = 60.0
INSTALL_POLL = 0.005
#: A sender's ``status`` with ``wait`` (seconds, at most this) answers once a new chunk is spooled (``until_spooled``),
#: looking every STATUS_WAIT_STEP seconds.
STATUS_WAIT_MAX = 1.0
STATUS_WAIT_STEP = 0.003


def pid_is_ours(pid: int, session_path: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return session_path.encode() in f.read()
    except OSError:
        return True  # no /proc: trust the pid


# --------------------------------------------------------------------------
# Daemons
# --------------------------------------------------------------------------

ALLOWED_SEND_FLAGS = {"-L", "-e", "-c", "-w", "-h", "-R"}  # zchunk.flags', and -R for an encrypted tree
ALLOWED_RECV_FLAGS = {"-F", "-u", "-s", "-v", "-e", "-d"}


def valid_zfs_name(name: str) -> bool:
    if not name or len(name) > 1024 or name.startswith("-"):
        return False
    for ch in name:
        if not (ch.isascii() and (ch.isalnum() or ch in "_-.:/@# ")):
            return False
    return True


def zfs_argv(cfg: Dict[str, Any]) -> List[str]:
    """The zfs command of this session, built from named fields and checked."""
    zfs = cfg.get("zfs", "zfs")
    if cfg["role"] == "send":
        send = cfg["send"]
        flags = [f for f in send.get("flags", [])]
        bad = [f for f in flags if f not in ALLOWED_SEND_FLAGS]
        names = [send["snapshot"]] + ([send["base"]] if send.get("base") else [])
        exclude = list(send.get("exclude") or [])
        if bad or not all(valid_zfs_name(n) for n in names + exclude) or (exclude and "-R" not in flags) \
                or any("," in n for n in exclude):
            raise AgentError("bad-request", "refusing zfs send arguments %r" % (flags + names + exclude))
        argv = [zfs, "send"] + flags + (["-X", ",".join(exclude)] if exclude else [])
        token = send.get("token")
        if token:  # resume a partial receive (OpenZFS resume tokens)
            if not all(c.isalnum() or c == "-" for c in token) or len(token) > 65536:
                raise AgentError("bad-request", "refusing a malformed resume token")
            return argv + ["-t", token]
        if send.get("base"):
            argv += ["-I" if send.get("intermediates", True) else "-i", send["base"]]
        return argv + [send["snapshot"]]
    recv = cfg["receive"]
    flags = list(recv.get("flags", []))
    bad = [f for f in flags if f not in ALLOWED_RECV_FLAGS]
    if bad or not valid_zfs_name(recv["target"]):
        raise AgentError("bad-request", "refusing zfs receive arguments %r" % (flags + [recv["target"]]))
    props: List[str] = []
    for name, value in sorted((recv.get("props") or {}).items()):
        if not valid_property_name(name) or any(c in str(value) for c in "\0\n") or len(str(value)) > 4096:
            raise AgentError("bad-request", "refusing receive property %r" % name)
        props += ["-o", "%s=%s" % (name, value)]
    for name in recv.get("excluded") or []:
        if not valid_property_name(name):
            raise AgentError("bad-request", "refusing receive -x %r" % name)
        props += ["-x", name]
    return [zfs, "receive"] + flags + props + [recv["target"]]


def valid_property_name(name: Any) -> bool:
    return isinstance(name, str) and 0 < len(name) <= 256 and not name.startswith("-") \
        and all(c.isascii() and (c.isalnum() or c in ":._-") for c in name)


RESERVE_BYTES = 256 * 1024
#: What one state write on a full filesystem gives up of the ballast (a state file is a few KiB): the rest
#: stays for the next, however fast other programs take the room each write leaves over.
RESERVE_SLICE = 64 * 1024
# A chunk this many seconds in the source spool is waiting for the link: compress harder (adaptive level).
SLOW_LINK_AGE = 2.0
#: Fan-out: how long the spool may be full while one target's chunks do not move before it is detached.
DETACH_AFTER = 300.0

#: Adaptive levels (no --compress level given): the range the sender moves in, one step per chunk.
ADAPT_LEVELS = {CODEC_ZSTD: (1, 9), CODEC_ZLIB: (1, 6)}
#: Compressing must stay this many times faster than the link takes the stream: zfs send, the checksums
#: and the transfer need CPU too.
ADAPT_HEADROOM = 2.0
#: Without a measurement at the next level, its speed is guessed as this share of the current one
#: (zstd 1 -> 9 goes from ~500 to ~60 MB/s on one core: about 0.77 per level).
ADAPT_STEP = 0.75


def cpu_seconds() -> float:
    """CPU this process and its waited-for children (zfs send) used: the sender's cost of a stream."""
    t = os.times()
    return round(t.user + t.system + t.children_user + t.children_system, 2)


class LevelAdapter:
    """The compression level per chunk, after ``zstd --adapt``: while the link keeps up (no chunk has waited
    ``SLOW_LINK_AGE`` in the spool) it steps down to the lowest, since harder compression only takes CPU
    that zfs and the transfer need. While chunks wait for the link, every byte saved is time saved: one
    level up per chunk as long as compressing at that level (measured, else guessed from this one) stays
    ``ADAPT_HEADROOM`` times ahead of the rate the link takes raw stream bytes, one down once it is not."""

    def __init__(self, codec: int) -> None:
        self.low, self.high = ADAPT_LEVELS.get(codec, (1, 1))
        self.level = self.low
        self.speed: Dict[int, float] = {}  # level -> raw bytes per second of encoding, smoothed

    def observe(self, level: int, raw_bytes: int, seconds: float) -> None:
        if raw_bytes >= (1 << 20) and seconds > 0:
            old, rate = self.speed.get(level), raw_bytes / seconds
            self.speed[level] = rate if old is None else (old + rate) / 2

    def next(self, waiting: bool, link_rate: Optional[float]) -> int:
        """``link_rate``: raw stream bytes per second the link has been taking, None while unknown."""
        if not waiting:
            self.level = max(self.low, self.level - 1)
            return self.level
        need = ADAPT_HEADROOM * link_rate if link_rate else 0.0
        here = self.speed.get(self.level)
        if need and here is not None and here < need:
            self.level = max(self.low, self.level - 1)
        elif self.level < self.high:
            up = self.speed.get(self.level + 1, here * ADAPT_STEP if here is not None else None)
            if not need or up is None or up >= need:
                self.level += 1
        return self.level


class Daemon:
    """Common life cycle: state file, idle timeout, termination.

    The state file must stay writable when the spool filesystem is full (that
    is when the coordinator most needs to read ``paused: "no-space"``, and a
    final ``done`` must never be lost): the daemon keeps ``reserve``, a small
    ballast file, and gives up a slice of it when a state write that matters
    fails for lack of space (see ``_save``).
    """

    def __init__(self, sess: Session) -> None:
        self.sess = sess
        self.proc: Optional[subprocess.Popen] = None
        self.st: Dict[str, Any] = {"pid": os.getpid(), "state": "running", "started": time.time(),
                                   "events": []}
        self.stopping = False
        self.shown: Optional[Tuple[Any, Any]] = None  # (state, paused) as the state file last said them
        self.lock = threading.RLock()  # the receiver saves state from two threads (see Feeder)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.make_reserve()

    def make_reserve(self) -> None:
        """Fill the ballast up again when there is room; random bytes, so no compression makes it free."""
        path = self.sess.file("reserve")
        try:
            if os.lstat(path).st_size >= RESERVE_BYTES:
                return
        except FileNotFoundError:
            pass
        try:
            write_atomic(path, os.urandom(RESERVE_BYTES), durable=False)
        except OSError as e:
            if e.errno not in NO_SPACE:
                raise

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True
        self.stop_zfs()
        self.save(state="aborted", reason="stopped by the coordinator")
        os._exit(0)

    def stop_zfs(self, grace: float = 20.0) -> None:
        """End our zfs process, so that it cleans up after itself before we are gone.

        ``zfs receive`` gets end-of-file and time to exit: it then discards the
        partial receive itself (or keeps it resumable, with -s) before it
        exits. Killed instead, on zfs-fuse the partial dataset outlives it until
        the daemon notices the closed pipe, and a stream restarted at once
        finds the target "existing" without snapshots. ``zfs send`` is killed.
        """
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if proc.stdin is not None:
            try:  # the raw fd: we may be in a signal handler, inside a write to this very pipe
                os.close(proc.stdin.fileno())
            except (OSError, ValueError):
                pass
            try:
                proc.wait(grace)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def save(self, **changes: Any) -> bool:
        """Write the state file; on a full filesystem give up the ballast and try again.

        Returns False when even that found no room: the state stays in memory
        and the next save writes it (``save_final`` waits for room instead).
        """
        with self.lock:
            return self._save(changes)

    def _save(self, changes: Dict[str, Any]) -> bool:
        self.st.update(changes)
        self.st["updated"] = time.time()
        # Worth the ballast: what the coordinator acts on (the state, a pause) when the file does not say it yet,
        # and the first state file. A progress count that finds no room waits for the next write.
        shown = (self.st.get("state"), self.st.get("paused"))
        for attempt in (1, 2):
            try:
                write_json(self.sess.state_path, self.st)
                self.shown = shown
                return True
            except OSError as e:
                if e.errno not in NO_SPACE:
                    raise
                if attempt == 1 and not (shown != self.shown and self.give_up_slice()):
                    break
        log("spool filesystem full: state not saved yet")
        return False

    def give_up_slice(self) -> bool:
        """Free one ``RESERVE_SLICE`` of the ballast (the last one removes it); False when none is left."""
        path = self.sess.file("reserve")
        try:
            fd = open_nofollow(path, os.O_WRONLY)
        except FileNotFoundError:
            return False
        try:
            size = os.fstat(fd).st_size
            if size > RESERVE_SLICE:
                os.ftruncate(fd, size - RESERVE_SLICE)
                return True
        finally:
            os.close(fd)
        os.unlink(path)
        return True

    def save_final(self, **changes: Any) -> None:
        """A terminal state is never lost to a full filesystem: wait for room."""
        while not self.save(**changes):
            self.check_idle()
            time.sleep(1.0)

    def event(self, kind: str, text: str) -> None:
        ev = {"t": time.time(), "kind": kind, "text": text}
        with self.lock:
            self.st["events"] = (self.st.get("events", []) + [ev])[-50:]
        log(text)

    def check_idle(self) -> None:
        if self.sess.idle_for() > self.sess.idle_timeout:
            self.stop_zfs()
            self.save(state="aborted", reason="no coordinator contact for %ds" % self.sess.idle_timeout)
            log("idle timeout: exiting")
            os._exit(3)

    def zfs_stderr(self) -> str:
        try:
            with os.fdopen(open_nofollow(self.sess.file("zfs.stderr"), os.O_RDONLY), "rb") as f:
                return f.read(65536).decode("utf-8", "replace").strip()
        except (OSError, AgentError):
            return ""

    def spawn(self, argv: List[str], **kw: Any) -> subprocess.Popen:
        err = open_nofollow(self.sess.file("zfs.stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            return subprocess.Popen(argv, stderr=err, close_fds=True, **kw)
        finally:
            os.close(err)


class SenderDaemon(Daemon):
    """Owns ``zfs send``: cuts its output into chunks, compresses, checksums, spools."""

    def __init__(self, sess: Session) -> None:
        super().__init__(sess)
        self.adapter = LevelAdapter(sess.codec)
        self.produced: Dict[int, int] = {}  # seq -> raw bytes, of chunks written and not yet seen released
        self._drain: Optional[Tuple[float, float]] = None  # (since when, smoothed raw bytes/s), while waiting
        self._released = 0  # raw bytes released since then
        # Fan-out: the members still fed (None: no fan-out, the chunks stay in this directory), and for each
        # the lowest chunk it holds and since when (a member that stays down is detached: ``wait_for_room``)
        self.members: Optional[List[Session]] = None
        self.lows: Dict[str, Tuple[Optional[int], float]] = {}
        if sess.fanout:
            self.members = []
            for name in sess.fanout:
                try:
                    member = Session(sess.sibling(name))
                except (AgentError, OSError):
                    continue  # removed already: its target's transfer ended
                if (read_json(member.state_path) or {}).get("state") != "aborted":  # not detached before
                    self.members.append(member)
            self.st["daemon_dir"] = sess.path

    def run(self) -> None:
        sess = self.sess
        argv = zfs_argv(sess.cfg)
        known = self.recorded()  # chunks an earlier daemon of this session cut: (raw_len, raw_hash)
        released = self.released_upto()
        self.save(argv=argv, chunks=0, raw_bytes=0, stored_bytes=0, eof=False, regenerated=0)
        if known:
            self.event("regenerating", "zfs send started again: the first %d chunks are checked against "
                       "the ones cut before and only those missing from the spool are written" % len(known))
            for name in os.listdir(sess.chunks):  # the dead daemon's half-written chunks (one daemon at a time)
                if name.endswith(".tmp"):
                    try:
                        os.unlink(os.path.join(sess.chunks, name))
                    except OSError:
                        pass
        self.proc = self.spawn(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        widen_pipe(self.proc.stdout.fileno())
        pieces = PieceReader(self.proc.stdout)
        pieces.start()
        stream = new_hasher(sess.hash_alg)
        seq, raw_total, stored_total = 0, 0, 0
        barely = False  # the last chunk shrank by under 2 %: the next one may be stored as it is
        record = os.fdopen(open_nofollow(sess.file("raw.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND), "a")
        while True:
            if seq < len(known):
                size = self.regenerate(seq, known[seq], pieces, stream, released)
                if size is None:
                    record.close()
                    return
                seq, raw_total, stored_total = seq + 1, raw_total + known[seq][0], stored_total + size
                self.save(chunks=seq, raw_bytes=raw_total, stored_bytes=stored_total, regenerated=seq)
                continue
            level = self.level()
            enc = ChunkEncoder(sess.codec, level, sess.hash_alg,
                               skip_incompressible=barely and self.stores_as_is(level))
            limit = sess.chunk_limit(seq, raw_total)
            busy = 0.0  # seconds spent checksumming and compressing this chunk (not waiting for zfs send)
            while enc.raw_len < limit:
                piece = pieces.next(limit - enc.raw_len)
                if not piece:
                    break
                started = time.monotonic()
                stream.update(piece)
                enc.update(piece)
                busy += time.monotonic() - started
            if enc.raw_len == 0:
                break
            started = time.monotonic()
            parts = enc.finish(seq)
            if sess.level is None and level is not None and enc.codec != CODEC_NONE:
                self.adapter.observe(level, enc.raw_len, busy + time.monotonic() - started)
            self.produced[seq] = enc.raw_len
            size = sum(len(p) for p in parts)
            barely = size - CHUNK_HEADER_SIZE > STORE_ABOVE * enc.raw_len
            self.wait_for_room(size)
            # recorded before the chunk is written: a daemon started again after a crash checks the chunk
            # against it, and writes it if the crash came before the chunk file
            record.write("%d %d %s\n" % (seq, enc.raw_len, enc.raw_hash.digest().hex()))
            record.flush()
            os.fsync(record.fileno())
            self.write_chunk(seq, parts)
            seq += 1
            raw_total += enc.raw_len
            stored_total += size
            if self.st.get("paused") == "no-space":
                self.event("spool-space", "spool filesystem has room again; zfs send continues")
                self.make_reserve()
            self.save(chunks=seq, raw_bytes=raw_total, stored_bytes=stored_total, paused=None)
        record.close()
        rc = self.proc.wait()
        if rc != 0:
            self.save_final(state="failed", zfs_exit=rc, zfs_stderr=self.zfs_stderr(),
                            reason="zfs send exited with status %d" % rc)
            return
        if seq < len(known):
            self.save_final(state="aborted", reason="zfs send started again ended after %d chunks; the first "
                            "run cut %d: the stream must start again" % (seq, len(known)))
            return
        self.save_final(state="done", eof=True, total_chunks=seq, raw_bytes=raw_total,
                  stream_hash=stream.hexdigest(), zfs_exit=0, zfs_stderr=self.zfs_stderr(), cpu=cpu_seconds())
        if self.members is not None:
            self.remove_if_alone()

    def recorded(self) -> List[Tuple[int, str]]:
        """(raw_len, raw_hash hex) of each chunk an earlier daemon of this session cut (``raw.log``), up to
        the first line a crash may have cut short."""
        try:
            text = read_file_nofollow(self.sess.file("raw.log"), 256 << 20).decode()
        except FileNotFoundError:
            return []
        out: List[Tuple[int, str]] = []
        for line in text.split("\n"):
            parts = line.split()
            if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) != len(out) or not parts[1].isdigit():
                break
            out.append((int(parts[1]), parts[2]))
        return out

    def regenerate(self, seq: int, known: Tuple[int, str], pieces: "PieceReader", stream: Any,
                   released: Dict[str, int]) -> Optional[int]:
        """Chunk ``seq`` of a ``zfs send`` started again: its raw bytes must be the ones cut before (their
        checksum); it is written only if it is neither in the spool nor released. Its stored size, or None
        when the stream differs (the daemon is then aborted: the coordinator starts the stream anew)."""
        raw_len, want = known
        write = self.needs(seq, released)
        enc = ChunkEncoder(self.sess.codec, self.sess.level, self.sess.hash_alg) if write else None
        check, got = new_hasher(self.sess.hash_alg), 0
        while got < raw_len:
            piece = pieces.next(raw_len - got)
            if not piece:
                break
            stream.update(piece)
            check.update(piece)
            if enc is not None:
                enc.update(piece)
            got += len(piece)
        if got != raw_len or check.digest().hex() != want:
            self.stop_zfs(grace=5.0)
            self.save_final(state="aborted", reason="zfs send started again gave other bytes at chunk %d than "
                            "the first run: the stream must start again" % seq)
            return None
        if enc is None:
            for where in [self.sess] + (self.members or []):
                try:
                    return os.stat(where.chunk_path(seq)).st_size
                except OSError:
                    continue
            return 0
        parts = enc.finish(seq)
        size = sum(len(p) for p in parts)
        self.wait_for_room(size)
        self.write_chunk(seq, parts, regenerated=True)
        self.event("regenerated", "chunk %d was missing from the spool: written again" % seq)
        return size

    def level(self) -> Optional[int]:
        """The compression level of the next chunk: the session's, if it set one; else ``LevelAdapter``'s,
        from whether chunks wait for the link and how fast it takes them."""
        if self.sess.level is not None or self.sess.codec == CODEC_NONE:
            return self.sess.level
        waiting = max([m.oldest_chunk_age() for m in self.spools()] or [0.0]) > SLOW_LINK_AGE
        if not waiting:
            self._drain = None  # the link's rate is measured only while it is what chunks wait for
        return self.adapter.next(waiting, self.link_rate() if waiting else None)

    def link_rate(self) -> Optional[float]:
        """Raw stream bytes per second leaving the spool (chunks the coordinator released) since chunks
        began to wait, smoothed; None until two looks at least half a second apart."""
        done, _used = self.listing()
        self._released += sum(self.produced.pop(s) for s in [s for s in self.produced if s not in done])
        now = time.monotonic()
        if self._drain is None:
            self._drain, self._released = (now, -1.0), 0
            return None
        when, rate = self._drain
        if now - when < 0.5:
            return rate if rate >= 0 else None
        sample, self._released = self._released / (now - when), 0
        rate = sample if rate < 0 else (rate + sample) / 2
        self._drain = (now, rate)
        return rate

    def stores_as_is(self, level: Optional[int]) -> bool:
        """Whether a chunk that barely compresses (``looks_incompressible``) is stored as it is: that saves
        CPU and costs under 2 % of its wire bytes, worth it while the link keeps up (adaptive level 1), not
        once chunks wait for it and every byte counts. A level the user fixed keeps it on."""
        return self.sess.level is not None or level == 1

    def wait_for_room(self, need: int) -> None:
        """Backpressure: while the spool is full we stop reading zfs send (it blocks, never fails)."""
        since = time.monotonic()
        while True:
            done, used = self.listing()
            if not done or used + need <= self.sess.spool_max:
                return
            if self.st.get("paused") != "spool-full":
                self.save(paused="spool-full")
            self.check_idle()
            if self.members:
                self.detach_laggards(time.monotonic() - since)
            time.sleep(0.2)

    # -- fan-out: one stream, a chunk directory per target ---------------------------------------------

    def spools(self) -> List[Session]:
        """The directories whose chunks wait for a target: this one, or the fan-out's members."""
        return [self.sess] if self.members is None else list(self.members)

    def listing(self) -> Tuple[Dict[int, int], int]:
        """({seq: size} of the chunks some target still needs, their bytes): with fan-out, each chunk once
        however many members hold a link to it."""
        union: Dict[int, int] = {}
        for where in self.spools():
            try:
                done, _parts, _used = where.spool_listing()
            except FileNotFoundError:  # a member's directory removed as its transfer ended
                continue
            union.update(done)
        return union, sum(union.values())

    def released_upto(self) -> Dict[str, int]:
        return {m.path: m.released_upto() for m in self.spools()}

    def needs(self, seq: int, released: Dict[str, int]) -> bool:
        """Whether chunk ``seq`` of a restarted stream must be written: some target neither has it in its
        directory nor released it."""
        return any(seq >= released.get(m.path, 0) and not os.path.isfile(m.chunk_path(seq)) for m in self.spools())

    def drop(self, member: Session, reason: Optional[str]) -> None:
        """Feed ``member`` no more: its directory is gone (its transfer ended), or (``reason``) it fell behind
        the others while they wait for spool room; its chunks go, its state says why."""
        if self.members is None or member not in self.members:
            return
        self.members.remove(member)
        if reason is None:
            return
        self.event("detached", "%s: %s" % (os.path.basename(member.path), reason))
        try:
            done, _parts, _used = member.spool_listing()
            for seq in done:
                try:
                    os.unlink(member.chunk_path(seq))
                except FileNotFoundError:
                    pass
            write_json(member.state_path, dict(self.st, state="aborted", reason=reason, detached=True,
                                               daemon_dir=self.sess.path))
        except OSError:
            pass

    def detach_laggards(self, waited: float) -> None:
        """With fan-out, a target that stays down holds the others back only once the spool is full: after
        ``detach_after`` seconds of that, the members whose oldest chunk has not moved for as long, while
        another member is further on, are detached (their next run continues from their own snapshot)."""
        after = float(self.sess.cfg.get("detach_after", DETACH_AFTER))
        now = time.monotonic()
        lows: Dict[str, Optional[int]] = {}
        for m in list(self.members or []):
            try:
                done, _parts, _used = m.spool_listing()
            except FileNotFoundError:
                self.drop(m, None)
                continue
            low = min(done) if done else None
            lows[m.path] = low
            if self.lows.get(m.path, (None, 0.0))[0] != low or m.path not in self.lows:
                self.lows[m.path] = (low, now)
        if waited < after or len(lows) < 2:
            return
        held = [low for low in lows.values() if low is not None]
        if not held:
            return
        lowest = min(held)
        if all(low == lowest for low in lows.values()):
            return  # nobody is further on: it is the link or the sender, not one target
        for m in list(self.members or []):
            low, since = self.lows.get(m.path, (None, now))
            if lows.get(m.path) == lowest and now - since >= after:
                self.drop(m, "it fell behind: its chunks waited %ds in a full source spool while the other "
                          "targets took theirs" % after)

    def remove_if_alone(self) -> None:
        """The group's directory goes once no member is left (the last member's removal does it too)."""
        if self.members is not None and not any(os.path.isdir(m.path) for m in self.members):
            try:
                remove_session_dir(self.sess.path)
            except (OSError, AgentError):
                pass

    def save(self, **changes: Any) -> bool:
        """The state file, and with fan-out each member's copy (what its target's coordinator reads): atomic,
        not fsynced (after a host crash this daemon is gone, and the one started again writes them anew)."""
        ok = super().save(**changes)
        for m in list(self.members or []):
            try:
                with self.lock:
                    write_json(m.state_path, dict(self.st), durable=False)
            except FileNotFoundError:
                self.drop(m, None)
            except OSError as e:
                if e.errno not in NO_SPACE:
                    raise
                ok = False
        return ok

    def check_idle(self) -> None:
        if self.members is not None and not self.members:
            self.stop_zfs()
            super().save(state="aborted", reason="every target of this fan-out left")
            log("no fan-out member left: exiting")
            self.remove_if_alone()
            os._exit(0)
        if self.members is not None:  # idle when no member's coordinator called for so long
            if min(m.idle_for() for m in self.members) > self.sess.idle_timeout:
                self.stop_zfs()
                self.save(state="aborted", reason="no coordinator contact for %ds" % self.sess.idle_timeout)
                log("idle timeout: exiting")
                os._exit(3)
            return
        super().check_idle()

    def write_chunk(self, seq: int, blob: Any, regenerated: bool = False) -> None:
        """Atomically; a full spool filesystem pauses (with a warning) instead of failing. With fan-out it is
        then hard-linked into each member's directory (each target releases its own link) and unlinked here."""
        path = self.sess.chunk_path(seq)
        self._write_file(path, seq, blob)
        if self.members is None:
            return
        released = self.released_upto() if regenerated else {}
        for m in list(self.members):
            if regenerated and (seq < released.get(m.path, 0) or os.path.isfile(m.chunk_path(seq))):
                continue
            try:
                os.link(path, m.chunk_path(seq))
            except FileExistsError:
                pass
            except FileNotFoundError:
                self.drop(m, None)
        os.unlink(path)
        if not self.members:
            self.check_idle()

    def _write_file(self, path: str, seq: int, blob: Any) -> None:
        warned = False
        while True:
            try:
                write_atomic(path, blob, durable=False)
                return
            except OSError as e:
                if e.errno not in NO_SPACE:
                    raise
                if not warned:
                    self.event("spool-no-space", "spool filesystem full writing chunk %d; pausing" % seq)
                    self.save(paused="no-space")
                    warned = True
                self.check_idle()
                time.sleep(1.0)


class PieceReader:
    """Reads ``zfs send``'s output ahead of the compressor, in pieces, on a thread.

    Reading (a syscall) and compressing (zstd/zlib release the GIL) overlap;
    the queue bounds what is read ahead (``depth`` x ``piece`` bytes).
    """

    def __init__(self, f: Any, piece: int = 1 << 20, depth: int = 8) -> None:
        import queue

        self.f, self.piece = f, piece
        self.q: Any = queue.Queue(maxsize=depth)
        self.pending = b""
        self.thread = threading.Thread(target=self._run, name="zfs-send-reader", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                data = self.f.read(self.piece)
                self.q.put(data)
                if not data:
                    return
        except BaseException as e:  # handed to the consumer
            self.q.put(e)

    def next(self, limit: int) -> bytes:
        """Up to ``limit`` bytes; b"" at the end of the stream."""
        if not self.pending:
            item = self.q.get()
            if isinstance(item, BaseException):
                raise item
            if not item:
                self.q.put(b"")  # stay at EOF for later calls
                return b""
            self.pending = item
        piece, self.pending = self.pending[:limit], self.pending[limit:]
        return piece


def read_up_to(f: Any, n: int) -> bytes:
    """Read n bytes unless EOF comes first; large reads, one buffer."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not k:
            break
        got += k
    del view
    if got < n:
        del buf[got:]
    return bytes(buf)


class ReceiverDaemon(Daemon):
    """Verifies each chunk and feeds ``zfs receive`` strictly in order.

    Two threads: this one verifies chunk n+1 (from its file, both checksums,
    one decompression pass) while a ``Feeder`` decompresses chunk n again and
    writes it to ``zfs receive``, so zfs never waits for a verification. A
    chunk is handed over only once verified, one at a time (memory: a few
    1 MiB pieces, never a whole chunk).
    """

    def run(self) -> None:
        sess = self.sess
        argv = zfs_argv(sess.cfg)
        # Without -u (zfs-fuse) zfs receive mounts what it received as it ends, and zfs-fuse can lose a
        # mount made at the same moment as another (docs/reliability.md): the stream's end is held back
        # (``Feeder.held``) and fed under the host's mount lock (``ending``).
        self.guarded = "-u" not in sess.cfg["receive"].get("flags", [])
        self.save(argv=argv, next_seq=0, raw_bytes=0)
        self.proc = self.spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        assert self.proc.stdin is not None
        widen_pipe(self.proc.stdin.fileno())
        feeder = Feeder(self)
        feeder.start()
        seq = 0
        end: Optional[Dict[str, Any]] = None
        while not feeder.failed:
            end = read_json(sess.file("end.json"))
            if end is not None and seq >= int(end["total_chunks"]):
                break
            path = sess.chunk_path(seq)
            try:
                f = os.fdopen(open_nofollow(path, os.O_RDONLY), "rb")
            except FileNotFoundError:
                self.check_idle()
                # zfs receive exits 0 as soon as it has read the stream's END record, which can
                # be before the coordinator's finish (end.json) arrives: only a failure is final.
                if self.proc.poll() not in (None, 0):
                    feeder.stop()
                    return self.finish_failed(feeder.stream, feeder.seq, feeder.raw_total,
                                              "zfs receive exited early")
                time.sleep(0.02)
                continue
            try:
                hdr = verify_chunk(f, os.fstat(f.fileno()).st_size, seq)
            except AgentError as e:
                f.close()
                self.discard(path, seq, e.reason)
                continue
            if not feeder.put((seq, path, f, hdr)):
                f.close()
                break
            seq += 1
        feeder.stop()
        if feeder.failed:
            return self.finish_failed(feeder.stream, feeder.seq, feeder.raw_total,
                                      "zfs receive closed its input")
        self.finish(feeder, end or {})

    def discard(self, path: str, seq: int, why: str) -> None:
        """A bad chunk never reaches zfs receive: drop it so the coordinator moves it again."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.event("chunk-discarded", "chunk %d discarded: %s" % (seq, why))
        self.save(discarded=int(self.st.get("discarded", 0)) + 1)

    def finish(self, feeder: "Feeder", end: Dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        with self.ending() as span:
            try:
                feeder.write(feeder.held)  # the stream's END record, after which zfs receive mounts
                self.proc.stdin.close()
            except OSError:
                pass
            rc = self.proc.wait()
        got = feeder.stream.hexdigest()
        fields = dict(next_seq=feeder.seq, raw_bytes=feeder.raw_total, stream_hash=got, zfs_exit=rc,
                      zfs_stderr=self.zfs_stderr(), **span)
        if got != end.get("stream_hash") or feeder.raw_total != end.get("raw_bytes"):
            self.save_final(state="failed", code="stream-checksum",
                            reason="whole-stream checksum mismatch: received %s (%d bytes), sender had %s (%s bytes)"
                            % (got, feeder.raw_total, end.get("stream_hash"), end.get("raw_bytes")), **fields)
        elif rc != 0:
            self.save_final(state="failed", reason="zfs receive exited with status %d" % rc, **fields)
        else:
            self.save_final(state="done", **fields)

    @contextlib.contextmanager
    def ending(self) -> Any:
        """The end of zfs receive, from the stream's last bytes to its exit, one receive at a time on this
        host when it mounts (no ``-u``): an exclusive flock on ``.mount.lock`` under the spool base, which
        every receiving agent of every coordinator shares. Yields the fields that record it (the span, in
        wall-clock seconds, and the wait before it). A lock not had in ``MOUNT_LOCK_WAIT`` seconds (a
        receive hung in its mount holds it) is gone without, and said in the log."""
        if not self.guarded:
            yield {}
            return
        import fcntl

        asked = time.time()
        fd = open_nofollow(self.sess.sibling(MOUNT_LOCK), os.O_RDWR | os.O_CREAT)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.time() - asked > MOUNT_LOCK_WAIT:
                        log("the mount lock was not free for %ds: ending zfs receive without it"
                            % MOUNT_LOCK_WAIT)
                        break
                    time.sleep(0.005)
            span: Dict[str, Any] = {}
            start = time.time()
            yield span
            span.update(mount_lock_wait=round(start - asked, 6), mount_end=[start, time.time()])
        finally:
            os.close(fd)  # and with it the lock

    def finish_failed(self, stream: Any, seq: int, raw_total: int, why: str) -> None:
        assert self.proc is not None
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        rc = self.proc.wait()
        self.save_final(state="failed", reason="%s (status %d)" % (why, rc), next_seq=seq,
                        raw_bytes=raw_total, zfs_exit=rc, zfs_stderr=self.zfs_stderr())


class Feeder:
    """The receiver's second thread: writes verified chunks to ``zfs receive``, in order.

    After each chunk: progress first, then the file is unlinked (a status
    between the two must never show the chunk as neither held nor consumed,
    or the coordinator would move it again).
    """

    def __init__(self, daemon: "ReceiverDaemon") -> None:
        import queue

        self.daemon = daemon
        self.q: Any = queue.Queue(maxsize=1)
        self.stream = new_hasher(daemon.sess.hash_alg)
        self.seq, self.raw_total = 0, 0
        self.stored_total = 0  # chunk file bytes fed (what crossed the link for them)
        # The stream's last bytes seen so far, held back from zfs receive while it mounts as it ends
        # (``ReceiverDaemon.ending``): whatever chunk is the last, its END record is in them.
        self.tail = HELD_TAIL if daemon.guarded else 0
        self.held = b""
        self.failed = False
        self.thread = threading.Thread(target=self._run, name="zfs-receive-feeder", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def put(self, item: Any) -> bool:
        """Hand over a verified chunk (waits while one is still queued); False once the feeder failed."""
        import queue

        while not self.failed and self.thread.is_alive():
            try:
                self.q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def stop(self) -> None:
        """Let the feeder write what it holds, then end it."""
        self.put(None)
        self.thread.join()

    def hold_back(self, piece: bytes) -> List[Any]:
        """What of ``piece`` may go to zfs receive now: all but the stream's last ``tail`` bytes so far."""
        if not self.tail:
            return [piece]
        if len(piece) >= self.tail:
            out = [self.held, memoryview(piece)[:-self.tail]]
            self.held = piece[-self.tail:]
            return out
        joined = self.held + piece
        self.held = joined[-self.tail:]
        return [joined[:-self.tail]]

    def write(self, *pieces: Any) -> None:
        """Into zfs receive, and into the stream's checksum."""
        assert self.daemon.proc is not None and self.daemon.proc.stdin is not None
        for piece in pieces:
            if piece:
                self.stream.update(piece)
                self.daemon.proc.stdin.write(piece)

    def _run(self) -> None:
        d = self.daemon
        assert d.proc is not None and d.proc.stdin is not None
        try:
            while True:
                item = self.q.get()
                if item is None:
                    return
                seq, path, f, hdr = item
                with f:
                    size = os.fstat(f.fileno()).st_size
                    f.seek(CHUNK_HEADER_SIZE)
                    for piece in raw_pieces(hdr, f):
                        self.write(*self.hold_back(piece))
                    d.proc.stdin.flush()
                self.seq, self.raw_total, self.stored_total = seq + 1, self.raw_total + hdr.raw_len, \
                    self.stored_total + size
                d.save(next_seq=self.seq, raw_bytes=self.raw_total, stored_fed=self.stored_total)
                os.unlink(path)
                d.make_reserve()
        except (OSError, ValueError):  # zfs receive closed its input (or the daemon is stopping)
            self.failed = True
        except BaseException as e:
            log("feeder crashed: %r" % (e,))
            self.failed = True


def log(text: str) -> None:
    """A line in daemon.log; best effort: a full spool filesystem must not crash the daemon by its log."""
    try:
        sys.stderr.write("%s zchunk-agent[%d]: %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                        os.getpid(), text))
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


# --------------------------------------------------------------------------
# Protocol server: one per coordinator channel
# --------------------------------------------------------------------------


#: What a coordinator may ask of an agent of each role: the ``Server`` method of each name answers it.
#: Anything else is refused (``bad-request``); the coordinator's clients (zchunk/client.py) mirror this.
OPS = {
    "send": ("status", "get_chunk", "release", "cleanup", "abort"),
    "receive": ("status", "put_chunk", "finish", "cleanup", "abort"),
}
#: What a coordinator may ask of a ``serve`` process of either role about the channel itself: ``attach``
#: (``Server.attach``) binds it to another session. ``HostAgent.serve`` makes it; never in process.
CHANNEL_OPS = ("attach",)


class Server:
    """Answers the coordinator on stdin/stdout; all state lives in the session directory."""

    def __init__(self, sess: Session, rfile: BinaryIO, wfile: BinaryIO) -> None:
        self.sess, self.rfile, self.wfile = sess, rfile, wfile
        self.handlers: Dict[str, Callable[[int, Dict[str, Any]], Optional[Dict[str, Any]]]] = {
            op: getattr(self, op) for op in OPS.get(sess.role, ())}

    def send(self, ftype: int, req_id: int, msg: Dict[str, Any]) -> None:
        self.wfile.write(encode_message(ftype, req_id, msg))
        self.wfile.flush()

    def serve(self) -> None:
        self.send(FRAME_HELLO, 0, {"protocol": PROTOCOL_VERSION, "agent_version": AGENT_VERSION,
                                   "capabilities": capabilities(), "role": self.sess.role,
                                   "session": self.sess.cfg.get("id"), "host": socket.gethostname()})
        try:
            ftype, _, payload = read_frame(self.rfile)
        except EOFError:  # the coordinator went away before its hello: nothing to answer
            return
        if ftype != FRAME_HELLO:
            raise AgentError("protocol", "expected the coordinator's hello first")
        hello = decode_message(payload)
        if hello.get("protocol") != PROTOCOL_VERSION:
            raise AgentError("protocol", "coordinator speaks protocol %r, agent %d"
                             % (hello.get("protocol"), PROTOCOL_VERSION))
        while True:
            try:
                ftype, req_id, payload = read_frame(self.rfile)
            except EOFError:
                return
            if ftype != FRAME_REQUEST:
                raise AgentError("protocol", "unexpected frame type %d outside a request" % ftype)
            msg = decode_message(payload)
            try:
                out = self.attach(msg) if msg.get("op") == "attach" else self.answer(req_id, msg)
            except EOFError:  # the channel closed in the middle of a request (e.g. put_chunk's data)
                return
            if out is not None:
                self.send(out[0], req_id, out[1])
            if msg.get("op") == "abort" or (msg.get("op") == "cleanup" and not msg.get("stay")):
                return

    def attach(self, msg: Dict[str, Any]) -> Optional[Tuple[int, Dict[str, Any]]]:
        """``attach``: from now on this server answers for the session directory ``dir`` (``Session``'s
        checks, as ``serve DIR``'s): a run's next stream on this host takes a channel its last one used,
        with no process to start. With ``wait``, first wait for install to make ``dir`` (as ``serve DIR
        wait``). The new session's role and id, and the capabilities, as a hello says them."""
        try:
            path = str(msg["dir"])
            if msg.get("wait") and not wait_for_install(path, self.rfile.fileno()):
                raise EOFError
            sess = Session(path)
            sess.touch_heartbeat()
        except AgentError as e:
            return FRAME_ERROR, e.to_dict()
        except OSError as e:
            return FRAME_ERROR, AgentError("os-error", "attach %s: %s" % (msg.get("dir"), e), errno=e.errno).to_dict()
        except (KeyError, ValueError, TypeError) as e:
            return FRAME_ERROR, AgentError("bad-request", "malformed attach request: %s: %s"
                                           % (type(e).__name__, e)).to_dict()
        self.sess = sess
        self.handlers = {op: getattr(self, op) for op in OPS.get(sess.role, ())}
        return FRAME_REPLY, {"role": sess.role, "session": sess.cfg.get("id"), "capabilities": capabilities()}

    def answer(self, req_id: int, msg: Dict[str, Any]) -> Optional[Tuple[int, Dict[str, Any]]]:
        """One request: the frame to answer with (REPLY or ERROR and its payload), or None when the
        handler has sent its reply itself (get_chunk). The coordinator also calls this in its own
        process for a session on its machine (``InProcessChannel``): no server process for status."""
        self.sess.touch_heartbeat()
        handler = self.handlers.get(str(msg.get("op")))
        try:
            if handler is None:
                raise AgentError("bad-request", "operation %r is not allowed for a %s agent"
                                 % (msg.get("op"), self.sess.role))
            reply = handler(req_id, msg)
            return None if reply is None else (FRAME_REPLY, reply)
        except AgentError as e:
            return FRAME_ERROR, e.to_dict()
        except OSError as e:  # e.g. end.json on a full spool: an answer, not a dead channel
            if e.errno not in NO_SPACE:
                raise
            return FRAME_ERROR, AgentError(
                "spool-no-space", "%s spool filesystem is full" % ("source" if self.sess.role == "send"
                                                                   else "target")).to_dict()
        except (KeyError, ValueError, TypeError) as e:  # a malformed request, not a broken agent
            return FRAME_ERROR, AgentError(
                "bad-request", "malformed %r request: %s: %s" % (msg.get("op"), type(e).__name__, e)).to_dict()

    # -- common -------------------------------------------------------------

    def status(self, req_id: int, msg: Dict[str, Any]) -> Dict[str, Any]:
        wait = min(float(msg.get("wait") or 0), STATUS_WAIT_MAX)
        if wait > 0 and self.sess.role == "send":
            self.until_spooled(int(msg.get("known") or 0), wait)
        # The state file and the spool as of one moment: a chunk fed while the spool is listed would be
        # counted twice or not at all (the receiver saves its progress, then deletes the chunk).
        # A chunk renamed from .part to .chunk while the directory is read may be listed under neither name
        # (readdir and a concurrent rename): two listings must agree on the names too.
        st = self.sess.state()
        done, parts, used = self.sess.spool_listing()
        for _ in range(3):
            again = self.sess.state()
            done2, parts2, used2 = self.sess.spool_listing()
            if again.get("next_seq") == st.get("next_seq") and set(done2) == set(done) and set(parts2) == set(parts):
                break
            st, done, parts, used = again, done2, parts2, used2
        return {"role": self.sess.role, "daemon": st, "chunks": sorted(done),
                "parts": {str(k): v for k, v in parts.items()}, "spool_bytes": used,
                "spool_max": self.sess.spool_max}

    def until_spooled(self, known: int, wait: float) -> None:
        """(Sender) Until the daemon has spooled more than ``known`` chunks, or has ended, paused or stopped, or
        ``wait`` seconds have passed. The coordinator asks so when its link has nothing to move: a chunk is
        moved once a status has shown it, and a link faster than the source would otherwise wait for the
        next poll, not for the source. The state file is read again only when its mtime changed."""
        deadline = time.monotonic() + wait
        seen: Optional[int] = None
        while True:
            over, seen = self.spooled_past(known, seen)
            if over or time.monotonic() >= deadline:
                return
            time.sleep(STATUS_WAIT_STEP)

    def spooled_past(self, known: int, seen: Optional[int]) -> Tuple[bool, Optional[int]]:
        """One look for ``until_spooled``: whether its wait is over, and the state file's mtime looked at
        (``seen``: the one looked at before; the file is read only when it changed)."""
        try:
            mtime = os.stat(self.sess.state_path).st_mtime_ns
        except OSError:
            return True, None
        if mtime == seen:
            return False, seen
        st = self.sess.state()
        return (int(st.get("chunks") or 0) > known or bool(st.get("eof")) or bool(st.get("paused"))
                or st.get("state") != "running"), mtime

    def stop_daemon(self) -> None:
        if self.sess.member_of:
            return  # a fan-out member: the group's daemon feeds other targets too; it notices the member gone
        st = self.sess.state()
        pid = st.get("pid")
        if pid and pid_is_ours(pid, self.sess.path):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            for _ in range(600):  # up to 30 s: the daemon lets zfs receive clean up first (stop_zfs)
                if not pid_is_ours(pid, self.sess.path):
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)

    def cleanup(self, req_id: int, msg: Dict[str, Any]) -> Dict[str, Any]:
        self.stop_daemon()
        if not msg.get("keep"):
            remove_session_dir(self.sess.path)
            if self.sess.member_of:
                remove_group_if_done(self.sess.sibling(self.sess.member_of))
        # ``stay``: the server answers on, for the session a later ``attach`` names (the caller keeps the
        # channel for the run's next stream on this host); else it exits after this reply
        return {"removed": not msg.get("keep"), **({"stays": True} if msg.get("stay") else {})}

    def abort(self, req_id: int, msg: Dict[str, Any]) -> Dict[str, Any]:
        return self.cleanup(req_id, msg)

    # -- sender -------------------------------------------------------------

    def get_chunk(self, req_id: int, msg: Dict[str, Any]) -> None:
        seq, offset = int(msg["seq"]), int(msg.get("offset", 0))
        try:
            fd = open_nofollow(self.sess.chunk_path(seq), os.O_RDONLY)
        except FileNotFoundError:
            raise AgentError("no-chunk", "chunk %d is not in the source spool" % seq) from None
        with os.fdopen(fd, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            if offset > total:
                raise AgentError("bad-request", "offset %d beyond chunk %d's %d bytes" % (offset, seq, total))
            f.seek(offset)
            self.send(FRAME_REPLY, req_id, {"seq": seq, "offset": offset, "length": total - offset,
                                            "total": total})
            while True:
                piece = f.read(DATA_PIECE)
                if not piece:
                    break
                # Header and piece written apart: a buffered writer passes a piece larger than its
                # buffer straight to the pipe, where header + piece would first copy the piece.
                self.wfile.write(frame_header(FRAME_DATA, req_id, len(piece)))
                self.wfile.write(piece)
            self.wfile.flush()
        return None

    def release(self, req_id: int, msg: Dict[str, Any]) -> Dict[str, Any]:
        """Delete chunks below ``upto``: the receiver has fed them to zfs receive."""
        upto = int(msg["upto"])
        done, _parts, _used = self.sess.spool_listing()
        freed = 0
        for seq in done:
            if seq < upto:
                try:
                    os.unlink(self.sess.chunk_path(seq))
                    freed += 1
                except FileNotFoundError:
                    pass
        # After the deletions, which make room for it. A restarted sender skips the chunks below it; without
        # it (a spool filesystem still full) it only writes those chunks again, to be released again.
        if upto > self.sess.released_upto():
            try:
                write_json(self.sess.file("released.json"), {"upto": upto})
            except OSError as e:
                if e.errno not in NO_SPACE:
                    raise
        return {"released": freed}

    # -- receiver -----------------------------------------------------------

    def put_chunk(self, req_id: int, msg: Dict[str, Any]) -> Dict[str, Any]:
        seq, offset, length, total = (int(msg[k]) for k in ("seq", "offset", "length", "total"))
        limit = MAX_CHUNK_RAW + 65536 + CHUNK_HEADER_SIZE
        if total > limit or offset + length > total or offset < 0 or length < 0:
            raise AgentError("bad-request", "chunk %d: bad sizes offset=%d length=%d total=%d"
                             % (seq, offset, length, total))
        part = self.sess.chunk_path(seq, ".part")
        error: Optional[AgentError] = None
        fd = -1
        try:
            fd = self.open_part(part, seq, offset)
        except AgentError as e:
            error = e
        except OSError as e:
            if e.errno not in NO_SPACE:
                raise
            error = AgentError("spool-no-space", "target spool filesystem is full")
        check = StoredCheck() if offset == 0 else None  # a resumed part is read back instead
        try:
            got = 0
            while got < length:  # always drain the data frames, even when refusing
                ftype, rid, payload = read_frame(self.rfile)
                if ftype != FRAME_DATA or rid != req_id:
                    raise AgentError("protocol", "expected data for request %d" % req_id)
                got += len(payload)
                if got > length:
                    raise AgentError("protocol", "more data than announced for chunk %d" % seq)
                if error is None:
                    if check is not None:
                        check.update(payload)
                    try:
                        write_all(fd, payload)  # unbuffered: nothing left to fail at close
                    except OSError as e:
                        if e.errno not in NO_SPACE:
                            raise
                        error = AgentError("spool-no-space", "target spool filesystem is full")
        finally:
            if fd >= 0:
                os.close(fd)  # no fsync: see write_atomic(durable=False)
        if error is not None:
            if error.code == "spool-no-space":
                try:
                    os.unlink(part)
                except FileNotFoundError:
                    pass
            raise error
        if offset + length < total:
            return {"stored": False, "have": offset + length}
        try:
            hdr = check.result() if check is not None else check_stored(read_file_nofollow(part, limit))
            if hdr.seq != seq:
                raise AgentError("chunk-corrupt", "chunk %d arrived holding another seq" % seq)
        except AgentError:
            os.unlink(part)
            raise
        os.rename(part, self.sess.chunk_path(seq))
        self.journal("stored %d %d" % (seq, total))
        return {"stored": True}

    @staticmethod
    def open_part(part: str, seq: int, offset: int) -> int:
        """The ``.part`` file to write ``offset..`` of chunk ``seq`` into, positioned there.

        From offset 0 it is a new file, created with O_EXCL after unlinking
        whatever had the name (a stale part, or a planted link: unlinked, never
        written through). A resumed chunk reopens the agent's own file, which
        must be a regular file with exactly one link.
        """
        if offset == 0:
            try:
                os.unlink(part)
            except FileNotFoundError:
                pass
            return open_nofollow(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            fd = open_nofollow(part, os.O_WRONLY)
        except FileNotFoundError:
            raise AgentError("bad-offset", "chunk %d: offset %d but no part is held" % (seq, offset),
                             have=0) from None
        st = os.fstat(fd)
        if st.st_nlink != 1:
            os.close(fd)
            raise AgentError("session-dir", "%s has %d links: refusing to write into a file shared with "
                             "another place" % (part, st.st_nlink))
        if offset > st.st_size:
            os.close(fd)
            raise AgentError("bad-offset", "chunk %d: offset %d but only %d bytes held"
                             % (seq, offset, st.st_size), have=st.st_size)
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        return fd

    def journal(self, line: str) -> None:
        """Append-only record of completed moves (``chunks.log``): evidence that none moved twice.

        Best effort on a full spool filesystem: the chunk is stored either way.
        """
        try:
            fd = open_nofollow(self.sess.file("chunks.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                write_all(fd, (line + "\n").encode())
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno not in NO_SPACE:
                raise

    def finish(self, req_id: int, msg: Dict[str, Any]) -> Dict[str, Any]:
        end = {k: msg[k] for k in ("total_chunks", "raw_bytes", "stream_hash")}
        write_json(self.sess.file("end.json"), end)
        return {"ok": True}


def remove_group_if_done(path: str) -> None:
    """A fan-out group's directory, once its daemon has ended and none of its members is left."""
    try:
        group = Session(path)
    except (AgentError, OSError):
        return  # gone already
    if any(os.path.isdir(group.sibling(name)) for name in group.fanout):
        return
    if group.state().get("state") in ("starting", "running"):
        return  # its daemon sees its members gone and removes it itself
    remove_session_dir(path)


def remove_session_dir(path: str) -> None:
    """rm -r of our own session directory only: never follows symlinks."""
    check_private_dir(path, "session directory")
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in dirs:
            full = os.path.join(root, name)
            if os.path.islink(full):
                os.unlink(full)
            else:
                os.rmdir(full)
    os.rmdir(path)


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------

AGENT_SOURCE: Optional[bytes] = None  # set by the bootstrap when run from stdin


def cmd_probe(args: List[str]) -> Dict[str, Any]:
    """probe [BASE]: what this host can do; with BASE also ``sessions BASE`` (one round trip for both)."""
    import grp
    import pwd
    import shutil
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
        groups = [grp.getgrgid(g).gr_name for g in os.getgroups()]
    except KeyError:
        user, groups = str(os.geteuid()), []
    listing: Dict[str, Any] = {}
    if args:
        try:
            listing = cmd_sessions(args[:1])
        except OSError:  # an unreadable base: left to `sessions`, asked for when needed, to report
            pass
    here = {"python": list(sys.version_info[:3]), "zstd": ZSTD_VIA == "module", "xxhash": xxhash is not None}
    prog = _program()
    return {"python": here["python"], "capabilities": capabilities(), "zstd": here["zstd"],
            "zstd_via": ZSTD_VIA, "xxhash": here["xxhash"],
            "agent_version": AGENT_VERSION, "protocol": PROTOCOL_VERSION,
            "zfs": shutil.which("zfs"), "uid": os.geteuid(), "user": user, "groups": groups,
            "host": socket.gethostname(), "executable": sys.executable,
            "interpreters": other_interpreters() if not (here["zstd"] and here["xxhash"]) else [],
            **({"program": list(prog)} if prog else {}), **listing}


def _program() -> Optional[Tuple[str, str]]:
    """(directory, module) of the agent program this process runs (imported from ``BASE/.agent``, as
    ``PROGRAM_BOOTSTRAP`` and ``IMPORT_BOOTSTRAP`` do), or None (the source was sent and compiled)."""
    path = globals().get("__file__")
    if not path or os.path.basename(os.path.dirname(path)) != PROGRAM_DIR:
        return None
    name = os.path.splitext(os.path.basename(path))[0]
    return (os.path.dirname(os.path.abspath(path)), name) if name.startswith("zchunk_agent_") else None


#: Where a host keeps the python3 that has its distribution's packages (Debian's python3-zstandard and
#: python3-xxhash live under /usr/lib/python3/dist-packages), besides the first python3 on PATH.
INTERPRETERS = ["/usr/bin/python3", "/usr/local/bin/python3"] + [
    "python3.%d" % minor for minor in range(14, 8, -1)]
INTERPRETER_CHECK = (
    "import json,sys\n"
    "def has(m):\n"
    "    try:\n"
    "        __import__(m)\n"
    "        return True\n"
    "    except Exception:\n"
    "        return False\n"
    "print(json.dumps({'python':list(sys.version_info[:3]),'zstd':has('zstandard'),'xxhash':has('xxhash')}))"
)


def other_interpreters() -> List[Dict[str, Any]]:
    """The host's other python3 interpreters (3.9+) and which speed-ups each can import: the coordinator
    runs the agent with the best of them when this one lacks zstandard or xxhash.

    All are asked at once, and the answer is given at the first, in ``INTERPRETERS`` order, that has both
    (the others are stopped): the one the coordinator would pick of the whole list. A pyenv host has a
    shim for every ``python3.N`` it ever installed, each a shell script that takes a tenth of a second to
    fail, so asking them one by one cost a run half a second on such a host."""
    import shutil
    # Not by the binary it resolves to: a venv's python3 is a link to the system's, without its packages.
    seen = {os.path.abspath(sys.executable)}
    asked: List[Tuple[str, "subprocess.Popen[bytes]"]] = []
    for name in INTERPRETERS:
        path = name if name.startswith("/") else shutil.which(name)
        if not path or not os.access(path, os.X_OK) or os.path.abspath(path) in seen:
            continue
        seen.add(os.path.abspath(path))
        try:
            asked.append((path, subprocess.Popen([path, "-c", INTERPRETER_CHECK], stdin=subprocess.DEVNULL,
                                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                 start_new_session=True)))
        except OSError:
            continue
    found = []
    deadline = time.monotonic() + 10
    try:
        for path, proc in asked:
            try:
                out = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))[0]
                info = json.loads(out.decode().strip().splitlines()[-1])
            except (ValueError, IndexError, subprocess.SubprocessError):
                continue
            if list(info.get("python", [0]))[:2] >= [3, 9]:
                found.append(dict(info, path=path))
                if info.get("zstd") and info.get("xxhash"):
                    break
    finally:
        for _, proc in asked:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # a shim's shell and what it started
                except OSError:
                    pass
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    return found


def ensure_base(base: str) -> None:
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError as e:  # no parent, read-only, not a directory on the way...
        raise AgentError("session-dir", "cannot create spool base directory %s: %s"
                         % (base, e.strerror or e)) from None
    check_private_dir(base, "spool base directory")


def cmd_install(args: List[str]) -> Dict[str, Any]:
    """install BASE ID CFG [start [DIR]]  (the agent source on stdin, see bootstrap).

    With ``start``, the daemon is started in the same command: one round trip instead of two.
    With ``DIR`` too (the session directory's absolute path, as the coordinator expects it) this
    very process forks it, since its command line then names the directory; without, or if the
    directory is another, it ``exec``s ``agent.py start DIR``. The reply is ``start``'s, with ``path``."""
    base, sid = args[0], args[1]
    cfg = json.loads(args[2])
    if AGENT_SOURCE is None:
        raise AgentError("bad-request", "install must be run through the bootstrap")
    if not sid or "/" in sid or sid.startswith("."):
        raise AgentError("bad-request", "bad session id %r" % sid)
    ensure_base(base)
    prog = _program()
    if prog is not None:  # found by a run's probe, not put again: its mtime says a run used it (cmd_program)
        try:
            os.utime(os.path.join(prog[0], prog[1] + ".py"))
        except OSError:
            pass
    # absolute: the daemon is recognised by this path in its command line (pid_is_ours), so the
    # coordinator must name it exactly so, also for a relative --spool-dir (relative to the SSH login dir)
    path = os.path.abspath(os.path.join(base, sid))
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not _installed_already(path, cfg):
            raise AgentError("session-dir", "session directory %s already exists: refusing to reuse it"
                             % path) from None
        # This very install, retried by the coordinator after the link died before its answer arrived
        # (the name holds a fresh random session id, the base is private, the files are ours to the byte).
        if args[3:4] == ["start"]:
            return cmd_start([path])  # the daemon is not started twice (see cmd_start)
        return {"path": path}
    check_private_dir(path, "session directory")
    try:
        os.mkdir(os.path.join(path, "chunks"), 0o700)
        write_atomic(os.path.join(path, "agent.py"), AGENT_SOURCE)
        write_json(os.path.join(path, "session.json"), cfg)
        # the daemon's ballast exists before the daemon: a filesystem that fills up between install
        # and start still leaves it room for its first state write
        write_atomic(os.path.join(path, "reserve"), os.urandom(RESERVE_BYTES), durable=False)
        Session(path).touch_heartbeat()
    except OSError as e:  # e.g. a full spool filesystem: leave nothing half-made behind
        remove_session_dir(path)
        if e.errno in NO_SPACE:
            raise AgentError("spool-no-space", "spool filesystem of %s is full: %s" % (base, e)) from None
        raise
    if args[3:4] == ["start"]:
        if args[4:5] == [path]:
            # The coordinator named the directory: it is in this process's command line, so the daemon
            # forked from here is recognised by it (pid_is_ours), and the source is compiled already.
            return cmd_start([path])
        agent = os.path.join(path, "agent.py")
        python = sys.executable or "python3"
        sys.stdout.flush()
        os.execv(python, [python, agent, "start", path])
    return {"path": path}


def _installed_already(path: str, cfg: Dict[str, Any]) -> bool:
    """Whether ``path`` is a complete install of exactly this session (a directory of ours, not a link)."""
    try:
        check_private_dir(path, "session directory")
        with os.fdopen(open_nofollow(os.path.join(path, "agent.py"), os.O_RDONLY), "rb") as f:
            same_agent = f.read(len(AGENT_SOURCE or b"") + 1) == AGENT_SOURCE
        return same_agent and read_json(os.path.join(path, "session.json")) == cfg
    except (AgentError, OSError, ValueError):
        return False


def cmd_start(args: List[str]) -> Dict[str, Any]:
    """Fork the detached daemon of this session (double fork, setsid, stdio to daemon.log).

    Never twice: the daemon holds an exclusive lock on ``daemon.lock`` for its whole life (taken here
    before forking, inherited), so a second ``start`` (a retried install, a stray command) finds it
    taken and answers ``already`` instead of starting a second zfs send or receive."""
    import fcntl

    sess = Session(args[0])
    zfs_argv(sess.cfg)  # refuse bad arguments before forking
    if sess.member_of:  # a fan-out member's daemon is its group's (started again after it died)
        group = sess.sibling(sess.member_of)
        python = sys.executable or "python3"
        sys.stdout.flush()
        os.execv(python, [python, os.path.join(group, "agent.py"), "start", group])
    lockfd = open_nofollow(sess.file("daemon.lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lockfd)
        return {"pid": sess.state().get("pid"), "already": True, "path": sess.path}
    st = sess.state()
    if st.get("state") in ("running",):
        os.close(lockfd)
        return {"pid": st["pid"], "already": True, "path": sess.path}
    logfd = open_nofollow(sess.file("daemon.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(logfd)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            data = r.read()
        os.waitpid(pid, 0)
        os.close(lockfd)  # the daemon holds it now
        return {"pid": int(data or b"0"), "path": sess.path}
    os.close(rfd)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    os.close(devnull)
    os.close(logfd)
    os.write(wfd, str(os.getpid()).encode())
    os.close(wfd)
    code = 0
    try:
        daemon = SenderDaemon(sess) if sess.role == "send" else ReceiverDaemon(sess)
        daemon.save()
        log("%s daemon started: %s" % (sess.role, " ".join(zfs_argv(sess.cfg))))
        daemon.run()
        log("%s daemon finished: %s" % (sess.role, daemon.st.get("state")))
    except BaseException as e:  # the daemon must leave a reason behind, also on a full filesystem
        log("daemon crashed: %r" % (e,))
        try:
            os.unlink(sess.file("reserve"))
        except OSError:
            pass
        try:
            write_json(sess.state_path, {"pid": os.getpid(), "state": "failed",
                                         "reason": "agent error: %s" % (e,)})
        except Exception:
            pass
        code = 1
    os._exit(code)


def cmd_serve(args: List[str]) -> None:
    """serve DIR [wait]: the framed protocol on stdin/stdout. With ``wait`` (started through
    ``SERVE_BOOTSTRAP`` while install is still making DIR), first wait for install to finish."""
    if args[1:2] == ["wait"] and not wait_for_install(args[0]):
        return
    sess = Session(args[0])
    for fd in (0, 1):  # from and to sshd (or the coordinator): chunk data in 1 MiB frames
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            widen_pipe(fd)
    try:
        Server(sess, sys.stdin.buffer, sys.stdout.buffer).serve()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the channel died with the link: nothing to report, the coordinator reconnects


def wait_for_install(path: str, fd: int = 0) -> bool:
    """Until install has made the session directory ``path`` (its last file, ``heartbeat``, is there):
    True; False when the coordinator closed the channel (``fd``, its requests) first (its install failed:
    nothing to serve)."""
    import select

    heartbeat = os.path.join(path, "heartbeat")
    deadline = time.monotonic() + INSTALL_WAIT
    while not os.path.lexists(heartbeat):
        if time.monotonic() > deadline:
            raise AgentError("session-dir", "%s was not installed within %d s" % (path, INSTALL_WAIT))
        # the coordinator sends nothing before this server's hello: stdin readable means closed
        if select.select([fd], [], [], INSTALL_POLL)[0]:
            return False
    return True


PROGRAM_DIR = ".agent"  # under the spool base: the agent program, compiled, for every session of a run
MOUNT_LOCK = ".mount.lock"  # under the spool base: the ends of receives that mount (``ReceiverDaemon.ending``)
PROGRAM_KEEP = 7 * 86400.0  # other versions' programs go after this long unused


def cmd_program(args: List[str]) -> Dict[str, Any]:
    """program BASE  (the agent source on stdin, see bootstrap): put this agent on the host once, as the
    module ``BASE/.agent/zchunk_agent_<sha>.py`` compiled beside it, so that the commands and channels of
    every session after it start by importing it (``IMPORT_BOOTSTRAP``) instead of receiving and compiling
    the source each time. Idempotent; other versions unused for a week are removed."""
    import hashlib
    import py_compile

    if AGENT_SOURCE is None:
        raise AgentError("bad-request", "program must be run through the bootstrap")
    base = args[0]
    ensure_base(base)
    where = os.path.join(os.path.abspath(base), PROGRAM_DIR)
    try:
        os.mkdir(where, 0o700)
    except FileExistsError:
        pass
    check_private_dir(where, "agent program directory")
    module = "zchunk_agent_" + hashlib.sha256(AGENT_SOURCE).hexdigest()[:16]
    path = os.path.join(where, module + ".py")
    fresh = False
    try:
        with os.fdopen(open_nofollow(path, os.O_RDONLY), "rb") as f:
            same = f.read(len(AGENT_SOURCE) + 1) == AGENT_SOURCE
    except OSError:
        same = False
    if not same:
        write_atomic(path, AGENT_SOURCE)
        py_compile.compile(path, doraise=True)
        fresh = True
    else:
        os.utime(path)  # its mtime says when a run last used it: what "unused for a week" is measured by
    now = time.time()
    for name in os.listdir(where):
        other = os.path.join(where, name)
        if name.startswith("zchunk_agent_") and not name.startswith(module):
            try:
                if now - os.lstat(other).st_mtime > PROGRAM_KEEP:
                    os.unlink(other)
            except OSError:
                pass
    return {"program": where, "module": module, "fresh": fresh}


def cmd_sessions(args: List[str]) -> Dict[str, Any]:
    """Session directories under BASE with their daemon state (for stale-session cleanup)."""
    base = args[0]
    out = []
    try:
        names = sorted(n for n in os.listdir(base) if not n.startswith("."))  # the program, the mount lock
    except FileNotFoundError:
        names = []
    for name in names:
        path = os.path.join(base, name)
        try:
            sess = Session(path)
            st = sess.state()
            dataset = (sess.cfg.get("receive") or {}).get("target") or (sess.cfg.get("send") or {}).get("snapshot")
            out.append({"id": name, "path": path, "role": sess.role, "state": st.get("state"),
                        "pid": st.get("pid"), "idle": sess.idle_for(), "dataset": dataset,
                        "session": sess.cfg.get("id")})
        except Exception as e:
            out.append({"id": name, "path": path, "error": str(e)})
    return {"sessions": out}


def cmd_remove(args: List[str]) -> Dict[str, Any]:
    """Stop the daemon of a session and remove its directory (abort/cleanup without a channel)."""
    sess = Session(args[0])
    srv = Server(sess, sys.stdin.buffer, sys.stdout.buffer)
    keep = len(args) > 1 and args[1] == "keep"
    return srv.cleanup(0, {"keep": keep})


COMMANDS: Dict[str, Callable[[List[str]], Any]] = {
    "probe": cmd_probe, "install": cmd_install, "start": cmd_start, "serve": cmd_serve,
    "sessions": cmd_sessions, "remove": cmd_remove, "program": cmd_program,
}


def main(argv: List[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        sys.stderr.write("usage: agent.py {%s} ...\n" % ",".join(sorted(COMMANDS)))
        return 2
    try:
        result = COMMANDS[argv[0]](argv[1:])
    except AgentError as e:
        sys.stdout.write(json.dumps({"error": e.to_dict()}) + "\n")
        sys.stdout.flush()
        return 1
    except OSError as e:  # a sentence for the user, not a traceback
        err = AgentError("os-error", "%s: %s" % (argv[0], e), errno=e.errno)
        sys.stdout.write(json.dumps({"error": err.to_dict()}) + "\n")
        sys.stdout.flush()
        return 1
    if result is not None:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


# The coordinator runs one-shot commands without installing anything first:
#   python3 -c BOOTSTRAP CMD ARGS...   with this file's source on stdin.
BOOTSTRAP = (
    "import sys;s=sys.stdin.buffer.read();g={'__name__':'zchunk_agent'};"
    "exec(compile(s,'zchunk_agent','exec'),g);g['AGENT_SOURCE']=s;"
    "sys.exit(g['main'](sys.argv[1:]))"
)

# A channel opened while install is still running (the coordinator's first ones, ready when install
# answers instead of an interpreter start later):  python3 -c SERVE_BOOTSTRAP serve DIR wait,  its
# stdin the source's length on a line, the source, then the channel's frames.
SERVE_BOOTSTRAP = (
    "import sys;f=sys.stdin.buffer;s=f.read(int(f.readline()));g={'__name__':'zchunk_agent'};"
    "exec(compile(s,'zchunk_agent','exec'),g);g['AGENT_SOURCE']=s;"
    "sys.exit(g['main'](sys.argv[1:]))"
)

# A run's probe of a host an earlier run put this agent's program on:  python3 -c PROGRAM_BOOTSTRAP BASE MODULE
# CMD ARGS...  imports ``BASE/.agent/MODULE.py`` (compiled there once) instead of receiving and compiling the
# source, when it is this agent (MODULE names its source's hash) in a directory only this user can write:
# ``check_private_dir``'s rules, and the file's. Else it exits 3, having done nothing, and the coordinator
# sends the source (BOOTSTRAP).
PROGRAM_BOOTSTRAP = (
    "import sys,os,stat,hashlib\n"
    "d=os.path.join(sys.argv[1],'.agent');m=sys.argv[2];p=os.path.join(d,m+'.py')\n"
    "try:\n"
    " s=[os.lstat(d),os.lstat(p)];b=open(p,'rb').read()\n"
    "except OSError:\n"
    " sys.exit(3)\n"
    "if (not stat.S_ISDIR(s[0].st_mode) or not stat.S_ISREG(s[1].st_mode)"
    " or any(x.st_uid!=os.geteuid() or x.st_mode&0o022 for x in s)"
    " or 'zchunk_agent_'+hashlib.sha256(b).hexdigest()[:16]!=m):\n"
    " sys.exit(3)\n"
    "sys.path.insert(0,d);g=__import__(m);g.AGENT_SOURCE=b;sys.exit(g.main(sys.argv[3:]))"
)

# Once ``program`` has put the agent on the host:  python3 -c IMPORT_BOOTSTRAP DIR MODULE CMD ARGS...  imports
# it (compiled once) and runs CMD; nothing on stdin but what CMD reads (a serve channel's frames).
IMPORT_BOOTSTRAP = (
    "import sys;sys.path.insert(0,sys.argv[1]);m=__import__(sys.argv[2]);"
    "m.AGENT_SOURCE=open(m.__file__,'rb').read();sys.exit(m.main(sys.argv[3:]))"
)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
