"""The sender daemon started again in its session (its first died: killed, a reboot): it runs the same
``zfs send`` anew, checks every chunk it cut before against ``raw.log`` by its raw checksum, writes only
those neither in the spool nor released, and gives up (aborted) where the stream differs. Pure agent logic:
a stand-in ``zfs`` that prints a fixed file is enough here; the real thing, on zfs-fuse with the source side
killed mid-stream, is in tests/test_faults.py (test_the_source_side_killed_mid_stream_...)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from zchunk import agent

MiB = 1 << 20


def install(tmp_path: Path, stream: Path) -> Path:
    fake = tmp_path / "fake-zfs"  # `zfs send ...` -> the stream file
    fake.write_text(f"#!/bin/sh\nexec cat {stream}\n")
    fake.chmod(0o755)
    cfg = {"id": "20250101T000000Z-regen", "role": "send", "codec": "zlib", "level": 1, "checksum": "blake2b-128",
           "chunk_size": MiB, "spool_max": 64 * MiB, "zfs": str(fake),
           "send": {"snapshot": "pool/ds@s1", "base": None, "flags": []}}
    p = subprocess.run([sys.executable, "-c", agent.BOOTSTRAP, "install", str(tmp_path / "spool"), "s-send",
                        json.dumps(cfg)], input=Path(agent.__file__).read_bytes(), capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return Path(json.loads(p.stdout)["path"])


def run_daemon(session: Path) -> dict[str, Any]:
    started = subprocess.run([sys.executable, str(session / "agent.py"), "start", str(session)],
                             capture_output=True, timeout=60)
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = json.loads((session / "sender.json").read_text()) if (session / "sender.json").exists() else {}
        if st.get("state") in ("done", "failed", "aborted"):
            return st
        time.sleep(0.05)
    raise AssertionError("the sender daemon did not finish")


def chunk(session: Path, seq: int) -> Path:
    return session / "chunks" / f"{agent.chunk_name(seq)}.chunk"


def raw_of(path: Path, seq: int) -> bytes:
    return agent.decode_chunk(path.read_bytes(), seq)


def test_a_restarted_sender_writes_only_what_is_missing_and_gives_up_on_another_stream(tmp_path: Path) -> None:
    stream = tmp_path / "stream"
    stream.write_bytes(random.Random(7).randbytes(6 * MiB + 12345))
    session = install(tmp_path, stream)
    first = run_daemon(session)
    assert first["state"] == "done" and first["total_chunks"] == 7, first
    originals = {seq: raw_of(chunk(session, seq), seq) for seq in range(7)}
    assert len((session / "raw.log").read_text().splitlines()) == 7

    # the coordinator released 0-2 (fed to zfs receive), chunk 5 was lost, the daemon died "running"
    for seq in (0, 1, 2, 5):
        chunk(session, seq).unlink()
    (session / "released.json").write_text(json.dumps({"upto": 3}))
    kept = {seq: chunk(session, seq).stat().st_mtime_ns for seq in (3, 4, 6)}
    (session / "sender.json").write_text(json.dumps({**first, "state": "running", "pid": 2 ** 22 + 1}))
    again = run_daemon(session)
    assert again["state"] == "done" and again["stream_hash"] == first["stream_hash"], again
    assert again["regenerated"] == 7 and again["total_chunks"] == 7
    left = sorted(int(p.name.split(".")[0]) for p in (session / "chunks").iterdir())
    assert left == [3, 4, 5, 6], "released ones stay gone"
    assert raw_of(chunk(session, 5), 5) == originals[5], "the lost chunk written again, the same bytes"
    assert {seq: chunk(session, seq).stat().st_mtime_ns for seq in (3, 4, 6)} == kept, "the others untouched"
    assert [e["kind"] for e in again["events"]].count("regenerated") == 1

    # zfs send now gives other bytes from chunk 4 on: aborted, nothing overwritten
    data = bytearray(stream.read_bytes())
    data[4 * MiB + 10] ^= 0xFF
    stream.write_bytes(bytes(data))
    chunk(session, 5).unlink()
    (session / "sender.json").write_text(json.dumps({**again, "state": "running", "pid": 2 ** 22 + 1}))
    differs = run_daemon(session)
    assert differs["state"] == "aborted" and "other bytes at chunk 4" in differs["reason"], differs
    assert not chunk(session, 5).exists()
    subprocess.run([sys.executable, str(session / "agent.py"), "remove", str(session)], capture_output=True,
                   timeout=60)
    assert not os.path.exists(session)


def test_release_frees_the_chunks_even_when_its_record_cannot_be_written(tmp_path: Path, monkeypatch: Any) -> None:
    """A release is what makes room on a full spool filesystem: the chunks go first, and ``released.json``
    (only an economy for a restarted sender) failing for lack of space is not an error of the release."""
    stream = tmp_path / "stream"
    stream.write_bytes(random.Random(8).randbytes(4 * MiB))
    session = install(tmp_path, stream)
    assert run_daemon(session)["state"] == "done"
    server = agent.Server(agent.Session(str(session)), None, None)  # type: ignore[arg-type]

    def full(path: str, data: Any) -> None:
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(agent, "write_json", full)
    assert server.answer(1, {"op": "release", "upto": 2}) == (agent.FRAME_REPLY, {"released": 2})
    assert sorted(int(p.name.split(".")[0]) for p in (session / "chunks").iterdir()) == [2, 3]
    assert not (session / "released.json").exists()
    monkeypatch.undo()
    assert server.answer(2, {"op": "release", "upto": 3}) == (agent.FRAME_REPLY, {"released": 1})
    assert json.loads((session / "released.json").read_text()) == {"upto": 3}


def test_status_does_not_lose_a_chunk_renamed_while_the_spool_is_listed(tmp_path: Path, monkeypatch: Any) -> None:
    """readdir may list a file renamed meanwhile (a received ``.part`` becoming ``.chunk``) under neither
    name: the bytes on the target would drop by a chunk for one progress event. Two listings must agree."""
    stream = tmp_path / "stream"
    stream.write_bytes(random.Random(9).randbytes(3 * MiB))
    session = install(tmp_path, stream)
    assert run_daemon(session)["state"] == "done"
    sess = agent.Session(str(session))
    real = sess.spool_listing
    calls = []

    def racy() -> tuple[dict[int, int], dict[int, int], int]:
        done, parts, used = real()
        calls.append(1)
        if len(calls) == 1:  # the first listing misses chunk 1, as a concurrent rename can make it
            used -= done.pop(1)
        return done, parts, used

    monkeypatch.setattr(sess, "spool_listing", racy)
    reply = agent.Server(sess, None, None).status(1, {"op": "status"})  # type: ignore[arg-type]
    assert reply["chunks"] == [0, 1, 2] and reply["spool_bytes"] == real()[2], reply
