"""Streams only current OpenZFS has: send flags (-L -e -c) and encrypted datasets sent raw (-w), with the
key never on the target. Runs in the OpenZFS VM tier (scripts/openzfs-vm), deselected on zfs-fuse by
marker; zchunk/flags.py's choices are unit-tested in tests/test_flags.py."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.test_openzfs import sync_killing_the_receiver
from tests.zc import Zchunk
from tests.zfsutil import add_change, assert_replica, exists, make_source, mountpoint, snapshots, zfs
from zchunk import lab

pytestmark = [pytest.mark.zfs, pytest.mark.openzfs]

MiB = 1 << 20
ZC_SYNC_ARGS = ("--chunk-size", "1M")
QUIET_TARGET = False


@pytest.fixture(autouse=True)
def _openzfs_only(tier: str) -> None:
    assert tier == "openzfs", "select these with -m openzfs inside the OpenZFS VM (scripts/openzfs-vm)"


def prop(name: str, *props: str) -> list[str]:
    return zfs("get", "-H", "-o", "value", ",".join(props), name).split("\n")[:len(props)]


def encrypted_source(pool: lab.Pool, tmp_path: Path, size: int, seed: int, name: str = "enc") -> tuple[str, Path]:
    """pool/name, encrypted with a passphrase in a key file, holding ``size`` bytes and @s1."""
    key = tmp_path / f"{name}.key"
    key.write_text("correct horse battery staple\n")
    ds = f"{pool.name}/{name}"
    zfs("create", "-o", "encryption=on", "-o", "keyformat=passphrase", "-o", f"keylocation=file://{key}",
        "-o", "compression=lz4", ds)
    lab.write_dataset(mountpoint(ds) / "data", size, seed=seed, compressible_fraction=0.3)
    zfs("snapshot", f"{ds}@s1")
    return ds, key


def open_replica(dst: str, key: Path) -> None:
    """For the test's own look at the data, after zchunk is done: the key zchunk never had."""
    zfs("load-key", "-L", f"file://{key}", dst)


def test_openzfs_hosts_send_large_blocks_whole_and_blocks_as_stored_when_asked(zc: Zchunk, pools: Any) -> None:
    src_pool, dst_pool = pools
    src = f"{src_pool.name}/big"
    zfs("create", "-o", "recordsize=1M", "-o", "compression=lz4", src)
    lab.write_dataset(mountpoint(src) / "data", 12 * MiB, seed=81, compressible_fraction=0.6)
    zfs("snapshot", f"{src}@s1")
    dst = f"{dst_pool.name}/big"
    run = zc.run("sync", src, dst, "--no-sync-snap", "--recv-option", "-o com.example:note=replica",
                 "--set-property", "atime=off")
    assert run.returncode == 0, run.explain()
    assert run.of("dataset_plan")[0]["send_flags"] == ["-L", "-e"]
    assert_replica(src, dst, "s1")
    assert prop(dst, "com.example:note", "atime") == ["replica", "off"]
    large = subprocess.run(["zpool", "get", "-H", "-o", "value", "feature@large_blocks", dst_pool.name],
                           capture_output=True, text=True).stdout.strip()
    assert large == "active", "-L: the 1M blocks arrived whole (without it they are split to 128K)"
    add_change(src, 3 * MiB, seed=82, snap="s2")  # once -L, always -L: the incremental must carry it too
    run = zc.run("sync", src, dst, "--no-sync-snap")
    assert run.returncode == 0, run.explain()
    assert_replica(src, dst, "s2")
    # -c when asked: the lz4 blocks as stored, a smaller stream (zchunk's chunks still compress it further)
    run = zc.run("sync", src, f"{dst_pool.name}/asis", "--no-sync-snap", "--send-option", "-c")
    assert run.returncode == 0, run.explain()
    assert run.of("dataset_plan")[0]["send_flags"] == ["-L", "-e", "-c"]
    stream = run.result()["transfer"]["raw_bytes"]
    logical = int(zfs("get", "-H", "-p", "-o", "value", "logicalreferenced", f"{src}@s2"))
    assert stream < 0.75 * logical, f"-c sends the blocks as stored (lz4): {stream} of {logical} logical bytes"
    assert_replica(src, f"{dst_pool.name}/asis", "s2")


