"""Named calls to the agents: every request the coordinator makes of an agent is a method here.

Three clients mirror what the agent answers (``zchunk/agent.py``), the
shape of borg's ``RemoteRepository`` against its ``RepositoryServer``:

- ``HostAgent``: one host's agent program, its one-shot commands (``probe``,
  ``install`` [+ ``start``], ``sessions``, ``remove``; the agent's
  ``COMMANDS``) and the ``serve`` channels it opens;
- ``SenderClient`` and ``ReceiverClient``: the requests one session's agent of
  that role answers over a channel (the agent's ``OPS``), over a ``serve``
  process's ``AgentChannel`` or, on this machine, an ``InProcessChannel``.

Request names and their fields are written only here; callers call methods.
``agent_call`` marks each method with the request it makes, and a test pins
that the clients' calls and the agent's allowlists are the same sets.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import posixpath
import sys
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from . import agent
from . import errors as E
from .protocol import AgentChannel, InProcessChannel, ProtocolError, as_remote
from .transport import Host, LinkDown, LocalHost

AGENT_SOURCE = Path(agent.__file__).read_bytes()
#: The module name ``program`` gives this agent on a host: its source's hash (``cmd_program``).
PROGRAM_MODULE = "zchunk_agent_" + hashlib.sha256(AGENT_SOURCE).hexdigest()[:16]
# This interpreter as the local agent imports the agent module from the coordinator's own copy (its
# compiled cache: ~35 ms less per command than compiling the source from stdin); the source still comes
# on stdin, which is what install writes into the session directory.
LOCAL_BOOTSTRAP = (
    f"import sys;sys.path.insert(0,{str(Path(agent.__file__).resolve().parents[1])!r});"
    "import zchunk.agent as m;m.AGENT_SOURCE=sys.stdin.buffer.read();sys.exit(m.main(sys.argv[1:]))"
)

F = TypeVar("F", bound=Callable[..., Any])

#: Hosts the agent program was put on in this process (``HostAgent.program``): (directory, module) each.
_PROGRAMS: weakref.WeakKeyDictionary[Host, tuple[str, str]] = weakref.WeakKeyDictionary()
_PROGRAM_LOCKS: weakref.WeakKeyDictionary[Host, asyncio.Lock] = weakref.WeakKeyDictionary()
#: Serve channels a finished stream left between requests, by the host (connection) each runs over: the
#: run's next stream there attaches to one (``HostAgent.serve``) instead of starting a serve process. They
#: are closed with their host (``Host.close``).
_IDLE: weakref.WeakKeyDictionary[Host, list[AgentChannel]] = weakref.WeakKeyDictionary()
#: Per machine (``Host.machine``): [serve processes started, channels a stream took over ``attach``].
_SERVED: weakref.WeakKeyDictionary[Host, list[int]] = weakref.WeakKeyDictionary()


def agent_call(*names: str) -> Callable[[F], F]:
    """Marks a client method with the agent request(s) or command(s) it makes."""
    def mark(fn: F) -> F:
        fn.agent_calls = names  # type: ignore[attr-defined]
        return fn
    return mark


def calls_of(cls: type) -> set[str]:
    """Every request or command a client class makes (its ``agent_call`` marks)."""
    return {name for attr in dir(cls) for name in getattr(getattr(cls, attr), "agent_calls", ())}


# -- one host's agent program ---------------------------------------------------------------------


class HostAgent:
    """The agent program on one host: one-shot commands (a process each) and ``serve`` channels."""

    def __init__(self, host: Host) -> None:
        self.host = host

    @property
    def name(self) -> str:
        return self.host.name

    def bootstrap(self, *args: str) -> list[str]:
        """``python3 -c BOOTSTRAP ARGS...``: a one-shot agent command, the agent's source on stdin."""
        own = isinstance(self.host, LocalHost) and self.host.python == sys.executable
        return [self.host.python, "-c", LOCAL_BOOTSTRAP if own else agent.BOOTSTRAP, *args]

    @property
    def installed(self) -> tuple[str, str] | None:
        """(directory, module) of the agent program on this host, when ``program`` put it there."""
        return _PROGRAMS.get(self.host.machine)  # a control connection's host too

    def command(self, *args: str) -> tuple[list[str], bytes | None]:
        """A one-shot agent command and its stdin: by importing the installed program when there is one
        (nothing to send, nothing to compile), else the bootstrap with the source."""
        prog = self.installed
        if prog is None:
            return self.bootstrap(*args), AGENT_SOURCE
        return [self.host.python, "-c", agent.IMPORT_BOOTSTRAP, *prog, *args], None

    @agent_call("program")
    async def program(self, spool_dir: str) -> dict[str, Any] | None:
        """Put the agent program on this host, once per host (connection) of this process: every session's
        commands and channels import it after. The agent's answer (``program``, ``module``, ``fresh``: not
        there before) the first time; None after, and on this machine for this interpreter (it imports the
        coordinator's own copy)."""
        if self.installed is not None or self.bootstrap()[2] is LOCAL_BOOTSTRAP:
            return None
        lock = _PROGRAM_LOCKS.setdefault(self.host.machine, asyncio.Lock())
        async with lock:
            if self.installed is not None:
                return None
            res = await self.host.run(self.bootstrap("program", spool_dir), stdin=AGENT_SOURCE)
            reply = self._reply(res.stdout, res.err_text)
            _PROGRAMS[self.host.machine] = (str(reply["program"]), str(reply["module"]))
            return reply

    async def program_if_idle(self, spool_dir: str) -> dict[str, Any] | None:
        """``program`` unless it is there or being put (nobody waits for another's), its failure not the
        caller's: a direct stream, which needs no agent, puts it for the probes and sessions of later runs."""
        lock = _PROGRAM_LOCKS.get(self.host.machine)
        if self.installed is not None or (lock is not None and lock.locked()):
            return None
        try:
            return await self.program(spool_dir)
        except (E.ZchunkError, LinkDown):  # a session's own put says what is wrong, should one be needed
            return None

    @agent_call("probe")
    async def probe(self, spool_dir: str) -> dict[str, Any]:
        """What this host's python3 can do (version, capabilities, user, the sessions under ``spool_dir``);
        nothing is written. A missing or too old python3 is said as such.

        Where an earlier run put this agent's program under ``spool_dir`` (``program``), the probe imports it
        (``PROGRAM_BOOTSTRAP``): the source is neither sent nor compiled, and the run's sessions import it
        without putting it there again. Else, or when that fails in any way, the source goes on stdin.

        On this machine, for the coordinator's own interpreter, the agent's own code answers in this process:
        the same answer without an interpreter start (whose CPU the run's start-up, the SSH handshake on the
        same cores among it, waits for)."""
        if self.bootstrap()[2] is LOCAL_BOOTSTRAP:
            return await asyncio.to_thread(self._here, ["probe", spool_dir])
        if self.installed is None:
            res = await self.host.run([self.host.python, "-c", agent.PROGRAM_BOOTSTRAP, spool_dir, PROGRAM_MODULE,
                                       "probe", spool_dir])
            try:
                reply = dict(json.loads(res.stdout.decode().strip().splitlines()[-1])) if res.status == 0 else {}
            except (ValueError, IndexError):
                reply = {}
            found = reply.get("program")
            if isinstance(found, list) and len(found) == 2 and found[1] == PROGRAM_MODULE:
                _PROGRAMS[self.host.machine] = (str(found[0]), PROGRAM_MODULE)
                return reply
        argv, stdin = self.command("probe", spool_dir)  # the program, found or put by now, else the source
        res = await self.host.run(argv, stdin=stdin)
        if res.status == 127:
            raise E.MissingPython(host=self.name)
        try:
            return dict(json.loads(res.stdout.decode().strip().splitlines()[-1]))
        except (ValueError, IndexError):
            version = res.err_text.splitlines()[-1] if res.err_text else f"status {res.status}"
            raise E.OldPython(host=self.name, version=version) from None

    @agent_call("install")
    async def install(self, spool_dir: str, dirname: str, config: dict[str, Any], start: bool = False) -> str:
        """Create ``<spool_dir>/<dirname>`` holding the agent and its config, and with ``start`` start its
        daemon in the same command. The session directory's path."""
        argv, stdin = self.command("install", spool_dir, dirname, json.dumps(config))
        if start:  # an absolute spool directory names the session's: the daemon is forked by install itself
            argv += ["start"] + ([posixpath.normpath(posixpath.join(spool_dir, dirname))]
                                 if spool_dir.startswith("/") else [])
        res = await self.host.run(argv, stdin=stdin)
        return str(self._reply(res.stdout, res.err_text)["path"])

    @agent_call("start")
    async def restart(self, session_dir: str) -> int:
        """Start a session's daemon again (it died: a crash, a reboot of its host); the session's own copy
        of the agent runs it. The new daemon's pid."""
        res = await self.host.run([self.host.python, f"{session_dir}/agent.py", "start", session_dir])
        return int(self._reply(res.stdout, res.err_text).get("pid") or 0)

    @agent_call("sessions")
    async def sessions(self, spool_dir: str) -> list[dict[str, Any]]:
        """The session directories under ``spool_dir``, as the agent sees them (role, state, pid, ...)."""
        argv, stdin = self.command("sessions", spool_dir)
        res = await self.host.run(argv, stdin=stdin)
        try:
            listing = json.loads(res.stdout.decode().strip().splitlines()[-1]).get("sessions", [])
        except (ValueError, IndexError, AttributeError):
            return []
        return session_listing(listing)

    @agent_call("remove")
    async def remove(self, session_dir: str, keep: bool = False) -> dict[str, Any]:
        """Stop a session's daemon and remove its directory (``keep``: only stop it), by the installed agent.
        On this machine the agent's own code does it in this process (no interpreter to start)."""
        args = ["remove", session_dir] + (["keep"] if keep else [])
        if isinstance(self.host, LocalHost):
            return await asyncio.to_thread(self._here, args)
        prog = self.installed
        argv = ([self.host.python, "-c", agent.IMPORT_BOOTSTRAP, *prog, *args] if prog is not None
                else [self.host.python, f"{session_dir}/agent.py", *args])
        res = await self.host.run(argv)
        return self._reply(res.stdout, res.err_text)

    @agent_call("serve", "attach")
    async def serve(self, session_dir: str, needs: list[str], stall_timeout: float,
                    source: bytes | None = None) -> AgentChannel:
        """A ``serve`` process's channel to a session's agent, after the handshake. With ``source`` (the
        agent's), one started before install has made the session directory: the source travels first on
        the channel (there is no ``agent.py`` yet) and the server answers once install is done, so the
        channel is ready when install is.

        A channel an earlier stream of this run left on this host (``park``) is taken first: its server
        attaches to ``session_dir`` (waiting for install likewise), which starts no process. One whose link
        failed meanwhile is closed and the next tried; a session directory the agent refuses is refused
        for a new process as well, so that error is raised and the channel kept."""
        idle = _IDLE.get(self.host) or []
        while idle:
            ch = idle.pop()
            try:
                await ch.attach(session_dir, needs, wait=source is not None)
                _SERVED.setdefault(self.host.machine, [0, 0])[1] += 1
                return ch
            except LinkDown:
                await ch.close()
            except E.ZchunkError:
                if ch.between:
                    park(ch)
                else:
                    await ch.close()
                raise
            except BaseException:
                await ch.close()
                raise
        prog = self.installed
        if prog is not None:  # the installed program: nothing to send first, nothing to compile
            argv = [self.host.python, "-c", agent.IMPORT_BOOTSTRAP, *prog, "serve", session_dir]
            argv += ["wait"] if source is not None else []
            source = None
        elif source is None:
            argv = [self.host.python, f"{session_dir}/agent.py", "serve", session_dir]
        else:
            argv = [self.host.python, "-c", agent.SERVE_BOOTSTRAP, "serve", session_dir, "wait"]
        pipe = await self.host.open_pipe(argv)
        _SERVED.setdefault(self.host.machine, [0, 0])[0] += 1
        ch = AgentChannel(pipe, self.name, stall_timeout)
        ch.origin = self.host
        try:
            if source is not None:
                pipe.write(b"%d\n" % len(source))
                pipe.write(source)
                await pipe.drain()
            await ch.handshake(needs)
        except BaseException:
            await ch.close()
            raise
        return ch

    def _here(self, argv: list[str]) -> dict[str, Any]:
        with as_remote(self.name, argv[0]):
            return dict(agent.COMMANDS[argv[0]](argv[1:]) or {})

    def _reply(self, stdout: bytes, stderr: str) -> dict[str, Any]:
        try:
            reply = json.loads(stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise E.RemoteError(host=self.name, code="agent-crashed", reason=stderr[-2000:] or "no output") from None
        if "error" in reply:
            raise E.from_remote(self.name, reply["error"])
        return dict(reply)


def park(channel: AgentChannel) -> None:
    """``channel``, between requests, kept for the next stream on the host it was opened on (``serve``)."""
    host = channel.origin
    assert isinstance(host, Host)
    idle = _IDLE.get(host)
    if idle is None:  # the first since the host was opened or last closed
        idle = _IDLE[host] = []
        host.on_close(functools.partial(_close_idle, host))
    idle.append(channel)


async def _close_idle(host: Host) -> None:
    channels = _IDLE.pop(host, [])
    await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)


