"""Fixtures for the real parts: zfs-fuse pools, sshd servers, the namespaced WAN.

On a developer laptop (not root, tools missing) these tests skip; with CI=true
a missing prerequisite fails them, so CI can never go green by skipping.
Everything a fixture starts or creates is torn down by it, by pid, also when
the test failed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.zc import Zchunk, kill_matching
from tests.zfsutil import quiet_target_pool
from zchunk import lab


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def need(condition: bool, why: str) -> None:
    """Skip the test when ``condition`` is false, but fail it under CI=true."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"CI=true and a test prerequisite is missing: {why}", pytrace=False)
    pytest.skip(why)


def need_root(*tools: str) -> None:
    need(os.geteuid() == 0, "needs root")
    for tool in tools:
        need(shutil.which(tool, path=lab.SYSTEM_PATH) is not None, f"needs {tool}")


def need_ssh() -> None:
    need_root("sshd", "ssh", "ssh-keygen")


@pytest.fixture(scope="session")
def tier() -> str:
    """"zfs-fuse" on the host, "openzfs" inside the OpenZFS VM: the same scenarios run on both."""
    return lab.zfs_tier()


@pytest.fixture(scope="session")
def zfs_fuse(tier: str) -> Iterator[lab.ZfsFuse | lab.KernelZfs]:
    """Real ZFS: the zfs-fuse daemon (the running one if any, else one we start and stop), or, in the
    OpenZFS VM, the kernel module."""
    if tier == "openzfs":
        with lab.KernelZfs() as kernel:
            yield kernel
        return
    need_root("zfs-fuse", "zfs", "zpool")
    need(Path("/dev/fuse").exists(), "needs /dev/fuse for zfs-fuse")
    with lab.ZfsFuse() as daemon:
        yield daemon


@pytest.fixture
def pool_factory(zfs_fuse: object, tmp_path: Path) -> Iterator[Callable[..., lab.Pool]]:
    """``pool_factory(name=None, size="1G")`` -> a Pool under tmp_path, destroyed after."""
    counter = itertools.count()
    with contextlib.ExitStack() as stack:
        def make(name: str | None = None, size: str = "1G") -> lab.Pool:
            # Unique by default: the machine's daemon may hold other people's pools.
            name = name or f"lab{uuid.uuid4().hex[:6]}{next(counter)}"
            return stack.enter_context(lab.Pool(name, tmp_path / "pools", size=size))
        yield make


@pytest.fixture
def zc(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Zchunk]:
    """The real ``zchunk`` CLI with this test's own state and spool directories; every agent of it is
    killed after the test, before the pools go (pool_factory, when the test has it, is set up first).

    A module's ``ZC_SYNC_ARGS`` are added to every ``sync``; by default ``--no-sync-snap`` (the engine
    tests send their own snapshot; replication tests set their own, e.g. ``("--chunk-size", "1M")``)."""
    if "pool_factory" in request.fixturenames:
        request.getfixturevalue("pool_factory")
    z = Zchunk(tmp_path, sync_args=getattr(request.module, "ZC_SYNC_ARGS", ("--no-sync-snap",)))
    yield z
    kill_matching(str(z.spool_dir))


@pytest.fixture
def pools(request: pytest.FixtureRequest, pool_factory: Callable[..., lab.Pool]) -> tuple[lab.Pool, lab.Pool]:
    """A source and a target pool of the module's ``POOL_SIZE`` (default 512M). The target's atime is off
    (``quiet_target_pool``) unless the module sets ``QUIET_TARGET = False``."""
    size = getattr(request.module, "POOL_SIZE", "512M")
    src, dst = pool_factory(size=size), pool_factory(size=size)
    if getattr(request.module, "QUIET_TARGET", True):
        quiet_target_pool(dst)
    return src, dst


@pytest.fixture
def wan() -> Iterator[lab.Wan]:
    need_root("ip", "tc", "iptables", "ss", "nsenter")
    with lab.Wan() as network:
        yield network


@pytest.fixture
def sshd_dst(wan: lab.Wan, tmp_path: Path) -> Iterator[lab.Sshd]:
    """sshd inside the dst namespace on wan.dst_addr:22, ssh_config alias "dst"."""
    need_ssh()
    with lab.Sshd(tmp_path / "sshd-dst", netns=wan.dst_ns, listen=wan.dst_addr, port=22,
                  alias="dst") as server:
        yield server


@pytest.fixture
def sshd_src(wan: lab.Wan, tmp_path: Path) -> Iterator[lab.Sshd]:
    """sshd inside the src namespace on wan.src_addr:22, ssh_config alias "src"."""
    need_ssh()
    with lab.Sshd(tmp_path / "sshd-src", netns=wan.src_ns, listen=wan.src_addr, port=22,
                  alias="src") as server:
        yield server


@pytest.fixture
def sshd_local(tmp_path: Path) -> Iterator[lab.Sshd]:
    """sshd on 127.0.0.1 at a free port, no namespace, ssh_config alias "local"."""
    need_ssh()
    with lab.Sshd(tmp_path / "sshd-local", port=lab.free_port(), alias="local") as server:
        yield server


# --------------------------------------------------------------------------- chaos schedules
# tests/test_chaos.py runs a few seeded fault schedules by default (CI); more on demand:
#   pytest tests/test_chaos.py --schedules 200              seeds 1..200
#   pytest tests/test_chaos.py --chaos-seed 17              replay seed 17 (what a failure prints)
#   pytest tests/test_chaos.py --chaos-seed 1000 --schedules 50


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("zchunk chaos", "seeded fault schedules (tests/test_chaos.py)")
    group.addoption("--schedules", type=int, default=None, metavar="N",
                    help="run N chaos schedules (default: the few CI runs)")
    group.addoption("--chaos-seed", type=int, default=None, metavar="S",
                    help="first seed: replays schedule S (with --schedules N: seeds S..S+N-1)")
