"""How the coordinator reaches a host: a local subprocess or one SSH connection.

The only module that imports asyncssh. A ``Host`` runs one-shot commands,
opens long-lived byte streams to agent processes and starts commands whose
stdin and stdout the caller streams (``start``: a direct stream's zfs send and
receive); an SSH host keeps one
connection and reconnects on demand. Connection trouble is raised as
``LinkDown`` (retryable: the caller decides how long to be patient); host key
and authentication failures are final.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes.util
import os
import shlex
import signal
import socket
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay

from .aio import backoff
from .endpoint import Endpoint
from .errors import AuthError, CommandHung, HostKeyError, HostUnreachable, UsageError

if TYPE_CHECKING:
    import asyncssh


def _in_ld_cache(name: str) -> str | None:
    """``ctypes.util.find_library`` without its compiler fallbacks: ld.so's cache only."""
    return ctypes.util._findSoname_ldconfig(name)  # type: ignore[attr-defined]


def _asyncssh() -> ModuleType:
    """asyncssh, imported when the first SSH host needs it. It is 40 % of the coordinator's start (80 of
    200 ms on the benchmark machine, 7 s in the TCG test VM), which a run between local datasets,
    ``sessions``, ``pause`` or ``--help`` never needs.

    asyncssh looks for liboqs (post-quantum key exchange) at import with find_library, which on Linux
    asks ldconfig, then runs gcc, then ld: ~25 ms where a compiler is installed. A liboqs installed as a
    package is in ld.so's cache, which is all that is asked while asyncssh imports."""
    if "asyncssh" in sys.modules:
        return sys.modules["asyncssh"]
    find_library = ctypes.util.find_library
    if hasattr(ctypes.util, "_findSoname_ldconfig"):
        ctypes.util.find_library = _in_ld_cache
    try:
        with warnings.catch_warnings():
            # cryptography 51 deprecates DSA, which asyncssh (2.24) names as it imports: ten lines of warning
            # on every command's stderr, about asyncssh's code, not the user's keys
            warnings.filterwarnings("ignore", message="DSA is deprecated", category=UserWarning)
            import asyncssh
    finally:
        ctypes.util.find_library = find_library
    return asyncssh