async def close_idle(host: Host) -> None:
    """Close the channels kept on ``host``'s machine (either connection) once the run starts no more
    streams: an SSH server counts each against its sessions per connection (sshd's MaxSessions, 10 by
    default), and the run's last commands need theirs."""
    await asyncio.gather(*(_close_idle(h) for h in list(_IDLE) if h.machine is host.machine))


def served(host: Host) -> tuple[int, int]:
    """(serve processes started, channels taken over ``attach``) on ``host``'s machine in this process."""
    started, attached = _SERVED.get(host.machine) or (0, 0)
    return started, attached


def session_listing(listing: Any) -> list[dict[str, Any]]:
    """The well-formed entries of an agent's ``sessions`` answer (also the probe's)."""
    return [s for s in listing if isinstance(s, dict) and "path" in s] if isinstance(listing, list) else []


# -- one session's agents -------------------------------------------------------------------------

Channel = AgentChannel | InProcessChannel


@dataclass(frozen=True)
class AgentStatus:
    """One ``status`` answer: the daemon's state file and the spool as the agent sees it."""

    role: str
    daemon: dict[str, Any]  # the daemon's state file (docs/protocol.md "Daemon state")
    chunks: frozenset[int]  # complete chunks in the spool
    parts: dict[int, int]  # target: chunks being received -> bytes held
    spool_bytes: int
    spool_max: int

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> AgentStatus:
        return cls(str(reply.get("role", "")), dict(reply.get("daemon") or {}),
                   frozenset(int(s) for s in reply.get("chunks", [])),
                   {int(k): int(v) for k, v in (reply.get("parts") or {}).items()},
                   int(reply.get("spool_bytes", 0)), int(reply.get("spool_max", 0)))


