"""The frame protocol (docs/protocol.md): bytes on the wire, bounds, both ends.

Agent side: ``zchunk/agent.py`` framing and its ``Server`` (driven over
in-memory files, with a real session directory under tmp_path). Coordinator
side: ``zchunk.protocol.AgentChannel`` over an in-memory fake pipe.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zchunk import agent as wire
from zchunk import errors as E
from zchunk.agent import (
    FRAME_DATA,
    FRAME_ERROR,
    FRAME_HELLO,
    FRAME_REPLY,
    FRAME_REQUEST,
    MAX_DATA_FRAME,
    MAX_JSON_FRAME,
    AgentError,
    decode_message,
    encode_frame,
    encode_message,
    parse_frame_header,
    read_frame,
)
from zchunk.client import CLIENTS, HostAgent, ReceiverClient, SenderClient, calls_of
from zchunk.protocol import COORDINATOR_CAPS, AgentChannel
from zchunk.relay import ChannelChunks, LocalSpoolChunks, relay_chunk
from zchunk.transport import LinkDown

# -- fixed vectors -----------------------------------------------------------------


def test_frame_header_layout() -> None:
    assert wire.FRAME_HEADER.size == 12
    assert wire.FRAME_MAGIC == b"ZC" and wire.PROTOCOL_VERSION == 1
    assert (FRAME_HELLO, FRAME_REQUEST, FRAME_REPLY, FRAME_ERROR, FRAME_DATA) == (1, 2, 3, 4, 5)
    assert MAX_JSON_FRAME == 1 << 20 and MAX_DATA_FRAME == 4 << 20


def test_vector_data_frame() -> None:
    assert encode_frame(FRAME_DATA, 7, b"abc") == bytes.fromhex(
        "5a43" "01" "05" "00000007" "00000003") + b"abc"


def test_vector_empty_frame() -> None:
    assert encode_frame(FRAME_DATA, 0, b"") == b"ZC\x01\x05\x00\x00\x00\x00\x00\x00\x00\x00"


def test_vector_request_message() -> None:
    frame = encode_message(FRAME_REQUEST, 1, {"op": "get_chunk", "seq": 42, "offset": 0})
    assert frame == (b'ZC\x01\x02\x00\x00\x00\x01\x00\x00\x00\x26'
                     b'{"op":"get_chunk","seq":42,"offset":0}')


def test_vector_error_message() -> None:
    frame = encode_message(FRAME_ERROR, 258, {"code": "no-chunk", "reason": "x", "details": {}})
    assert frame == (b'ZC\x01\x04\x00\x00\x01\x02\x00\x00\x00\x2d'
                     b'{"code":"no-chunk","reason":"x","details":{}}')


def test_read_frame_reads_back_what_was_encoded() -> None:
    f = io.BytesIO(encode_message(FRAME_REPLY, 9, {"ok": True}) + encode_frame(FRAME_DATA, 9, b"xyz"))
    assert read_frame(f) == (FRAME_REPLY, 9, b'{"ok":true}')
    assert read_frame(f) == (FRAME_DATA, 9, b"xyz")
    with pytest.raises(EOFError):
        read_frame(f)


# -- header validation ---------------------------------------------------------------


def header(magic: bytes = b"ZC", version: int = 1, ftype: int = FRAME_REQUEST, req_id: int = 1,
           length: int = 0) -> bytes:
    return wire.FRAME_HEADER.pack(magic, version, ftype, req_id, length)


@pytest.mark.parametrize("hdr,words", [
    (header(magic=b"ZD"), "magic"),
    (header(magic=b"\0\0"), "magic"),
    (header(version=0), "version"),
    (header(version=2), "version"),
    (header(ftype=0), "type"),
    (header(ftype=6), "type"),
    (header(ftype=255), "type"),
    (header(ftype=FRAME_REQUEST, length=MAX_JSON_FRAME + 1), "limit"),
    (header(ftype=FRAME_HELLO, length=MAX_JSON_FRAME + 1), "limit"),
    (header(ftype=FRAME_ERROR, length=2**32 - 1), "limit"),
    (header(ftype=FRAME_DATA, length=MAX_DATA_FRAME + 1), "limit"),
])
def test_parse_frame_header_rejects(hdr: bytes, words: str) -> None:
    with pytest.raises(AgentError) as e:
        parse_frame_header(hdr)
    assert e.value.code == "protocol"
    assert words in e.value.reason


def test_bounds_are_per_frame_type() -> None:
    assert parse_frame_header(header(ftype=FRAME_REPLY, length=MAX_JSON_FRAME)) == (
        FRAME_REPLY, 1, MAX_JSON_FRAME)
    assert parse_frame_header(header(ftype=FRAME_DATA, length=MAX_DATA_FRAME)) == (
        FRAME_DATA, 1, MAX_DATA_FRAME)


class RecordingReader(io.BytesIO):
    """A BytesIO that remembers how much each read asked for (what a real pipe would allocate)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.requests: list[int] = []

    def read(self, n: int | None = -1) -> bytes:  # type: ignore[override]
        self.requests.append(-1 if n is None else n)
        return super().read(n)


def test_oversized_frame_is_refused_before_reading_its_payload() -> None:
    # No payload follows: a reader that tried to read it would hit EOF instead.
    f = RecordingReader(header(ftype=FRAME_REQUEST, length=MAX_JSON_FRAME + 1))
    with pytest.raises(AgentError):
        read_frame(f)
    assert f.requests == [wire.FRAME_HEADER.size]


@pytest.mark.parametrize("payload", [b"", b"not json", b"\xff\xfe", b"{", b'{"a":1}x', b"[1]", b"1",
                                     b'"op"', b"null", b"true"])
