"""What a host can do, learned before anything is changed there: python3, the agent's capabilities, zfs.

``probe_host`` asks the agent's ``probe`` and zfs's feature probes at once
(both read-only); ``negotiate`` picks the codec and checksum both agents
have. A host that cannot take part is refused here, naming what it lacks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from . import agent
from . import errors as E
from .client import HostAgent, session_listing
from .transport import Host
from .zfs import Features, Zfs

MIN_PYTHON = (3, 9)


@dataclass
class HostReport:
    """What preflight learned about one host."""

    name: str
    python: tuple[int, ...]
    capabilities: list[str]
    features: Features
    uid: int
    user: str = "root"
    groups: tuple[str, ...] = ()
    hostname: str = "host"
    sessions: list[dict[str, Any]] | None = None  # ``sessions --spool-dir`` as the probe saw it

    def summary(self) -> dict[str, Any]:
        """For the ``preflight`` event."""
        return {"host": self.name, "python": ".".join(map(str, self.python)), "capabilities": self.capabilities,
                "zfs": self.features.summary(), "uid": self.uid}


async def probe_host(host: Host, spool_dir: str) -> HostReport:
    """python3 and zfs present and usable; nothing is written."""
    # Both at once (the zfs probes are read-only); python's answer is judged first.
    info, features = await asyncio.gather(HostAgent(host).probe(spool_dir), Zfs(host).features(),
                                          return_exceptions=True)
    if isinstance(info, BaseException):
        raise info
    py = tuple(info.get("python", [0]))
    if py < MIN_PYTHON:
        raise E.OldPython(host=host.name, version=".".join(map(str, py)))
    if isinstance(features, BaseException):
        raise features
    return HostReport(host.name, py, list(info.get("capabilities", [])), features, int(info.get("uid", -1)),
                      str(info.get("user", "")), tuple(info.get("groups", [])), str(info.get("host", "host")),
                      session_listing(info.get("sessions")) if "sessions" in info else None)


def negotiate(compress: str, src: HostReport, dst: HostReport) -> tuple[str, int | None, str]:
    """Pick codec (+level) and checksum both agents support; a failure names both lists."""
    both = set(src.capabilities) & set(dst.capabilities)
    name, _, level_s = compress.partition(":")
    level = int(level_s) if level_s.isdigit() else None
    if name == "auto":
        name = "zstd" if "zstd-v1" in both else "zlib"
    if name not in agent.CODEC_CAPS:
        raise E.UsageError(reason=f"--compress {compress!r}: use zstd[:LEVEL], zlib[:LEVEL] or none")
    if agent.CODEC_CAPS[name] not in both:
        raise E.CapabilityMismatch(what=f"codec {name}", ours=src.capabilities, theirs=dst.capabilities,
                                   host=f"{src.name}/{dst.name}")
    checksum = "xxh3-128" if "xxh3-128-v1" in both else "blake2b-128"
    return name, level, checksum
