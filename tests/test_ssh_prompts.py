"""SSH never prompts (issue 5, item 5): a passphrase-protected key fails fast, on a terminal too.

zchunk runs unattended (cron, systemd timers) and over hours of outages: a
prompt would hang it forever. A key with a passphrase, given with --ssh-key or
as IdentityFile in --ssh-config, must end the run quickly with an
authentication error (exit 5) that says why, without reading the terminal,
and without changing anything. (Unknown/changed host keys, a wrong key and a
restricted key are in tests/test_ssh.py.)
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.zc import REPO, Zchunk
from tests.zfsutil import exists, make_source

pytestmark = [pytest.mark.zfs]

MiB = 1 << 20


@pytest.fixture
def locked_key(tmp_path: Path, sshd_local: Any) -> Path:
    """An ed25519 key protected by a passphrase, authorized on the sshd (so only the passphrase is missing)."""
    key = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "correct horse", "-f", str(key)], check=True)
    pub = (tmp_path / "locked.pub").read_text().strip()
    with open(sshd_local.authorized_keys, "a") as f:
        f.write(f'environment="HOME={sshd_local.home}" {pub}\n')
    return key


def run_on_a_terminal(argv: list[str], timeout: float) -> tuple[int | None, str, float]:
    """Run ``argv`` with a pty as its terminal (where a prompt would go); answer nothing.
    Returns (exit code or None if it had to be killed, what it wrote, seconds taken)."""
    started = time.monotonic()
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(REPO)
        os.execv(argv[0], argv)
    out = b""
    code: int | None = None
    while time.monotonic() - started < timeout:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            out += chunk
            if chunk:
                continue
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return code, out.decode(errors="replace"), time.monotonic() - started


def attempt(zc: Zchunk, pool_factory: Any, sshd_local: Any, locked_key: Path, tmp_path: Path,
            how: str) -> tuple[int | None, str, float, str]:
    """A sync to sshd_local with the locked key, on a terminal: (exit, output, seconds, target dataset)."""
    src_pool, dst_pool = pool_factory(size="256M"), pool_factory(size="256M")
    src = make_source(src_pool, 1 * MiB, seed=71)
    dst = f"{dst_pool.name}/r"
    if how == "--ssh-key":
        ssh = ["--ssh-key", str(locked_key), "--ssh-port", str(sshd_local.port),
               "-o", f"UserKnownHostsFile={sshd_local.known_hosts}"]
        target = f"root@127.0.0.1:{dst}"
    else:
        cfg = tmp_path / "ssh_config_locked"
        cfg.write_text(f"Host locked\n    HostName 127.0.0.1\n    Port {sshd_local.port}\n    User root\n"
                       f"    IdentityFile {locked_key}\n    IdentitiesOnly yes\n"
                       f"    UserKnownHostsFile {sshd_local.known_hosts}\n    StrictHostKeyChecking yes\n")
        ssh = ["--ssh-config", str(cfg)]
        target = f"locked:{dst}"
    argv = [sys.executable, "-m", "zchunk", "sync", src, target, *ssh, "--no-sync-snap",
            "--state-dir", str(zc.state_dir), "--spool-dir", str(zc.spool_dir)]
    code, out, took = run_on_a_terminal(argv, timeout=60)
    return code, out, took, dst


@pytest.mark.parametrize("how", ["--ssh-key", "IdentityFile"])
def test_a_passphrase_protected_key_never_hangs_on_a_prompt(zc: Zchunk, pool_factory: Any, sshd_local: Any,
                                                            locked_key: Path, tmp_path: Path, how: str) -> None:
    code, out, took, dst = attempt(zc, pool_factory, sshd_local, locked_key, tmp_path, how)
    assert code is not None, f"zchunk hung (killed after 60s):\n{out}"
    assert took < 30, f"took {took:.0f}s"
    assert "passphrase for" not in out.lower() and "password:" not in out.lower(), out
    assert code != 0 and not exists(dst) and zc.session_dirs() == [], out


@pytest.mark.parametrize("how", ["--ssh-key", "IdentityFile"])
def test_a_passphrase_protected_key_is_an_authentication_error(zc: Zchunk, pool_factory: Any, sshd_local: Any,
                                                               locked_key: Path, tmp_path: Path, how: str) -> None:
    code, out, _, _ = attempt(zc, pool_factory, sshd_local, locked_key, tmp_path, how)
    assert code == 5 and "authentication failed" in out, out
    assert "Traceback" not in out and "internal error" not in out, out