def test_decode_message_rejects_non_objects(payload: bytes) -> None:
    with pytest.raises(AgentError) as e:
        decode_message(payload)
    assert e.value.code == "protocol"


def test_decode_message_accepts_an_object_with_unknown_fields() -> None:
    assert decode_message(b'{"op":"status","from_the_future":[1,2]}') == {
        "op": "status", "from_the_future": [1, 2]}


_valid_prefix = st.builds(lambda t, i, n: header(ftype=t, req_id=i, length=n),
                          st.integers(0, 7), st.integers(0, 2**32 - 1),
                          st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)))


@settings(max_examples=500, deadline=None)
@given(prefix=st.one_of(st.just(b""), _valid_prefix), tail=st.binary(max_size=200))
def test_read_frame_fuzz_raises_only_protocol_errors(prefix: bytes, tail: bytes) -> None:
    f = RecordingReader(prefix + tail)
    try:
        while True:
            ftype, _, payload = read_frame(f)
            if ftype != FRAME_DATA:
                decode_message(payload)
    except (AgentError, EOFError):
        pass
    assert max(f.requests, default=0) <= MAX_DATA_FRAME


# -- the agent's server, over in-memory files ------------------------------------------

SESSION_ID = "20250101T000000Z-test"


def make_session(root: Path, role: str, chunk_size: int = 1 << 20) -> Path:
    path = root / f"{role}-session"
    path.mkdir(mode=0o700)
    (path / "chunks").mkdir(mode=0o700)
    cfg: dict[str, Any] = {"id": SESSION_ID, "role": role, "codec": "zlib", "level": None,
                           "checksum": "blake2b-128", "chunk_size": chunk_size, "spool_max": 1 << 30}
    (path / "session.json").write_text(json.dumps(cfg))
    return path


def coordinator_hello(protocol: int = 1) -> bytes:
    return encode_message(FRAME_HELLO, 0, {"protocol": protocol, "capabilities": COORDINATOR_CAPS})


def serve(path: Path, *frames: bytes) -> list[tuple[int, int, Any]]:
    """Run one ``agent.py serve`` conversation; return the frames it wrote (JSON decoded)."""
    out = io.BytesIO()
    server = wire.Server(wire.Session(str(path)), io.BytesIO(coordinator_hello() + b"".join(frames)), out)
    server.serve()
    out.seek(0)
    got: list[tuple[int, int, Any]] = []
    while True:
        try:
            ftype, rid, payload = read_frame(out)
        except EOFError:
            return got
        got.append((ftype, rid, payload if ftype == FRAME_DATA else decode_message(payload)))


def request(req_id: int, op: str, **fields: Any) -> bytes:
    return encode_message(FRAME_REQUEST, req_id, dict(fields, op=op))


@pytest.fixture(params=["send", "receive"])
def any_session(request: Any, tmp_path: Path) -> Path:
    return make_session(tmp_path, request.param)


@pytest.fixture
def sender(tmp_path: Path) -> Path:
    return make_session(tmp_path, "send")


@pytest.fixture
def receiver(tmp_path: Path) -> Path:
    return make_session(tmp_path, "receive")


def test_agent_speaks_first_with_its_capabilities(any_session: Path) -> None:
    (ftype, rid, hello), = serve(any_session)
    assert (ftype, rid) == (FRAME_HELLO, 0)
    assert hello["protocol"] == 1
    assert hello["session"] == SESSION_ID
    assert hello["role"] in ("send", "receive")
    assert {"chunk-v1", "resume-offset-v1", "none-v1", "zlib-v1", "blake2b-128-v1"} <= set(
        hello["capabilities"])
    assert ("zstd-v1" in hello["capabilities"]) == (wire.zstandard is not None)
    assert ("xxh3-128-v1" in hello["capabilities"]) == (wire.xxhash is not None)


def test_agent_refuses_a_coordinator_of_another_protocol(sender: Path) -> None:
    srv = wire.Server(wire.Session(str(sender)), io.BytesIO(coordinator_hello(protocol=2)), io.BytesIO())
    with pytest.raises(AgentError) as e:
        srv.serve()
    assert e.value.code == "protocol"


@pytest.mark.parametrize("role,op", [
    ("send", "put_chunk"), ("send", "finish"), ("receive", "get_chunk"), ("receive", "release"),
    ("send", "rm_rf"), ("receive", "__init__"), ("send", "serve"),
])
def test_agent_dispatches_only_its_roles_allow_list(tmp_path: Path, role: str, op: str) -> None:
    path = make_session(tmp_path, role)
    frames = serve(path, request(5, op, seq=0, upto=1), request(6, "status"))
    (ftype, rid, err), (ftype2, rid2, _) = frames[1:]
    assert (ftype, rid, err["code"]) == (FRAME_ERROR, 5, "bad-request")
    assert op in err["reason"]
    assert (ftype2, rid2) == (FRAME_REPLY, 6)  # the channel is still usable


def test_agent_allow_lists_match_the_coordinators(any_session: Path) -> None:
    srv = wire.Server(wire.Session(str(any_session)), io.BytesIO(), io.BytesIO())
    assert set(srv.handlers) == set(wire.OPS[srv.sess.role]) == calls_of(CLIENTS[srv.sess.role])


@pytest.mark.parametrize("role", ["send", "receive"])
def test_every_request_the_agent_answers_has_exactly_one_client_method(role: str) -> None:
    """client.py mirrors the agent: one method per allowlisted handler, and none the agent would refuse."""
    cls = CLIENTS[role]
    methods = [name for name in dir(cls) if getattr(getattr(cls, name), "agent_calls", ())]
    made = [call for name in methods for call in getattr(cls, name).agent_calls]
    assert sorted(made) == sorted(wire.OPS[role]), (methods, wire.OPS[role])
    assert all(hasattr(wire.Server, op) for op in wire.OPS[role]), "each allowed op is a Server method"


