"""Parsing zfs output: feature detection from usage text, ``zfs get`` tables.

The usage texts are recorded verbatim (what ``zfs send -?`` / ``zfs receive -?``
print on stderr, exit status 2) so feature detection is tested against the
real thing for both ZFS families.
"""

from __future__ import annotations

import pytest

from zchunk.progress import describe_zfs
from zchunk.zfs import (
    Features,
    _batches,
    dataset_from_props,
    datasets_from_props,
    parse_commands,
    parse_get_output,
    parse_usage_flags,
    receive_perms,
    send_perms,
)

# zfs-fuse 0.7.0 (Debian bookworm), pool v23: captured on this machine.
ZFS_FUSE_SEND = (
    "invalid option '?'\n"
    "usage:\n"
    "\tsend [-RDp] [-[iI] snapshot] <snapshot>\n"
    "\n"
    "For the property list, run: zfs set|get\n"
    "\n"
    "For the delegated permission list, run: zfs allow|unallow\n"
)
ZFS_FUSE_RECEIVE = (
    "invalid option '?'\n"
    "usage:\n"
    "\treceive [-vnF] <filesystem|volume|snapshot>\n"
    "\treceive [-vnF] -d <filesystem>\n"
    "\n"
    "For the property list, run: zfs set|get\n"
    "\n"
    "For the delegated permission list, run: zfs allow|unallow\n"
)

# OpenZFS 2.3 (cmd/zfs/zfs_main.c get_usage(HELP_SEND/HELP_RECEIVE) + usage(B_FALSE)).
OPENZFS_SEND = (
    "invalid option '?'\n"
    "usage:\n"
    "\tsend [-DLPbcehnpsVvw] [-i|-I snapshot]\n"
    "\t     [-R [-X dataset[,dataset]...]]     <snapshot>\n"
    "\tsend [-DnVvPLecw] [-i snapshot|bookmark] <filesystem|volume|snapshot>\n"
    "\tsend [-DnPpVvLec] [-i bookmark|snapshot] --redact <bookmark> <snapshot>\n"
    "\tsend [-nVvPe] -t <receive_resume_token>\n"
    "\tsend [-PnVv] --saved filesystem\n"
    "\n"
    "For the property list, run: zfs set|get\n"
    "\n"
    "For the delegated permission list, run: zfs allow|unallow\n"
    "\n"
    "For further help on a command or topic, run: zfs help [<topic>]\n"
)
OPENZFS_RECEIVE = (
    "invalid option '?'\n"
    "usage:\n"
    "\treceive [-vMnsFhu] [-o <property>=<value>] ... [-x <property>] ...\n"
    "\t    <filesystem|volume|snapshot>\n"
    "\treceive [-vMnsFhu] [-o <property>=<value>] ... [-x <property>] ... \n"
    "\t    [-d | -e] <filesystem>\n"
    "\treceive -A <filesystem|volume>\n"
    "\n"
    "For the property list, run: zfs set|get\n"
    "\n"
    "For the delegated permission list, run: zfs allow|unallow\n"
    "\n"
    "For further help on a command or topic, run: zfs help [<topic>]\n"
)


def features(send: str, recv: str) -> Features:
    return Features(parse_usage_flags(send, "send"), parse_usage_flags(recv, "receive"))


def test_zfs_fuse_flags() -> None:
    assert {"R", "D", "p"} <= parse_usage_flags(ZFS_FUSE_SEND, "send")
    assert parse_usage_flags(ZFS_FUSE_SEND, "send").isdisjoint({"t", "n", "P", "w", "c", "L", "e"})
    assert parse_usage_flags(ZFS_FUSE_RECEIVE, "receive") == frozenset("vnFd")


def test_zfs_fuse_features() -> None:
    f = features(ZFS_FUSE_SEND, ZFS_FUSE_RECEIVE)
    assert f.resume_tokens is False
    assert f.send_estimate is False
    assert f.receive_unmounted is False
    s = f.summary()
    assert not (s["raw"] or s["compressed"] or s["large_blocks"] or s["embedded"])


def test_openzfs_flags() -> None:
    send = parse_usage_flags(OPENZFS_SEND, "send")
    assert set("DLPbcehnpsVvw") <= send
    assert {"t", "R", "X", "i", "I"} <= send
    recv = parse_usage_flags(OPENZFS_RECEIVE, "receive")
    assert set("vMnsFhu") <= recv
    assert {"o", "x", "d", "e", "A"} <= recv


def test_openzfs_features() -> None:
    f = features(OPENZFS_SEND, OPENZFS_RECEIVE)
    assert f.resume_tokens is True
    assert f.send_estimate is True
    assert f.receive_unmounted is True
    s = f.summary()
    assert s["raw"] and s["compressed"] and s["large_blocks"] and s["embedded"]