class AgentClient:
    """The requests both roles answer, over one channel."""

    role: ClassVar[str] = ""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    @property
    def host(self) -> str:
        return self.channel.host

    @agent_call("status")
    async def status(self, wait: float = 0.0, known: int = 0) -> AgentStatus:
        """The agent's status. ``wait`` (a sender): answered once it has spooled more than ``known`` chunks,
        has ended, paused or stopped, or ``wait`` seconds have passed; an agent from before ``wait`` answers
        at once."""
        fields = {"wait": wait, "known": known} if wait > 0 else {}
        return AgentStatus.from_reply(await self.channel.request("status", **fields))

    @agent_call("cleanup")
    async def cleanup(self, keep: bool = False) -> bool:
        """Stop the daemon and remove the session directory (``keep``: only stop it). A ``serve`` process
        stays for another session (``stay``: the caller ``park``s its channel); one from before ``stay``
        exits, and its channel is not between requests any more."""
        reply = await self.channel.request("cleanup", keep=keep, stay=True)
        if isinstance(self.channel, AgentChannel) and not reply.get("stays"):
            self.channel.between = False
        return bool(reply.get("removed"))

    async def park(self) -> None:
        """Keep this client's channel for the run's next stream on its host when it is a serve channel
        between requests (``park``); else close it."""
        ch = self.channel
        if isinstance(ch, AgentChannel) and ch.between and ch.origin is not None:
            park(ch)
        else:
            await ch.close()

    @agent_call("abort")
    async def abort(self) -> bool:
        """As ``cleanup``: the partial zfs receive is aborted with the daemon. The server exits after."""
        reply = await self.channel.request("abort")
        if isinstance(self.channel, AgentChannel):
            self.channel.between = False
        return bool(reply.get("removed"))

    def drop_connection(self) -> None:
        self.channel.drop_connection()

    async def close(self) -> None:
        await self.channel.close()