def test_every_agent_command_has_exactly_one_host_agent_method() -> None:
    """The one-shot commands (and ``serve``, the channel, with its ``attach``) of the agent program, each made
    by one method."""
    made = [c for name in dir(HostAgent) for c in getattr(getattr(HostAgent, name), "agent_calls", ())]
    assert sorted(made) == sorted([*wire.COMMANDS, *wire.CHANNEL_OPS])


@pytest.mark.parametrize("role,fields", [
    ("send", {"op": "get_chunk"}),                      # seq missing
    ("send", {"op": "get_chunk", "seq": "nine"}),       # seq not a number
    ("send", {"op": "release"}),                        # upto missing
    ("receive", {"op": "put_chunk", "seq": 0}),         # offset/length/total missing
    ("receive", {"op": "finish", "total_chunks": 1}),   # raw_bytes/stream_hash missing
])
def test_agent_answers_a_malformed_request_with_an_error_frame(tmp_path: Path, role: str,
                                                               fields: dict[str, Any]) -> None:
    """A bad request is the coordinator's bug, not a dead link: answer bad-request, stay up."""
    path = make_session(tmp_path, role)
    frames = serve(path, encode_message(FRAME_REQUEST, 3, fields), request(4, "status"))
    (t1, r1, err), (t2, r2, _) = frames[1:]
    assert (t1, r1, err["code"]) == (FRAME_ERROR, 3, "bad-request")
    assert (t2, r2) == (FRAME_REPLY, 4)


def test_agent_ignores_unknown_request_fields(any_session: Path) -> None:
    frames = serve(any_session, request(1, "status", from_the_future={"x": 1}))
    ftype, rid, st = frames[1]
    assert (ftype, rid) == (FRAME_REPLY, 1)
    assert st["chunks"] == [] and st["parts"] == {} and st["spool_max"] == 1 << 30


def write_chunk(session: Path, seq: int, raw: bytes) -> bytes:
    blob = wire.encode_chunk(seq, raw, wire.CODEC_NONE, None, wire.HASH_BLAKE2B)
    (session / "chunks" / f"{seq:020d}.chunk").write_bytes(blob)
    return blob


BIG = os.urandom(2 * wire.DATA_PIECE + 1000)


@pytest.mark.parametrize("offset", [0, 1, wire.DATA_PIECE, len(BIG) + wire.CHUNK_HEADER_SIZE])
def test_get_chunk_streams_data_frames_from_an_offset(sender: Path, offset: int) -> None:
    blob = write_chunk(sender, 3, BIG)
    frames = serve(sender, request(4, "get_chunk", seq=3, offset=offset))[1:]
    ftype, rid, head = frames[0]
    assert (ftype, rid) == (FRAME_REPLY, 4)
    assert head == {"seq": 3, "offset": offset, "length": len(blob) - offset, "total": len(blob)}
    data = frames[1:]
    assert all(t == FRAME_DATA and r == 4 and len(p) <= wire.DATA_PIECE for t, r, p in data)
    assert b"".join(p for _, _, p in data) == blob[offset:]


def test_get_chunk_errors(sender: Path) -> None:
    blob = write_chunk(sender, 0, b"x" * 10)
    frames = serve(sender, request(1, "get_chunk", seq=9), request(2, "get_chunk", seq=0,
                                                                   offset=len(blob) + 1))
    assert [(t, r, m["code"]) for t, r, m in frames[1:]] == [
        (FRAME_ERROR, 1, "no-chunk"), (FRAME_ERROR, 2, "bad-request")]


def test_release_deletes_chunks_below_upto(sender: Path) -> None:
    for seq in range(4):
        write_chunk(sender, seq, b"c%d" % seq)
    frames = serve(sender, request(1, "release", upto=2), request(2, "status"))
    assert frames[1][2] == {"released": 2}
    assert frames[2][2]["chunks"] == [2, 3]


def put(req_id: int, seq: int, blob: bytes, offset: int, end: int | None = None,
        piece: int = 7) -> bytes:
    """A put_chunk request for blob[offset:end] followed by its data frames."""
    end = len(blob) if end is None else end
    out = request(req_id, "put_chunk", seq=seq, offset=offset, length=end - offset, total=len(blob))
    for i in range(offset, end, piece):
        out += encode_frame(FRAME_DATA, req_id, blob[i:min(i + piece, end)])
    return out


def test_put_chunk_partial_then_resumed(receiver: Path) -> None:
    blob = wire.encode_chunk(5, b"payload " * 20, wire.CODEC_ZLIB, None, wire.HASH_BLAKE2B)
    frames = serve(receiver, put(1, 5, blob, 0, 25), request(2, "status"))
    assert frames[1][2] == {"stored": False, "have": 25}
    assert frames[2][2]["parts"] == {"5": 25} and frames[2][2]["chunks"] == []
    # a new channel (after a reconnect) resumes from what the target holds
    frames = serve(receiver, put(1, 5, blob, 25), request(2, "status"))
    assert frames[1][2] == {"stored": True}
    assert frames[2][2]["chunks"] == [5] and frames[2][2]["parts"] == {}
    assert (receiver / "chunks" / f"{5:020d}.chunk").read_bytes() == blob