def test_usage_lines_of_other_subcommands_are_ignored() -> None:
    text = "usage:\n\tsnapshot [-r] [-o property=value] ... <filesystem|volume>@<snap> ...\n"
    assert parse_usage_flags(text, "send") == frozenset()
    # a '-' inside a word is not an option
    assert parse_usage_flags("\tsend [-RDp] <snapshot-name>\n", "send") == frozenset("RDp")


def test_unknown_output_means_no_features() -> None:
    f = features("zfs: command not found\n", "")
    assert not (f.resume_tokens or f.send_estimate or f.receive_unmounted)


# -- zfs get -H -p -o name,property,value -d 1 type,guid,createtxg,referenced DS ---------------

GET_OUTPUT = (
    "tank/data\ttype\tfilesystem\n"
    "tank/data\tguid\t1111\n"
    "tank/data\tcreatetxg\t10\n"
    "tank/data\treferenced\t4096\n"
    # snapshots listed in name order, not creation order
    "tank/data@a-late\ttype\tsnapshot\n"
    "tank/data@a-late\tguid\t3333\n"
    "tank/data@a-late\tcreatetxg\t300\n"
    "tank/data@a-late\treferenced\t8192\n"
    "tank/data@b-early\ttype\tsnapshot\n"
    "tank/data@b-early\tguid\t2222\n"
    "tank/data@b-early\tcreatetxg\t20\n"
    "tank/data@b-early\treferenced\t4096\n"
    "tank/data@my snap\ttype\tsnapshot\n"
    "tank/data@my snap\tguid\t18446744073709551615\n"
    "tank/data@my snap\tcreatetxg\t150\n"
    "tank/data@my snap\treferenced\t-\n"
    # a child dataset (-d 1 lists children too) and its snapshots are not ours
    "tank/data/child\ttype\tfilesystem\n"
    "tank/data/child\tguid\t4444\n"
    "tank/data/child@x\tguid\t5555\n"
    "tank/data/child@x\tcreatetxg\t400\n"
    "tank/database@y\tguid\t6666\n"
    "tank/database@y\tcreatetxg\t500\n"
)


def test_many_names_go_in_as_few_commands_as_fit_the_shells_limit() -> None:
    """A tree's holds and settings name every dataset at once; one ``sh -c`` argument holds 128 KiB."""
    names = [f"tank/replica/dataset{i:05d}@zchunk_x_h_20261204T000000Z" for i in range(5000)]
    batches = _batches(names)
    assert [n for b in batches for n in b] == names, "every name once, in order"
    assert len(batches) > 1 and all(len(" ".join(b)) <= 64 * 1024 for b in batches)
    assert _batches(["a", "b"]) == [["a", "b"]] and _batches([]) == []
    assert _batches(["x" * 100, "y"], limit=10) == [["x" * 100], ["y"]], "a name longer than the limit alone"


def test_parse_get_output() -> None:
    props = parse_get_output(GET_OUTPUT + "garbage line without tabs\n\n")
    assert props["tank/data"] == {"type": "filesystem", "guid": "1111", "createtxg": "10",
                                  "referenced": "4096"}
    assert props["tank/data@my snap"]["guid"] == "18446744073709551615"
    assert "garbage line without tabs" not in props


def test_dataset_from_props_orders_snapshots_by_createtxg() -> None:
    ds = dataset_from_props("tank/data", parse_get_output(GET_OUTPUT))
    assert ds is not None
    assert (ds.name, ds.type, ds.guid, ds.referenced) == ("tank/data", "filesystem", 1111, 4096)
    assert [s.short for s in ds.snapshots] == ["b-early", "my snap", "a-late"]
    assert [s.createtxg for s in ds.snapshots] == [20, 150, 300]
    assert ds.newest is not None and ds.newest.name == "tank/data@a-late"
    assert ds.by_guid()[2**64 - 1].short == "my snap"
    assert ds.snapshots[1].referenced == 0  # "-" reads as 0, not a crash


def test_written_comes_with_the_listing_where_it_is_asked() -> None:
    """OpenZFS lists ``written`` with the tree (no ``zfs get written`` per dataset before its plan); where it
    is not listed (zfs-fuse has no such property) the dataset says None, and the probe decides."""
    assert dataset_from_props("tank/data", parse_get_output(GET_OUTPUT)).written is None  # type: ignore[union-attr]
    listed = GET_OUTPUT + "tank/data\twritten\t12288\ntank/data@a-late\twritten\t4096\ntank/data/child\twritten\t0\n"
    props = parse_get_output(listed)
    assert dataset_from_props("tank/data", props).written == 12288  # type: ignore[union-attr]
    tree = datasets_from_props(props)
    assert (tree["tank/data"].written, tree["tank/data/child"].written) == (12288, 0)


