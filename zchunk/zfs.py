"""zfs commands on a host: building them, running them, parsing their output.

Works with old ZFS (zfs-fuse, pool v23: no ``list -p``, no ``send -nP``, no
resume tokens, no ``receive -u``) and current OpenZFS alike; what a host can
do is read from its own usage text once per session (``Features``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import CommandFailed, MissingZfs, PermissionDenied, UnknownDataset
from .transport import CommandResult, Host


@dataclass(frozen=True)
class Snapshot:
    name: str  # full name, pool/ds@snap
    guid: int
    createtxg: int
    referenced: int = 0
    seed: bool = False  # SEED_PROPERTY set: a seed export's snapshot, held until the target has it

    @property
    def short(self) -> str:
        """The part after ``@`` (a snapshot) or ``#`` (a bookmark, which can serve as a base)."""
        return self.name.split("@", 1)[1] if "@" in self.name else self.name.split("#", 1)[-1]


#: On a snapshot ``zchunk seed export`` streamed and holds (tag ``zchunk_seed``) until the target has it: the
#: first ``zchunk sync`` that finds it there releases the hold and clears this.
SEED_PROPERTY = "zchunk:seed"
#: A replica locked against replication (a failover): "who@host ISO-time: why", on the dataset itself so that
#: the lock travels with the data; inherited by its children. Every zchunk sync into it refuses (TargetLocked).
LOCK_PROPERTY = "zchunk:locked"


#: What a dataset's (or tree's) one listing reads of it and its snapshots.
LISTED = f"type,guid,createtxg,referenced,{LOCK_PROPERTY},{SEED_PROPERTY}"

@dataclass(frozen=True)
class Dataset:
    name: str
    type: str  # filesystem | volume
    guid: int
    referenced: int
    snapshots: tuple[Snapshot, ...] = ()  # oldest first (createtxg)
    locked: str = ""  # LOCK_PROPERTY (set here or inherited): who locked it against replication, when, why
    written: int | None = None  # bytes written since its newest snapshot; None: not listed (``Zfs.written``)

    @property
    def newest(self) -> Snapshot | None:
        return self.snapshots[-1] if self.snapshots else None

    def by_guid(self) -> dict[int, Snapshot]:
        return {s.guid: s for s in self.snapshots}


@dataclass(frozen=True)
class Encryption:
    """A dataset's native encryption, as ``zfs get`` shows it."""

    cipher: str  # "off" when not encrypted
    keystatus: str  # available | unavailable | "-" (not encrypted)
    root: str  # encryptionroot, "" when not encrypted

    @property
    def on(self) -> bool:
        return self.cipher not in ("off", "-", "")


UNENCRYPTED = Encryption("off", "-", "")


@dataclass(frozen=True)
class Features:
    """What one host's zfs can do, read from its usage text."""

    send_flags: frozenset[str] = field(default_factory=frozenset)
    recv_flags: frozenset[str] = field(default_factory=frozenset)
    version: str = "unknown"
    commands: frozenset[str] = field(default_factory=frozenset)  # zfs subcommands in its usage

    @property
    def bookmarks(self) -> bool:
        return "bookmark" in self.commands

    @property
    def holds(self) -> bool:
        return {"hold", "release"} <= self.commands

    @property
    def implementation(self) -> str:
        return "OpenZFS" if self.openzfs else "legacy ZFS (zfs-fuse or Solaris-era, no `zfs version`)"

    @property
    def receive_props(self) -> bool:
        return "o" in self.recv_flags

    @property
    def openzfs(self) -> bool:
        return "version" in self.commands

    @property
    def resume_tokens(self) -> bool:
        return "t" in self.send_flags and "s" in self.recv_flags

    @property
    def send_estimate(self) -> bool:
        return {"n", "P"} <= self.send_flags

    @property
    def receive_unmounted(self) -> bool:
        return "u" in self.recv_flags

    @property
    def encryption(self) -> bool:
        """Native encryption: raw sends (``send -w``) and the ``encryption`` property (OpenZFS >= 0.8)."""
        return "w" in self.send_flags

    def compact_send_flags(self) -> tuple[str, ...]:
        """``-L -e`` where this zfs sends them: large blocks whole, embedded data. Not ``-c`` (blocks as
        stored): zchunk's own chunk compression of the plain stream puts fewer bytes on the wire
        (``flags.py``)."""
        return tuple(f"-{f}" for f in "Le" if f in self.send_flags)

    def summary(self) -> dict[str, object]:
        return {"implementation": self.implementation, "version": self.version, "holds": self.holds,
                "resume_tokens": self.resume_tokens,
                "send_estimate": self.send_estimate, "receive_u": self.receive_unmounted,
                "bookmarks": self.bookmarks, "receive_props": self.receive_props,
                "raw": "w" in self.send_flags, "compressed": "c" in self.send_flags,
                "large_blocks": "L" in self.send_flags, "embedded": "e" in self.send_flags}