def test_put_chunk_resend_from_an_earlier_offset_truncates(receiver: Path) -> None:
    blob = wire.encode_chunk(0, b"abc" * 50, wire.CODEC_NONE, None, wire.HASH_BLAKE2B)
    serve(receiver, put(1, 0, blob, 0, 100))
    frames = serve(receiver, put(1, 0, blob, 40))
    assert frames[1][2] == {"stored": True}
    assert (receiver / "chunks" / f"{0:020d}.chunk").read_bytes() == blob


def test_put_chunk_beyond_what_is_held_is_refused_and_drained(receiver: Path) -> None:
    blob = wire.encode_chunk(0, b"abc" * 50, wire.CODEC_NONE, None, wire.HASH_BLAKE2B)
    frames = serve(receiver, put(1, 0, blob, 30), request(2, "status"))
    (t1, r1, err), (t2, r2, st) = frames[1:]
    assert (t1, r1, err["code"]) == (FRAME_ERROR, 1, "bad-offset")
    assert err["details"] == {"have": 0}
    assert (t2, r2) == (FRAME_REPLY, 2)  # its data frames were drained: the channel is in sync


@pytest.mark.parametrize("damage", ["flip", "wrong-seq"])
def test_put_chunk_verifies_on_arrival(receiver: Path, damage: str) -> None:
    blob = wire.encode_chunk(2, b"data " * 30, wire.CODEC_ZLIB, None, wire.HASH_BLAKE2B)
    seq = 2
    if damage == "flip":
        blob = blob[:-1] + bytes([blob[-1] ^ 1])
    else:
        seq = 3
    frames = serve(receiver, put(1, seq, blob, 0), request(2, "status"))
    (t1, _, err), (_, _, st) = frames[1:]
    assert (t1, err["code"]) == (FRAME_ERROR, "chunk-corrupt")
    assert st["chunks"] == [] and st["parts"] == {}  # nothing kept: it moves again from 0


def test_put_chunk_refuses_more_data_than_announced(receiver: Path) -> None:
    blob = wire.encode_chunk(0, b"z" * 40, wire.CODEC_NONE, None, wire.HASH_BLAKE2B)
    frames = request(1, "put_chunk", seq=0, offset=0, length=10, total=len(blob)) + encode_frame(
        FRAME_DATA, 1, blob[:20])
    (ftype, rid, err), = serve(receiver, frames)[1:]
    assert (ftype, rid, err["code"]) == (FRAME_ERROR, 1, "protocol")
    assert not (receiver / "chunks" / f"{0:020d}.chunk").exists()


def test_finish_writes_end_json_with_named_fields_only(receiver: Path) -> None:
    frames = serve(receiver, request(1, "finish", total_chunks=3, raw_bytes=100, stream_hash="ab" * 16,
                                     from_the_future=1))
    assert frames[1] == (FRAME_REPLY, 1, {"ok": True})
    assert json.loads((receiver / "end.json").read_text()) == {
        "total_chunks": 3, "raw_bytes": 100, "stream_hash": "ab" * 16}


def test_cleanup_removes_the_session_and_ends_the_channel(any_session: Path) -> None:
    frames = serve(any_session, request(1, "cleanup"), request(2, "status"))
    assert frames[1:] == [(FRAME_REPLY, 1, {"removed": True})]
    assert not any_session.exists()


def test_cleanup_with_stay_keeps_the_server_for_another_session_it_attaches_to(tmp_path: Path) -> None:
    """A run's next stream on a host takes the channel its last one used: ``cleanup`` with ``stay`` answers
    and goes on serving; ``attach`` binds the server to another session directory, of another role too,
    and its requests are that role's from then on."""
    first, second = make_session(tmp_path, "send"), make_session(tmp_path, "receive")
    frames = serve(first, request(1, "cleanup", stay=True), request(2, "attach", dir=str(second)),
                   request(3, "put_chunk", seq=0, offset=0, length=0, total=0), request(4, "get_chunk", seq=0),
                   request(5, "cleanup"), request(6, "status"))
    assert frames[1] == (FRAME_REPLY, 1, {"removed": True, "stays": True}) and not first.exists()
    ftype, rid, attached = frames[2]
    assert (ftype, rid, attached["role"], attached["session"]) == (FRAME_REPLY, 2, "receive", SESSION_ID)
    assert "chunk-v1" in attached["capabilities"]
    assert frames[3][:2] == (FRAME_ERROR, 3) and frames[3][2]["code"] != "bad-request"  # a receiver's request now
    assert frames[4][:2] == (FRAME_ERROR, 4) and frames[4][2]["code"] == "bad-request"  # a sender's is not
    assert frames[5] == (FRAME_REPLY, 5, {"removed": True}) and len(frames) == 6, "no stay: the server ended"
    assert not second.exists()


@pytest.mark.parametrize("target,code", [("missing", "session-dir"), ("open", "session-dir"), (None, "bad-request")])
def test_attach_to_what_is_not_a_session_directory_is_refused_and_the_old_one_kept(
        tmp_path: Path, target: str | None, code: str) -> None:
    first = make_session(tmp_path, "send")
    wide = tmp_path / "open"
    wide.mkdir(mode=0o777)
    wide.chmod(0o777)
    fields = {} if target is None else {"dir": str(tmp_path / target)}
    frames = serve(first, request(1, "attach", **fields), request(2, "status"))
    assert frames[1][:2] == (FRAME_ERROR, 1) and frames[1][2]["code"] == code, frames[1]
    assert frames[2][:2] == (FRAME_REPLY, 2) and frames[2][2]["role"] == "send"


def test_cleanup_keep(any_session: Path) -> None:
    frames = serve(any_session, request(1, "abort", keep=True))
    assert frames[1:] == [(FRAME_REPLY, 1, {"removed": False})]
    assert (any_session / "session.json").exists()