def test_encrypted_source_is_replicated_raw_and_the_key_never_reaches_the_target(
        zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src, key = encrypted_source(src_pool, tmp_path, 6 * MiB, seed=83)
    dst = f"{dst_pool.name}/enc"
    run = zc.run("sync", src, dst, "--identifier", "e", "--preserve-properties")
    assert run.returncode == 0, run.explain()
    plan = run.of("dataset_plan")[0]
    assert "-w" in plan["send_flags"] and plan["encryption"].startswith("raw"), plan
    assert "keylocation" in run.of("properties_skipped")[0]["properties"]
    assert prop(dst, "encryption", "keystatus", "encryptionroot") == ["aes-256-gcm", "unavailable", dst]
    assert prop(dst, "keylocation") != [f"file://{key}"], "key properties are never copied"
    add_change(src, 2 * MiB, seed=84, snap="s2")
    run = zc.run("sync", src, dst, "--identifier", "e")
    assert run.returncode == 0, run.explain()
    assert prop(dst, "keystatus") == ["unavailable"], "an incremental raw receive needs no key either"
    # --no-raw onto the raw replica would need its key on the target: refused before anything is done
    before = snapshots(src)
    refused = zc.run("sync", src, dst, "--identifier", "e", "--no-raw")
    assert refused.returncode == 4, refused.explain()
    assert "zfs load-key" in refused.error()["hint"] and snapshots(src) == before, "no sync snapshot left"
    open_replica(dst, key)
    assert_replica(src, dst, "s2")


def test_an_interrupted_raw_receive_resumes_from_its_token(zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src, key = encrypted_source(src_pool, tmp_path, 24 * MiB, seed=85)
    dst = f"{dst_pool.name}/enc"
    run = sync_killing_the_receiver(zc, src, dst)
    assert run.returncode == 0, run.explain()
    assert run.of("resume_token"), "the raw stream went on from the token (openzfs #10234 territory)"
    assert prop(dst, "keystatus") == ["unavailable"]
    open_replica(dst, key)
    assert_replica(src, dst, "s1")


def test_no_raw_sends_decrypted_and_only_with_the_key_loaded(zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src, key = encrypted_source(src_pool, tmp_path, 3 * MiB, seed=86)
    zfs("unmount", src)
    zfs("unload-key", src)
    before = snapshots(src)
    refused = zc.run("sync", src, f"{dst_pool.name}/plain", "--no-raw")
    assert refused.returncode == 4 and f"zfs load-key {src}" in refused.error()["hint"], refused.explain()
    assert snapshots(src) == before and not exists(f"{dst_pool.name}/plain"), "nothing changed"
    zfs("load-key", src)
    run = zc.run("sync", src, f"{dst_pool.name}/plain", "--no-raw")
    assert run.returncode == 0, run.explain()
    assert "-w" not in run.of("dataset_plan")[0]["send_flags"]
    assert "not encrypted" in run.of("dataset_plan")[0]["encryption"]
    assert prop(f"{dst_pool.name}/plain", "encryption") == ["off"]


def test_an_unencrypted_source_lands_encrypted_under_an_encrypted_target_parent(
        zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 2 * MiB, seed=87)
    vault, key = encrypted_source(dst_pool, tmp_path, MiB, seed=88, name="vault")
    zfs("unmount", vault)
    zfs("unload-key", vault)
    dst = f"{vault}/r"
    refused = zc.run("sync", src, dst)
    assert refused.returncode == 4 and f"zfs load-key {vault}" in refused.error()["hint"], refused.explain()
    assert not [s for s in snapshots(src) if "@zchunk_" in s], "a refused run leaves no sync snapshot"
    zfs("load-key", vault)
    run = zc.run("sync", src, dst)
    assert run.returncode == 0, run.explain()
    assert f"under {vault}'s key" in run.of("dataset_plan")[0]["encryption"]
    assert prop(dst, "encryptionroot") == [vault]
    assert_replica(src, dst, "s1")



def test_a_recursive_encrypted_tree_keeps_its_encryption_roots(zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    root, key = encrypted_source(src_pool, tmp_path, MiB, seed=89, name="t")
    for child in ("a", "a/deep", "skipme"):
        zfs("create", f"{root}/{child}")
    zfs("create", "-o", "encryption=on", "-o", "keyformat=passphrase", "-o", f"keylocation=file://{key}",
        f"{root}/own")
    zfs("set", f"mountpoint={src_pool.mountpoint}/elsewhere", f"{root}/a")
    for n, child in enumerate(("a", "a/deep", "own", "skipme")):
        lab.write_dataset(mountpoint(f"{root}/{child}") / "f", 256 << 10, seed=90 + n)
    dst = f"{dst_pool.name}/t"
    run = zc.run("sync", "-r", root, dst, "--identifier", "tr", "--exclude", "skipme$")
    assert run.returncode == 0, run.explain()
    plan = run.of("dataset_plan")[0]
    assert "-R" in plan["send_flags"] and "keeps their encryption roots" in plan["steps"][0], plan
    want = {dst: dst, f"{dst}/a": dst, f"{dst}/a/deep": dst, f"{dst}/own": f"{dst}/own"}
    got = {name: prop(name, "encryptionroot")[0] for name in want}
    assert got == want, "each inherits from the same encryption root as on the source"
    assert all(prop(name, "keystatus") == ["unavailable"] for name in want), "no key on the target"
    assert prop(dst, "keylocation") == ["prompt"] and prop(f"{dst}/own", "keylocation") == ["prompt"]
    assert zfs("get", "-H", "-o", "source", "mountpoint", f"{dst}/a").strip() != "local", "not copied"
    assert not exists(f"{dst}/skipme") and not [s for s in snapshots(f"{root}/skipme") if "zchunk_" in s]
    ours = [s for s in snapshots(root) if "@zchunk_tr_" in s][-1].split("@")[1]
    assert prop(f"{root}/a/deep@{ours}", "userrefs") == ["1"] and prop(f"{dst}/a/deep@{ours}", "userrefs") == ["1"]
    for child in ("a", "a/deep"):  # later runs: each dataset incrementally, raw, which keeps the roots
        add_change(f"{root}/{child}", 128 << 10, seed=95, snap="s2")
    run = zc.run("sync", "-r", root, dst, "--identifier", "tr", "--exclude", "skipme$")
    assert run.returncode == 0, run.explain()
    assert {name: prop(name, "encryptionroot")[0] for name in want} == want
    open_replica(dst, key)
    open_replica(f"{dst}/own", key)
    for child in ("", "/a", "/a/deep", "/own"):  # each dataset's own sync snapshot of the second run
        newest = [s for s in snapshots(root + child) if "@zchunk_tr_" in s][-1].split("@")[1]
        assert newest != ours
        assert_replica(root + child, dst + child, newest)


def test_doctor_says_where_a_key_is_needed(zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    """zchunk doctor's encryption check (zfs-fuse has no encryption: this runs in the VM only)."""
    src_pool, dst_pool = pools
    src, _ = encrypted_source(src_pool, tmp_path, MiB, seed=89)

    def encryption(*args: str) -> tuple[int, str, str, str]:
        run = zc.run("doctor", *args)
        found = [e for e in run.of("doctor") if e["check"] == "encryption"]
        assert len(found) == 1, run.explain()
        return run.returncode, found[0]["status"], found[0]["evidence"], found[0]["fix"]

    code, status, evidence, _ = encryption(src, f"{dst_pool.name}/enc")
    assert (code, status) == (0, "PASS") and "sent raw, the target never needs its key" in evidence
    zfs("unmount", src)
    zfs("unload-key", src)
    code, status, evidence, fix = encryption(src, f"{dst_pool.name}/enc", "--no-raw")
    assert (code, status) == (2, "FAIL") and "not loaded" in evidence and fix.startswith(f"zfs load-key {src}")
    # an unencrypted source under an encrypted target parent whose key is not loaded
    plain = make_source(src_pool, MiB, seed=90, name="plain")
    vault, _ = encrypted_source(dst_pool, tmp_path, MiB, seed=91, name="vault")
    zfs("unmount", vault)
    zfs("unload-key", vault)
    code, status, evidence, fix = encryption(plain, f"{vault}/plain")
    assert (code, status) == (2, "FAIL") and f"under {vault}" in evidence and f"zfs load-key {vault}" in fix