class LinkDown(Exception):
    """A retryable transport failure (reset, refused, timeout, unreachable, name lookup)."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"{host}: {reason}")
        self.host, self.reason = host, reason


@dataclass(frozen=True)
class CommandResult:
    status: int
    stdout: bytes
    stderr: bytes

    @property
    def err_text(self) -> str:
        return self.stderr.decode("utf-8", "replace").strip()


@dataclass
class SshOptions:
    """Client settings from the CLI: ``--ssh-config``, ``--ssh-key``, ``--ssh-port``, ``-o``."""

    config: Path | None = None
    key: Path | None = None
    port: int | None = None
    options: dict[str, str] = field(default_factory=dict)
    keepalive: float = 5.0
    keepalive_count: int = 3
    connect_timeout: float = 20.0

    @classmethod
    def from_cli(cls, config: Path | None, key: Path | None, port: int | None,
                 options: list[str]) -> SshOptions:
        opts: dict[str, str] = {}
        for item in options:
            key_, sep, value = item.partition("=")
            if not sep or not key_.strip():
                raise UsageError(reason=f"-o {item!r}: expected KEY=VALUE, e.g. -o StrictHostKeyChecking=accept-new")
            opts[key_.strip().lower()] = value.strip()
        if config is not None and not config.is_file():
            raise UsageError(reason=f"--ssh-config {config}: no such file")
        if key is not None and not key.is_file():
            raise UsageError(reason=f"--ssh-key {key}: no such file")
        return cls(config=config, key=key, port=port, options=opts)


class ByteStream(Protocol):
    """Both asyncio subprocess pipes and asyncssh process streams fit this."""

    async def readexactly(self, n: int) -> bytes: ...


class AgentPipe:
    """A running agent process seen as a duplex byte stream."""

    def __init__(self, reader: Any, writer: Any, closer: Any, host: str,
                 drop: Any = None) -> None:
        self.reader, self.writer, self._closer = reader, writer, closer
        self.host = host
        self._drop = drop

    async def readexactly(self, n: int) -> bytes:
        try:
            return bytes(await self.reader.readexactly(n))
        except asyncio.IncompleteReadError as e:
            raise LinkDown(self.host, "the agent channel closed") from e
        except _transient() as e:
            raise LinkDown(self.host, _describe(e)) from e

    def write(self, data: bytes) -> None:
        try:
            self.writer.write(data)
        except _transient() as e:
            raise LinkDown(self.host, _describe(e)) from e

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except _transient() as e:
            raise LinkDown(self.host, _describe(e)) from e

    def drop_connection(self) -> None:
        """The link under this pipe failed: make the host reconnect (only if still the same link)."""
        if self._drop is not None:
            self._drop()

    async def close(self) -> None:
        await self._closer()


class Process:
    """A command whose stdin and stdout the caller streams (``Host.start``); its stderr is collected.
    ``pid`` is its process id on its host: after the link under it failed, ``Host.stop`` ends it there."""

    def __init__(self, host: str, pid: int, stdout: Any, stdin: Any, stderr: Any,
                 finished: Callable[[], Awaitable[int | None]], close_stdin: Callable[[], None],
                 abandon: Callable[[], None], remote: bool) -> None:
        self.host, self.pid, self.remote = host, pid, remote
        self._stdout, self._stdin = stdout, stdin
        self._stderr = asyncio.ensure_future(_read_all(stderr))
        self._finished, self._close_stdin, self._abandon = finished, close_stdin, abandon

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of its stdout; b"" at the end."""
        try:
            return bytes(await self._stdout.read(n))
        except _transient() as e:
            raise LinkDown(self.host, _describe(e)) from e

    async def write(self, data: bytes) -> None:
        try:
            self._stdin.write(data)
            await self._stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as e:  # it ended: wait() says how
            raise EOFError(str(e)) from e
        except _transient() as e:
            raise LinkDown(self.host, _describe(e)) from e

    def close_stdin(self) -> None:
        try:
            self._close_stdin()
        except (OSError, *_transient()):  # type: ignore[misc]  # a tuple of exception classes
            pass  # ended already: wait() says how

    async def wait(self) -> CommandResult:
        """Its exit status and stderr; ``LinkDown`` when the link ended it before it said its status."""
        try:
            status = await self._finished()
            err = await self._stderr
        except _transient() as e:
            raise LinkDown(self.host, _describe(e)) from e
        if status is None:
            raise LinkDown(self.host, "the command's channel closed before it finished")
        return CommandResult(status, b"", _as_bytes(err))

    def abandon(self) -> None:
        """Stop caring: a local process is terminated (``wait`` then says when it ended), a remote one's
        channel closed (``Host.stop`` makes sure it ended: ``remote``)."""
        try:
            self._abandon()
        except (OSError, *_transient()):  # type: ignore[misc]  # a tuple of exception classes
            pass


async def _read_all(stream: Any) -> bytes:
    """A command's stderr, whatever became of its channel (what it said until then)."""
    try:
        return _as_bytes(await stream.read())
    except Exception:  # the link's failure is wait()'s to say
        return b""


class Host:
    """Common interface; ``name`` is how messages refer to the host.

    ``python`` runs the agent there: the host's own ``python3`` on remote
    hosts; on this machine the coordinator's interpreter, whose environment
    always has zstandard and xxhash (they are zchunk's dependencies).
    """

    name: str
    python: str = "python3"

    async def run(self, argv: list[str], stdin: bytes | None = None,
                  timeout: float | None = 120.0) -> CommandResult:
        raise NotImplementedError

    async def open_pipe(self, argv: list[str]) -> AgentPipe:
        raise NotImplementedError

    async def start(self, argv: list[str]) -> Process:
        """``argv`` running, its stdin and stdout for the caller to stream (a direct stream's zfs send
        and zfs receive)."""
        raise NotImplementedError

    async def stop(self, pid: int, patience: float = 30.0) -> bool:
        """End process ``pid`` (SIGTERM: zfs receive discards a partial stream) and wait up to
        ``patience`` seconds until it is gone. True when it is."""
        raise NotImplementedError

    def control(self) -> Host:
        """Where short requests that must not wait go (the status poller's): this host itself, unless
        its bulk data shares a connection with them (``SshHost``)."""
        return self

    @property
    def machine(self) -> Host:
        """The host this connection is one to: itself, or the host a control connection was opened for.
        What is put on the machine (the agent program, ``HostAgent.program``) is known under this."""
        return self

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """``closer`` runs first when this host is closed: what a run keeps open there (idle channels)."""
        self.__dict__.setdefault("_closers", []).append(closer)

    async def _run_closers(self) -> None:
        closers, self.__dict__["_closers"] = self.__dict__.get("_closers", []), []
        for closer in closers:
            with contextlib.suppress(Exception):
                await closer()

    async def close(self) -> None:
        await self._run_closers()