class SenderClient(AgentClient):
    """A session's sender agent: chunks out of its spool."""

    role = "send"

    @agent_call("get_chunk")
    async def get_chunk(self, seq: int, offset: int) -> tuple[int, int, int]:
        """Start chunk ``seq`` at ``offset``: (the request's id, for ``read_data``; bytes that will follow;
        the chunk file's size). Only over a ``serve`` channel: a local spool is read directly (relay.py)."""
        ch = self.channel
        if not isinstance(ch, AgentChannel):
            raise ProtocolError(host=self.host, reason="get_chunk needs a serve channel")
        req_id = ch.begin("get_chunk", seq=seq, offset=offset)
        await ch.drain()
        head = await ch.reply(req_id)
        ch.owe(int(head["length"]))
        return req_id, int(head["length"]), int(head["total"])

    async def read_data(self, req_id: int) -> bytes:
        """The next piece of the chunk that ``get_chunk`` started."""
        assert isinstance(self.channel, AgentChannel)
        return await self.channel.read_data(req_id)

    @agent_call("release")
    async def release(self, upto: int) -> int:
        """Delete the spooled chunks below ``upto`` (the receiver has fed them to zfs receive); how many."""
        return int((await self.channel.request("release", upto=upto)).get("released", 0))


class ReceiverClient(AgentClient):
    """A session's receiver agent: chunks into its spool, and the stream's end."""

    role = "receive"

    @agent_call("put_chunk")
    async def put_chunk(self, seq: int, offset: int, length: int, total: int,
                        pieces: AsyncIterator[bytes]) -> bool:
        """Bytes ``offset..offset+length`` of chunk ``seq`` (``total`` bytes in all), as ``pieces`` yields
        them, each written and drained before the next is asked for. True when the agent holds the
        whole chunk, verified; False when more of it is to come."""
        ch = self.channel
        if not isinstance(ch, AgentChannel):
            raise ProtocolError(host=self.host, reason="put_chunk needs a serve channel")
        req_id = ch.begin("put_chunk", seq=seq, offset=offset, length=length, total=total)
        async for payload in pieces:
            await ch.write_data(req_id, payload)
        return bool((await ch.reply(req_id)).get("stored"))

    @agent_call("finish")
    async def finish(self, total_chunks: int, raw_bytes: int, stream_hash: str) -> None:
        """The stream's end as the sender saw it: the receiver checks the whole stream against it."""
        await self.channel.request("finish", total_chunks=total_chunks, raw_bytes=raw_bytes,
                                   stream_hash=stream_hash)


CLIENTS: dict[str, type[AgentClient]] = {"send": SenderClient, "receive": ReceiverClient}
