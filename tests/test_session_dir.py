"""Session directory safety (issue 5, item 4), against the real agent program.

The agent is run exactly as the coordinator runs it: one-shot commands through
the bootstrap (``python3 -c BOOTSTRAP install BASE ID CFG`` with the agent's
source on stdin), then the installed copy (``python3 DIR/agent.py serve DIR``)
speaking frames on stdin/stdout. No zfs is needed: nothing here gets as far as
starting a daemon. Every refusal must be a ``session-dir`` error naming the
path, and must leave whatever was planted (and what it points to) untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from zchunk import agent
from zchunk.agent import (
    BOOTSTRAP,
    FRAME_DATA,
    FRAME_ERROR,
    FRAME_HELLO,
    FRAME_REPLY,
    FRAME_REQUEST,
    decode_message,
    encode_chunk,
    encode_frame,
    encode_message,
    read_frame,
)

AGENT_SOURCE = Path(agent.__file__).read_bytes()
NOBODY = 65534
SID = "20250101T000000Z-cafe0001"


def config(role: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {"id": SID, "role": role, "codec": "zlib", "level": None, "checksum": "blake2b-128",
                           "chunk_size": 1 << 20, "spool_max": 1 << 30, "idle_timeout": 60}
    if role == "send":
        cfg["send"] = {"snapshot": "pool/ds@s1", "base": None, "intermediates": True, "flags": []}
    else:
        cfg["receive"] = {"target": "pool/replica", "flags": []}
    return cfg


def bootstrap(*args: str) -> tuple[int, dict[str, Any]]:
    """``python3 -c BOOTSTRAP ARGS...`` with the agent on stdin, as ``zchunk.client.HostAgent.install`` runs it."""
    p = subprocess.run([sys.executable, "-c", BOOTSTRAP, *args], input=AGENT_SOURCE, capture_output=True,
                       timeout=60)
    return p.returncode, json.loads(p.stdout.decode().strip().splitlines()[-1])


def install(base: Path, role: str = "receive", name: str | None = None) -> tuple[int, dict[str, Any]]:
    return bootstrap("install", str(base), f"{SID}-{role}" if name is None else name, json.dumps(config(role)))


def installed(base: Path, role: str) -> Path:
    rc, out = install(base, role)
    assert rc == 0, out
    return Path(out["path"])


def refused(rc: int, out: dict[str, Any], *words: str) -> str:
    assert rc == 1 and "error" in out, out
    err = out["error"]
    assert err["code"] == "session-dir", err
    for w in words:
        assert w in err["reason"], err["reason"]
    return str(err["reason"])


def tree(path: Path) -> dict[str, tuple[int, bytes]]:
    """What is under ``path`` (not following links): relative name -> (mode, content or link target)."""
    out: dict[str, tuple[int, bytes]] = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(root) / name
            st = p.lstat()
            body = os.readlink(p).encode() if p.is_symlink() else (p.read_bytes() if p.is_file() else b"")
            out[str(p.relative_to(path))] = (st.st_mode, body)
    return out


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A directory the agent must never write into or remove from (an attacker's target)."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    (d / "precious").write_bytes(b"do not touch\n")
    return d


# -- install -------------------------------------------------------------------------------------


def test_install_creates_private_directories_and_files(base: Path) -> None:
    path = installed(base, "receive")
    assert path == base / f"{SID}-receive"
    for d in (base, path, path / "chunks"):
        st = d.lstat()
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700, d
    for f in ("agent.py", "session.json", "heartbeat", "reserve"):
        st = (path / f).lstat()
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, f
    assert (path / "agent.py").read_bytes() == AGENT_SOURCE
    assert json.loads((path / "session.json").read_text()) == config("receive")


def test_a_relative_base_gives_an_absolute_session_path(tmp_path: Path) -> None:
    """The daemon is recognised by its path in its command line: the coordinator must use the absolute one."""
    p = subprocess.run([sys.executable, "-c", BOOTSTRAP, "install", "relative-spool", f"{SID}-send",
                        json.dumps(config("send"))], input=AGENT_SOURCE, capture_output=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stdout
    assert json.loads(p.stdout)["path"] == str(tmp_path / "relative-spool" / f"{SID}-send")


def test_a_pre_created_session_directory_is_refused_and_left_alone(base: Path) -> None:
    base.mkdir(mode=0o700)
    planted = base / f"{SID}-receive"
    planted.mkdir(mode=0o700)
    (planted / "agent.py").write_text("print('not the agent')\n")
    before = tree(planted)
    reason = refused(*install(base), str(planted), "already exists")
    assert "reuse" in reason
    assert tree(planted) == before


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-directory", "dangling"])
def test_a_symlink_in_place_of_the_session_directory_is_refused(base: Path, elsewhere: Path,
                                                                dangling: bool) -> None:
    base.mkdir(mode=0o700)
    link = base / f"{SID}-receive"
    link.symlink_to(elsewhere / "nothing-here" if dangling else elsewhere)
    before = tree(elsewhere)
    refused(*install(base), str(link))
    assert link.is_symlink() and tree(elsewhere) == before
    assert not (elsewhere / "nothing-here").exists()


def test_a_file_in_place_of_the_session_directory_is_refused(base: Path) -> None:
    base.mkdir(mode=0o700)
    (base / f"{SID}-receive").write_text("x")
    refused(*install(base), "already exists")
    assert (base / f"{SID}-receive").read_text() == "x"


def test_a_symlink_as_the_base_directory_is_refused(tmp_path: Path, elsewhere: Path) -> None:
    os.chmod(elsewhere, 0o700)
    link = tmp_path / "spool-link"
    link.symlink_to(elsewhere)
    before = tree(elsewhere)
    refused(*install(link), str(link), "symlink")
    assert tree(elsewhere) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_base_owned_by_someone_else_is_refused(base: Path) -> None:
    base.mkdir(mode=0o700)
    os.chown(base, NOBODY, NOBODY)
    refused(*install(base), str(base), f"owned by uid {NOBODY}")
    assert os.listdir(base) == []


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o720, 0o702, 0o750 | 0o020])
def test_a_group_or_world_writable_base_is_refused(base: Path, mode: int) -> None:
    base.mkdir()
    os.chmod(base, mode)
    refused(*install(base), str(base), "writable by group or others", f"{mode:o}")
    assert os.listdir(base) == []


def test_a_base_that_cannot_be_created_is_a_clear_refusal(tmp_path: Path) -> None:
    for base in (tmp_path / "no" / "such" / "parent", tmp_path / "a-file" / "spool"):
        (tmp_path / "a-file").write_text("x")
        refused(*install(base), str(base), "cannot create spool base directory")


def test_a_readable_but_not_writable_base_is_accepted(base: Path) -> None:
    base.mkdir()
    os.chmod(base, 0o755)  # only *writable* by others is a danger
    assert install(base)[0] == 0


@pytest.mark.parametrize("name", ["", ".", "..", "../escape", "a/b", ".hidden"])
def test_session_names_cannot_leave_the_base(base: Path, name: str) -> None:
    rc, out = install(base, name=name)
    assert rc == 1 and out["error"]["code"] == "bad-request", out
    assert not (base.parent / "escape").exists()


# -- an installed session directory that changed under the agent ---------------------------------


def agent_cmd(path: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, str(path / "agent.py"), *args], input=stdin, capture_output=True,
                          timeout=60)


def error_of(p: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    out = json.loads(p.stdout.decode().strip().splitlines()[-1])
    assert p.returncode == 1 and "error" in out, (p.returncode, out, p.stderr)
    return dict(out["error"])


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
@pytest.mark.parametrize("command", ["serve", "start", "remove"])
def test_a_session_directory_now_owned_by_someone_else_is_refused(base: Path, command: str) -> None:
    path = installed(base, "receive")
    os.chown(path, NOBODY, NOBODY)
    # a copy of the agent outside: the one inside is what we refuse to trust
    copy = base.parent / "agent-copy"
    copy.mkdir()
    (copy / "agent.py").write_bytes(AGENT_SOURCE)
    err = error_of(agent_cmd(copy, command, str(path)))
    assert err["code"] == "session-dir" and f"owned by uid {NOBODY}" in err["reason"], err
    assert (path / "session.json").exists(), "a refused remove removes nothing"


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_session_directory_opened_up_afterwards_is_refused(base: Path, mode: int) -> None:
    path = installed(base, "send")
    os.chmod(path, mode)
    err = error_of(agent_cmd(path, "serve", str(path)))
    assert err["code"] == "session-dir" and "writable by group or others" in err["reason"]


def test_a_symlink_in_place_of_the_chunks_directory_is_refused(base: Path, elsewhere: Path) -> None:
    path = installed(base, "receive")
    (path / "chunks").rmdir()
    (path / "chunks").symlink_to(elsewhere)
    before = tree(elsewhere)
    err = error_of(agent_cmd(path, "serve", str(path)))
    assert err["code"] == "session-dir" and "chunks" in err["reason"], err
    assert tree(elsewhere) == before


@pytest.mark.parametrize("name", ["session.json", "receiver.json"])
def test_a_symlink_in_place_of_a_state_file_is_refused(base: Path, elsewhere: Path, name: str) -> None:
    path = installed(base, "receive")
    secret = elsewhere / "precious"
    secret.write_text(json.dumps(config("receive") | {"state": "running"}))
    (path / name).unlink(missing_ok=True)
    (path / name).symlink_to(secret)
    frames = conversation(path, request(1, "status"))
    err = frames[0][2] if frames else error_of(agent_cmd(path, "serve", str(path)))
    if frames:
        assert frames[0][0] == FRAME_ERROR, frames
    assert err["code"] == "session-dir" and name in err["reason"] and "symlink" in err["reason"], err


# -- chunk files: a symlink or a hard link planted where the agent writes or reads ----------------


def hello() -> bytes:
    return encode_message(FRAME_HELLO, 0, {"protocol": 1, "capabilities": ["chunk-v1"]})


def request(req_id: int, op: str, **fields: Any) -> bytes:
    return encode_message(FRAME_REQUEST, req_id, dict(fields, op=op))


def conversation(path: Path, *frames: bytes) -> list[tuple[int, int, Any]]:
    """One real ``agent.py serve`` process: our frames in, its frames (after its hello) out."""
    p = agent_cmd(path, "serve", str(path), stdin=hello() + b"".join(frames))
    import io

    out = io.BytesIO(p.stdout)
    got: list[tuple[int, int, Any]] = []
    while True:
        try:
            ftype, rid, payload = read_frame(out)
        except (EOFError, agent.AgentError):
            break
        got.append((ftype, rid, payload if ftype == FRAME_DATA else decode_message(payload)))
    if got and got[0][0] == FRAME_HELLO:
        got = got[1:]
    return got


def chunk_blob(seq: int) -> bytes:
    return encode_chunk(seq, b"zfs send bytes " * 1000, agent.CODEC_ZLIB, None, agent.HASH_BLAKE2B)


def put(seq: int, blob: bytes, offset: int = 0, req_id: int = 1) -> bytes:
    data = blob[offset:]
    return request(req_id, "put_chunk", seq=seq, offset=offset, length=len(data), total=len(blob)) + \
        encode_frame(FRAME_DATA, req_id, data)


@pytest.mark.parametrize("offset", [0, 100], ids=["new-chunk", "resumed-chunk"])
def test_a_symlink_in_place_of_a_part_file_is_never_written_through(base: Path, elsewhere: Path,
                                                                     offset: int) -> None:
    path = installed(base, "receive")
    victim = elsewhere / "precious"
    part = path / "chunks" / f"{3:020d}.part"
    part.symlink_to(victim)
    blob = chunk_blob(3)
    frames = conversation(path, put(3, blob, offset), request(2, "status"))
    assert victim.read_bytes() == b"do not touch\n", "the agent wrote through a planted symlink"
    ftype, rid, msg = frames[0]
    if offset == 0:  # a fresh chunk replaces whatever was in its place (the link, not its target)
        assert (ftype, msg) == (FRAME_REPLY, {"stored": True}), frames
        assert (path / "chunks" / f"{3:020d}.chunk").read_bytes() == blob
    else:  # resuming into a link: refused, clearly, and the channel goes on
        assert ftype == FRAME_ERROR and msg["code"] == "session-dir" and "symlink" in msg["reason"], frames
    assert frames[1][0] == FRAME_REPLY and frames[1][1] == 2, "the channel stays in step"


def test_a_hard_link_in_place_of_a_part_file_is_never_resumed_into(base: Path, elsewhere: Path) -> None:
    path = installed(base, "receive")
    victim = elsewhere / "precious"
    part = path / "chunks" / f"{5:020d}.part"
    os.link(victim, part)
    blob = chunk_blob(5)
    frames = conversation(path, put(5, blob, offset=5), request(2, "status"))
    assert victim.read_bytes() == b"do not touch\n"
    assert frames[0][0] == FRAME_ERROR and frames[0][2]["code"] == "session-dir", frames
    assert frames[1][0] == FRAME_REPLY


def test_a_symlink_in_place_of_a_chunk_is_never_served(base: Path, elsewhere: Path) -> None:
    path = installed(base, "send")
    secret = elsewhere / "precious"
    (path / "chunks" / f"{0:020d}.chunk").symlink_to(secret)
    frames = conversation(path, request(1, "get_chunk", seq=0, offset=0), request(2, "status"))
    assert all(b"do not touch" not in (p if isinstance(p, bytes) else json.dumps(p).encode())
               for _, _, p in frames), "the link's target was sent to the coordinator"
    assert frames[0][0] == FRAME_ERROR and frames[0][2]["code"] == "session-dir", frames
    assert frames[1][0] == FRAME_REPLY and frames[1][2]["chunks"] == [0]  # listed, but never followed


def test_remove_unlinks_planted_links_and_never_follows_them(base: Path, elsewhere: Path) -> None:
    path = installed(base, "send")
    (path / "chunks" / "dir-link").symlink_to(elsewhere)
    (path / "file-link").symlink_to(elsewhere / "precious")
    before = tree(elsewhere)
    p = agent_cmd(path, "remove", str(path))
    assert p.returncode == 0, p.stderr
    assert not path.exists() and tree(elsewhere) == before


# -- atomic writes ----------------------------------------------------------------------------------


def test_write_atomic_never_writes_through_a_planted_temp_file(tmp_path: Path, elsewhere: Path) -> None:
    target = tmp_path / "state.json"
    (tmp_path / f"state.json.{os.getpid()}.tmp").symlink_to(elsewhere / "precious")
    agent.write_atomic(str(target), b'{"new": true}')
    assert target.read_bytes() == b'{"new": true}' and not target.is_symlink()
    assert (elsewhere / "precious").read_bytes() == b"do not touch\n"
    assert not (tmp_path / f"state.json.{os.getpid()}.tmp").exists()


def test_files_the_agent_creates_use_o_excl_or_o_nofollow() -> None:
    """Every ``os.open(..., O_CREAT ...)`` in the agent also has O_EXCL or O_NOFOLLOW (read from the code)."""
    import ast

    tree_ = ast.parse(AGENT_SOURCE.decode())
    opens = [n for n in ast.walk(tree_) if isinstance(n, ast.Call) and ast.unparse(n.func) in (
        "os.open", "open_nofollow")]
    assert opens
    for call in opens:
        flags = ast.unparse(call.args[1]) if len(call.args) > 1 else ""
        if ast.unparse(call.func) == "os.open" and "O_CREAT" in flags:
            assert "O_NOFOLLOW" in flags or "O_EXCL" in flags, ast.unparse(call)
    plain = [n for n in ast.walk(tree_) if isinstance(n, ast.Call) and ast.unparse(n.func) == "open"]
    assert all("/proc/" in ast.unparse(n.args[0]) for n in plain), [ast.unparse(n) for n in plain]


@pytest.mark.zfs
def test_a_relative_spool_dir_works_end_to_end(pool_factory: Any, sshd_local: Any, tmp_path: Path) -> None:
    """--spool-dir relative: to the coordinator's directory locally, to the login directory over SSH."""
    from tests.zc import REPO, Zchunk, kill_matching
    from tests.zfsutil import assert_replica, make_source

    src_pool, dst_pool = pool_factory(size="256M"), pool_factory(size="256M")
    src = make_source(src_pool, 2 << 20, seed=91)
    zc = Zchunk(tmp_path, sync_args=("--no-sync-snap",))
    zc.spool_dir = Path(f"zchunk-test-relative-spool-{os.getpid()}")
    try:
        run = zc.run("sync", src, f"local:{dst_pool.name}/r", "--chunk-size", "256K", "--ssh-config",
                     str(sshd_local.ssh_config))
        assert run.returncode == 0, run.explain()
        assert_replica(src, f"{dst_pool.name}/r", "s1")
    finally:
        kill_matching(str(zc.spool_dir))
        for where in (REPO, Path(os.path.expanduser("~root"))):
            d = where / zc.spool_dir
            if d.is_dir():
                assert {p.name for p in d.iterdir()} <= {".agent", ".mount.lock"}, f"session directories left in {d}"
                shutil.rmtree(d / ".agent", ignore_errors=True)  # the program, kept for the next run
                (d / ".mount.lock").unlink(missing_ok=True)  # the receives' mount lock (no receive -u here)
                d.rmdir()


