"""Across ZFS implementations: zfs-fuse (this host) <-> OpenZFS 2.3 (the VM), both directions.

The unit tests pin what zchunk.compat predicts. ``test_across_implementations`` runs on the host in
the OpenZFS tier of scripts/test (marker ``openzfs``; the host tier deselects it): it starts a
zfs-fuse pool and an sshd on 127.0.0.1, then tests/vm/cross_impl.py inside a VM whose only network
is 10.0.2.100:22, forwarded to that sshd (``scripts/openzfs-vm run --forward-ssh PORT``).
"""

from __future__ import annotations

import asyncio
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
from zchunk import errors as E
from zchunk.transport import CommandResult, Host
from zchunk.zfs import Features, Zfs

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


# `zdb -dddd tp/v4 1` in the VM (OpenZFS 2.3.2) of a `zfs create -o version=4` filesystem (zdb ends the
# entry lines with a space, dropped here; test_root_object_from_zdb has one)
ZDB_MASTER_NODE_OPENZFS = """Dataset tp/v4 [ZPL], ID 69, cr_txg 9, 272K, 4 objects, rootbp DVA[0]=<0:71c00:200> ...

    Object  lvl   iblk   dblk  dsize  dnsize  lsize   %full  type
         1    1   128K    512     1K     512    512  100.00  ZFS master node
\tdnode flags: USED_BYTES USERUSED_ACCOUNTED USEROBJUSED_ACCOUNTED
\tdnode maxblkid: 0
\tmicrozap: 512 bytes, 6 entries

\t\tDELETE_QUEUE = 32
\t\tcasesensitivity = 0
\t\tnormalization = 0
\t\tutf8only = 0
\t\tROOT = 33
\t\tVERSION = 4

"""
OPENZFS = Features(commands=frozenset({"version", "hold", "release"}))
LEGACY = Features(commands=frozenset({"hold", "release"}))


class Scripted(Host):
    """Answers each command by its first words; records what was run."""

    def __init__(self, answers: dict[tuple[str, ...], CommandResult]) -> None:
        self.name, self.answers = "h", answers
        self.ran: list[list[str]] = []

    async def run(self, argv: list[str], stdin: bytes | None = None, timeout: float | None = 120.0) -> CommandResult:
        self.ran.append(argv)
        for prefix, res in self.answers.items():
            if tuple(argv[:len(prefix)]) == prefix:
                return res
        raise AssertionError(f"unexpected command {argv}")


def ok(out: str) -> CommandResult:
    return CommandResult(0, out.encode(), b"")


def source(version: str = "4", mounted: bool = True, **answers: CommandResult) -> Scripted:
    props = (f"type\tfilesystem\nversion\t{version}\ndnodesize\tlegacy\n"
             f"mounted\t{'yes' if mounted else 'no'}\nmountpoint\t/tp/v4\n")
    return Scripted({("zfs", "get"): ok(props), **{(k,): v for k, v in answers.items()}})


def check(src: Scripted, src_features: Features = OPENZFS, dst_features: Features = LEGACY) -> Scripted:
    dst = Scripted({("zfs", "upgrade"): ok(UPGRADE_V_ZFS_FUSE), ("zpool", "get"): ok("23\n")})
    asyncio.run(compat.check_stream(Zfs(src), src_features, "tp/v4", Zfs(dst), dst_features, "fuse/v4"))
    return dst


def test_root_object_from_zdb() -> None:
    assert compat.parse_zdb_root(ZDB_MASTER_NODE_OPENZFS) == 33
    assert compat.parse_zdb_root("\t\tROOT = 3 \n\t\tDELETE_QUEUE = 2 \n") == 3, "zfs-fuse's zdb"
    assert compat.parse_zdb_root("\t\tROOTX = 3\n") is None
    assert compat.parse_zdb_root("") is None


def test_openzfs_made_filesystem_is_refused_for_a_legacy_target() -> None:
    src = source(stat=ok("33\n"))
    with pytest.raises(E.RootObjectIncompatible) as err:
        check(src)
    assert err.value.exit_code == 4 and "object 33, not 3" in str(err.value)
    assert "h:tp/v4" in str(err.value) and "the inode of /tp/v4" in err.value.hint
    assert src.ran[1] == ["stat", "-c", "%i", "/tp/v4"] and len(src.ran) == 2, "mounted: no zdb"


def test_unmounted_filesystem_asks_zdb() -> None:
    src = source(mounted=False, zdb=ok(ZDB_MASTER_NODE_OPENZFS.replace("ROOT = 33", "ROOT = 3")))
    check(src)  # a replica of a legacy filesystem: root object 3, accepted
    assert src.ran[1] == ["zdb", "-dddd", "tp/v4", "1"]
    with pytest.raises(E.RootObjectIncompatible, match="object 33"):
        check(source(mounted=False, zdb=ok(ZDB_MASTER_NODE_OPENZFS)))


def test_unknown_root_is_refused_with_the_way_out() -> None:
    denied = CommandResult(1, b"", b"failed to hold dataset 'tp/v4': Permission denied\n")
    with pytest.raises(E.RootObjectUnknown) as err:
        check(source(mounted=False, zdb=denied))
    assert err.value.exit_code == 4 and "it is not mounted and `zdb -dddd tp/v4 1` failed" in str(err.value)
    assert "Permission denied" in str(err.value) and "zfs mount tp/v4" in err.value.hint
    missing = CommandResult(127, b"", b"zdb: command not found")
    with pytest.raises(E.RootObjectUnknown, match="stat /tp/v4` failed.*command not found"):
        check(source(stat=CommandResult(1, b"", b"stat: cannot statx"), zdb=missing))


def test_root_object_asked_only_where_it_matters() -> None:
    check(source(), dst_features=OPENZFS)  # an OpenZFS target reads any root object: nothing run
    src = source()
    check(src, src_features=LEGACY)  # a legacy source made its filesystems with the root at 3
    assert [argv[:2] for argv in src.ran] == [["zfs", "get"]]
    with pytest.raises(E.StreamIncompatible, match="SA_SPILL"):  # the stream feature is named first
        check(source(version="5", stat=ok("34\n")))


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
