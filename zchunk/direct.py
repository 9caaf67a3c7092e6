"""A stream too small to be worth a session: ``zfs send`` piped into ``zfs receive`` through the coordinator.

A session (stream.py) costs each host an agent install, a daemon and its channels: 0.2-0.4 s per stream
on a 2-core host, which for an incremental of a few KiB is all of its time, and a recursive run has
hundreds of them (benchmarks/README.md, "The floor for a tree"). A stream whose estimate is at most
``--direct-max`` goes straight instead: ``zfs send`` runs on the source, the coordinator reads its stdout
and writes it, paced by the run's bandwidth budget, to ``zfs receive`` on the target, over the SSH
connections the run already has. Nothing is spooled and nothing is installed.

Such a stream either completes, verified by the target snapshot's guid like every stream, or leaves
nothing behind: zfs receive discards a partial stream (it runs without ``-s`` here). Whatever goes wrong,
a link failure, a stall, zfs send or zfs receive failing, or a stream that turns out over twice the
limit (zfs-fuse's estimate of an incremental is a difference of sizes, and can be far off), ends both
commands and ``run_direct`` returns None: the caller then sends the stream through a session, which rides
out outages and reports a failure the way every stream does. At most twice ``--direct-max`` is sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from zoneinfo import ZoneInfo

from . import agent
from . import errors as E
from .aio import all_of
from .engine import TransferResult
from .events import Emitter
from .link import Bandwidth, Pacer
from .transport import CommandResult, Host, LinkDown, Process
from .zfs import Zfs

#: Bytes read from zfs send at a time.
PIECE = 256 << 10


class _Stopped(Exception):
    """Why a direct stream gave up: said in the note, and the stream goes through a session."""


async def run_direct(src_host: Host, dst_host: Host, snapshot: str, snapshot_guid: int,
                     target_snapshot: str, send: dict[str, object], receive: dict[str, object], estimate: int,
                     limit: int, bwlimit: str | None, timezone: str | None, stall: float, pacer: Pacer | None,
                     emit: Emitter) -> tuple[TransferResult, int] | None:
    """Send one stream directly (``send`` and ``receive``: the agents' ``zfs_argv`` fields). Its transfer and
    the target snapshot's guid, checked against ``snapshot_guid``; None when it stopped and left nothing,
    said in a ``note``."""
    try:
        send_argv = agent.zfs_argv({"role": "send", "send": send})
        recv_argv = agent.zfs_argv({"role": "receive", "receive": receive})
    except agent.AgentError:
        return None  # the session's agents refuse it too, and say so as usual
    pacer = pacer or Pacer()
    rate = Bandwidth.parse(bwlimit).rate_at(datetime.now(ZoneInfo(timezone) if timezone else None))
    if rate is not None and pacer.rate is None:  # --bwlimit now; a session of the run may have set it already
        pacer.set_rate(rate)
    started = time.monotonic()
    running: list[tuple[Host, Process]] = []
    try:
        running.append((dst_host, await dst_host.start(recv_argv)))
        running.append((src_host, await src_host.start(send_argv)))
        (_, receiver), (_, sender) = running
        moved, whole, last = await _pump(sender, receiver, pacer, max(2 * limit, estimate + PIECE), stall)
        async with _mounting(dst_host, receive):
            if whole:
                whole = await _put(receiver, pacer, last, stall)
                receiver.close_stdin()
            if not whole:  # zfs receive stopped reading: it says why (the send is of no more use)
                sender.abandon()
            recv_res, send_res = await asyncio.wait_for(all_of(receiver.wait(), sender.wait()), stall)
        running.clear()  # both have ended
        for host, res, what in ((dst_host, recv_res, "zfs receive"), (src_host, send_res, "zfs send")):
            if res.status != 0 or not whole:
                raise _Stopped(f"{host.name}: {what} failed (status {res.status}): {_last_line(res)}")
    except (LinkDown, asyncio.TimeoutError, _Stopped) as e:
        why = (f"link to {e.host} failed: {e.reason}" if isinstance(e, LinkDown)
               else f"no byte moved for {stall:.0f} s" if isinstance(e, asyncio.TimeoutError) else str(e))
        await _end(running, emit)
        emit("note", host=dst_host.name, detail=f"the direct stream of {snapshot} stopped ({why}): "
             "sending it through a session")
        return None
    except BaseException:
        await asyncio.shield(_end(running, emit))
        raise
    emit("stream_end", chunks=0, raw_bytes=moved, sender_cpu=None, sender=None)
    guid = await Zfs(dst_host).guid(target_snapshot)
    if guid != snapshot_guid:
        raise E.IntegrityError(reason=f"target snapshot guid {guid} != source guid {snapshot_guid}")
    elapsed = time.monotonic() - started
    emit("verified", snapshot=snapshot, guid=guid, stream_hash=None)
    return TransferResult(raw_bytes=moved, wire_bytes=moved, total_chunks=0, stream_hash="", elapsed=elapsed,
                          outages=0, outage_seconds=0.0, discarded_chunks=0), guid


async def _pump(send: Process, recv: Process, pacer: Pacer, cutoff: int, stall: float) -> tuple[int, bool, bytes]:
    """zfs send's stdout into zfs receive's stdin, paced, but for its last piece (the one with the stream's
    END record, after which zfs receive mounts: ``_mounting``): the bytes read, whether every piece before
    the last went in (False: zfs receive stopped reading first), and the last piece."""
    moved, held = 0, b""
    while data := await asyncio.wait_for(send.read(PIECE), stall):
        moved += len(data)
        if moved > cutoff:
            raise _Stopped(f"it is larger than its estimate: over {moved} bytes")
        if held and not await _put(recv, pacer, held, stall):
            return moved, False, b""
        held = data
    return moved, True, held


async def _put(recv: Process, pacer: Pacer, data: bytes, stall: float) -> bool:
    """One piece into zfs receive, paced; False when it stopped reading."""
    await pacer.take(len(data))
    try:
        await asyncio.wait_for(recv.write(data), stall)
    except EOFError:
        return False
    return True


#: One lock per target machine (``Host.machine``) for the ends of its receives that mount (``_mounting``).
_MOUNT_LOCKS: weakref.WeakKeyDictionary[Host, asyncio.Lock] = weakref.WeakKeyDictionary()


def _mounting(host: Host, receive: dict[str, object]) -> AbstractAsyncContextManager[object]:
    """Where zfs receive has no ``-u`` (zfs-fuse), it mounts what it received as it ends, and zfs-fuse can
    lose a mount made at the same moment as another (docs/reliability.md): every access to it then hangs.
    So on such a target the receives of a run end one at a time, from their last piece to their exit; the
    bytes before move at once."""
    flags = receive.get("flags")
    if isinstance(flags, list) and "-u" in flags:
        return contextlib.nullcontext()
    return _MOUNT_LOCKS.setdefault(host.machine, asyncio.Lock())


async def _end(running: list[tuple[Host, Process]], emit: Emitter) -> None:
    """Both commands ended where they run: a remote one by its pid, once its host answers again (its
    commands ride out an outage for --patience), so that no zfs receive waits on a dead channel's stdin
    while the session that follows receives into the same dataset."""
    for _, proc in running:
        proc.abandon()
    for host, proc in running:
        try:
            if not proc.remote:  # terminated by abandon; reaped here, and its pid never signalled again
                await asyncio.wait_for(proc.wait(), 30)
            elif not await host.stop(proc.pid):
                emit("warning", host=host.name, detail=f"process {proc.pid} of a direct stream did not end")
        except (E.ZchunkError, LinkDown, asyncio.TimeoutError) as e:
            emit("warning", host=host.name, detail=f"could not end process {proc.pid} of a direct stream: "
                 f"{e or 'it did not exit'}")


def _last_line(res: CommandResult) -> str:
    lines = res.err_text.strip().splitlines()
    return lines[-1] if lines else "no message"