class LocalHost(Host):
    def __init__(self) -> None:
        self.name = "localhost"
        self.python = sys.executable or "python3"

    async def run(self, argv: list[str], stdin: bytes | None = None,
                  timeout: float | None = 120.0) -> CommandResult:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except FileNotFoundError:
            return CommandResult(127, b"", f"{argv[0]}: command not found".encode())
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        return CommandResult(proc.returncode or 0, out, err)

    async def open_pipe(self, argv: list[str]) -> AgentPipe:
        proc = await asyncio.create_subprocess_exec(  # stderr: as over SSH, not on the user's terminal
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            limit=1 << 22)
        _widen_pipe(proc.stdout)

        async def closer() -> None:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()

        return AgentPipe(proc.stdout, proc.stdin, closer, self.name)

    async def start(self, argv: list[str]) -> Process:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            limit=1 << 22)
        _widen_pipe(proc.stdout)
        assert proc.stdin is not None

        def abandon() -> None:
            if proc.returncode is None:
                proc.terminate()

        return Process(self.name, proc.pid, proc.stdout, proc.stdin, proc.stderr, proc.wait, proc.stdin.close,
                       abandon, remote=False)

    async def stop(self, pid: int, patience: float = 30.0) -> bool:
        return await _stop_pid(lambda sig: _local_kill(pid, sig), patience)


def _local_kill(pid: int, sig: int) -> bool:
    try:  # a child of ours is reaped by the event loop's child watcher while _stop_pid sleeps
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def _stop_pid(kill: Callable[[int], Any], patience: float) -> bool:
    """SIGTERM, then poll with signal 0 until the process is gone or ``patience`` passed."""
    if not await _maybe_await(kill(signal.SIGTERM)):
        return True
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        if not await _maybe_await(kill(0)):
            return True
    return False


async def _maybe_await(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value


def _widen_pipe(reader: Any) -> None:
    """1 MiB instead of 64 KiB in the agent's stdout pipe (Linux): chunk data then arrives in 256 KiB
    reads, not 64 KiB ones, a quarter of the event-loop rounds per byte. Best effort."""
    transport = getattr(reader, "_transport", None)
    pipe = transport.get_extra_info("pipe") if transport is not None else None
    if pipe is None:
        return
    try:
        import fcntl

        fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (OSError, ValueError):
        pass


#: How long a host may take to run ``true`` before its link counts as down (``_answers``).
ANSWER_TIMEOUT = 15.0


async def _answers(conn: Any) -> bool:
    """Whether the connection still runs a command: ``true``, within ``ANSWER_TIMEOUT``."""
    try:
        res = await asyncio.wait_for(conn.run("true", check=False), ANSWER_TIMEOUT)
    except _transient():
        return False
    return res.exit_status == 0


def _transient() -> tuple[type[BaseException], ...]:
    """The failures a link can cure: asyncssh's among them once it is imported (before, none can occur)."""
    base: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError, socket.gaierror, EOFError)
    ssh = sys.modules.get("asyncssh")
    if ssh is None:
        return base
    return base + (ssh.ConnectionLost, ssh.DisconnectError, ssh.ChannelOpenError, ssh.BreakReceived)


