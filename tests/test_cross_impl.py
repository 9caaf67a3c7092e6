"""Across ZFS implementations: zfs-fuse (this host) <-> OpenZFS 2.3 (the VM), both directions.

The unit tests pin what zchunk.compat predicts. ``test_across_implementations`` runs on the host in
the OpenZFS tier of scripts/test (marker ``openzfs``; the host tier deselects it): it starts a
zfs-fuse pool and an sshd on 127.0.0.1, then tests/vm/cross_impl.py inside a VM whose only network
is 10.0.2.100:22, forwarded to that sshd (``scripts/openzfs-vm run --forward-ssh PORT``).
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import need, need_ssh
from tests.zc import REPO, kill_matching
from tests.zfsutil import zfs
from zchunk import compat, lab

UPGRADE_V_ZFS_FUSE = """The following filesystem versions are supported:

VER  DESCRIPTION
---  --------------------------------------------------------
 1   Initial ZFS filesystem version
 2   Enhanced directory entries
 3   Case insensitive and File system unique identifier (FUID)
 4   userquota, groupquota properties

For more information on a particular version, including supported releases, see:
"""


def test_plain_send_flags_follow_the_dataset() -> None:
    assert [f.name for f in compat.stream_features({"type": "filesystem", "version": "5"}, False)] == ["SA_SPILL"]
    assert compat.stream_features({"type": "filesystem", "version": "4", "dnodesize": "legacy"}, True) == []
    assert [f.name for f in compat.stream_features({"type": "filesystem", "version": "4", "dnodesize": "auto"},
                                                   True)] == ["LARGE_DNODE"]
    assert compat.stream_features({"type": "filesystem", "version": "4", "dnodesize": "auto"}, False) == []
    assert compat.stream_features({"type": "volume", "version": "-"}, False) == []
    assert compat.stream_features({"type": "filesystem", "version": "4"}, False) == [], "zfs-fuse sends no flags"


def test_legacy_receiver_limits() -> None:
    assert compat.parse_zpl_max(UPGRADE_V_ZFS_FUSE) == 4
    sa = compat.stream_features({"type": "filesystem", "version": "5"}, False)[0]
    assert not compat.ReceiverLimits(4, 23).receives(sa)
    assert compat.ReceiverLimits(5, 33).receives(sa), "a legacy zfs with system attributes (e.g. Solaris 11)"
    assert not compat.ReceiverLimits(5, 23).receives(sa), "ZPL 5 needs pool version 24"


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Under the repo, not /tmp: the VM sees the host's files but has its own /tmp."""
    path = REPO / ".cache" / f"cross-impl-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.zfs
@pytest.mark.openzfs
def test_across_implementations(tier: str, pool_factory: Any, workdir: Path) -> None:
    assert tier == "zfs-fuse", "runs on the host (zfs-fuse), and starts the OpenZFS VM itself"
    need_ssh()
    vm = REPO / "scripts" / "openzfs-vm"
    need(subprocess.run([str(vm), "status"], capture_output=True).returncode == 0,
         "the OpenZFS VM is not built (scripts/openzfs-vm build)")
    fpool = pool_factory(size="256M")
    zfs("set", "atime=off", fpool.name)
    src = f"{fpool.name}/src"
    zfs("create", src)
    lab.write_dataset(Path(zfs("get", "-H", "-o", "value", "mountpoint", src).strip()) / "data", 2 << 20, seed=80)
    zfs("snapshot", f"{src}@s1")
    spool = Path("/var/tmp") / f"zchunk-cross-{workdir.name}"  # a path that exists on both hosts
    with lab.Sshd(workdir / "sshd", port=lab.free_port(), alias="fusehost") as sshd:
        ssh_config = vm_ssh_config(sshd, workdir)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                [str(vm), "run", "--timeout", "900", "--forward-ssh", str(sshd.port),
                 "--env", f"ZCHUNK_CROSS_SSH_CONFIG={ssh_config}", "--env", f"ZCHUNK_CROSS_FUSE_POOL={fpool.name}",
                 "--env", f"ZCHUNK_CROSS_SPOOL={spool}", "--",
                 ".venv/bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/vm/cross_impl.py"],
                cwd=REPO, capture_output=True, text=True, timeout=1000)
        finally:
            kill_matching(str(spool))  # host-side agents of a run the VM did not finish
            shutil.rmtree(spool, ignore_errors=True)
        print(f"VM part: {time.monotonic() - t0:.0f} s\n{proc.stdout[-3000:]}")
        assert proc.returncode == 0, f"in the VM:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


def vm_ssh_config(sshd: lab.Sshd, workdir: Path) -> Path:
    """An ssh config for the VM's side: the host is 10.0.2.100:22 there, with sshd's host key."""
    kind, blob = sshd.known_hosts.read_text().split()[1:3]
    known = workdir / "vm_known_hosts"
    known.write_text(f"10.0.2.100 {kind} {blob}\n")
    config = workdir / "vm_ssh_config"
    config.write_text(f"""Host 10.0.2.100
    User root
    IdentityFile {sshd.user_key}
    IdentitiesOnly yes
    UserKnownHostsFile {known}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 30
    LogLevel ERROR
""")
    return config
