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
    interpreter: str = ""  # the python the agent runs with there
    why: str = ""  # how that one was chosen
    program: str = ""  # the agent program an earlier run put there, which the probe imported ("": none)

    def summary(self) -> dict[str, Any]:
        """For the ``preflight`` event."""
        return {"host": self.name, "python": ".".join(map(str, self.python)), "capabilities": self.capabilities,
                "zfs": self.features.summary(), "uid": self.uid, "interpreter": self.interpreter, "why": self.why,
                "program": self.program}


async def probe_host(host: Host, spool_dir: str, choose_python: bool = True) -> HostReport:
    """python3 and zfs present and usable; nothing is written. With ``choose_python`` (no --python given),
    a host whose first python3 lacks zstandard or xxhash runs the agent with another of its interpreters
    that has them (Debian's /usr/bin/python3 with python3-zstandard, under a pyenv or venv python3 on PATH):
    ``host.python`` is set to it."""
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
    why = "given with --python" if not choose_python else "has zstandard and xxhash"
    better = best_interpreter(info) if choose_python else None
    if better is not None:
        first, first_info, host.python = f"{host.python} ({_version(info['python'])})", info, better["path"]
        info = await HostAgent(host).probe(spool_dir)
        py = tuple(info.get("python", [0]))
        why = f"{first} lacks {_lacks(first_info)}: {better['path']} has {_has(better)}"
    elif choose_python and not (_speedups(info) == (True, True)):
        why = f"lacks {_lacks(info)}, and so do the host's other python3 interpreters"
    if info.get("zstd_via") == "command":
        why += "; zstd through the zstd command (a pipe per chunk)"
    elif not _speedups(info)[0]:
        why += "; no zstd module or command: zlib"
    if not _speedups(info)[1]:
        why += "; no xxhash: BLAKE2b checksums"
    return HostReport(host.name, py, list(info.get("capabilities", [])), features, int(info.get("uid", -1)),
                      str(info.get("user", "")), tuple(info.get("groups", [])), str(info.get("host", "host")),
                      session_listing(info.get("sessions")) if "sessions" in info else None,
                      str(info.get("executable") or host.python), why,
                      "/".join(map(str, info["program"])) + ".py" if isinstance(info.get("program"), list) else "")


def _speedups(info: dict[str, Any]) -> tuple[bool, bool]:
    """(the zstandard module, xxhash): the zstd command counts less than the module, which needs no process
    per chunk, so an interpreter with the module is still preferred."""
    if "zstd" in info or "capabilities" not in info:
        return bool(info.get("zstd")), bool(info.get("xxhash"))
    caps = info["capabilities"]  # an agent from before the probe said which (the module, then)
    return agent.CODEC_CAPS["zstd"] in caps, agent.HASH_CAPS["xxh3-128"] in caps


def best_interpreter(info: dict[str, Any]) -> dict[str, Any] | None:
    """Of the host's other interpreters (the probe's ``interpreters``), one with more of zstandard and xxhash
    than the probing one (zstandard first: it is the larger gain), or None."""
    current = _speedups(info)
    candidates = [c for c in info.get("interpreters") or [] if isinstance(c, dict) and c.get("path")]
    best = max(candidates, key=_speedups, default=None)
    return best if best is not None and _speedups(best) > current else None


def _version(v: Any) -> str:
    return ".".join(map(str, v)) if isinstance(v, list) else "?"


def _lacks(info: dict[str, Any]) -> str:
    zstd, xx = _speedups(info)
    return " and ".join(n for n, ok in (("zstandard", zstd), ("xxhash", xx)) if not ok) or "nothing"


def _has(info: dict[str, Any]) -> str:
    zstd, xx = _speedups(info)
    return " and ".join(n for n, ok in (("zstandard", zstd), ("xxhash", xx)) if ok) or "neither"



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