_FLAG_GROUP = re.compile(r"\[-([A-Za-z]+)\]")
_FLAG_SINGLE = re.compile(r"(?:^|[\s\[|])-([A-Za-z])\b")


def parse_usage_flags(text: str, subcommand: str) -> frozenset[str]:
    """Option letters shown for ``subcommand`` in zfs's usage text."""
    flags: set[str] = set()
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith((subcommand + " ", "[", "-")):
            continue
        for group in _FLAG_GROUP.findall(stripped):
            flags.update(group)
        flags.update(_FLAG_SINGLE.findall(stripped))
    flags.discard("[")
    return frozenset(flags)


def parse_commands(text: str) -> frozenset[str]:
    """Subcommand names listed in ``zfs -?``/``zfs help`` usage text."""
    names = set()
    for line in text.splitlines():
        word = line.strip().split(" ", 1)[0]
        if word.isalpha() and word.islower() and line.startswith(("\t", " ")):
            names.add(word)
    return frozenset(names)


#: Bytes of names in one command: a remote command is one argument of ``sh -c``, which Linux caps at 128 KiB.
ARGS_MAX = 64 * 1024


def _batches(names: Sequence[str], limit: int = ARGS_MAX) -> list[list[str]]:
    """``names`` in order, cut into runs whose joined length stays within ``limit`` (one name each at least)."""
    out: list[list[str]] = []
    size = limit + 1
    for name in names:
        if size + len(name) + 1 > limit:
            out.append([])
            size = 0
        out[-1].append(name)
        size += len(name) + 1
    return out


def parse_get_output(text: str) -> dict[str, dict[str, str]]:
    """``zfs get -H -p -o name,property,value`` -> {name: {property: value}}."""
    out: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        out.setdefault(parts[0], {})[parts[1]] = parts[2]
    return out


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def dataset_from_props(name: str, props: dict[str, dict[str, str]]) -> Dataset | None:
    mine = props.get(name)
    if mine is None:
        return None
    snaps = [
        _snapshot(n, p)
        for n, p in props.items()
        if n.startswith(name + "@")
    ]
    snaps.sort(key=lambda s: s.createtxg)
    return Dataset(name, mine.get("type", "filesystem"), _int(mine.get("guid")),
                   _int(mine.get("referenced")), tuple(snaps), _lock(mine), _written(mine))


def datasets_from_props(props: dict[str, dict[str, str]]) -> dict[str, Dataset]:
    """Every dataset in a recursive ``zfs get`` (``parse_get_output``), with its snapshots."""
    snaps: dict[str, list[Snapshot]] = {}
    for n, p in props.items():
        if "@" in n:
            snaps.setdefault(n.split("@", 1)[0], []).append(_snapshot(n, p))
    return {n: Dataset(n, p.get("type", "filesystem"), _int(p.get("guid")), _int(p.get("referenced")),
                       tuple(sorted(snaps.get(n, ()), key=lambda s: s.createtxg)), _lock(p), _written(p))
            for n, p in props.items() if "@" not in n and "#" not in n}


def _written(props: dict[str, str]) -> int | None:
    value = props.get("written")
    return int(value) if value is not None and value.isdigit() else None


def _snapshot(name: str, p: dict[str, str]) -> Snapshot:
    return Snapshot(name, _int(p.get("guid")), _int(p.get("createtxg")), _int(p.get("referenced")),
                    p.get(SEED_PROPERTY, "-") not in ("-", ""))


