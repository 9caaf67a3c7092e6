"""Timeline of one zchunk run, for benchmarks/trace.py: put this directory first on PYTHONPATH.

Python imports ``sitecustomize`` at start-up. With ``ZCHUNK_TRACE=1`` this one imports zchunk and wraps
what costs time before, around and after the stream: every host command (``Host.run``), every channel
(``Host.open_pipe``, ``AgentSide.open_channel`` up to the agent's hello), every chunk move and every
change in what the status poller sees. Each is one line on stderr::

    TRACE <start s> +<duration s> <what>

times from this interpreter's start. Nothing is changed but the timing lines.
"""

from __future__ import annotations

import os
import sys
import time

T0 = time.monotonic()


def _say(start: float, took: float | None, what: str) -> None:
    dur = f"+{took:5.3f}" if took is not None else "      "
    sys.stderr.write(f"TRACE {start - T0:6.3f} {dur} {what}\n")


def _short(argv: list[str]) -> str:
    text = " ".join(argv)
    for word in ("probe", "install", "sessions", "serve"):
        if "-c" in argv and word in argv:  # a bootstrap: the source is not worth printing
            i = argv.index(word)
            return f"{argv[0]} -c BOOTSTRAP {word} {' '.join(argv[i + 1:i + 2])}"
    return text[:120]


def _install() -> None:
    from zchunk import channels, engine, transport

    for cls in (transport.LocalHost, transport.SshHost):
        def wrap_run(orig):  # noqa: ANN001, ANN202
            async def run(self, argv, stdin=None, timeout=120.0):  # noqa: ANN001, ANN202
                t = time.monotonic()
                try:
                    return await orig(self, argv, stdin, timeout)
                finally:
                    _say(t, time.monotonic() - t, f"{self.name}: {_short(argv)}")
            return run

        def wrap_pipe(orig):  # noqa: ANN001, ANN202
            async def open_pipe(self, argv):  # noqa: ANN001, ANN202
                t = time.monotonic()
                try:
                    return await orig(self, argv)
                finally:
                    _say(t, time.monotonic() - t, f"{self.name}: pipe {_short(argv)}")
            return open_pipe

        cls.run = wrap_run(cls.run)
        cls.open_pipe = wrap_pipe(cls.open_pipe)

    open_channel = channels.AgentSide.open_channel

    async def traced_channel(self, stall_timeout, source=None, control=False):  # noqa: ANN001, ANN202
        t = time.monotonic()
        ch = await open_channel(self, stall_timeout, source, control)
        early = " (opened with install)" if source else ""
        kind = " control" if control else ""
        _say(t, time.monotonic() - t, f"{self.name}: {self.role}{kind} channel ready{early}")
        return ch

    channels.AgentSide.open_channel = traced_channel
    relay = engine.relay_chunk

    async def traced_relay(source, dst, seq, *a, **k):  # noqa: ANN001, ANN202
        t = time.monotonic()
        stored = await relay(source, dst, seq, *a, **k)
        _say(t, time.monotonic() - t, f"moved chunk {seq}")
        return stored

    engine.relay_chunk = traced_relay
    absorb = engine.Transfer._absorb
    seen: dict[str, object] = {}

    def traced_absorb(self, src_st, dst_st):  # noqa: ANN001, ANN202
        absorb(self, src_st, dst_st)
        r = self.reports
        now = (r.sender.get("state"), r.receiver.get("state"), len(r.src.chunks), r.received)
        if now != seen.get("last"):
            seen["last"] = now
            _say(time.monotonic(), None, f"poll: sender {now[0]}, receiver {now[1]}, spooled "
                 f"{sorted(r.src.chunks)}, fed to zfs receive {now[3]}")

    engine.Transfer._absorb = traced_absorb


if os.environ.pop("ZCHUNK_TRACE", ""):  # popped: the agents this run starts here are not traced
    _install()
    _say(time.monotonic(), None, "zchunk imported")
