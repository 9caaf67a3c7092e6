"""Full speed wherever the agent runs: a host whose first python3 lacks zstandard or xxhash (a pyenv or venv
python3, as this machine's PATH has) runs the agent with another of its interpreters that has them
(Debian's /usr/bin/python3 with python3-zstandard and python3-xxhash), said per host with -v. The chain is
pinned with interpreters that hide the modules (a sitecustomize that refuses their import)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need
from tests.zc import Zchunk
from tests.zfsutil import assert_replica, make_source
from zchunk import agent, lab
from zchunk.endpoint import parse_endpoint
from zchunk.preflight import best_interpreter, probe_host
from zchunk.transport import SshOptions, make_host

MiB = 1 << 20
SYSTEM_PYTHON = "/usr/bin/python3"


def system_python_has_both() -> None:
    res = os.popen(f"{SYSTEM_PYTHON} -c 'import zstandard, xxhash; print(1)' 2>/dev/null").read().strip()
    need(res == "1", f"{SYSTEM_PYTHON} with python3-zstandard and python3-xxhash (scripts/setup installs them)")


def hiding(tmp_path: Path, name: str, *modules: str) -> str:
    """A python3 that cannot import ``modules``: the system one with a sitecustomize refusing them."""
    site = tmp_path / f"site-{name}"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None  # import raises ImportError\n" for m in modules))
    exe = tmp_path / name
    exe.write_text(f"#!/bin/sh\nPYTHONPATH={site} exec {SYSTEM_PYTHON} \"$@\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(exe)


def venv_python(tmp_path: Path) -> str:
    """A venv of the system python without its packages: a python3 that lacks zstandard and xxhash, as a
    host's venv or pyenv python3 first on PATH does."""
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=120)
    exe = str(tmp_path / "venv" / "bin" / "python3")
    res = subprocess.run([exe, "-c", "import zstandard"], capture_output=True, timeout=60)
    assert res.returncode != 0, "the venv sees the system's zstandard"
    return exe


@pytest.mark.parametrize("current,others,chosen", [
    ((False, False), [("/a", False, True), ("/b", True, False), ("/c", True, True)], "/c"),
    ((False, False), [("/a", False, True), ("/b", True, False)], "/b"),  # zstandard is the larger gain
    ((False, True), [("/a", False, True)], None),  # nothing better
    ((True, False), [("/a", True, True)], "/a"),
    ((True, True), [("/a", True, True)], None),  # already the best
    ((False, False), [], None),
])
def test_the_best_interpreter_is_one_with_more_speed_ups(current: tuple[bool, bool],
                                                          others: list[tuple[str, bool, bool]],
                                                          chosen: str | None) -> None:
    caps = agent.BASE_CAPS + ["zlib-v1"] + (["zstd-v1"] if current[0] else []) + (
        ["xxh3-128-v1"] if current[1] else [])
    info = {"capabilities": caps, "interpreters": [{"path": p, "python": [3, 11, 2], "zstd": z, "xxhash": x}
                                                   for p, z, x in others]}
    best = best_interpreter(info)
    assert (best["path"] if best else None) == chosen


def test_the_probe_reports_what_each_other_interpreter_can_import(tmp_path: Path, monkeypatch: Any) -> None:
    system_python_has_both()
    no_zstd, none = hiding(tmp_path, "py-no-zstd", "zstandard"), hiding(tmp_path, "py-none", "zstandard", "xxhash")
    monkeypatch.setattr(agent, "INTERPRETERS", [no_zstd, none, SYSTEM_PYTHON, str(tmp_path / "missing")])
    found = {Path(i["path"]).name: (i["zstd"], i["xxhash"]) for i in agent.other_interpreters()}
    assert found["py-no-zstd"] == (False, True) and found["py-none"] == (False, False)
    assert "missing" not in found


