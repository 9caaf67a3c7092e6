"""Across ZFS implementations: can the target's zfs receive what the source's zfs will send?

Where either side is legacy ZFS, zchunk sends plain streams (``zfs send`` without ``-L -e -c -w``;
``flags.py``): OpenZFS then splits large
blocks to 128K, decompresses, and sends no embedded or raw blocks, so a stream carries only the
feature flags the dataset itself forces into its BEGIN record. Measured with OpenZFS 2.3.2 and
zfs-fuse 0.7 (pool version 23, ZPL version 4; tests/test_cross_impl.py):

- ``SA_SPILL`` (flag 0x4): every filesystem of ZPL version 5 (system attributes), OpenZFS's
  default. A target that knows only ZPL <= 4 / pool < 24 answers "stream has unsupported
  feature, feature flags = 4".
- ``LARGE_DNODE`` (0x800000): a filesystem with ``dnodesize`` other than ``legacy`` once its pool
  has ``feature@large_dnode`` active (also on ZPL 4).
- zfs-fuse sends no feature flags at all: zfs-fuse -> OpenZFS always works, full and incremental,
  and such a replica (ZPL 4) can go back to zfs-fuse incrementally.

A stream without flags is not enough: zfs-fuse also needs the filesystem's root directory at object 3.
Its FUSE layer maps the FUSE root (inode 1) to object 3, where legacy ZFS creates it (master node 1,
delete queue 2, root 3), instead of reading ROOT from the master node. OpenZFS allocates the root
elsewhere (33 for ``-o version=4``, 34 for ZPL 5): such a filesystem is received "successfully" and
cannot be read ("No such file or directory"). OpenZFS replicas of legacy filesystems keep object 3.
zchunk cannot tell zfs-fuse from other legacy ZFS (no ``zfs version``), so the rule covers them all.

What cannot work is refused here, once per dataset, before a sync snapshot is taken or any agent is
started, naming the stream feature (``StreamIncompatible``) or the root object
(``RootObjectIncompatible``; ``RootObjectUnknown`` when it cannot be learned). An OpenZFS target
receives whatever a plain send of an OpenZFS source of the same or an older release carries, and
reads it, so nothing is asked then.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from . import errors as E
from .zfs import Features, Zfs

#: ZPL version from which filesystems keep their attributes as system attributes (stream flag SA_SPILL).
ZPL_VERSION_SA = 5
#: Pool version that brought system attributes (SPA_VERSION_SA); feature-flag pools (OpenZFS) have them.
SPA_VERSION_SA = 24
#: The only root directory object zfs-fuse can read (see above).
LEGACY_ROOT_OBJECT = 3


@dataclass(frozen=True)
class StreamFeature:
    name: str  # as in OpenZFS's zfs_ioctl.h (DMU_BACKUP_FEATURE_<name>)
    flag: int
    why: str  # what about the source dataset sets it


@dataclass(frozen=True)
class ReceiverLimits:
    """What a legacy (pre-feature-flag) zfs can receive, from ``zfs upgrade -v`` and ``zpool get version``."""

    zpl_max: int
    pool_version: int | None  # of the target's pool; None: a feature-flag pool or unknown

    def receives(self, feature: StreamFeature) -> bool:
        if feature.name == "SA_SPILL":
            return self.zpl_max >= ZPL_VERSION_SA and (self.pool_version or SPA_VERSION_SA) >= SPA_VERSION_SA
        return False  # every later flag needs a feature-flag (OpenZFS) receiver


def stream_features(props: dict[str, str], large_dnode_active: bool) -> list[StreamFeature]:
    """The feature flags a plain ``zfs send`` of a dataset with these properties puts into its stream."""
    out = []
    if props.get("type") == "filesystem" and _int(props.get("version")) >= ZPL_VERSION_SA:
        out.append(StreamFeature("SA_SPILL", 0x4, f"ZPL version {props['version']} filesystem (system attributes)"))
    dnodesize = props.get("dnodesize", "legacy")
    if large_dnode_active and dnodesize not in ("legacy", "-", ""):
        out.append(StreamFeature("LARGE_DNODE", 0x800000, f"dnodesize={dnodesize}, feature@large_dnode active"))
    return out


def parse_zpl_max(upgrade_v: str) -> int:
    """Highest filesystem (ZPL) version ``zfs upgrade -v`` lists."""
    versions = [int(m.group(1)) for m in re.finditer(r"(?m)^\s*(\d+)\s+\S", upgrade_v)]
    return max(versions, default=0)


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


def parse_zdb_root(master_node: str) -> int | None:
    """The ROOT entry of a ZPL master node as ``zdb -dddd DATASET 1`` prints it (``ROOT = 33``)."""
    m = re.search(r"(?m)^\s*ROOT = (\d+)\s*$", master_node)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class RootObject:
    """The object number of a filesystem's root directory, how it was learned, or why it could not be."""

    number: int | None
    how: str