class SshHost(Host):
    """One asyncssh connection, reopened on demand after a failure."""

    def __init__(self, endpoint: Endpoint, opts: SshOptions) -> None:
        assert endpoint.host is not None
        self.endpoint, self.opts = endpoint, opts
        self.name = endpoint.host_label
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()
        self.patience = 0.0  # > 0 once reached: one-shot commands then ride through outages
        self._control: SshHost | None = None
        self._of: SshHost | None = None  # set on a control connection: the host it was opened for

    def control(self) -> Host:
        """A second connection to this host for the status poller. On one connection a status request
        queues behind every chunk byte the channels' windows let out before it (8 MiB per channel: over
        two seconds at 30 Mbit/s), so progress came every 2.4 s and described the past; on its own
        connection it waits only behind the link's queue. Opened on first use, closed with this one."""
        if self._control is None:
            self._control = SshHost(self.endpoint, self.opts)
            self._control._of = self
        self._control.python = self.python
        return self._control

    @property
    def machine(self) -> Host:
        return self._of or self

    def _connect_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "keepalive_interval": self.opts.keepalive,
            "keepalive_count_max": self.opts.keepalive_count,
            "connect_timeout": self.opts.connect_timeout,
            "login_timeout": self.opts.connect_timeout,
            # never prompt: keys only
            "password": None, "kbdint_auth": False, "passphrase": None, "agent_path": None,
        }
        if self.opts.config is not None:
            kw["config"] = [str(self.opts.config)]
        if self.endpoint.user:
            kw["username"] = self.endpoint.user
        if self.opts.port is not None:
            kw["port"] = self.opts.port
        if self.opts.key is not None:
            kw["client_keys"] = [str(self.opts.key)]
        o = self.opts.options
        if "port" in o and self.opts.port is None:
            kw["port"] = int(o["port"])
        if "user" in o and not self.endpoint.user:
            kw["username"] = o["user"]
        if "identityfile" in o and self.opts.key is None:
            kw["client_keys"] = [os.path.expanduser(o["identityfile"])]
        if "userknownhostsfile" in o:
            kw["known_hosts"] = os.path.expanduser(o["userknownhostsfile"])
        strict = self._strict_host_key_checking()
        if strict == "no":
            kw["known_hosts"] = None
        if "ciphers" in o:
            kw["encryption_algs"] = [c.strip() for c in o["ciphers"].split(",") if c.strip()]
        elif not self._config_sets("ciphers"):
            kw["encryption_algs"] = preferred_ciphers()
        return kw

    def _config_sets(self, key: str) -> bool:
        """Whether the ssh config asyncssh reads (--ssh-config, else ~/.ssh/config) sets ``key`` for this host."""
        path = self.opts.config if self.opts.config is not None else Path("~/.ssh/config").expanduser()
        try:
            return _config_value(path, self.endpoint.host or "", key) is not None
        except OSError:
            return False

    def _strict_host_key_checking(self) -> str:
        if "stricthostkeychecking" in self.opts.options:
            return self.opts.options["stricthostkeychecking"].lower()
        if self.opts.config is not None:
            return _config_value(self.opts.config, self.endpoint.host or "", "stricthostkeychecking") or "yes"
        return "yes"

    async def connection(self) -> asyncssh.SSHClientConnection:
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return self._conn
            self._conn = await self._open()
            return self._conn

    async def _open(self) -> asyncssh.SSHClientConnection:
        host = self.endpoint.host or ""
        kw = self._connect_kwargs()
        ssh = _asyncssh()
        try:
            return _acking_promptly(await ssh.connect(host, **kw))
        except ssh.HostKeyNotVerifiable as e:
            if self._strict_host_key_checking() == "accept-new":
                return await self._accept_new(host, kw)
            raise HostKeyError(host=self.name, reason=str(e), port=kw.get("port", 22),
                               hostname=host) from e
        except ssh.PermissionDenied as e:
            raise AuthError(host=self.name, user=kw.get("username", "(default)"), reason=str(e)) from e
        except ssh.KeyImportError as e:
            # an encrypted --ssh-key: zchunk never asks for a passphrase (an agent would hang on it)
            keys = ", ".join(kw.get("client_keys", [])) or "the key"
            raise AuthError(host=self.name, user=kw.get("username", "(default)"),
                            reason=f"cannot use {keys}: {e} (zchunk never prompts for passphrases)") from e
        except _transient() as e:
            raise LinkDown(self.name, _describe(e)) from e

    async def _accept_new(self, host: str, kw: dict[str, Any]) -> asyncssh.SSHClientConnection:
        """OpenSSH's accept-new: trust a host with no entry yet, and record its key."""
        known = Path(kw.get("known_hosts") or os.path.expanduser("~/.ssh/known_hosts"))
        port = int(kw.get("port", 22))
        ssh = _asyncssh()
        key = await ssh.get_server_host_key(host, port)
        if key is None:
            raise HostKeyError(host=self.name, reason="server sent no host key", port=port, hostname=host)
        entry = host if port == 22 else f"[{host}]:{port}"
        if known.exists() and any(line.split(" ", 1)[0] == entry for line in known.read_text().splitlines()):
            raise HostKeyError(host=self.name, reason="the host key CHANGED", port=port, hostname=host)
        known.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with known.open("a") as f:
            f.write(f"{entry} {key.export_public_key().decode().strip()}\n")
        kw = dict(kw, known_hosts=str(known))
        return _acking_promptly(await ssh.connect(host, **kw))

    def drop(self, conn: asyncssh.SSHClientConnection | None = None) -> None:
        """Forget a connection that failed, so the next use reconnects.

        With ``conn``, only if that is still the current connection: a channel
        of an old, already replaced connection must not drop the new one.
        """
        if self._conn is not None and (conn is None or conn is self._conn):
            self._conn.abort()
            self._conn = None

    async def run(self, argv: list[str], stdin: bytes | None = None,
                  timeout: float | None = 120.0) -> CommandResult:
        """One command; once the host has been reached (``patience`` set by first_contact), a link
        failure is retried with backoff until ``patience`` passes, like the engine's transfers."""
        if self.patience <= 0:
            return await self._run_once(argv, stdin, timeout)
        retrying = AsyncRetrying(retry=retry_if_exception_type(LinkDown), reraise=True,
                                 wait=backoff(0.25, 5),
                                 stop=stop_after_delay(self.patience))
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._run_once(argv, stdin, timeout)
        except LinkDown as e:
            raise HostUnreachable(host=self.name, reason=f"link down for longer than --patience ({e.reason})") from e
        raise AssertionError("unreachable")

    def _failed(self, conn: asyncssh.SSHClientConnection, e: BaseException) -> LinkDown:
        """A channel that failed to open or to run: the link's failure (the connection is dropped, and the next
        use reconnects), or sshd refusing another session on a connection that works: past its MaxSessions
        (10 by default) when a run's jobs want more channels at once. That one stays, with every other
        stream's channel on it, and the channel is asked for again as after an outage, once one is free."""
        if isinstance(e, _asyncssh().ChannelOpenError):
            return LinkDown(self.name, f"sshd refused another session on this connection ({e.reason}): more "
                            "channels at once than its MaxSessions (INSTALL.md)")
        self.drop(conn)
        return LinkDown(self.name, _describe(e))

    async def _run_once(self, argv: list[str], stdin: bytes | None, timeout: float | None) -> CommandResult:
        conn = await self.connection()
        try:
            res = await asyncio.wait_for(
                conn.run(shlex.join(argv), input=stdin, encoding=None, check=False), timeout)
        except asyncio.TimeoutError as e:
            # a command silent this long on a link that still answers is hung there, not cut off: said as
            # such, and the connection (every other stream's) stays; run again, it would hang again
            if await _answers(conn):
                raise CommandHung(host=self.name, command=shlex.join(argv)[:200], seconds=f"{timeout or 0:.0f}") from e
            raise self._failed(conn, e) from e
        except _transient() as e:
            raise self._failed(conn, e) from e
        if res.exit_status is None and res.exit_signal is None:
            self.drop(conn)  # the channel closed without an exit status: the link died under it
            raise LinkDown(self.name, "the command's channel closed before it finished")
        status = res.exit_status if res.exit_status is not None else 255
        return CommandResult(status, _as_bytes(res.stdout), _as_bytes(res.stderr))

    async def open_pipe(self, argv: list[str]) -> AgentPipe:
        conn = await self.connection()
        try:
            proc = await conn.create_process(shlex.join(argv), encoding=None, window=8 << 20,
                                             max_pktsize=256 << 10, stderr=_asyncssh().DEVNULL)
        except _transient() as e:
            raise self._failed(conn, e) from e

        async def closer() -> None:
            proc.stdin.write_eof() if not proc.stdin.is_closing() else None
            proc.close()
            try:
                await asyncio.wait_for(proc.wait_closed(), 5)
            except _transient():  # timeouts among them
                pass

        return AgentPipe(proc.stdout, proc.stdin, closer, self.name, lambda: self.drop(conn))

    async def start(self, argv: list[str]) -> Process:
        # The shell says its pid, then becomes the command: the pid ``stop`` ends after a link failure
        # (sshd may not notice a dead link for hours, and zfs receive would wait on its stdin till then).
        conn = await self.connection()
        try:
            proc = await conn.create_process(shlex.join(["sh", "-c", 'echo $$; exec "$@"', "zchunk", *argv]),
                                             encoding=None, window=8 << 20, max_pktsize=256 << 10)
            line = await proc.stdout.readline()
        except _transient() as e:
            raise self._failed(conn, e) from e
        if not line.strip().isdigit():
            proc.close()
            raise LinkDown(self.name, "the command's channel closed before it started")

        async def finished() -> int | None:
            await proc.wait_closed()
            if proc.exit_status is not None and proc.exit_status >= 0:
                return int(proc.exit_status)
            return 255 if proc.exit_signal is not None else None  # killed by a signal; None: no status at all

        return Process(self.name, int(line), proc.stdout, proc.stdin, proc.stderr, finished, proc.stdin.write_eof,
                       proc.close, remote=True)

    async def stop(self, pid: int, patience: float = 30.0) -> bool:
        async def kill(sig: int) -> bool:
            return (await self.run(["kill", f"-{sig}", str(pid)], timeout=30)).status == 0

        return await _stop_pid(kill, patience)

    async def close(self) -> None:
        await self._run_closers()
        if self._control is not None:
            await self._control.close()
        if self._conn is not None:
            self._conn.close()
            try:
                await asyncio.wait_for(self._conn.wait_closed(), 5)
            except _transient():  # timeouts among them
                pass
            self._conn = None