def test_a_retried_install_is_taken_for_the_first_and_never_starts_a_second_daemon(base: Path) -> None:
    """The link died before install's answer: the coordinator runs the same install again. The very same
    files are found, the answer is the first one's, and the daemon (holding daemon.lock) is not doubled."""
    argv = [sys.executable, "-c", BOOTSTRAP, "install", str(base), f"{SID}-receive", json.dumps(config("receive"))]
    first = subprocess.run(argv, input=AGENT_SOURCE, capture_output=True, timeout=60)
    assert first.returncode == 0, first.stdout
    path = Path(json.loads(first.stdout)["path"])
    again = subprocess.run(argv, input=AGENT_SOURCE, capture_output=True, timeout=60)
    assert again.returncode == 0 and json.loads(again.stdout) == {"path": str(path)}, again.stdout
    lock = path / "daemon.lock"
    lock.touch(mode=0o600)
    import fcntl
    with open(lock, "r+") as held:  # as a running daemon holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        started = subprocess.run(argv + ["start"], input=AGENT_SOURCE, capture_output=True, timeout=60)
    reply = json.loads(started.stdout.splitlines()[-1])
    assert started.returncode == 0 and reply["already"] is True and reply["path"] == str(path), started.stdout
    assert not (path / "receiver.json").exists(), "no second daemon was started"
    other = dict(config("receive"), chunk_size=1 << 16)  # not this install: refused
    refused(*bootstrap("install", str(base), f"{SID}-receive", json.dumps(other)), "already exists")