async def root_object(zfs: Zfs, name: str, props: dict[str, str]) -> RootObject:
    """Where ``name``'s root directory is: the inode of its mountpoint (ZFS inode numbers are object
    numbers) when mounted, else the master node as zdb reads it (the user must be able to read the
    pool's devices). Not ``.zfs/snapshot/SNAP``: the control directory gives it a made-up inode."""
    mountpoint = props.get("mountpoint", "")
    unseen = "it is not mounted"
    if props.get("mounted") == "yes" and mountpoint.startswith("/"):
        res = await zfs.host.run(["stat", "-c", "%i", mountpoint])
        inode = res.stdout.decode().strip()
        if res.status == 0 and inode.isdigit():
            return RootObject(int(inode), f"the inode of {mountpoint}")
        unseen = f"`stat {mountpoint}` failed ({_last_line(res.err_text) or res.status})"
    elif props.get("mounted") == "yes":
        unseen = f"its mountpoint is {mountpoint}, not a path to stat"
    argv = ["zdb", "-dddd", name, "1"]
    try:
        res = await zfs.host.run(argv, timeout=120)
    except asyncio.TimeoutError:
        return RootObject(None, f"{unseen} and `{' '.join(argv)}` did not answer in 120 s")
    root = parse_zdb_root(res.stdout.decode("utf-8", "replace"))
    if res.status == 0 and root is not None:
        return RootObject(root, f"`{' '.join(argv)}`")
    said = _last_line(res.err_text) or f"exit status {res.status}, no ROOT entry"
    return RootObject(None, f"{unseen} and `{' '.join(argv)}` failed: {said}")


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


#: What a stream's compatibility is decided from, per source dataset.
STREAM_PROPS = "type,version,dnodesize,mounted,mountpoint"
#: The same for a zfs that has no ``dnodesize`` (zfs-fuse; it refuses the whole list for that one name).
STREAM_PROPS_NO_DNODE = "type,version,mounted,mountpoint"


async def _get_stream_props(src: Zfs, dataset: str, *how: str) -> bytes:
    """``zfs get -H -p HOW... STREAM_PROPS dataset``'s output; again without ``dnodesize`` where that zfs
    has none. Empty when the source will not say (the checks then ask nothing of the target)."""
    res = await src.run("get", "-H", "-p", *how, STREAM_PROPS, dataset, check=False, dataset=dataset)
    if res.status != 0 and "dnodesize" in res.err_text:
        res = await src.run("get", "-H", "-p", *how, STREAM_PROPS_NO_DNODE, dataset, check=False, dataset=dataset)
    return res.stdout


async def tree_props(src: Zfs, root: str) -> dict[str, dict[str, str]]:
    """``STREAM_PROPS`` of every dataset under ``root``, in one command (a tree run asks once, not per
    dataset). zfs-fuse's ``zfs get`` has no ``-t``: snapshots come too and are left out."""
    out: dict[str, dict[str, str]] = {}
    for line in (await _get_stream_props(src, root, "-r", "-o", "name,property,value")).decode().splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and "@" not in parts[0]:
            out.setdefault(parts[0], {})[parts[1]] = parts[2]
    return out


async def check_stream(src: Zfs, src_features: Features, src_name: str,
                       dst: Zfs, dst_features: Features, dst_name: str,
                       props: dict[str, str] | None = None) -> None:
    """Raise StreamIncompatible when ``dst``'s zfs cannot receive a plain send of ``src_name``, and
    RootObjectIncompatible / RootObjectUnknown when it could receive but not read it. ``props``: the
    source's ``STREAM_PROPS``, when already read (``tree_props``)."""
    if dst_features.openzfs:
        return
    if props is None:
        out = await _get_stream_props(src, src_name, "-o", "property,value")
        props = dict(line.split("\t", 1) for line in out.decode().splitlines() if "\t" in line)
    await _check_features(src, src_features, src_name, props, dst, dst_features, dst_name)
    if src_features.openzfs and props.get("type") == "filesystem":
        await _check_root(src, src_name, props, f"{dst.host.name}:{dst_name}", dst_features.implementation)


async def _check_features(src: Zfs, src_features: Features, src_name: str, props: dict[str, str],
                          dst: Zfs, dst_features: Features, dst_name: str) -> None:
    pool = src_name.split("/", 1)[0]
    large_dnode = False
    if props.get("dnodesize", "legacy") not in ("legacy", "-"):
        large_dnode = (await _pool_prop(src, pool, "feature@large_dnode")) == "active"
    wanted = stream_features(props, large_dnode)
    if not wanted:
        return
    upgrade = await dst.run("upgrade", "-v", check=False)
    pool_version = await _pool_prop(dst, dst_name.split("/", 1)[0], "version")
    limits = ReceiverLimits(parse_zpl_max(upgrade.stdout.decode()),
                            int(pool_version) if pool_version and pool_version.isdigit() else None)
    for feature in wanted:
        if not limits.receives(feature):
            raise E.StreamIncompatible(
                source=f"{src.host.name}:{src_name}", target=f"{dst.host.name}:{dst_name}", feature=feature.name,
                flag=f"{feature.flag:#x}", why=feature.why, source_zfs=src_features.version,
                target_zfs=dst_features.implementation, zpl_max=limits.zpl_max,
                pool_version=pool_version or "unknown")


async def _check_root(src: Zfs, src_name: str, props: dict[str, str], target: str, target_zfs: str) -> None:
    root = await root_object(src, src_name, props)
    source = f"{src.host.name}:{src_name}"
    if root.number is None:
        raise E.RootObjectUnknown(source=source, target=target, target_zfs=target_zfs, reason=root.how,
                                  host=src.host.name, dataset=src_name)
    if root.number != LEGACY_ROOT_OBJECT:
        raise E.RootObjectIncompatible(source=source, target=target, target_zfs=target_zfs, root=root.number,
                                       how=root.how)


async def _pool_prop(zfs: Zfs, pool: str, prop: str) -> str | None:
    res = await zfs.host.run(["zpool", "get", "-H", "-o", "value", prop, pool])
    value = res.stdout.decode().strip()
    return value if res.status == 0 and value not in ("", "-") else None