def _lock(props: dict[str, str]) -> str:
    value = props.get(LOCK_PROPERTY, "-")
    return "" if value in ("-", "") else value


def parse_allow(text: str, user: str, groups: tuple[str, ...] = ()) -> set[str]:
    """Permissions ``zfs allow DATASET`` grants ``user`` (directly, via a group, or to everyone)."""
    perms: set[str] = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and ((parts[0] == "user" and parts[1] == user)
                                or (parts[0] == "group" and parts[1] in groups)):
            perms.update(parts[2].split(","))
        elif len(parts) == 2 and parts[0] == "everyone":
            perms.update(parts[1].split(","))
    return perms


SEND_PERMS = ("send",)
RECEIVE_PERMS = ("receive", "create", "mount")


# The delegation a failed command needs, for PermissionDenied's hint.
_PERMS_FOR = {"send": "send", "snapshot": "snapshot", "destroy": "destroy,mount", "hold": "hold",
              "release": "release", "rollback": "rollback", "bookmark": "bookmark"}


def send_perms(sync_snap: bool, holds: bool, bookmark: bool) -> tuple[str, ...]:
    """What a non-root user needs delegated on a source dataset for a run with these options.

    Sync snapshots are taken and later pruned (destroying a snapshot needs ``mount`` as well);
    the incremental base is held and released where this zfs has holds.
    """
    perms = list(SEND_PERMS)
    if sync_snap:
        perms += ["snapshot", "destroy", "mount"]
    if holds:
        perms += ["hold", "release"]
    if bookmark:
        perms.append("bookmark")
    return tuple(perms)


def receive_perms(sync_snap: bool, holds: bool, rollback: bool) -> tuple[str, ...]:
    """What a non-root user needs delegated where the replica is received (itself, or its parent)."""
    perms = list(RECEIVE_PERMS)
    if holds:
        perms += ["hold", "release"]
    if sync_snap or rollback:
        perms.append("destroy")  # pruning old sync snapshots; a rollback destroys newer ones
    if rollback:
        perms.append("rollback")
    return tuple(perms)


#: An incremental stream between a snapshot and an identical one is BEGIN, FREEOBJECTS and END records
#: (624 bytes on zfs-fuse); any write adds at least an object's records (6 KB for an atime update).
UNCHANGED_STREAM_MAX = 2048


