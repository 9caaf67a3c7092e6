"""The shortcuts that took a fast transfer's fixed costs down (issue 4, hot path), and what each must
keep true. Their effect is measured in benchmarks/ (README, "Hot path"); here, that each still does what
the slower way did, against the real agent program, real sockets and a real sshd:

- the status poller asks an agent on this machine in process (``InProcessChannel``), with the
  agent's own request handling: the same answers and errors as a ``serve`` process;
- the first channels are opened while install runs (``serve DIR wait``): they answer once install is
  done, and a channel closed before (install failed) leaves no process and writes nothing;
- a removal whose directory is already gone (a retry after a lost answer) is not a failure, and
  one the link defeated is not followed by a question that would wait out --patience again;
- polls come quicker only at the two ends of a stream (tests/test_scheduler.py);
- the SSH socket acknowledges at once what arrives (TCP_QUICKACK);
- asyncssh's liboqs lookup at import asks ld.so's cache only, and the lookup is put back;
- the local agent's one-shot commands import the coordinator's copy of the agent;
- the first hold of a run asks nothing first: only a refused one asks whether holds work at all;
- a tree run's end lets go of no old base on a side whose new bases were not held.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_session_dir import SID, config, conversation, hello, installed, request
from tests.zc import REPO, Zchunk, kill_matching, matching
from tests.zfsutil import make_source, quiet_target_pool
from zchunk import agent, lab
from zchunk import errors as E
from zchunk.client import LOCAL_BOOTSTRAP, HostAgent
from zchunk.events import Emitter
from zchunk.protocol import InProcessChannel
from zchunk.replicate import Side, _hold
from zchunk.session import SessionRecord
from zchunk.stream import SyncOptions, _remove_dirs
from zchunk.transport import CommandResult, Host, LocalHost, _acking_promptly, _in_ld_cache
from zchunk.zfs import Zfs

AGENT_SOURCE = Path(agent.__file__).read_bytes()
MiB = 1 << 20


@pytest.fixture
def base(tmp_path: Path) -> Path:
    b = tmp_path / "spool"
    b.mkdir(mode=0o700)
    return b


# -- the poller's channel to a local agent -------------------------------------------------------


def test_in_process_status_and_release_answer_as_a_serve_process_does(base: Path) -> None:
    path = installed(base, "send")
    for seq in (0, 1, 2):
        (path / "chunks" / agent.chunk_name(seq)).with_suffix(".chunk").write_bytes(b"x" * 10)
    ch = InProcessChannel(str(path), "localhost")
    ours = asyncio.run(ch.request("status"))
    (theirs,) = conversation(path, request(1, "status"))
    assert theirs[0] == agent.FRAME_REPLY
    assert ours == theirs[2] and ours["chunks"] == [0, 1, 2], (ours, theirs)
    assert asyncio.run(ch.request("release", upto=2)) == {"released": 2}
    assert sorted(p.name for p in (path / "chunks").iterdir()) == [agent.chunk_name(2) + ".chunk"]


def test_a_senders_status_with_wait_answers_once_its_daemon_spools_a_new_chunk(base: Path) -> None:
    """While the link has nothing to move, the poller asks the sender's status with ``wait``: the answer
    comes when the daemon has spooled a chunk past ``known``, so the chunk moves then, not at the next poll.
    A receiver's status ignores ``wait``."""
    path = installed(base, "send")
    daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(path)])  # "ours"
    try:
        def spooled(chunks: int) -> None:
            part = path / "sender.json.tmp"
            part.write_text(json.dumps({"pid": daemon.pid, "state": "running", "chunks": chunks, "eof": False}))
            os.replace(part, path / "sender.json")

        spooled(2)
        ch = InProcessChannel(str(path), "localhost")
        assert asyncio.run(ch.request("status"))["daemon"]["state"] == "running"
        later = threading.Timer(0.3, spooled, args=(3,))
        later.start()
        try:
            reply = asyncio.run(ch.request("status", wait=1.0, known=2))
        finally:
            later.join()
        assert reply["daemon"]["chunks"] == 3, "answered before the daemon spooled its next chunk"
        later = threading.Timer(0.3, spooled, args=(4,))  # the same in a serve process (a remote sender)
        later.start()
        try:
            (answer,) = conversation(path, request(1, "status", wait=1.0, known=3))
        finally:
            later.join()
        assert answer[0] == agent.FRAME_REPLY and answer[2]["daemon"]["chunks"] == 4, answer
        reply = asyncio.run(ch.request("status", wait=0.05, known=4))  # nothing new: what there is
        assert reply["daemon"]["chunks"] == 4 and reply["role"] == "send"
        assert asyncio.run(InProcessChannel(str(installed(base, "receive")), "localhost")
                           .request("status", wait=1.0, known=0))["role"] == "receive"
    finally:
        daemon.kill()
        daemon.wait()


