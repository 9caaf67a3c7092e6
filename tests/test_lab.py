"""The lab's real parts do what the fault tests will rely on.

Each test proves one property with the real thing: zfs-fuse pools hold and
send data and go away; sshd in a namespace runs zfs; tbf really slows a
transfer; a port reset kills a live ssh session and refuses new ones; an
unplugged NIC drops packets without resetting anyone; a PATH without python3
makes python3 "command not found".
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import need, need_ssh
from zchunk import lab

# ------------------------------------------------------------------ no root needed


def test_write_dataset_is_deterministic_sized_and_compressible(tmp_path: Path) -> None:
    size = 1 << 20
    lab.write_dataset(tmp_path / "a", size, seed=7)
    lab.write_dataset(tmp_path / "b", size, seed=7)
    lab.write_dataset(tmp_path / "c", size, seed=8)
    assert lab.tree_digest(tmp_path / "a") == lab.tree_digest(tmp_path / "b")
    assert lab.tree_digest(tmp_path / "a") != lab.tree_digest(tmp_path / "c")
    files = sorted((tmp_path / "a").rglob("*.dat"))
    assert sum(f.stat().st_size for f in files) == size

    def ratio(fraction: float) -> float:
        lab.write_dataset(tmp_path / f"r{fraction}", size, seed=1, compressible_fraction=fraction)
        data = b"".join(f.read_bytes() for f in sorted((tmp_path / f"r{fraction}").rglob("*.dat")))
        return len(zlib.compress(data, 6)) / len(data)

    assert ratio(0.0) > 0.99
    assert 0.5 < ratio(0.5) < 0.75
    assert ratio(1.0) < 0.35


def test_tree_digest_sees_names_and_contents(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"ab")
    before = lab.tree_digest(tmp_path)
    (tmp_path / "x").rename(tmp_path / "y")
    assert lab.tree_digest(tmp_path) != before
    (tmp_path / "y").write_bytes(b"ac")
    (tmp_path / "y").rename(tmp_path / "x")
    assert lab.tree_digest(tmp_path) != before


def test_need_skips_on_a_laptop_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        need(False, "no zfs-fuse")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no zfs-fuse"):
        need(False, "no zfs-fuse")
    need(True, "present")


# ------------------------------------------------------------------ helpers


def ssh(server: lab.Sshd, *command: str, alias: str | None = None, timeout: float = 30,
        **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(server.ssh_argv(*command, alias=alias), check=False,
                          capture_output=True, timeout=timeout, **kw)  # type: ignore[call-overload]


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def in_thread(fn: Callable[[], object]) -> Iterator[threading.Thread]:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        thread.join(timeout=30)


@contextmanager
def session(server: lab.Sshd, command: str) -> Iterator[subprocess.Popen[bytes]]:
    """A live ssh session whose remote side printed "ready"; killed by pid at the end."""
    proc = subprocess.Popen(server.ssh_argv(f"echo ready; {command}"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def zfs(*args: str, **kw: object) -> str:
    return lab.run(["zfs", *args], **kw).stdout  # type: ignore[arg-type]


# ------------------------------------------------------------------ zfs


@pytest.mark.zfs
def test_pool_holds_snapshots_sends_and_is_destroyed(zfs_fuse: lab.ZfsFuse,
                                                     tmp_path: Path) -> None:
    with lab.Pool("lab" + os.urandom(3).hex(), tmp_path, size="256M") as pool:
        zfs("create", f"{pool.name}/src")
        lab.write_dataset(pool.mountpoint / "src", 3 << 20, seed=3)
        zfs("snapshot", f"{pool.name}/src@a")
        send = subprocess.Popen(["zfs", "send", f"{pool.name}/src@a"], stdout=subprocess.PIPE)
        lab.run(["zfs", "receive", f"{pool.name}/copy"], stdin=send.stdout)
        assert send.wait() == 0
        guids = [zfs("get", "-H", "-o", "value", "guid", f"{pool.name}/{fs}@a").strip()
                 for fs in ("src", "copy")]
        assert guids[0] == guids[1]
        assert lab.tree_digest(pool.mountpoint / "copy") == lab.tree_digest(
            pool.mountpoint / "src")
        # Destroy right after a receive: the case where zfs-fuse says "busy".
    assert lab.run(["zpool", "list", pool.name], check=False).returncode != 0
    assert not pool.file.exists()


@pytest.mark.zfs
def test_zfs_fuse_reuses_a_running_daemon(zfs_fuse: lab.ZfsFuse) -> None:
    with lab.ZfsFuse() as again:
        assert not again.started and again.pid is None
    assert lab.zfs_daemon_running()


# ------------------------------------------------------------------ ssh


def test_sshd_teardown_ends_live_sessions(tmp_path: Path) -> None:
    need_ssh()
    with lab.Sshd(tmp_path, port=lab.free_port()) as server, session(server, "sleep 30") as client:
        pids = [server.pid, *lab.descendants(server.pid or 0)]
        assert len(pids) >= 3  # listener, per-connection sshd, the shell
        server.stop()
        assert client.wait(timeout=10) != 0
    assert not any(lab.pid_alive(pid) for pid in pids if pid)
    assert not reachable(server.host, server.port)


def test_path_without_python3_makes_it_command_not_found(sshd_local: lab.Sshd) -> None:
    bare = sshd_local.path_without("python3")
    sshd_local.add_key("nopy", options=f'environment="PATH={bare}"')
    nopy = sshd_local.key_alias("nopy")
    missing = ssh(sshd_local, "python3", "-c", "1", alias=nopy)
    assert missing.returncode == 127, missing.stderr
    assert b"command not found" in missing.stderr
    assert ssh(sshd_local, "zfs", "-?", alias=nopy).returncode != 127
    assert ssh(sshd_local, "env", alias=nopy).stdout.count(f"PATH={bare}\n".encode()) == 1
    assert ssh(sshd_local, "python3", "-c", "1").returncode == 0


@pytest.mark.zfs
@pytest.mark.netns
def test_ssh_into_dst_namespace_runs_zfs(wan: lab.Wan, sshd_dst: lab.Sshd,
                                         pool_factory: Callable[..., lab.Pool]) -> None:
    pool = pool_factory()  # created after sshd started: mounts must still show inside
    lab.write_dataset(pool.mountpoint, 4096, seed=5)
    listed = ssh(sshd_dst, "zfs", "list", "-H", "-o", "name")
    assert listed.returncode == 0, listed.stderr
    assert pool.name.encode() in listed.stdout.split()
    remote = ssh(sshd_dst, "cat", *map(str, sorted(pool.mountpoint.rglob("*.dat"))))
    assert remote.stdout == b"".join(f.read_bytes() for f in sorted(
        pool.mountpoint.rglob("*.dat")))
    # From src through the root namespace: the path a coordinator inside src takes.
    via_src = wan.run_in("src", sshd_dst.ssh_argv("echo", "$SSH_CLIENT"), capture_output=True,
                         timeout=30)
    assert via_src.stdout.split()[0].decode() == wan.src_addr, via_src.stderr


# ------------------------------------------------------------------ faults


@pytest.mark.netns
def test_rate_limit_slows_both_directions(wan: lab.Wan, sshd_dst: lab.Sshd) -> None:
    size = 5_000_000
    payload = os.urandom(size)

    def upload() -> float:
        start = time.monotonic()
        assert ssh(sshd_dst, "cat >/dev/null", input=payload).returncode == 0
        return time.monotonic() - start

    def download() -> float:
        start = time.monotonic()
        got = ssh(sshd_dst, f"head -c {size} /dev/urandom")
        assert len(got.stdout) == size
        return time.monotonic() - start

    wan.rate("dst", 20)
    expected = size * 8 / 20e6  # 2.0 s
    assert upload() >= 0.8 * expected
    assert download() >= 0.8 * expected
    wan.rate("dst", None)
    assert upload() < 0.5 * expected
    assert download() < 0.5 * expected


@pytest.mark.netns
def test_loss_drops_that_share_of_packets(wan: lab.Wan) -> None:
    sink = subprocess.Popen(wan.ns_argv("dst", ["python3", "-c", (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind((sys.argv[1],9999))\n"
        "s.settimeout(1.0); n=0\nprint('ready',flush=True)\n"
        "try:\n  while True: s.recv(64); n+=1\nexcept socket.timeout: print(n)\n"),
        wan.dst_addr]), stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None and sink.stdout.readline() == "ready\n"
        wan.loss("dst", 30)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for _ in range(1000):
                udp.sendto(b"x", (wan.dst_addr, 9999))
                time.sleep(0.0002)
        received = int(sink.communicate(timeout=10)[0])
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
    assert 600 < received < 800  # 700 expected, sd about 15
    rules = wan.run_in("dst", ["iptables", "-S"], capture_output=True, text=True).stdout
    assert rules.count("statistic") == 2
    wan.loss("dst", None)
    rules = wan.run_in("dst", ["iptables", "-S"], capture_output=True, text=True).stdout
    assert "statistic" not in rules


@pytest.mark.netns
def test_reset_kills_established_ssh_and_refuses_new_until_off(
        wan: lab.Wan, sshd_dst: lab.Sshd) -> None:
    with session(sshd_dst, "sleep 60") as client:
        start = time.monotonic()
        with in_thread(lambda: wan.outage("dst", 22, 3.0)):
            assert client.wait(timeout=10) == 255
            assert time.monotonic() - start < 3.0  # killed by the reset, not by the end
            assert client.stderr is not None
            # ssh reports the RST as "reset by peer", or as EPIPE on its goodbye.
            assert re.search(rb"reset by peer|Broken pipe", client.stderr.read())
            refused = ssh(sshd_dst, "true", timeout=10)
            assert refused.returncode == 255 and b"Connection refused" in refused.stderr
            assert time.monotonic() - start < 3.0, "refused at once, not timed out"
    assert ssh(sshd_dst, "true").returncode == 0
    rules = wan.run_in("dst", ["iptables", "-S"], capture_output=True, text=True).stdout
    assert "REJECT" not in rules


@pytest.mark.netns
def test_unplug_drops_without_reset_and_comes_back(wan: lab.Wan, sshd_dst: lab.Sshd) -> None:
    with session(sshd_dst, "read line; echo got $line") as client:
        with in_thread(lambda: wan.unplug("dst", 2.0)):
            time.sleep(0.3)
            assert not reachable(wan.dst_addr, 22)
            assert client.stdin is not None
            client.stdin.write(b"hello\n")  # sent into the void, retransmitted later
            client.stdin.flush()
            assert client.poll() is None
        out, err = client.communicate(timeout=20)
        assert (client.returncode, out) == (0, b"got hello\n"), err  # survived the unplug
    assert reachable(wan.dst_addr, 22)
    # dst's route to src went with the link and must be back.
    back = wan.run_in("src", sshd_dst.ssh_argv("true"), capture_output=True, timeout=30)
    assert back.returncode == 0, back.stderr