class Zfs:
    """zfs on one host."""

    def __init__(self, host: Host, command: str = "zfs") -> None:
        self.host, self.command = host, command
        self.user = "USER"  # the remote login, for error hints; set once the host was probed
        self.written = False  # a listing also reads ``written`` (OpenZFS; zfs-fuse refuses the whole list)

    @property
    def listed(self) -> str:
        return f"{LISTED},written" if self.written else LISTED

    async def run(self, *args: str, check: bool = True, dataset: str = "", action: str = "") -> CommandResult:
        argv = [self.command, *args]
        res = await self.host.run(argv)
        if res.status == 127:
            raise MissingZfs(host=self.host.name)
        if check and res.status != 0:
            err = res.err_text
            if "permission denied" in err.lower():
                what = action or args[0]
                raise PermissionDenied(host=self.host.name, action=what, dataset=dataset, reason=err,
                                       perms=_PERMS_FOR.get(what, "receive,create,mount"), user=self.user)
            raise CommandFailed(host=self.host.name, command=" ".join(argv), status=res.status, stderr=err)
        return res

    async def dataset(self, name: str) -> Dataset | None:
        """The dataset and its snapshots, or None when it does not exist."""
        res = await self.run("get", "-H", "-p", "-o", "name,property,value", "-d", "1",
                             self.listed, name, check=False, dataset=name)
        if res.status != 0:
            if "does not exist" in res.err_text or "no such" in res.err_text.lower():
                return None
            raise CommandFailed(host=self.host.name, command=f"zfs get ... {name}", status=res.status,
                                stderr=res.err_text)
        return dataset_from_props(name, parse_get_output(res.stdout.decode()))

    async def tree(self, root: str) -> dict[str, Dataset]:
        """``root`` and every dataset below it, with their snapshots, by name: one command for a whole tree.
        Empty when ``root`` does not exist."""
        res = await self.run("get", "-H", "-p", "-r", "-o", "name,property,value",
                             self.listed, root, check=False, dataset=root)
        if res.status != 0:
            if "does not exist" in res.err_text or "no such" in res.err_text.lower():
                return {}
            raise CommandFailed(host=self.host.name, command=f"zfs get -r ... {root}", status=res.status,
                                stderr=res.err_text)
        return datasets_from_props(parse_get_output(res.stdout.decode()))

    async def snapshot_all(self, root: str, short: str, members: list[str], left_out: list[str],
                           many: bool) -> None:
        """``short`` on every dataset in ``members`` (of the tree at ``root``) at one moment: ``zfs snapshot
        -r`` when none of the tree is ``left_out``, else all names in one ``zfs snapshot`` where this zfs
        takes several (``many``: OpenZFS), else ``-r`` and the snapshots of the datasets left out destroyed
        at once (nobody else's: this command made them)."""
        if left_out and many:
            await self.run("snapshot", *(f"{m}@{short}" for m in members), dataset=root, action="snapshot")
            return
        await self.run("snapshot", "-r", f"{root}@{short}", dataset=root, action="snapshot")
        for name in left_out:
            await self.destroy(f"{name}@{short}")

    async def require(self, name: str) -> Dataset:
        ds = await self.dataset(name)
        if ds is None:
            raise UnknownDataset(host=self.host.name, dataset=name, dataset_parent=name.split("/")[0])
        return ds

    async def features(self) -> Features:
        import asyncio

        send, recv, top, ver = await asyncio.gather(  # one round trip's latency, not four
            self.run("send", "-?", check=False), self.run("receive", "-?", check=False),
            self.run("-?", check=False), self.run("version", check=False))
        version = (ver.stdout.decode().split("\n")[0].strip() if ver.status == 0
                   else "legacy zfs (no `zfs version`)")
        return Features(parse_usage_flags((send.stdout + send.stderr).decode(), "send"),
                        parse_usage_flags((recv.stdout + recv.stderr).decode(), "receive"), version,
                        parse_commands((top.stdout + top.stderr).decode()))

    async def estimate(self, snapshot: Snapshot, base: Snapshot | None, features: Features,
                       flags: tuple[str, ...] = ()) -> int:
        """Stream size: ``zfs send -nP`` (with the send's own flags: ``-c``/``-w`` streams are smaller) where
        supported, else referenced sizes."""
        if features.send_estimate:
            args = ["send", "-nP", *flags] + (["-I", base.name] if base else []) + [snapshot.name]
            res = await self.run(*args, check=False)
            for line in reversed((res.stdout + res.stderr).decode().splitlines()):
                parts = line.split()
                if len(parts) == 2 and parts[0] == "size" and parts[1].isdigit():
                    return int(parts[1])
        if base is None:
            return snapshot.referenced
        return max(abs(snapshot.referenced - base.referenced), 1 << 20)

    async def check_delegation(self, dataset: str, user: str, groups: tuple[str, ...], needed: tuple[str, ...],
                               action: str) -> bool | None:
        """For a non-root user: are ``needed`` permissions delegated on ``dataset``?

        Raises PermissionDenied naming the missing ones; None when this zfs
        cannot tell (no ``zfs allow``, e.g. zfs-fuse), so the command itself decides.
        """
        res = await self.run("allow", dataset, check=False)
        if res.status != 0:
            return None
        missing = [p for p in needed if p not in parse_allow(res.stdout.decode(), user, groups)]
        if missing:
            raise PermissionDenied(host=self.host.name, action=action, dataset=dataset,
                                   reason=f"user {user} lacks {','.join(missing)}", perms=",".join(needed), user=user)
        return True

    async def snapshot(self, name: str) -> None:
        await self.run("snapshot", name, dataset=name, action="snapshot")

    async def prop(self, name: str, prop: str) -> str | None:
        """A property's raw value, or None when this zfs or dataset doesn't have it."""
        res = await self.run("get", "-H", "-p", "-o", "value", prop, name, check=False)
        value = res.stdout.decode().strip()
        return value if res.status == 0 and value not in ("", "-") else None

    async def changed_since(self, dataset: str, snapshot: str, probe: bool = True,
                            written: bool = True) -> bool | None:
        """Whether ``dataset`` was written after ``snapshot`` (its newest), which an incremental receive would
        refuse. OpenZFS: its ``written`` property (``written``: this zfs may have it). A zfs without it
        (zfs-fuse): with ``probe``, a snapshot taken and destroyed at once, and the size of the incremental
        stream between the two (624 bytes on zfs-fuse when nothing changed; a read's atime update alone makes
        it 6 KB), all in one command. None: cannot tell."""
        value = await self.prop(dataset, "written") if written else None
        if value is not None:
            return value.isdigit() and int(value) > 0
        if not probe:
            return None
        import os
        import time

        name = f"{dataset}@zchunk-probe-{os.getpid()}-{time.time_ns()}"
        # the stream is counted, not kept; a failing zfs send is told apart from an empty stream, and a
        # probe snapshot the destroy left (zfs-fuse: "dataset is busy" just after the send) is retried below
        script = ('"$0" snapshot "$2" || exit 3; { "$0" send -i "$1" "$2" || echo "zfs send failed" >&2; } | wc -c; '
                  '"$0" destroy "$2" 2>/dev/null || echo "destroy failed" >&2')
        try:
            res = await self.host.run(["sh", "-c", script, self.command, snapshot, name])
        except BaseException:
            try:  # the snapshot, if the link let the command take it at all
                await self.run("destroy", name, check=False)
            except Exception:
                pass  # what the caller hears is the first failure
            raise
        if res.status == 3:
            return None
        if "destroy failed" in res.err_text:
            await self.destroy(name)
        size = res.stdout.decode().strip()
        if res.status != 0 or "zfs send failed" in res.err_text or not size.isdigit():
            return None
        return int(size) > UNCHANGED_STREAM_MAX

    async def encryption(self, name: str) -> Encryption:
        """``name``'s encryption; UNENCRYPTED where this zfs has none (zfs-fuse: no such property)."""
        res = await self.run("get", "-H", "-o", "property,value", "encryption,keystatus,encryptionroot", name,
                             check=False)
        if res.status != 0:
            return UNENCRYPTED
        props = dict(line.split("\t", 1) for line in res.stdout.decode().splitlines() if "\t" in line)
        root = props.get("encryptionroot", "-")
        return Encryption(props.get("encryption", "off"), props.get("keystatus", "-"), "" if root == "-" else root)

    async def local_props(self, name: str) -> dict[str, str]:
        res = await self.run("get", "-H", "-p", "-s", "local", "-o", "property,value", "all", name)
        return dict(line.split("\t", 1) for line in res.stdout.decode().splitlines() if "\t" in line)

    async def children(self, name: str) -> list[tuple[str, str, str]]:
        """(name, type, zchunk:sync) of ``name`` and its descendants, parents first."""
        res = await self.run("list", "-H", "-r", "-o", "name,type,zchunk:sync", "-t", "filesystem,volume", name,
                             dataset=name)
        rows = [tuple(line.split("\t")) for line in res.stdout.decode().splitlines() if line]
        return [(r[0], r[1], r[2] if len(r) > 2 else "-") for r in rows]  # type: ignore[misc]

    async def bookmarks(self, name: str) -> tuple[Snapshot, ...]:
        res = await self.run("list", "-H", "-p", "-t", "bookmark", "-o", "name,guid,createtxg", "-d", "1", name,
                             check=False)
        marks = []
        for line in res.stdout.decode().splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[0].startswith(name + "#"):
                marks.append(Snapshot(parts[0], _int(parts[1]), _int(parts[2])))
        return tuple(sorted(marks, key=lambda b: b.createtxg))

    async def holds_supported(self, snapshot: str) -> bool:
        """Whether holds work here, by what they do: a snapshot counts its holds (``userrefs``). Not by the
        listing ``zfs holds``, which Debian's zfs-fuse lacks (it needs pyzfs) though hold/release work."""
        refs = await self.prop(snapshot, "userrefs")
        if refs is not None:
            return refs.isdigit()
        return (await self.run("holds", "-H", snapshot, check=False)).status == 0

    async def held_snapshots(self, dataset: str, tree: bool = False) -> list[str]:
        """The snapshots of ``dataset`` (with ``tree``: and of every dataset below it) that carry any hold
        (``userrefs`` > 0): where a hold of ours may be left, found without ``zfs holds``."""
        res = await self.run("list", "-H", "-t", "snapshot", *(["-r"] if tree else ["-d", "1"]),
                             "-o", "name,userrefs", dataset, check=False)
        if res.status != 0:
            return []
        rows = [line.split("\t") for line in res.stdout.decode().splitlines()]
        return [r[0] for r in rows if len(r) == 2 and r[1].isdigit() and int(r[1]) > 0]

    async def hold(self, tag: str, *snapshots: str) -> None:
        """Hold every one (zfs holds each name on its own: one refused leaves the others held); a hold of
        ``tag`` already there is no failure. Many names go in as few commands as the shell's limit allows."""
        for names in _batches(snapshots):
            res = await self.run("hold", tag, *names, check=False)
            refused = [line for line in res.err_text.splitlines() if line and "tag already exists" not in line]
            if res.status != 0 and refused:
                raise CommandFailed(host=self.host.name, command=f"zfs hold {tag} {' '.join(names)}",
                                    status=res.status, stderr="\n".join(refused))

    async def release(self, tag: str, *snapshots: str) -> None:
        """Let ``tag`` go from every one, in as few commands as fit (zfs releases each name on its own: one
        without the tag, said and ignored, leaves the others released)."""
        for names in _batches(snapshots):
            await self.run("release", tag, *names, check=False)  # no such tag: nothing to release

    async def destroy(self, name: str, *flags: str, busy_retry: float = 30.0) -> None:
        """``zfs destroy``; zfs-fuse answers "dataset is busy" just after a receive: retry a while."""
        import asyncio
        import time

        deadline = time.monotonic() + busy_retry
        while True:
            res = await self.run("destroy", *flags, name, check=False, dataset=name, action="destroy")
            if res.status == 0:
                return
            if "busy" not in res.err_text or time.monotonic() > deadline:
                raise CommandFailed(host=self.host.name, command=f"zfs destroy {' '.join(flags)} {name}",
                                    status=res.status, stderr=res.err_text)
            await asyncio.sleep(1.0)

    async def unmount(self, name: str, busy_retry: float = 30.0) -> None:
        """Unmount if mounted; zfs-fuse may be "busy" right after a receive: retry a while. Tried first and
        asked after (a refusal of a dataset that is not mounted is no failure): one round trip when it works."""
        import asyncio
        import time

        deadline = time.monotonic() + busy_retry
        while True:
            res = await self.run("unmount", name, check=False, dataset=name, action="unmount")
            if res.status == 0 or "not currently mounted" in res.err_text:  # both zfs say so, in these words
                return
            if await self.prop(name, "mounted") != "yes":
                return
            if time.monotonic() > deadline:
                raise CommandFailed(host=self.host.name, command=f"zfs unmount {name}", status=res.status,
                                    stderr=res.err_text)
            await asyncio.sleep(1.0)

    async def set(self, name: str, prop: str, value: str, *more: str) -> None:
        """``prop=value`` on ``name`` and on the datasets in ``more``, in as few commands as fit."""
        for names in _batches((name, *more)):
            await self.run("set", f"{prop}={value}", *names, dataset=name, action="set properties on")

    async def rollback(self, snapshot: str, destroy_newer: bool) -> None:
        await self.run("rollback", *(["-r"] if destroy_newer else []), snapshot, dataset=snapshot,
                       action="roll back")

    async def available(self, name: str) -> tuple[str, int] | None:
        """Free space for ``name`` (``available``, bytes), from the nearest existing dataset at or above it:
        (that dataset, bytes), or None when not even the pool answers."""
        parts = name.split("@", 1)[0].split("/")
        for n in range(len(parts), 0, -1):
            where = "/".join(parts[:n])
            value = await self.prop(where, "available")
            if value is not None and value.isdigit():
                return where, int(value)
        return None

    async def guid(self, name: str) -> int | None:
        res = await self.run("get", "-H", "-p", "-o", "value", "guid", name, check=False)
        return _int(res.stdout.decode().strip()) if res.status == 0 else None