def test_dataset_from_props_volume_and_missing() -> None:
    props = parse_get_output("tank/vol\ttype\tvolume\ntank/vol\tguid\t7\n")
    ds = dataset_from_props("tank/vol", props)
    assert ds is not None and ds.type == "volume" and ds.snapshots == () and ds.newest is None
    assert dataset_from_props("tank/nope", props) is None


@pytest.mark.parametrize("name", ["tank/data", "tank/data/child"])
def test_only_own_snapshots(name: str) -> None:
    ds = dataset_from_props(name, parse_get_output(GET_OUTPUT))
    assert ds is not None
    assert all(s.name.startswith(name + "@") for s in ds.snapshots)


ZFS_ALLOW_OUTPUT = """\
---- Permissions on tank/data ----------------------------------------
Local+Descendent permissions:
\tuser zchunk hold,send,snapshot
\tgroup backup receive
\teveryone mount
"""


def test_parse_allow_user_group_everyone() -> None:
    from zchunk.zfs import parse_allow

    assert parse_allow(ZFS_ALLOW_OUTPUT, "zchunk") == {"hold", "send", "snapshot", "mount"}
    assert parse_allow(ZFS_ALLOW_OUTPUT, "zchunk", ("backup",)) == {"hold", "send", "snapshot", "mount", "receive"}
    assert parse_allow(ZFS_ALLOW_OUTPUT, "other") == {"mount"}
    assert parse_allow("", "zchunk") == set()


def test_check_delegation_decides_from_zfs_allow() -> None:
    import asyncio

    import pytest

    from zchunk.errors import PermissionDenied
    from zchunk.transport import CommandResult, Host
    from zchunk.zfs import Zfs

    class Recorded(Host):
        def __init__(self, res: CommandResult) -> None:
            self.name, self.res, self.argv = "h", res, None

        async def run(self, argv, stdin=None, timeout=120.0):  # type: ignore[no-untyped-def]
            self.argv = argv
            return self.res

    ok = Recorded(CommandResult(0, ZFS_ALLOW_OUTPUT.encode(), b""))
    assert asyncio.run(Zfs(ok).check_delegation("tank/data", "zchunk", (), ("send",), "send")) is True
    assert ok.argv == ["zfs", "allow", "tank/data"]
    with pytest.raises(PermissionDenied) as err:
        asyncio.run(Zfs(ok).check_delegation("tank/data", "zchunk", (), ("receive", "create"), "receive into"))
    assert err.value.exit_code == 7 and "receive,create" in str(err.value)
    assert "zfs allow -u zchunk receive,create tank/data" in err.value.hint
    legacy = Recorded(CommandResult(1, b"", b"internal error: /usr/lib/zfs/pyzfs.py not found"))
    assert asyncio.run(Zfs(legacy).check_delegation("tank/data", "zchunk", (), ("send",), "send")) is None


def test_holds_and_implementation_come_from_the_command_list() -> None:
    legacy = Features(commands=parse_commands("usage: zfs command args ...\n\thold [-r] <tag> <snapshot> ...\n"
                                              "\trelease [-r] <tag> <snapshot> ...\n"))
    assert legacy.holds and not legacy.openzfs and "legacy" in legacy.summary()["implementation"]
    current = Features(commands=parse_commands("\tversion\n\thold <tag> <snapshot>\n\trelease <tag> <snapshot>\n"))
    assert current.holds and current.summary()["implementation"] == "OpenZFS"
    assert not Features(commands=parse_commands("\tsnapshot <snap>\n")).holds


def test_verbose_feature_line_names_what_a_host_has_and_lacks() -> None:
    line = describe_zfs(features(ZFS_FUSE_SEND, ZFS_FUSE_RECEIVE).summary())
    assert line.startswith("legacy ZFS") and "lacks" in line and "resume tokens" in line.split("lacks")[1]
    line = describe_zfs(Features(parse_usage_flags(OPENZFS_SEND, "send"), parse_usage_flags(OPENZFS_RECEIVE, "receive"),
                                 "zfs-2.3.4-1", frozenset({"version", "hold", "release", "bookmark"})).summary())
    assert line.startswith("OpenZFS zfs-2.3.4-1: has holds, bookmarks, resume tokens") and "lacks nothing" in line


def test_delegation_asked_for_is_what_the_run_will_do() -> None:
    assert send_perms(sync_snap=False, holds=False, bookmark=False) == ("send",)
    assert set(send_perms(sync_snap=True, holds=True, bookmark=True)) == {
        "send", "snapshot", "destroy", "mount", "hold", "release", "bookmark"}
    assert receive_perms(sync_snap=False, holds=False, rollback=False) == ("receive", "create", "mount")
    assert {"hold", "release", "destroy", "rollback"} <= set(receive_perms(sync_snap=True, holds=True, rollback=True))