def test_in_process_errors_are_the_agents(base: Path) -> None:
    """A malformed request is the agent's ``bad-request``, an operation of the other role is refused as
    the serve process refuses it, one with data frames is not answered in process at all."""
    path = installed(base, "receive")
    ch = InProcessChannel(str(path), "localhost")
    with pytest.raises(E.RemoteError) as bad:
        asyncio.run(ch.request("finish", total_chunks="many"))
    assert bad.value.fields["code"] == "bad-request", bad.value.fields
    with pytest.raises(E.ProtocolError, match="release"):
        asyncio.run(ch.request("release", upto=1))
    with pytest.raises(E.ProtocolError, match="put_chunk"):
        asyncio.run(ch.request("put_chunk", seq=0, offset=0, length=1, total=1))
    gone = InProcessChannel(str(base / "no-such-session"), "localhost")
    with pytest.raises(E.SessionDirError, match="does not exist"):
        asyncio.run(gone.request("status"))


def test_in_process_cleanup_removes_the_directory_and_finish_writes_the_end(base: Path) -> None:
    path = installed(base, "receive")
    ch = InProcessChannel(str(path), "localhost")
    assert asyncio.run(ch.request("finish", total_chunks=3, raw_bytes=10, stream_hash="ab")) == {"ok": True}
    assert json.loads((path / "end.json").read_text()) == {"total_chunks": 3, "raw_bytes": 10, "stream_hash": "ab"}
    assert asyncio.run(ch.request("cleanup", keep=False)) == {"removed": True}
    assert not path.exists()


# -- channels opened while install runs ----------------------------------------------------------