# -- the agent program, put on a host once per run -----------------------------------------------


def test_program_is_put_once_imported_by_later_commands_and_refused_in_an_open_place(base: Path,
                                                                                      elsewhere: Path) -> None:
    rc, out = bootstrap("program", str(base))
    assert rc == 0 and out["fresh"] is True, out
    where = Path(out["program"])
    assert where == base.resolve() / ".agent" and stat.S_IMODE(where.stat().st_mode) == 0o700
    assert (where / f"{out['module']}.py").read_bytes() == AGENT_SOURCE
    assert list((where / "__pycache__").glob(f"{out['module']}.*.pyc")), "compiled once, beside it"
    mine = where / f"{out['module']}.py"
    os.utime(mine, (0, 0))
    rc, again = bootstrap("program", str(base))
    assert rc == 0 and again["fresh"] is False and again["module"] == out["module"]
    assert mine.exists() and mine.stat().st_mtime > 1e9, "a run's use makes it recent again"
    old = where / "zchunk_agent_0000000000000000.py"  # another version's, unused for a week: removed
    old.write_bytes(b"# old\n")
    os.utime(old, (0, 0))
    assert bootstrap("program", str(base))[0] == 0 and not old.exists()

    # a later command imports it: nothing on stdin, and install writes the same source into the session
    p = subprocess.run([sys.executable, "-c", agent.IMPORT_BOOTSTRAP, str(where), out["module"], "install",
                        str(base), f"{SID}-receive", json.dumps(config("receive"))], capture_output=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    session = Path(json.loads(p.stdout.decode().splitlines()[-1])["path"])
    assert (session / "agent.py").read_bytes() == AGENT_SOURCE
    rc, listing = bootstrap("sessions", str(base))
    assert [s["id"] for s in listing["sessions"]] == [f"{SID}-receive"], "the program is no session"

    open_base = elsewhere / "open"
    open_base.mkdir(mode=0o777)
    os.chmod(open_base, 0o777)
    before = tree(elsewhere)
    refused(*bootstrap("program", str(open_base)), "writable by group or others")
    assert tree(elsewhere) == before


def test_a_probe_imports_the_program_a_run_before_put_and_only_this_agents_in_a_private_place(base: Path) -> None:
    """``PROGRAM_BOOTSTRAP``: a run's probe imports the program (nothing sent, nothing compiled) only when
    it is this very agent (its module name is its source's hash) in a directory and file only this user can
    write; otherwise it exits 3 having printed nothing, and the coordinator sends the source instead."""
    from zchunk.client import PROGRAM_MODULE

    def probe() -> tuple[int, bytes]:
        p = subprocess.run([sys.executable, "-c", agent.PROGRAM_BOOTSTRAP, str(base), PROGRAM_MODULE, "probe",
                            str(base)], capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        return p.returncode, p.stdout

    assert probe() == (3, b""), "nothing there yet"
    rc, out = bootstrap("program", str(base))
    assert rc == 0 and out["module"] == PROGRAM_MODULE, out
    where = base / agent.PROGRAM_DIR
    rc, stdout = probe()
    reply = json.loads(stdout.decode().splitlines()[-1])
    assert rc == 0 and reply["program"] == [str(where), PROGRAM_MODULE] and "capabilities" in reply, reply
    rc, plain = bootstrap("probe", str(base))
    assert rc == 0 and "program" not in plain, "a probe sent the source says it imported nothing"

    mine = where / f"{PROGRAM_MODULE}.py"
    os.chmod(where, 0o770)
    assert probe() == (3, b""), "a directory others may write"
    os.chmod(where, 0o700)
    os.chmod(mine, 0o620)
    assert probe() == (3, b""), "a file others may write"
    os.chmod(mine, 0o600)
    mine.write_bytes(AGENT_SOURCE + b"\nraise SystemExit(9)\n")
    assert probe() == (3, b""), "not this agent's source"
    mine.unlink()
    (where / "real.py").write_bytes(AGENT_SOURCE)
    mine.symlink_to(where / "real.py")
    assert probe() == (3, b""), "a symlink in its place"


def test_a_run_keeps_a_streams_channels_for_the_next_and_closes_them_with_the_host(base: Path) -> None:
    """The coordinator's side of ``attach`` against real ``serve`` processes on this machine: a channel
    between requests is parked and the next session on the host attaches to it (no process started); a
    refused attach raises the agent's error and keeps the channel; a parked channel whose process died is
    closed and replaced; closing the host ends the parked ones' processes."""
    import asyncio

    from zchunk import client
    from zchunk.errors import SessionDirError
    from zchunk.transport import LocalHost

    first, second, third = (installed(base, role) if i == 0 else Path(install(base, role, f"{SID}-{i}")[1]["path"])
                            for i, role in enumerate(("send", "receive", "send")))
    needs = ["chunk-v1"]

    async def main() -> None:
        host = LocalHost()
        agent_ = client.HostAgent(host)
        ch = await agent_.serve(str(first), needs, 30)
        assert (await client.SenderClient(ch).status()).role == "send"
        await client.SenderClient(ch).park()
        assert client.served(host) == (1, 0)
        again = await agent_.serve(str(second), needs, 30)
        assert again is ch and client.served(host) == (1, 1), "attached to the parked channel"
        assert (await client.ReceiverClient(again).status()).role == "receive" and again.hello.role == "receive"
        # cleanup with stay: the server goes on, the channel is parked again
        assert await client.ReceiverClient(again).cleanup() and not second.exists()
        await client.ReceiverClient(again).park()
        with pytest.raises(SessionDirError):
            await agent_.serve(str(base / "no-such-session"), needs, 30)
        assert client.served(host) == (1, 1)
        # the refused attach kept it; its process now dies: the next serve starts a new one
        (kept,) = client._IDLE[host]
        proc = kept.pipe
        assert proc is ch.pipe
        pids = [int(p) for p in subprocess.run(["pgrep", "-f", f"serve {first}"], capture_output=True,
                                                text=True).stdout.split()]
        assert len(pids) == 1, pids
        os.kill(pids[0], 9)
        await asyncio.sleep(0.2)
        fresh = await agent_.serve(str(third), needs, 30)
        assert fresh is not ch and client.served(host) == (2, 1)

        async def ended(path: Path, how: str) -> None:
            for _ in range(100):
                if not subprocess.run(["pgrep", "-f", f"serve {path}"], capture_output=True).stdout:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"the parked channel's serve process outlived {how}")

        await client.SenderClient(fresh).park()
        await client.close_idle(host)  # the run starts no more streams: its process gets EOF and ends
        await ended(third, "close_idle")
        assert host not in client._IDLE
        last = await agent_.serve(str(first), needs, 30)
        await client.SenderClient(last).park()
        await host.close()  # and so with the host
        await ended(first, "its host's close")
        assert host not in client._IDLE

    asyncio.run(main())
