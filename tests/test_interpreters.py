"""Full speed wherever the agent runs: a host whose first python3 lacks zstandard or xxhash (a pyenv or venv
python3, as this machine's PATH has) runs the agent with another of its interpreters that has them
(Debian's /usr/bin/python3 with python3-zstandard and python3-xxhash), said per host with -v. The chain is
pinned with interpreters that hide the modules (a sitecustomize that refuses their import)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
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
    assert python == bare and "zstd-v1" not in kept.capabilities and kept.why == "given with --python"


def test_sync_to_a_host_whose_path_python3_lacks_zstandard_uses_zstd(zc: Zchunk, pools: Any,
                                                                     sshd_local: lab.Sshd) -> None:
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
    forced = zc.run("sync", src, f"local:{dst_pool.name}/forced", "--python", "python3",
                    "--ssh-config", str(sshd_local.ssh_config))
    assert forced.returncode == 0, forced.explain()
