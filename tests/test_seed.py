"""zchunk seed export / import on real zfs-fuse pools: the seed's volumes carried as directories, imported
in any order (staged until complete), every chunk verified before zfs receive sees it, an interrupted
export finished without rewriting its chunks, and zchunk sync continuing incrementally from the seed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.spoolfs import Tmpfs
from tests.zc import Zchunk
from tests.zfsutil import add_change, assert_replica, destroy_when_free, exists, make_source, mounted, snapshots, zfs
from zchunk import lab

pytestmark = [pytest.mark.zfs]

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


def prop(name: str, p: str) -> str:
    return zfs("get", "-H", "-p", "-o", "value", p, name).strip()


def done_seed(out: Path) -> str:
    return str(json.loads((out / "export.json").read_text())["seed"])


def export(zc: Zchunk, src: str, out: Path, *extra: str) -> Any:
    return zc.run("seed", "export", src, str(out), "--chunk-size", "1M", *extra)


def test_export_import_then_sync_continues_incrementally(zc: Zchunk, pools: Any, tmp_path: Path,
                                                         tier: str) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 6 * MiB, seed=31, name="big", compressible=0.5)
    out = tmp_path / "disk"
    run = export(zc, src, out, "--volume-size", "3M")
    assert run.returncode == 0, run.explain()
    done = run.of("seed_exported")[0]
    seed_snap = done["snapshot"]
    assert seed_snap.startswith(f"{src}@zchunk_seed_") and done["volumes"] >= 2, done
    assert prop(seed_snap, "userrefs") == "1", "held until the target has it"
    assert prop(seed_snap, "zchunk:seed") == done_seed(out), "marked for the sync that will let it go"
    vols = sorted(p.name for p in out.iterdir() if p.name.startswith("vol"))
    assert vols == [f"vol{n:03d}" for n in range(1, done["volumes"] + 1)]
    for v in vols:
        m = json.loads((out / v / "manifest.json").read_text())
        assert m["guid"] == int(prop(seed_snap, "guid")) and m["volumes"] == done["volumes"]
        size = sum(f.stat().st_size for f in (out / v / "chunks").iterdir())
        assert size <= 3 * MiB, f"{v}: {size} bytes"
        assert [c[0] for c in m["chunks"]] == sorted(int(f.name.split(".")[0]) for f in (out / v / "chunks").iterdir())
    assert m["total"]["chunks"] == done["chunks"] and m["total"]["raw_bytes"] == done["raw_bytes"]

    dst = f"{dst_pool.name}/big"
    imp = zc.run("seed", "import", str(out), dst, "--staging-dir", str(tmp_path / "staging"))
    assert imp.returncode == 0, imp.explain()
    short = seed_snap.split("@")[1]
    assert_replica(src, dst, short)
    assert prop(dst, "mounted") == "no", "left as zchunk sync leaves one"
    if tier != "openzfs":  # no receive -u: kept from mounting
        assert prop(dst, "canmount") == "noauto"
    again = zc.run("seed", "import", str(out), dst, "--staging-dir", str(tmp_path / "staging"))
    assert again.returncode == 0 and again.of("seed_imported")[0]["chunks"] == 0, "imported already: nothing"

    add_change(src, MiB, seed=36, snap="s2")
    sync = zc.run("sync", src, dst)
    assert sync.returncode == 0, sync.explain()
    assert [e["send_kind"] for e in sync.of("plan")] == ["incremental"], sync.explain()
    assert prop(seed_snap, "userrefs") == "0", "the seed's hold let go once the target has its snapshot"
    assert prop(seed_snap, "zchunk:seed") == "-"
    destroy_when_free(seed_snap)  # no longer held by the seed: the admin may prune it
    assert_replica(src, dst, snapshots(src)[-1].split("@")[1])


def test_volumes_in_reverse_order_are_staged_until_the_set_is_complete(zc: Zchunk, pools: Any,
                                                                        tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 5 * MiB, seed=32, name="vols", compressible=0.0)
    out = tmp_path / "export"
    run = export(zc, src, out, "--volume-size", "2M")
    assert run.returncode == 0, run.explain()
    count = run.of("seed_exported")[0]["volumes"]
    assert count >= 3
    disks = []
    for n in range(1, count + 1):  # each volume on its own "disk"
        disk = tmp_path / f"disk{n}"
        disk.mkdir()
        shutil.move(str(out / f"vol{n:03d}"), disk / f"vol{n:03d}")
        disks.append(disk)
    dst = f"{dst_pool.name}/vols"
    staging = ("--staging-dir", str(tmp_path / "staging"))
    need_all_but_last = ", ".join(str(n) for n in range(1, count))
    last = zc.run("seed", "import", str(disks[-1]), dst, *staging)
    assert last.returncode == 19 and last.error()["error"] == "SeedIncomplete", last.explain()
    assert f"volume(s) {need_all_but_last} of {count}" in last.error()["message"]
    assert not exists(dst), "nothing reached zfs receive"
    for disk in reversed(disks[1:-1]):
        mid = zc.run("seed", "import", str(disk), dst, *staging)
        assert mid.returncode == 19 and not exists(dst), mid.explain()
    assert "volume(s) 1 of" in mid.error()["message"]
    first = zc.run("seed", "import", str(disks[0]), dst, *staging)
    assert first.returncode == 0, first.explain()
    assert_replica(src, dst, run.of("seed_exported")[0]["snapshot"].split("@")[1])
    assert not any((tmp_path / "staging").iterdir()), "the staged chunks are removed once received"


def test_a_damaged_chunk_stops_the_import_before_zfs_sees_it_and_is_repaired_from_the_source(
        zc: Zchunk, pools: Any, tmp_path: Path, sshd_local: lab.Sshd) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 4 * MiB, seed=33, name="bad", compressible=0.3)
    out = tmp_path / "disk"
    assert export(zc, src, out, "--volume-size", "2M").returncode == 0
    victim = sorted((out / "vol002" / "chunks").iterdir())[0]
    seq = int(victim.name.split(".")[0])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    dst = f"{dst_pool.name}/bad"
    run = zc.run("seed", "import", str(out), dst, "--staging-dir", str(tmp_path / "staging"))
    assert run.returncode == 13, run.explain()
    assert f"chunk {seq} of volume 2" in run.error()["message"] and "damaged" in run.error()["message"]
    assert not exists(dst), "the partial receive is not left behind"
    victim.unlink()
    gone = zc.run("seed", "import", str(out), dst, "--staging-dir", str(tmp_path / "staging"))
    assert gone.returncode == 13 and f"chunk {seq} of volume 2" in gone.error()["message"] \
        and "missing" in gone.error()["message"], gone.explain()
    assert not exists(dst)

    # a chunk of volume 1 damaged too; both regenerated on the source (over SSH) from the seed's snapshot
    other = sorted((out / "vol001" / "chunks").iterdir())[1]
    other.write_bytes(other.read_bytes()[:-10])
    snap = json.loads((out / "vol001" / "manifest.json").read_text())["snapshot"]
    ssh = ("--ssh-config", str(sshd_local.ssh_config))
    renamed = f"{src}@moved"
    zfs("rename", snap, renamed)  # the snapshot the seed was made from is not on the source: refused
    wrong = zc.run("seed", "import", str(out), dst, "--staging-dir", str(tmp_path / "staging"),
                   "--repair-from", f"local:{src}", *ssh)
    assert wrong.returncode == 13 and "is gone" in wrong.error()["message"], wrong.explain()
    assert not exists(dst)
    zfs("rename", renamed, snap)
    repaired = zc.run("seed", "import", str(out), dst, "--staging-dir", str(tmp_path / "staging"),
                      "--repair-from", f"local:{src}", *ssh)
    assert repaired.returncode == 0, repaired.explain()
    notes = [e["detail"] for e in repaired.of("note")]
    assert sum(n.startswith("repaired chunk") for n in notes) == 2, notes
    assert any(n.startswith(f"repaired chunk {seq} of volume 2 from local:") for n in notes), notes
    assert_replica(src, dst, snap.split("@")[1])


def test_an_interrupted_export_keeps_its_chunks(zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 32 * MiB, seed=34, name="slow", compressible=0.0)
    out = tmp_path / "disk"
    argv = [sys.executable, "-m", "zchunk", "seed", "export", src, str(out), "--chunk-size", "1M",
            "--snapshot", "s1", "--json"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        # Looked at while it is stopped, let run 5 ms at a time: on a fast machine the whole export takes
        # less than one look of an ordinary poll, and this test is about a crash in the middle of it.
        log, deadline = out / "export.log", time.monotonic() + 60
        while not (log.exists() and len(log.read_text().splitlines()) >= 6):
            assert time.monotonic() < deadline, "timed out waiting for six chunks exported"
            assert proc.poll() is None, "the export ended before six chunks were seen"
            os.killpg(proc.pid, signal.SIGCONT)
            time.sleep(0.005)
            os.killpg(proc.pid, signal.SIGSTOP)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # zchunk and its zfs send, as a crash would
        proc.wait()
    assert not (out / "export.json").read_text().count('"complete": true')
    kept = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in (out / "vol001" / "chunks").glob("*.chunk")}
    assert len(kept) >= 6
    time.sleep(0.05)
    run = zc.run("seed", "export", src, str(out), "--chunk-size", "1M", "--snapshot", "s1")
    assert run.returncode == 0, run.explain()
    done = run.of("seed_exported")[0]
    assert done["reused"] >= 6 and done["chunks"] > done["reused"], done
    for f, stat in kept.items():
        if f.exists() and int(f.name.split(".")[0]) < done["reused"]:
            assert (f.stat().st_ino, f.stat().st_mtime_ns) == stat, f"{f.name} was written again"
    dst = f"{dst_pool.name}/slow"
    imp = zc.run("seed", "import", str(out), dst, "--staging-dir", str(tmp_path / "staging"))
    assert imp.returncode == 0, imp.explain()
    assert_replica(src, dst, "s1")
    with mounted(dst) as files:
        assert sum(f.stat().st_size for f in (files / "data").rglob("*") if f.is_file()) >= 32 * MiB


def test_a_full_export_disk_is_one_clear_error_and_the_export_goes_on_in_a_copy(zc: Zchunk, pools: Any,
                                                                                  tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, 12 * MiB, seed=36, name="big", compressible=0.0)
    before = snapshots(src)
    with Tmpfs(tmp_path / "tiny", MiB) as tiny:  # not even one chunk: refused before any snapshot is taken
        run = zc.run("seed", "export", src, str(tiny.path / "seed"), "--chunk-size", "1M")
        assert run.returncode == 20 and run.error()["error"] == "SeedDiskFull", run.explain()
        assert "less than one chunk" in run.error()["message"]
        assert snapshots(src) == before and not (tiny.path / "seed").exists()
    with Tmpfs(tmp_path / "small", 6 * MiB) as small:
        out = small.path / "seed"
        run = zc.run("seed", "export", src, str(out), "--chunk-size", "1M", "--snapshot", "s1")
        assert run.returncode == 20 and run.error()["error"] == "SeedDiskFull", run.explain()
        error = [line for line in run.stderr.splitlines() if line.startswith("zchunk: error:")]
        assert len(error) == 1 and str(out) in error[0] and "No space left on device after " in error[0], run.stderr
        assert "copy" in run.error()["hint"]
        written = len((out / "export.log").read_text().splitlines())
        assert written >= 3 and not list(out.rglob("*.tmp")), "whole chunks kept, no half-written one"
        copy = tmp_path / "bigger"
        shutil.copytree(out, copy)
    run = zc.run("seed", "export", src, str(copy), "--chunk-size", "1M", "--snapshot", "s1")
    assert run.returncode == 0, run.explain()
    assert run.of("seed_exported")[0]["reused"] == written
    dst = f"{dst_pool.name}/big"
    imp = zc.run("seed", "import", str(copy), dst, "--staging-dir", str(tmp_path / "staging"))
    assert imp.returncode == 0, imp.explain()
    assert_replica(src, dst, "s1")


def test_bad_input_changes_nothing(zc: Zchunk, pools: Any, tmp_path: Path) -> None:
    src_pool, dst_pool = pools
    src = make_source(src_pool, MiB, seed=35, name="in")
    before = snapshots(src)
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    for args, code, words in (
            ((src, str(full)), 2, "not empty"),
            ((f"{src_pool.name}/nosuch", str(tmp_path / "a")), 3, "nosuch"),
            ((src, str(tmp_path / "b"), "--snapshot", "nosuch"), 3, "nosuch"),
            (("host:" + src, str(tmp_path / "c")), 2, "run it on the source host"),
            ((src, str(tmp_path / "d"), "--volume-size", "1M"), 2, "--volume-size")):
        run = zc.run("seed", "export", *args, "--chunk-size", "1M")
        assert run.returncode == code and words in run.error()["message"], (args, run.explain())
    assert snapshots(src) == before, "no seed snapshot taken"
    assert export(zc, src, tmp_path / "ok").returncode == 0
    zfs("create", f"{dst_pool.name}/taken")
    taken = zc.run("seed", "import", str(tmp_path / "ok"), f"{dst_pool.name}/taken")
    assert taken.returncode == 2 and "exists" in taken.error()["message"], taken.explain()
    nowhere = zc.run("seed", "import", str(tmp_path / "ok"), f"{dst_pool.name}/no/parent")
    assert nowhere.returncode == 3, nowhere.explain()
    empty = zc.run("seed", "import", str(full), f"{dst_pool.name}/x")
    assert empty.returncode == 2 and "no seed volume" in empty.error()["message"], empty.explain()
    assert snapshots(f"{dst_pool.name}/taken") == [] and not exists(f"{dst_pool.name}/x")