def early_serve(path: Path) -> subprocess.Popen[bytes]:
    """``python3 -c SERVE_BOOTSTRAP serve DIR wait``, the source first on its stdin, as the coordinator
    starts it (``HostAgent.serve`` with the source)."""
    p = subprocess.Popen([sys.executable, "-c", agent.SERVE_BOOTSTRAP, "serve", str(path), "wait"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdin is not None
    p.stdin.write(b"%d\n" % len(AGENT_SOURCE) + AGENT_SOURCE)
    p.stdin.flush()
    return p


def test_a_channel_opened_before_install_answers_once_install_is_done(base: Path) -> None:
    path = base / f"{SID}-send"
    p = early_serve(path)
    try:
        assert p.stdout is not None and p.stdin is not None
        time.sleep(0.3)  # it has compiled the source and waits: nothing said before install
        assert select.select([p.stdout], [], [], 0)[0] == [], "the server spoke before its directory existed"
        assert installed(base, "send") == path
        ftype, _, payload = agent.read_frame(p.stdout)
        assert ftype == agent.FRAME_HELLO and agent.decode_message(payload)["role"] == "send"
        p.stdin.write(hello() + request(1, "status"))
        p.stdin.flush()
        ftype, rid, payload = agent.read_frame(p.stdout)
        assert (ftype, rid) == (agent.FRAME_REPLY, 1) and agent.decode_message(payload)["chunks"] == []
        p.stdin.close()
        assert p.wait(30) == 0
    finally:
        p.kill()
        p.wait()


def test_a_channel_closed_before_install_exits_and_writes_nothing(base: Path) -> None:
    path = base / f"{SID}-receive"
    p = early_serve(path)
    try:
        time.sleep(0.3)
        assert p.stdin is not None
        p.stdin.close()  # install failed: the coordinator closes the channels it opened meanwhile
        assert p.wait(30) == 0
        assert p.stdout is not None and p.stdout.read() == b""
        assert list(base.iterdir()) == []
    finally:
        p.kill()
        p.wait()


@pytest.mark.zfs
def test_a_failed_install_leaves_no_early_channel_behind(tmp_path: Path, pool_factory: Any,
                                                         sshd_local: lab.Sshd) -> None:
    """The run fails at install (a spool directory writable by others is refused); the channels that were
    being opened meanwhile, on this machine and over SSH, are closed and their servers gone."""
    zc = Zchunk(tmp_path, sync_args=("--no-sync-snap",))
    src_pool, dst_pool = pool_factory(size="256M"), pool_factory(size="256M")
    quiet_target_pool(dst_pool)
    src = make_source(src_pool, 1 * MiB, seed=91)
    zc.spool_dir.mkdir(mode=0o700)
    os.chmod(zc.spool_dir, 0o777)
    try:
        run = zc.run("sync", src, f"local:{dst_pool.name}/replica", "--ssh-config", str(sshd_local.ssh_config),
                     "--direct-max", "0")  # a session's install, however small the stream
        assert run.returncode != 0 and "writable by group or others" in run.stderr + run.stdout, run.explain()
        deadline = time.monotonic() + 20
        while (left := serving(zc.spool_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == [], f"servers left running: {left}"
        assert list(zc.spool_dir.iterdir()) == []
    finally:
        kill_matching(str(zc.spool_dir))


def serving(spool: Path) -> list[str]:
    return [cmd[:200] for cmd in matching(str(spool)).values() if " serve " in cmd]


# -- a removal that a lost answer makes a retry --------------------------------------------------


def record(target_dir: str, spool: Path) -> SessionRecord:
    return SessionRecord(id=SID, source="pool/ds", target="pool/replica", snapshot="pool/ds@s1", snapshot_guid=1,
                         base=None, target_dataset="pool/replica", source_dir="", target_dir=target_dir,
                         spool_base=str(spool), codec="zlib", checksum="blake2b-128", chunk_size=MiB,
                         spool_max=MiB, estimate=0, ssh={}, dirs_left=True)


async def removal(rec: SessionRecord, host: Any) -> tuple[bool, list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    done = await _remove_dirs(rec, host, host, SyncOptions(spool_dir=rec.spool_base),
                              Emitter(lambda kind, fields: events.append((kind, fields))), roles=("receive",))
    return done, events


def test_removing_a_directory_that_is_already_gone_is_not_a_failure(base: Path) -> None:
    path = installed(base, "receive")
    rec = record(str(path), base)
    assert asyncio.run(removal(rec, LocalHost())) == (True, [("cleaned", {"kept": False})])
    assert not path.exists()
    done, events = asyncio.run(removal(rec, LocalHost()))  # the retry: the first attempt removed it
    assert done and [k for k, _ in events] == ["cleaned"], events


def test_a_remote_removal_retried_after_the_directory_went_is_not_a_failure(base: Path,
                                                                            sshd_local: lab.Sshd) -> None:
    """Over SSH the retry cannot even start ``DIR/agent.py`` ("can't open file"): the directory's absence
    is looked for, and the record may say that nothing is left. One that is still there and refused
    (writable by others) stays a warning."""
    from zchunk.endpoint import parse_endpoint
    from zchunk.transport import SshOptions, make_host

    refused = installed(base, "receive")
    os.chmod(refused, 0o777)

    async def go() -> list[tuple[bool, list[tuple[str, dict[str, Any]]]]]:
        host = make_host(parse_endpoint("local:pool/x"), SshOptions(config=sshd_local.ssh_config))
        try:
            return [await removal(record(str(base / "gone" / f"{SID}-receive"), base), host),
                    await removal(record(str(refused), base), host)]
        finally:
            await host.close()

    (done, events), (refused_done, refused_events) = asyncio.run(go())
    assert done and [k for k, _ in events] == ["cleaned"], events
    assert not refused_done and refused.exists()
    assert any(k == "warning" and "could not clean up" in f["detail"] for k, f in refused_events), refused_events


class Unreachable(Host):
    """A far host whose link stays down beyond --patience: every command ends in HostUnreachable."""

    name = "far"

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    async def run(self, argv: list[str], stdin: bytes | None = None,
                  timeout: float | None = 120.0) -> CommandResult:
        self.asked.append(argv)
        raise E.HostUnreachable(host=self.name, reason="link down for longer than --patience")


def test_a_removal_that_the_link_defeated_is_not_asked_about_again(base: Path) -> None:
    """After the removal waited out --patience on a dead link, asking whether the directory is gone would
    wait as long again: it stays a warning at once."""
    host = Unreachable()
    done, events = asyncio.run(removal(record("/var/tmp/zchunk/x-receive", base), host))
    assert not done and [argv[2] for argv in host.asked] == ["remove"], host.asked
    assert any(k == "warning" and "could not clean up" in f["detail"] for k, f in events), events


# -- the SSH socket's acknowledgements -----------------------------------------------------------


class FakeConn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.got = sock, []

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        self.got.append((data, datatype))


def test_each_read_of_the_ssh_socket_acknowledges_at_once() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    try:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)  # as after a request/response exchange
        conn = _acking_promptly(FakeConn(client))  # type: ignore[arg-type]
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 0
        conn.data_received(b"packet", None)
        assert conn.got == [(b"packet", None)], "asyncssh still gets every byte"
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
    finally:
        for s in (client, peer, server):
            s.close()


def test_commands_run_on_an_acking_connection(sshd_local: lab.Sshd) -> None:
    from zchunk.endpoint import parse_endpoint
    from zchunk.transport import SshOptions, make_host

    async def go() -> list[bytes]:
        host = make_host(parse_endpoint("local:pool/x"), SshOptions(config=sshd_local.ssh_config))
        try:
            conn = await host.connection()  # type: ignore[attr-defined]
            assert conn.data_received.__qualname__.startswith("_acking_promptly"), "not wrapped"
            return [(await host.run(["echo", str(i)])).stdout for i in range(3)]
        finally:
            await host.close()

    assert asyncio.run(go()) == [b"0\n", b"1\n", b"2\n"]


def test_the_control_connection_imports_the_program_the_data_connection_put(sshd_local: lab.Sshd,
                                                                           tmp_path: Path) -> None:
    """The status poller's channel goes over a second connection to the host (``Host.control``). It must
    import the agent program put on the host once per run, not send and compile the agent's source for
    every stream: that cost a 200-dataset sync -r 3.7 s (full) and 7.7 s (incremental); see
    benchmarks/README.md, "The floor for a tree"."""
    from zchunk.endpoint import parse_endpoint
    from zchunk.transport import SshOptions, make_host

    spool = str(tmp_path / "spool")

    async def go() -> tuple[list[str], bytes | None, dict[str, Any]]:
        host = make_host(parse_endpoint("local:pool/x"), SshOptions(config=sshd_local.ssh_config))
        try:
            assert await HostAgent(host).program(spool) is not None, "put on the host the first time"
            ctl = HostAgent(host.control())
            assert ctl.host is not host and ctl.host.machine is host
            assert await ctl.program(spool) is None, "already there: not put again"
            argv, stdin = ctl.command("probe", spool)
            res = await ctl.host.run(argv, stdin=stdin)  # over the control connection itself
            return argv, stdin, json.loads(res.stdout.decode().splitlines()[-1])
        finally:
            await host.close()

    argv, stdin, reply = asyncio.run(go())
    assert argv[2] == agent.IMPORT_BOOTSTRAP and stdin is None, "the control connection sent the source"
    assert reply.get("ok", True) and "capabilities" in json.dumps(reply), reply


# -- imports and bootstraps ------------------------------------------------------------------------


def test_the_liboqs_lookup_is_put_back_after_asyncssh_imports() -> None:
    code = ("import ctypes.util, sys; f = ctypes.util.find_library; import zchunk.transport as t; "
            "assert 'asyncssh' not in sys.modules; ssh = t._asyncssh(); assert ssh is sys.modules['asyncssh']; "
            "assert ctypes.util.find_library is f, 'find_library left swapped'; print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
    assert _in_ld_cache("c") is not None, "libc is in ld.so's cache: the lookup itself works"


def test_a_run_without_ssh_never_imports_asyncssh(tmp_path: Path) -> None:
    """asyncssh is 40 % of the coordinator's start (7 s of every command in the TCG test VM): a local run,
    `sessions` and the rest import it only when a host is reached over SSH."""
    code = ("import sys; from zchunk.cli import app; "
            "app(['sessions', '--state-dir', sys.argv[1]], standalone_mode=False); print('asyncssh' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                       timeout=60)
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == "False", (p.stdout, p.stderr)


def test_the_local_bootstrap_imports_the_coordinators_agent_from_anywhere(tmp_path: Path) -> None:
    here, other = LocalHost(), LocalHost()
    other.python = "/usr/bin/python3"
    assert HostAgent(here).bootstrap("probe")[:3] == [sys.executable, "-c", LOCAL_BOOTSTRAP]
    assert HostAgent(other).bootstrap("probe")[:3] == ["/usr/bin/python3", "-c", agent.BOOTSTRAP]
    install = HostAgent(here).bootstrap("install", str(tmp_path / "spool"), f"{SID}-send", json.dumps(config("send")))
    p = subprocess.run(install,
                       input=AGENT_SOURCE, capture_output=True, cwd=tmp_path, timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    path = Path(json.loads(p.stdout.decode().splitlines()[-1])["path"])
    assert (path / "agent.py").read_bytes() == AGENT_SOURCE, "install writes the source it was given"


# -- holds: no question before the first ---------------------------------------------------------


class ScriptedZfs(Host):
    """A host whose zfs answers ``hold`` with ``hold``, ``get userrefs`` with ``userrefs`` and refuses
    ``holds`` (pure logic: what is asked, and in what order)."""

    name = "far"

    def __init__(self, hold: CommandResult, userrefs: str, listing: str = "") -> None:
        self.asked: list[list[str]] = []
        self.hold, self.userrefs, self.listing = hold, userrefs, listing

    async def run(self, argv: list[str], stdin: bytes | None = None,
                  timeout: float | None = 120.0) -> CommandResult:
        self.asked.append(argv)
        if argv[1] == "hold":
            return self.hold
        if argv[1] == "holds":
            return CommandResult(1, b"", b"unrecognized command 'holds'")
        if argv[1] == "list":  # zfs list -t snapshot -o name,userrefs
            return CommandResult(0, self.listing.encode(), b"")
        if argv[1] in ("release", "destroy"):
            return CommandResult(0, b"", b"")
        return CommandResult(0, f"{self.userrefs}\n".encode(), b"")


def holding(host: ScriptedZfs, times: int) -> tuple[Side, list[Any], BaseException | None]:
    side = Side(None, host, None, Zfs(host))  # type: ignore[arg-type]
    events: list[Any] = []
    emit = Emitter(lambda kind, fields: events.append((kind, fields)))
    try:
        for _ in range(times):
            asyncio.run(_hold(side, "zchunk_t", "p/a@s", "p/b@s", emit=emit))
    except E.CommandFailed as e:
        return side, events, e
    return side, events, None


def test_the_first_hold_asks_nothing_before_where_holds_work() -> None:
    host = ScriptedZfs(CommandResult(0, b"", b""), "0")
    side, events, failed = holding(host, 2)
    assert failed is None and side.holds is True and not events
    assert host.asked == [["zfs", "hold", "zchunk_t", "p/a@s", "p/b@s"]] * 2


def test_a_zfs_whose_holds_do_not_work_is_asked_once_said_once_and_never_held_again() -> None:
    host = ScriptedZfs(CommandResult(1, b"", b"cannot hold snapshot 'p/a@s': pool must be upgraded"), "-")
    side, events, failed = holding(host, 3)
    assert failed is None and side.holds is False
    assert [argv[1] for argv in host.asked] == ["hold", "get", "holds"], host.asked
    assert [f["detail"] for k, f in events if k == "note"] == [
        "this zfs has no working holds: the base is not protected against `zfs destroy`"], events


def test_a_refused_hold_where_holds_work_is_a_failure() -> None:
    host = ScriptedZfs(CommandResult(1, b"", b"cannot hold snapshot 'p/b@s': dataset does not exist"), "0")
    side, events, failed = holding(host, 1)
    assert isinstance(failed, E.CommandFailed) and "does not exist" in str(failed)
    assert side.holds is None and not events


def test_a_tree_runs_end_lets_nothing_go_and_prunes_nothing_where_the_new_bases_were_not_held() -> None:
    """Always one base held: on the side whose hold of the new bases is refused, the old ones keep ours and
    nothing is pruned (said as a note); the other side holds, lets go (its leftover too) and prunes."""
    from types import SimpleNamespace

    from zchunk.replicate import Later, _at_the_end
    from zchunk.zfs import Snapshot

    src = ScriptedZfs(CommandResult(1, b"", b"cannot hold snapshot 'p/a@new': dataset is busy"), "0")
    dst = ScriptedZfs(CommandResult(0, b"", b""), "0", listing="q/a@old\t1\nq/a@new\t1\nq/a@older\t1\n"
                                                              "q/b@other\t1\n")
    sides = [Side(SimpleNamespace(dataset=root), host, None, Zfs(host))  # type: ignore[arg-type]
             for root, host in (("p", src), ("q", dst))]
    events: list[Any] = []
    emit = Emitter(lambda kind, fields: events.append((kind, fields)))
    later = Later(src_holds=["p/a@new"], dst_holds=["q/a@new"], moved=[("p/a@new", "q/a@new")],
                  src_prunes=[(Snapshot("p/a@old", 1, 1), emit)])
    asyncio.run(_at_the_end(sides[0], sides[1], later, "zchunk_t", 2, emit))
    assert [argv[1] for argv in src.asked] == ["hold", "get"], src.asked  # refused, holds work: nothing more
    assert any(k == "note" and "at the end of the run" in f["detail"] and "busy" in f["detail"]
               for k, f in events), events
    assert [argv[1:] for argv in dst.asked] == [
        ["hold", "zchunk_t", "q/a@new"],
        ["list", "-H", "-t", "snapshot", "-r", "-o", "name,userrefs", "q"],
        ["release", "zchunk_t", "q/a@old", "q/a@older"]], dst.asked  # not q/b's: its base did not move
    assert not [f for k, f in events if k == "pruned"], events