def test_the_probe_stops_asking_at_the_first_interpreter_with_both(tmp_path: Path, monkeypatch: Any) -> None:
    """All are asked at once; the first in order with both speed-ups is the answer, and the ones after it
    are stopped (a pyenv shim per python3.N costs a tenth of a second each)."""
    system_python_has_both()
    marker = tmp_path / "slow-ran"
    no_zstd = hiding(tmp_path, "py-no-zstd", "zstandard")
    slow = tmp_path / "py-slow"  # slow, and without zstandard
    slow.write_text(f"#!/bin/sh\nsleep 3\ntouch {marker}\nexec {no_zstd} \"$@\"\n")
    slow.chmod(0o755)
    monkeypatch.setattr(agent, "INTERPRETERS", [no_zstd, SYSTEM_PYTHON, str(slow)])
    found = [Path(i["path"]).name for i in agent.other_interpreters()]
    assert found == ["py-no-zstd", "python3"], found
    time.sleep(4)  # what the slow one would have needed to leave its mark
    assert not marker.exists(), "the interpreter after the chosen one was not stopped"
    # and with the slow one first, it is waited for and reported: order decides, not speed
    monkeypatch.setattr(agent, "INTERPRETERS", [str(slow), SYSTEM_PYTHON])
    assert [Path(i["path"]).name for i in agent.other_interpreters()] == ["py-slow", "python3"]
    assert marker.exists()


def probe(sshd: lab.Sshd, python: str, choose: bool, spool: Path) -> Any:
    async def go() -> Any:
        host = make_host(parse_endpoint("local:pool/x"), SshOptions(config=sshd.ssh_config))
        host.python = python
        try:
            return await probe_host(host, str(spool), choose_python=choose), host.python
        finally:
            await host.close()
    return asyncio.run(go())


def test_a_remote_python3_without_the_speed_ups_hands_the_agent_to_one_with_them(sshd_local: lab.Sshd,
                                                                                  tmp_path: Path) -> None:
    system_python_has_both()
    bare = venv_python(tmp_path)
    rep, python = probe(sshd_local, bare, True, tmp_path / "spool")
    assert python == SYSTEM_PYTHON and rep.interpreter == SYSTEM_PYTHON
    assert "zstd-v1" in rep.capabilities and "xxh3-128-v1" in rep.capabilities
    assert rep.why.startswith(f"{bare} (") and "lacks zstandard and xxhash" in rep.why, rep.why
    kept, python = probe(sshd_local, bare, False, tmp_path / "spool")  # --python given: the user's choice
    assert python == bare and kept.why.startswith("given with --python"), kept.why
    assert "zstd-v1" in kept.capabilities and "zstd through the zstd command" in kept.why, "the command, then"
    assert "no xxhash: BLAKE2b checksums" in kept.why


def test_sync_to_a_host_whose_path_python3_lacks_zstandard_uses_zstd(zc: Zchunk, pools: Any,
                                                                     sshd_local: lab.Sshd, tmp_path: Path) -> None:
    """This machine's sshd sessions find pyenv's python3 first (no zstandard, no xxhash), as a host with a
    venv or pyenv python3 would: the agent runs with /usr/bin/python3 there, and the chunks are zstd."""
    system_python_has_both()
    src_pool, dst_pool = pools
    src = make_source(src_pool, 6 * MiB, seed=81)
    dst = f"{dst_pool.name}/replica"
    run = zc.run("sync", src, f"local:{dst}", "-v", "--ssh-config", str(sshd_local.ssh_config))
    assert run.returncode == 0, run.explain()
    target = run.of("preflight")[0]["target"]
    assert target["interpreter"] == SYSTEM_PYTHON, json.dumps(target)
    plan = run.of("plan")[0]
    assert (plan["codec"], plan["checksum"]) == ("zstd", "xxh3-128"), plan
    assert_replica(src, dst, "s1")
    # --python: a python3 without zstandard and xxhash (a venv's) on both ends: zstd through the zstd command
    bare = venv_python(tmp_path)
    forced = zc.run("sync", f"local:{src}", f"local:{dst_pool.name}/forced", "--python", bare, "-v",
                    "--ssh-config", str(sshd_local.ssh_config))
    assert forced.returncode == 0, forced.explain()
    assert (forced.of("plan")[0]["codec"], forced.of("plan")[0]["checksum"]) == ("zstd", "blake2b-128"), \
        forced.explain()
    assert all("zstd through the zstd command" in forced.of("preflight")[0][side]["why"]
               for side in ("source", "target"))
    assert forced.result()["transfer"]["wire_bytes"] < 0.95 * forced.result()["transfer"]["raw_bytes"]
    assert_replica(src, f"{dst_pool.name}/forced", "s1")


