"""SSH options against a real sshd: --ssh-key, --ssh-port, -o, host key checking, TTY progress."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need_ssh
from tests.zc import REPO, Zchunk, kill_matching
from tests.zfsutil import assert_replica, exists, make_source
from zchunk import errors as E
from zchunk import lab
from zchunk.endpoint import parse_endpoint
from zchunk.transport import LinkDown, SshHost, SshOptions, first_contact, make_host

pytestmark = [pytest.mark.zfs]

MiB = 1 << 20


def test_host_key_checked_by_default_accept_new_on_request(zc: Zchunk, pools: Any, sshd_local: lab.Sshd,
                                                           tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 2 * MiB, seed=31)
    dst = f"{dst_pool.name}/r"
    known = tmp_path / "known_hosts"
    known.write_text("")
    base = ["--ssh-key", str(sshd_local.user_key), "--ssh-port", str(sshd_local.port),
            "-o", f"UserKnownHostsFile={known}", "--chunk-size", "1M"]
    run = zc.run("sync", src, f"root@127.0.0.1:{dst}", *base)
    assert run.returncode == 5 and "host key verification failed" in run.stderr, run.explain()
    assert "known_hosts" in run.stderr or "accept-new" in run.stderr, "the fix is named"
    assert not exists(dst) and known.read_text() == ""

    run = zc.run("sync", src, f"root@127.0.0.1:{dst}", *base, "-o", "StrictHostKeyChecking=accept-new")
    assert run.returncode == 0, run.explain()
    assert_replica(src, dst, "s1")
    assert f"[127.0.0.1]:{sshd_local.port}" in known.read_text()

    # a changed key is refused even with accept-new
    known.write_text(f"[127.0.0.1]:{sshd_local.port} ssh-ed25519 "
                     "AAAAC3NzaC1lZDI1NTE5AAAAIDy4xkBzl1lS4WzwvS3tq6b7o0mR2o6Pp2V1gx0z0b9b\n")
    run = zc.run("sync", src, f"root@127.0.0.1:{dst_pool.name}/other", *base,
                 "-o", "StrictHostKeyChecking=accept-new")
    assert run.returncode == 5 and "CHANGED" in run.stderr, run.explain()


def test_wrong_key_is_an_auth_error_without_prompting(zc: Zchunk, pools: Any, sshd_local: lab.Sshd,
                                                      tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 1 * MiB, seed=32)
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    run = zc.run("sync", src, f"root@127.0.0.1:{dst_pool.name}/r", "--ssh-key", str(stranger),
                 "--ssh-port", str(sshd_local.port), "-o", f"UserKnownHostsFile={sshd_local.known_hosts}",
                 timeout=60)
    assert run.returncode == 5 and "authentication failed" in run.stderr, run.explain()


def test_progress_bar_on_a_tty(zc: Zchunk, pools: Any, sshd_local: lab.Sshd) -> None:
    """On a terminal: a live line with percent, bytes, rate, ETA and chunk counts, never above 100%."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, 8 * MiB, seed=33, compressible=0.0)
    argv = [sys.executable, "-m", "zchunk", "sync", src, f"local:{dst_pool.name}/r", "--no-sync-snap",
            "--chunk-size", "256K", "--parallel", "1", "--ssh-config", str(sshd_local.ssh_config),
            "--state-dir", str(zc.state_dir), "--spool-dir", str(zc.spool_dir)]
    pid, fd = pty.fork()
    if pid == 0:  # child: becomes zchunk with the pty as its terminal
        os.chdir(REPO)
        os.execv(argv[0], argv)
    out = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 1)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "\r\x1b[K" in text and "ETA" in text and "chunks" in text and "spooled" in text, text
    percents = [float(tok[:-1]) for tok in text.replace("\r", " ").split() if tok.endswith("%")
                and tok[:-1].replace(".", "").isdigit()]
    assert percents and max(percents) <= 100.0, percents
    assert "verified:" in text and "done:" in text


def test_works_with_a_restricted_key(zc: Zchunk, pools: Any, sshd_local: lab.Sshd) -> None:
    """authorized_keys `restrict` (no forwarding, no pty, no agent): zchunk needs only exec channels."""
    src_pool, dst_pool = pools
    src = make_source(src_pool, 3 * MiB, seed=34)
    sshd_local.add_key("restricted", options="restrict")
    alias = sshd_local.key_alias("restricted")
    run = zc.run("sync", src, f"{alias}:{dst_pool.name}/r", "--chunk-size", "1M",
                 "--ssh-config", str(sshd_local.ssh_config))
    assert run.returncode == 0, run.explain()
    assert_replica(src, f"{dst_pool.name}/r", "s1")