# -- the coordinator's channel, over a fake pipe ------------------------------------------


class FakePipe:
    """What AgentChannel needs of an AgentPipe, in memory."""

    def __init__(self, incoming: bytes = b"", host: str = "fake") -> None:
        self.incoming = bytearray(incoming)
        self.written = bytearray()
        self.host = host
        self.closed = False

    def feed(self, data: bytes) -> None:
        self.incoming += data

    async def readexactly(self, n: int) -> bytes:
        if len(self.incoming) < n:
            raise LinkDown(self.host, "the agent channel closed")
        out = bytes(self.incoming[:n])
        del self.incoming[:n]
        return out

    def write(self, data: bytes) -> None:
        self.written += data

    async def drain(self) -> None:
        return None

    async def close(self) -> None:
        self.closed = True

    def drop_connection(self) -> None:
        return None

    def sent(self) -> list[tuple[int, int, Any]]:
        f = io.BytesIO(bytes(self.written))
        out = []
        while f.tell() < len(self.written):
            t, r, p = read_frame(f)
            out.append((t, r, p if t == FRAME_DATA else decode_message(p)))
        return out


def agent_hello(role: str = "send", caps: list[str] | None = None, **extra: Any) -> bytes:
    msg = {"protocol": 1, "agent_version": "0.1.0", "role": role, "session": SESSION_ID,
           "host": "agenthost", "capabilities": caps if caps is not None else list(COORDINATOR_CAPS)}
    msg.update(extra)
    return encode_message(FRAME_HELLO, 0, msg)


NEEDS = ["chunk-v1", "zlib-v1", "blake2b-128-v1"]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_handshake_answers_with_the_coordinators_hello() -> None:
    pipe = FakePipe(agent_hello("receive", unknown_hello_field=1))
    ch = AgentChannel(pipe, "tgt", stall_timeout=5)  # type: ignore[arg-type]
    hello = run(ch.handshake(NEEDS))
    assert hello.role == "receive" and hello.session == SESSION_ID and hello.protocol == 1
    assert pipe.sent() == [(FRAME_HELLO, 0, {"protocol": 1, "capabilities": COORDINATOR_CAPS})]


def test_handshake_capability_mismatch_names_both_lists() -> None:
    theirs = ["chunk-v1", "resume-offset-v1", "none-v1", "zlib-v1", "blake2b-128-v1"]
    need = ["chunk-v1", "zstd-v1", "xxh3-128-v1"]
    pipe = FakePipe(agent_hello(caps=theirs))
    ch = AgentChannel(pipe, "src", stall_timeout=5)  # type: ignore[arg-type]
    with pytest.raises(E.CapabilityMismatch) as e:
        run(ch.handshake(need))
    text = str(e.value)
    assert "zstd-v1" in text and "xxh3-128-v1" in text  # what is missing / what we offer
    for cap in theirs:
        assert cap in text  # what the agent offers
    assert "src" in text
    assert e.value.exit_code == 10
    assert pipe.written == b""  # we never answered: the agent gets no hello


@pytest.mark.parametrize("incoming,words", [
    (agent_hello(protocol=2), "protocol"),
    (encode_message(FRAME_REPLY, 0, {"protocol": 1}), "hello"),
    (b"XX" + agent_hello()[2:], "magic"),
    (encode_frame(FRAME_HELLO, 0, b"[]"), "object"),
])
def test_handshake_protocol_errors(incoming: bytes, words: str) -> None:
    ch = AgentChannel(FakePipe(incoming), "src", stall_timeout=5)  # type: ignore[arg-type]
    with pytest.raises(E.ProtocolError) as e:
        run(ch.handshake(NEEDS))
    assert words in str(e.value)


async def connected(role: str, *replies: bytes) -> tuple[AgentChannel, FakePipe]:
    pipe = FakePipe(agent_hello(role))
    ch = AgentChannel(pipe, "agenthost", stall_timeout=5)  # type: ignore[arg-type]
    await ch.handshake(NEEDS)
    pipe.written.clear()
    for r in replies:
        pipe.feed(r)
    return ch, pipe


def test_request_reply_with_unknown_fields_is_accepted() -> None:
    async def go() -> tuple[dict[str, Any], FakePipe]:
        ch, pipe = await connected("send", encode_message(FRAME_REPLY, 1, {
            "role": "send", "chunks": [0, 1], "brand_new_field": {"nested": True}}))
        return await ch.request("status", verbose=True), pipe

    reply, pipe = run(go())
    assert reply["chunks"] == [0, 1] and reply["brand_new_field"] == {"nested": True}
    assert pipe.sent() == [(FRAME_REQUEST, 1, {"verbose": True, "op": "status"})]


@pytest.mark.parametrize("role,op", [("send", "put_chunk"), ("send", "finish"),
                                     ("receive", "get_chunk"), ("receive", "release"),
                                     ("send", "rm_rf")])
def test_request_not_allowed_for_the_role_is_refused_locally(role: str, op: str) -> None:
    async def go() -> FakePipe:
        ch, pipe = await connected(role)
        with pytest.raises(E.ProtocolError) as e:
            await ch.request(op)
        assert op in str(e.value)
        return pipe

    assert run(go()).written == b""  # nothing went on the wire


def test_request_before_handshake_is_refused() -> None:
    ch = AgentChannel(FakePipe(), "h", stall_timeout=5)  # type: ignore[arg-type]
    with pytest.raises(E.ProtocolError):
        run(ch.request("status"))