def agent_probe(python: str, path: str) -> dict[str, Any]:
    res = subprocess.run([python, "-c", agent.BOOTSTRAP, "probe"], input=Path(agent.__file__).read_bytes(),
                         capture_output=True, timeout=60, env={"PATH": path})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("hide,with_command,via,caps", [
    ((), True, "module", {"zstd-v1", "xxh3-128-v1"}),
    (("zstandard",), True, "command", {"zstd-v1", "xxh3-128-v1"}),
    (("zstandard",), False, None, {"xxh3-128-v1"}),
    (("zstandard", "xxhash"), True, "command", {"zstd-v1"}),
    (("zstandard", "xxhash"), False, None, set()),
])
def test_the_agent_finds_zstd_in_the_module_then_the_command_then_does_without(
        tmp_path: Path, hide: tuple[str, ...], with_command: bool, via: str | None, caps: set[str]) -> None:
    """The fallback chain, pinned: modules hidden by a sitecustomize, the command by a PATH without it."""
    system_python_has_both()
    zstd = shutil.which("zstd")
    need(zstd is not None, "the zstd command (apt install zstd)")
    python = hiding(tmp_path, "py", *hide) if hide else SYSTEM_PYTHON
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if with_command:
        (bindir / "zstd").symlink_to(str(zstd))
    info = agent_probe(python, str(bindir))
    assert info["zstd_via"] == via and info["zstd"] == (via == "module")
    assert set(info["capabilities"]) & {"zstd-v1", "xxh3-128-v1"} == caps
    assert {"zlib-v1", "blake2b-128-v1"} <= set(info["capabilities"]), "the stdlib codecs are always there"


def test_chunks_made_by_the_zstd_command_and_by_the_module_read_each_other(tmp_path: Path) -> None:
    system_python_has_both()
    need(shutil.which("zstd") is not None, "the zstd command (apt install zstd)")
    python = hiding(tmp_path, "py", "zstandard")
    raw = b"".join(b"line %d of something to compress\n" % i for i in range(50000)) + os.urandom(1 << 18)
    (tmp_path / "raw").write_bytes(raw)
    (tmp_path / "by-module").write_bytes(agent.encode_chunk(1, raw, agent.CODEC_ZSTD, 3, agent.HASH_BLAKE2B))
    script = f"""
import io, sys
sys.path.insert(0, {str(Path(agent.__file__).parent.parent)!r})
from zchunk import agent
assert agent.ZSTD_VIA == "command", agent.ZSTD_VIA
raw = open({str(tmp_path / "raw")!r}, "rb").read()
blob = open({str(tmp_path / "by-module")!r}, "rb").read()
assert agent.decode_chunk(blob, 1) == raw
hdr = agent.check_stored(blob)
f = io.BytesIO(blob)
f.seek(agent.CHUNK_HEADER_SIZE)
assert b"".join(agent.raw_pieces(hdr, f, piece=4096)) == raw
enc = agent.ChunkEncoder(agent.CODEC_ZSTD, 1, agent.HASH_BLAKE2B)
for i in range(0, len(raw), 1 << 20):
    enc.update(raw[i:i + (1 << 20)])
open({str(tmp_path / "by-command")!r}, "wb").write(b"".join(enc.finish(2)))
"""
    res = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    blob = (tmp_path / "by-command").read_bytes()
    assert agent.check_stored(blob).codec == agent.CODEC_ZSTD and agent.decode_chunk(blob, 2) == raw