def _acking_promptly(conn: asyncssh.SSHClientConnection) -> asyncssh.SSHClientConnection:
    """Acknowledge what the server sends as it arrives (TCP_QUICKACK after each read), not after
    Linux's delayed-ACK timer.

    sshd switches Nagle off only when a session starts: the confirmation of the first channel waits in
    the server until its post-authentication packets are acknowledged, and the client, with nothing to
    send while it waits for that confirmation, delays the ACK by 40 ms. Every run's first commands on
    a host (and every reconnect's) waited those 40 ms; with the ACK sent at once they answer in 4 ms.
    """
    sock = conn.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_QUICKACK"):
        return conn
    received = conn.data_received

    def data_received(data: bytes, datatype: Any = None) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass
        received(data, datatype)

    conn.data_received = data_received  # type: ignore[method-assign]  # the transport looks it up on each read
    return conn


def _as_bytes(data: bytes | str | None) -> bytes:
    if data is None:
        return b""
    return data.encode() if isinstance(data, str) else bytes(data)


def _describe(e: BaseException) -> str:
    if isinstance(e, socket.gaierror):
        return f"name resolution failed ({e})"
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__


def preferred_ciphers() -> list[str]:
    """asyncssh's default ciphers, AES-GCM first where the CPU has AES instructions.

    asyncssh encrypts every packet from Python; its chacha20-poly1305 (first by default, and
    what OpenSSH picks) costs twice the CPU of AES-GCM per byte: 0.26 vs 0.13 s for 100 MiB,
    0.49 vs 0.31 s wall, on the benchmark machine, and chunks are moved at CPU speed on fast links.
    """
    algs = [a.decode() for a in _asyncssh().encryption.get_default_encryption_algs()]
    if not _cpu_has_aes():
        return algs
    gcm = [a for a in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com") if a in algs]
    return gcm + [a for a in algs if a not in gcm]


def _cpu_has_aes() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return "aes" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def _config_value(path: Path, host: str, key: str) -> str | None:
    """The first value of ``key`` in Host blocks matching ``host`` (for options asyncssh ignores)."""
    import fnmatch

    active = True
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace("=", " ", 1).split(None, 1)
        if len(parts) < 2:
            continue
        k, v = parts[0].lower(), parts[1].strip()
        if k == "host":
            active = any(fnmatch.fnmatch(host, pat) for pat in v.split())
        elif k == "match":
            active = False
        elif active and k == key:
            return v
    return None


def make_host(endpoint: Endpoint, opts: SshOptions, python: str | None = None) -> Host:
    host: Host = LocalHost() if endpoint.is_local else SshHost(endpoint, opts)
    if python:
        host.python = python
    return host


async def first_contact(host: Host, patience: float = 0.0, connect_patience: float = 30.0) -> None:
    """Connect before anything else, retrying a link failure for ``connect_patience`` seconds (a
    flapping link at the start of a cron run); past that an unreachable host is a plain error, since
    nothing has started yet. From then on, commands retry through outages for ``patience`` seconds."""
    if not isinstance(host, SshHost):
        return
    retrying = AsyncRetrying(retry=retry_if_exception_type(LinkDown), reraise=True,
                             wait=backoff(0.25, 5),
                             stop=stop_after_delay(max(0.0, min(connect_patience, patience or connect_patience))))
    try:
        async for attempt in retrying:
            with attempt:
                await host.connection()
    except LinkDown as e:
        raise HostUnreachable(host=host.name, reason=e.reason) from e
    host.patience = patience