@pytest.mark.parametrize("err,cls", [
    ({"code": "session-dir", "reason": "it is a symlink", "details": {}}, E.SessionDirError),
    ({"code": "protocol", "reason": "bad frame", "details": {}}, E.ProtocolError),
    ({"code": "no-chunk", "reason": "chunk 9 is not in the source spool", "details": {}}, E.NoChunk),
    ({"code": "chunk-corrupt", "reason": "chunk 3: payload checksum mismatch", "details": {}}, E.ChunkCorrupt),
    ({"code": "spool-no-space", "reason": "target spool filesystem is full", "details": {}}, E.SpoolFull),
    ({"code": "from-the-future", "reason": "new", "details": {"x": 1}, "extra": 2}, E.RemoteError),
])
def test_error_frame_is_rebuilt_through_from_remote(err: dict[str, Any],
                                                    cls: type[E.ZchunkError]) -> None:
    async def go() -> None:
        ch, _ = await connected("send", encode_message(FRAME_ERROR, 1, err))
        await ch.request("status")

    with pytest.raises(cls) as e:
        run(go())
    assert type(e.value) is cls
    assert err["reason"] in str(e.value) and "agenthost" in str(e.value)
    if isinstance(e.value, E.RemoteError):
        assert e.value.fields["code"] == err["code"]


def test_reply_to_another_request_is_a_protocol_error() -> None:
    async def go() -> None:
        ch, _ = await connected("send", encode_message(FRAME_REPLY, 99, {}))
        await ch.request("status")

    with pytest.raises(E.ProtocolError):
        run(go())


def test_silent_agent_is_a_link_down_after_the_stall_timeout() -> None:
    class SilentPipe(FakePipe):
        async def readexactly(self, n: int) -> bytes:
            await asyncio.Event().wait()
            return b""

    ch = AgentChannel(SilentPipe(), "quiet", stall_timeout=0.05)  # type: ignore[arg-type]
    with pytest.raises(LinkDown) as e:
        run(ch.handshake(NEEDS))
    assert e.value.host == "quiet"


@pytest.mark.parametrize("details", [
    {"host": "spoofed"},
    {"reason": "second reason"},
    "not a mapping",
    ["nor", "this"],
])
def test_from_remote_survives_any_details(details: Any) -> None:
    """A peer's details must never turn into a TypeError inside the error path."""
    for code in ("session-dir", "protocol", "no-chunk"):
        err = E.from_remote("h", {"code": code, "reason": "r", "details": details})
        assert isinstance(err, E.ZchunkError)
        assert "r" in str(err)


def test_from_remote_keeps_the_details_of_a_generic_remote_error() -> None:
    """STYLE: the zfs command, exit status and stderr ride along with a remote error."""
    details = {"command": "zfs receive -u tank/x", "status": 1, "stderr": "cannot receive"}
    err = E.from_remote("h", {"code": "zfs-failed", "reason": "zfs receive failed", "details": details})
    kept = err.fields.get("details", err.fields)
    assert {k: kept.get(k) for k in details} == details


# -- relaying a chunk between two channels -------------------------------------------------


@pytest.mark.parametrize("offset", [0, 13])
def test_relay_chunk_forwards_data_frames_from_the_offset(offset: int) -> None:
    blob = wire.encode_chunk(4, os.urandom(3000), wire.CODEC_NONE, None, wire.HASH_BLAKE2B)
    rest = blob[offset:]
    src_frames = encode_message(FRAME_REPLY, 1, {"seq": 4, "offset": offset, "length": len(rest),
                                                 "total": len(blob)})
    for i in range(0, len(rest), 1000):
        src_frames += encode_frame(FRAME_DATA, 1, rest[i:i + 1000])
    moved: list[int] = []

    async def go() -> tuple[bool, FakePipe, FakePipe]:
        src, spipe = await connected("send", src_frames)
        dst, dpipe = await connected("receive", encode_message(FRAME_REPLY, 1, {"stored": True}))
        stored = await relay_chunk(ChannelChunks(SenderClient(src)), ReceiverClient(dst), 4, offset, moved.append)
        return stored, spipe, dpipe

    stored, spipe, dpipe = run(go())
    assert stored is True
    assert spipe.sent() == [(FRAME_REQUEST, 1, {"seq": 4, "offset": offset, "op": "get_chunk"})]
    sent = dpipe.sent()
    assert sent[0] == (FRAME_REQUEST, 1, {"seq": 4, "offset": offset, "length": len(rest),
                                          "total": len(blob), "op": "put_chunk"})
    assert all(t == FRAME_DATA and r == 1 for t, r, _ in sent[1:])
    assert b"".join(p for _, _, p in sent[1:]) == rest
    assert sum(moved) == len(rest)


def test_relay_chunk_refuses_more_data_than_announced() -> None:
    src_frames = (encode_message(FRAME_REPLY, 1, {"seq": 0, "offset": 0, "length": 5, "total": 5})
                  + encode_frame(FRAME_DATA, 1, b"123456"))

    async def go() -> None:
        src, _ = await connected("send", src_frames)
        dst, _ = await connected("receive")
        await relay_chunk(ChannelChunks(SenderClient(src)), ReceiverClient(dst), 0, 0)

    with pytest.raises(E.ProtocolError):
        run(go())