def test_aes_gcm_is_preferred_unless_the_user_chose_ciphers(tmp_path: Path, monkeypatch: Any) -> None:
    """Unit: asyncssh's chacha20 costs twice the CPU of AES-GCM per byte; a user's Ciphers always wins."""
    from zchunk import transport
    from zchunk.endpoint import parse_endpoint

    monkeypatch.setattr(transport, "_cpu_has_aes", lambda: True)
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host other\n    Ciphers aes256-ctr\n")
    host = transport.SshHost(parse_endpoint("dst:pool/ds"), transport.SshOptions(config=cfg))
    algs = host._connect_kwargs()["encryption_algs"]
    assert algs[0] == "aes128-gcm@openssh.com" and "chacha20-poly1305@openssh.com" in algs
    cfg.write_text("Host dst\n    Ciphers aes256-ctr\n")
    assert "encryption_algs" not in host._connect_kwargs()  # asyncssh takes the config's
    opts = transport.SshOptions(config=cfg, options={"ciphers": "aes192-ctr,aes128-ctr"})
    host = transport.SshHost(parse_endpoint("dst:pool/ds"), opts)
    assert host._connect_kwargs()["encryption_algs"] == ["aes192-ctr", "aes128-ctr"]
    monkeypatch.setattr(transport, "_cpu_has_aes", lambda: False)
    assert transport.preferred_ciphers()[0] == "chacha20-poly1305@openssh.com"


def test_a_command_hung_on_a_host_that_answers_is_said_and_the_connection_stays(sshd_local: lab.Sshd) -> None:
    """A command silent past its timeout, on a link that still runs ``true``, is hung there (zfs-fuse losing a
    mount does this to ``zfs unmount``): CommandHung names it, and the connection every other stream of the
    run rides on is kept. Before, it counted as a dead link: the connection was dropped and the command run
    again, hanging again, until --patience ran out as "host unreachable"."""
    marker = "7.3125"  # this test's sleep, found and killed at the end

    async def go() -> tuple[E.CommandHung, bytes, bool]:
        host = make_host(parse_endpoint("local:pool/x"), SshOptions(config=sshd_local.ssh_config))
        try:
            await first_contact(host, patience=60)
            assert isinstance(host, SshHost)
            before = await host.connection()
            with pytest.raises(E.CommandHung) as hung:
                await host.run(["sleep", marker], timeout=1)
            after = await host.connection()
            return hung.value, (await host.run(["echo", "still"])).stdout, after is before
        finally:
            await host.close()

    try:
        err, out, same = asyncio.run(go())
    finally:
        kill_matching(f"sleep {marker}")
    assert str(err) == f"local: `sleep {marker}` did not finish in 1 s, though the host answers other commands", \
        str(err)
    assert err.exit_code == 14 and "docs/reliability.md" in err.hint
    assert out == b"still\n" and same, "the connection was dropped"


def test_a_session_sshd_refuses_past_maxsessions_waits_for_one_and_keeps_the_connection(tmp_path: Path) -> None:
    """sshd allows MaxSessions channels per connection (10 by default); a run with --jobs and --parallel can
    want more. A channel sshd refuses is no link failure: the connection, and every stream's channel on it,
    stays, and a command waits (within --patience) until a channel is free. Before, the refusal dropped the
    connection under the other channels."""
    need_ssh()
    marker = "7.4375"  # this test's sleep, found and killed at the end

    async def go() -> None:
        with lab.Sshd(tmp_path / "sshd", port=lab.free_port(), alias="local", extra_config="MaxSessions 2\n") as sshd:
            host = make_host(parse_endpoint("local:pool/x"), SshOptions(config=sshd.ssh_config))
            try:
                await first_contact(host, patience=60)
                assert isinstance(host, SshHost)
                before = await host.connection()
                pipe = await host.open_pipe(["cat"])
                sleeper = await host.start(["sleep", marker])
                with pytest.raises(LinkDown, match="refused"):  # the third channel
                    await host.open_pipe(["cat"])
                assert await host.connection() is before, "the connection was dropped"
                pipe.writer.write(b"still\n")  # the channels open before go on
                assert await asyncio.wait_for(pipe.reader.readline(), 10) == b"still\n"

                async def free_one() -> None:
                    await asyncio.sleep(1.0)
                    await pipe.close()  # cat ends, and with it its session

                started = time.monotonic()
                freed = asyncio.ensure_future(free_one())
                res = await host.run(["echo", "ran"])  # refused until cat's session has ended
                await freed
                assert res.stdout == b"ran\n" and time.monotonic() - started >= 0.9
                assert await host.connection() is before, "the connection was dropped"
                with pytest.raises(asyncio.TimeoutError):  # the other stream's command runs on
                    await asyncio.wait_for(asyncio.shield(sleeper.wait()), 0.5)
            finally:
                await host.close()

    try:
        asyncio.run(go())
    finally:
        kill_matching(f"sleep {marker}")
