"""The flags of zfs send and receive (zchunk/flags.py): what zchunk picks from both hosts' zfs and the
source's encryption, and what a user may add through the allowlists. Pure logic; the streams themselves
are shown on real OpenZFS in tests/test_openzfs.py (send flags, raw sends) and on zfs-fuse in
tests/test_replicate.py (properties)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from zchunk import errors as E
from zchunk.flags import (
    ReceiveProperties,
    StreamOptions,
    parse_recv_options,
    parse_send_options,
    send_flags,
    stream_options,
)
from zchunk.zfs import UNENCRYPTED, Encryption, Features

OPENZFS = Features(frozenset("DLPbcehnpsVvwiIRt"), frozenset("vMnsFhuoxde"), "zfs-2.3.2",
                   frozenset({"version", "hold", "release", "bookmark"}))
LEGACY = Features(frozenset("iIRDpnv"), frozenset("vnFde"), "legacy", frozenset({"hold", "release"}))
ENCRYPTED = Encryption("aes-256-gcm", "available", "pool/enc")
LOCKED = Encryption("aes-256-gcm", "unavailable", "pool/enc")


def flags(src: Features, dst: Features, enc: Encryption = UNENCRYPTED, into_encrypted: bool = False,
          **kw: object) -> tuple[str, ...]:
    return send_flags("a:pool/src", "b:tank/dst", src, dst, enc, StreamOptions(**kw),  # type: ignore[arg-type]
                      into_encrypted=into_encrypted)


def test_openzfs_to_openzfs_sends_large_blocks_and_embedded_data_not_blocks_as_stored() -> None:
    assert flags(OPENZFS, OPENZFS) == ("-L", "-e")
    assert flags(OPENZFS, OPENZFS, send=("-c",)) == ("-L", "-e", "-c"), "asked for"


@pytest.mark.parametrize("src,dst", [(OPENZFS, LEGACY), (LEGACY, OPENZFS), (LEGACY, LEGACY)])
def test_a_legacy_zfs_on_either_side_gets_plain_streams(src: Features, dst: Features) -> None:
    assert flags(src, dst) == ()


def test_an_encrypted_source_is_sent_raw_unless_no_raw() -> None:
    assert flags(OPENZFS, OPENZFS, ENCRYPTED) == ("-L", "-e", "-w")
    assert flags(OPENZFS, OPENZFS, ENCRYPTED, raw=False) == ("-L", "-e")


def test_into_an_encrypted_target_a_decrypted_stream_carries_no_embedded_data() -> None:
    assert flags(OPENZFS, OPENZFS, into_encrypted=True) == ("-L",)
    assert flags(OPENZFS, OPENZFS, ENCRYPTED, into_encrypted=True) == ("-L", "-e", "-w"), "raw keeps it"
    with pytest.raises(E.UsageError, match="embedded data only in raw"):
        flags(OPENZFS, OPENZFS, into_encrypted=True, send=("-e",))


def test_raw_to_a_zfs_without_encryption_is_refused_naming_no_raw() -> None:
    with pytest.raises(E.RawNeedsEncryption) as e:
        flags(OPENZFS, LEGACY, ENCRYPTED)
    assert e.value.exit_code == 4 and "--no-raw" in e.value.hint and "b:tank/dst" in str(e.value)


def test_no_raw_without_the_source_key_is_refused_naming_load_key() -> None:
    with pytest.raises(E.SourceKeyNotLoaded) as e:
        flags(OPENZFS, OPENZFS, LOCKED, raw=False)
    assert "zfs load-key pool/enc" in e.value.hint
    assert flags(OPENZFS, OPENZFS, LOCKED) == ("-L", "-e", "-w"), "raw needs no key"


def test_user_send_options_are_added_once_and_checked_against_both_zfs() -> None:
    assert flags(OPENZFS, OPENZFS, send=("-h", "-L")) == ("-L", "-e", "-h")
    with pytest.raises(E.UsageError, match="receives only plain streams"):
        flags(OPENZFS, LEGACY, send=("-c",))
    with pytest.raises(E.UsageError, match="has no send -c"):
        flags(LEGACY, OPENZFS, send=("-c",))


@pytest.mark.parametrize("given,want", [
    (["-L"], ("-L",)), (["-L -c"], ("-L", "-c")), (["-Lce"], ("-L", "-c", "-e")), (["Lc"], ("-L", "-c")),
    (["--large-block", "--compressed", "-c"], ("-L", "-c")), (["--raw --holds"], ("-w", "-h")),
])
def test_send_options_forms(given: list[str], want: tuple[str, ...]) -> None:
    assert parse_send_options(given) == want


@pytest.mark.parametrize("opt,why", [
    ("-R", "use -r"), ("-p", "--preserve-properties"), ("-I", "incremental base"), ("-t", "token"),
    ("-D", "deprecated"), ("-x", "allowed: -L"), ("--replicate", "allowed: -L"),
])
def test_send_options_that_change_the_stream_are_refused_saying_why(opt: str, why: str) -> None:
    with pytest.raises(E.UsageError) as e:
        parse_send_options([opt])
    assert opt in str(e.value) and why in str(e.value) and e.value.exit_code == 2


def test_recv_options() -> None:
    got = parse_recv_options(["-o compression=zstd", "-x mountpoint", "-oatime=off", "-o 'com.x:note=a b'"])
    assert got == ReceiveProperties((("compression", "zstd"), ("atime", "off"), ("com.x:note", "a b")),
                                    ("mountpoint",))


@pytest.mark.parametrize("opt,why", [
    ("-F", "--rollback"), ("-d", "where the stream lands"), ("-u", "unmounted"), ("-s", "resume tokens"),
    ("-o", "needs NAME=VALUE"), ("-o compression", "NAME=VALUE"), ("-x -F", "not a property name"),
    ("-o 'x'\"", "No closing quotation"), ("--force", "allowed: -o NAME=VALUE, -x NAME"),
])
def test_recv_options_that_change_where_or_how_are_refused(opt: str, why: str) -> None:
    with pytest.raises(E.UsageError) as e:
        parse_recv_options([opt])
    assert why in str(e.value) and e.value.exit_code == 2


def test_set_and_exclude_properties_merge_with_preserved_ones() -> None:
    opts = stream_options(True, [], ["-o atime=off"], ["compression=zstd"], ["com.x:secret"])
    preserved = (("com.x:secret", "1"), ("compression", "lz4"), ("recordsize", "1M"))
    assert opts.receive.merge(preserved) == (("atime", "off"), ("compression", "zstd"), ("recordsize", "1M"))
    with pytest.raises(E.UsageError, match="both set and excluded"):
        stream_options(True, [], [], ["atime=off"], ["atime"])
    with pytest.raises(E.UsageError, match="contradict"):
        stream_options(False, ["-w"], [], [], [])
    with pytest.raises(E.UsageError, match="NAME=VALUE"):
        stream_options(True, [], [], ["atime"], [])


@pytest.mark.parametrize("args,words", [
    (["--send-option", "-R"], "--send-option -R is not allowed"),
    (["--recv-option", "-F"], "--recv-option -F is not allowed"),
    (["--set-property", "nothing"], "write NAME=VALUE"),
    (["--no-raw", "--send-option", "-w"], "contradict"),
])
def test_bad_stream_options_exit_2_with_one_line_before_any_host_is_asked(tmp_path: Path, args: list[str],
                                                                         words: str) -> None:
    # The hosts do not exist: a run that got past the options would fail differently (exit 5).
    res = subprocess.run([sys.executable, "-m", "zchunk", "sync", *args, "--state-dir", str(tmp_path),
                          "nohost.invalid:pool/a", "tank/b"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert words in lines[0] and len(lines) <= 2, res.stderr
    assert not list(tmp_path.iterdir()), "nothing written"


def test_the_agent_builds_zfs_argv_from_named_fields_and_refuses_the_rest() -> None:
    """The agent's own allowlist (zchunk/agent.py zfs_argv), the last line before a zfs command runs."""
    from zchunk import agent

    def argv(send: dict[str, object] | None = None, receive: dict[str, object] | None = None) -> list[str]:
        cfg = {"role": "send", "send": send} if send is not None else {"role": "receive", "receive": receive}
        return agent.zfs_argv(cfg)

    base = {"snapshot": "p/t@s", "base": None}
    assert argv({**base, "flags": ["-L", "-w", "-R"], "exclude": ["p/t/a", "p/t/b"]}) == \
        ["zfs", "send", "-L", "-w", "-R", "-X", "p/t/a,p/t/b", "p/t@s"]
    assert argv(receive={"target": "b/t", "flags": ["-u"], "props": {"atime": "off"}, "excluded": ["mountpoint"]}) \
        == ["zfs", "receive", "-u", "-o", "atime=off", "-x", "mountpoint", "b/t"]
    for bad in ({**base, "flags": ["-p"]}, {**base, "flags": ["-L"], "exclude": ["p/t/a"]},
                {**base, "flags": ["-R"], "exclude": ["p/t/a,p/u"]}, {**base, "flags": ["-R"], "exclude": ["-F"]}):
        with pytest.raises(agent.AgentError):
            argv(bad)
    with pytest.raises(agent.AgentError):
        argv(receive={"target": "b/t", "flags": [], "excluded": ["-o"]})