@pytest.mark.parametrize("offset", [0, 13])
def test_a_local_source_spool_is_relayed_straight_from_its_chunk_file(tmp_path: Path, offset: int) -> None:
    """Push mode: the coordinator reads the local sender's chunk itself; the target sees the same frames."""
    path = make_session(tmp_path, "send")
    blob = wire.encode_chunk(4, os.urandom(3 << 20), wire.CODEC_NONE, None, wire.HASH_BLAKE2B)
    (path / "chunks" / (wire.chunk_name(4) + ".chunk")).write_bytes(blob)
    rest = blob[offset:]

    async def go() -> tuple[bool, FakePipe]:
        dst, dpipe = await connected("receive", encode_message(FRAME_REPLY, 1, {"stored": True}))
        return await relay_chunk(LocalSpoolChunks(str(path), "localhost"), ReceiverClient(dst), 4, offset), dpipe

    stored, dpipe = run(go())
    sent = dpipe.sent()
    assert stored is True
    assert sent[0] == (FRAME_REQUEST, 1, {"seq": 4, "offset": offset, "length": len(rest),
                                          "total": len(blob), "op": "put_chunk"})
    assert all(t == FRAME_DATA and r == 1 and len(p) <= wire.DATA_PIECE for t, r, p in sent[1:])
    assert b"".join(p for _, _, p in sent[1:]) == rest


def test_a_local_source_spool_refuses_what_the_agent_refuses(tmp_path: Path) -> None:
    """A missing chunk is the agent's no-chunk; a symlink in a chunk's place is never followed."""
    path = make_session(tmp_path, "send")
    (tmp_path / "elsewhere").write_bytes(b"secret")
    (path / "chunks" / (wire.chunk_name(1) + ".chunk")).symlink_to(tmp_path / "elsewhere")

    async def go(seq: int) -> None:
        dst, _ = await connected("receive")
        await relay_chunk(LocalSpoolChunks(str(path), "localhost"), ReceiverClient(dst), seq, 0)

    with pytest.raises(E.NoChunk):
        run(go(0))
    with pytest.raises(E.ZchunkError) as link:
        run(go(1))
    assert "symlink" in str(link.value)


# -- chunk sizes: the ramp ------------------------------------------------------------


