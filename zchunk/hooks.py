"""Commands run around the sync snapshot (``--pre-snapshot`` / ``--post-snapshot``, a job's
``pre_snapshot`` / ``post_snapshot``): put a database into backup mode, take the snapshot, take it out.

A hook is an argv list run on the coordinator's host as its user, never through a shell, with stdin closed,
its output kept for the message, in a process group of its own that is killed whole when it outlives its
timeout. It learns what is snapshotted from ``ZCHUNK_SOURCE``, ``ZCHUNK_TARGET`` and ``ZCHUNK_SNAPSHOT``.
A failing pre-snapshot hook skips the run (``HookFailed``: nothing snapshotted, nothing sent); the
post-snapshot hook runs whenever the pre-snapshot one succeeded, whatever became of the snapshot, and its
failure is a warning (the snapshot is taken: replicating it is still right).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from . import errors as E
from .events import Emitter


@dataclass(frozen=True)
class Hook:
    argv: tuple[str, ...]
    timeout: float = 300.0


@dataclass(frozen=True)
class Hooks:
    pre: Hook | None = None
    post: Hook | None = None


async def around_snapshot(hooks: Hooks, env: dict[str, str], emit: Emitter,
                          take: Callable[[], Awaitable[None]]) -> None:
    """``take()`` (the snapshot) between the hooks: pre first (failing, ``HookFailed`` and no snapshot),
    post after it whatever happened."""
    if hooks.pre is not None:
        await _run(hooks.pre, "pre-snapshot", env, emit)
    try:
        await take()
    finally:
        if hooks.post is not None:
            try:
                await _run(hooks.post, "post-snapshot", env, emit)
            except E.HookFailed as e:
                emit("warning", host="", detail=str(e))


async def _run(hook: Hook, which: str, env: dict[str, str], emit: Emitter) -> None:
    command = " ".join(hook.argv)
    start = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *hook.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True)
    except OSError as e:
        raise E.HookFailed(which=which, command=command, why=f"cannot run it: {e.strerror or e}") from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), hook.timeout)
    except asyncio.TimeoutError:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await proc.wait()
        raise E.HookFailed(which=which, command=command,
                           why=f"still running after its timeout of {hook.timeout:g} s: killed") from None
    text = out.decode(errors="replace").strip()
    emit("hook", which=which, command=command, status=proc.returncode, seconds=round(time.monotonic() - start, 2),
         output=text[-2000:])
    if proc.returncode != 0:
        last = text.splitlines()[-1] if text else "no output"
        raise E.HookFailed(which=which, command=command, why=f"exit status {proc.returncode}: {last}")