@pytest.mark.parametrize("first, sizes", [
    (None, [1 << 20, 1 << 20, 1 << 20, 1 << 19]),  # no first_chunk: every chunk full size
    (1 << 18, [1 << 18, 1 << 19, 1 << 20, 1 << 20, 1 << 18]),  # 256K, 512K, then 1M: zfs receive starts sooner
    (1 << 30, [1 << 20, 1 << 20, 1 << 20, 1 << 19]),  # never above chunk_size
])
def test_sender_ramps_chunk_sizes_from_first_chunk(tmp_path: Path, first: int | None, sizes: list[int]) -> None:
    """Chunk n holds min(chunk_size, first_chunk * 2**n) raw bytes; the stream's bytes are all there, in order."""
    stream = bytes(range(256)) * (sum(sizes) // 256)
    path = sender_session(tmp_path, stream, **({"first_chunk": first} if first is not None else {}))
    sess = wire.Session(str(path))
    assert [sess.chunk_limit(n) for n in range(len(sizes) - 1)] == sizes[:-1]  # the last one is what is left
    wire.SenderDaemon(sess).run()
    chunks = sorted((path / "chunks").glob("*.chunk"))
    assert [wire.ChunkHeader.unpack(c.read_bytes()[:wire.CHUNK_HEADER_SIZE]).raw_len for c in chunks] == sizes
    assert b"".join(wire.decode_chunk(c.read_bytes(), n) for n, c in enumerate(chunks)) == stream
    assert sess.chunk_limit(10**6) == 1 << 20


def sender_session(tmp_path: Path, stream: bytes, **cfg: Any) -> Path:
    """A sender session directory whose zfs is a fake that prints ``stream`` (the cutting and encoding are
    what is tested), with these session settings."""
    (tmp_path / "stream").write_bytes(stream)
    fake_zfs = tmp_path / "fake-zfs"
    fake_zfs.write_text(f"#!/bin/sh\nexec cat {tmp_path / 'stream'}\n")
    fake_zfs.chmod(0o755)
    path = make_session(tmp_path, "send")
    session = json.loads((path / "session.json").read_text())
    session.update({"zfs": str(fake_zfs), "send": {"snapshot": "pool/ds@s1", "base": None, "flags": []}, **cfg})
    (path / "session.json").write_text(json.dumps(session))
    return path


def sender_chunks(tmp_path: Path, stream: bytes, **cfg: Any) -> list[Path]:
    """The sender daemon run over ``stream`` (``sender_session``); its chunk files in order."""
    path = sender_session(tmp_path, stream, spool_max=1 << 30, **cfg)
    wire.SenderDaemon(wire.Session(str(path))).run()
    return sorted((path / "chunks").glob("*.chunk"))


@pytest.mark.parametrize("expected, sizes_mib", [
    # as expected: up 1, 2, 4, 8, then half of what is left (8.5, 4.25), 4 MiB at the least, the rest
    (32 << 20, [1, 2, 4, 8, 8.5, 4.25, 4, 0.25]),
    # larger than expected (8 MiB): past it, an eighth of what was sent counts as left (still under 4 MiB)
    (8 << 20, [1, 2, 4, 4, 4, 4, 1]),
])
def test_last_chunks_get_smaller_towards_the_expected_size(tmp_path: Path, expected: int,
                                                           sizes_mib: list[float]) -> None:
    """The chunk still on its way when zfs send ends is a small one (first_chunk 1 MiB, chunk_size 16 MiB)."""
    sizes = [int(m * (1 << 20)) for m in sizes_mib]
    stream = bytes(range(256)) * (sum(sizes) // 256)
    chunks = sender_chunks(tmp_path, stream, chunk_size=16 << 20, first_chunk=1 << 20, expected_bytes=expected)
    assert [wire.ChunkHeader.unpack(c.read_bytes()[:wire.CHUNK_HEADER_SIZE]).raw_len for c in chunks] == sizes
    assert b"".join(wire.decode_chunk(c.read_bytes(), n) for n, c in enumerate(chunks)) == stream


def test_adaptive_level_is_1_while_the_link_keeps_up_and_climbs_once_chunks_wait(tmp_path: Path) -> None:
    """No level given: 1 while no chunk has waited SLOW_LINK_AGE in the source spool; then one level up per
    chunk (nothing measured yet says compression would fall behind), and down again once the link keeps up."""
    path = make_session(tmp_path, "send")
    daemon = wire.SenderDaemon(wire.Session(str(path)))
    assert daemon.level() == 1  # empty spool
    chunk = path / "chunks" / (wire.chunk_name(0) + ".chunk")
    chunk.write_bytes(b"x")
    assert daemon.level() == 1 and daemon.stores_as_is(1)  # just made: chunks that barely compress skip it
    old = time.time() - wire.SLOW_LINK_AGE - 1
    os.utime(chunk, (old, old))
    assert [daemon.level() for _ in range(3)] == [2, 3, 4]  # waiting for the link: every byte counts
    assert not daemon.stores_as_is(4)
    chunk.unlink()
    assert [daemon.level() for _ in range(4)] == [3, 2, 1, 1]
    cfg = json.loads((path / "session.json").read_text())
    (path / "session.json").write_text(json.dumps(dict(cfg, level=6)))
    fixed = wire.SenderDaemon(wire.Session(str(path)))
    assert fixed.level() == 6 and fixed.stores_as_is(6)  # --compress zstd:6 is kept


MB = 1e6


def test_the_level_climbs_only_while_compressing_stays_twice_as_fast_as_the_link() -> None:
    adapter = wire.LevelAdapter(wire.CODEC_ZSTD)
    adapter.observe(1, 64 << 20, 64 * (1 << 20) / (400 * MB))  # 400 MB/s at level 1
    # a 10 MB/s link: the guesses (x0.75 per level) stay above 20 MB/s up to the top
    assert [adapter.next(True, 10 * MB) for _ in range(9)] == [2, 3, 4, 5, 6, 7, 8, 9, 9]
    # measured at 9: 15 MB/s, under twice the link: one down; 8 is guessed from nothing measured there
    adapter.observe(9, 32 << 20, 32 * (1 << 20) / (15 * MB))
    assert adapter.next(True, 10 * MB) == 8
    adapter.observe(8, 32 << 20, 32 * (1 << 20) / (25 * MB))
    assert adapter.next(True, 10 * MB) == 8, "25 MB/s holds, and 9 is known to be too slow"
    assert adapter.next(True, 40 * MB) == 7, "a faster link: 8 falls behind"
    assert [adapter.next(False, None) for _ in range(7)] == [6, 5, 4, 3, 2, 1, 1], "the link keeps up"
    assert wire.LevelAdapter(wire.CODEC_ZLIB).high == 6 and wire.LevelAdapter(wire.CODEC_NONE).high == 1


def test_the_link_rate_is_raw_bytes_released_from_the_spool_per_second(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_session(tmp_path, "send")
    daemon = wire.SenderDaemon(wire.Session(str(path)))
    clock = [100.0]
    monkeypatch.setattr(wire.time, "monotonic", lambda: clock[0])
    for seq in range(4):
        (path / "chunks" / (wire.chunk_name(seq) + ".chunk")).write_bytes(b"x")
        daemon.produced[seq] = 8 << 20
    assert daemon.link_rate() is None  # the first look
    (path / "chunks" / (wire.chunk_name(0) + ".chunk")).unlink()
    (path / "chunks" / (wire.chunk_name(1) + ".chunk")).unlink()
    clock[0] += 2.0
    assert daemon.link_rate() == (16 << 20) / 2.0
    (path / "chunks" / (wire.chunk_name(2) + ".chunk")).unlink()
    clock[0] += 0.2
    assert daemon.link_rate() == (16 << 20) / 2.0, "under half a second: the last rate"
    clock[0] += 1.8
    assert daemon.link_rate() == ((16 << 20) / 2.0 + (8 << 20) / 2.0) / 2


def test_sender_stores_as_is_only_after_a_chunk_that_did_not_compress(tmp_path: Path) -> None:
    """A first piece that does not compress skips compression only when the chunk before did not compress
    either: a stream of already compressed blocks is stored as it is from its second chunk on, while a
    random extent at the start of an otherwise compressible chunk (a VM image) does not mislead."""
    rng = random.Random(5)
    noise = rng.randbytes(2 << 20)
    text = b"".join(b"row %d of a table that compresses\n" % i for i in range(60000))[:2 << 20]
    stream = noise + noise[::-1] + text + noise[:1 << 20] + text[:1 << 20] + text
    chunks = sender_chunks(tmp_path, stream, chunk_size=2 << 20, first_chunk=2 << 20, expected_bytes=len(stream),
                           codec="zlib", level=None)
    codecs = [wire.ChunkHeader.unpack(c.read_bytes()[:wire.CHUNK_HEADER_SIZE]).codec for c in chunks]
    # noise (nothing before it: tried), noise (after noise: stored as is), text (after noise, but its first
    # piece compresses), noise|text (first piece noise, but the chunk before compressed: tried), text
    assert codecs == [wire.CODEC_ZLIB, wire.CODEC_NONE, wire.CODEC_ZLIB, wire.CODEC_ZLIB, wire.CODEC_ZLIB], codecs
    sizes = [len(c.read_bytes()) for c in chunks]
    assert sizes[3] < 1.6 * (1 << 20), "the mixed chunk was compressed: its text half shrank"
    assert b"".join(wire.decode_chunk(c.read_bytes(), n) for n, c in enumerate(chunks)) == stream
