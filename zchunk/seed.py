"""``zchunk seed``: the first, full copy of a dataset carried on disks instead of the link.

``export`` runs where the disk is attached to the source host: it takes a seed snapshot (or uses
``--snapshot``), holds it (tag ``zchunk_seed``) so that it stays until the target has it, and writes its
``zfs send`` stream into DIR as chunk files of the documented chunk format (docs/chunk-format.md), split
into volumes (``vol001/``, ``vol002/``, ... of at most ``--volume-size`` each, one per disk), each with the
manifest of its chunks. It is resumable: ``export.json`` holds the parameters and ``export.log`` one line
per chunk written; run again, it sends the same snapshot again, checks each regenerated chunk's raw
checksum against the recorded one and writes only what is missing (a stream that differs from the
recorded one from some chunk on is written anew from there).

``import`` runs where the disk is attached to the target host: it reads the volumes' manifests from the
directories given (in any order), and when every volume is present feeds the stream to ``zfs receive``,
each chunk verified (its framing, its checksums, and the manifest's checksums for it) before any of its
bytes reach zfs; then it checks the whole-stream checksum and the snapshot's guid. A volume set that is
not complete yet is staged: the present volumes' chunks, verified, are copied to the staging directory
(nothing reaches zfs), and the import says which volumes it still needs and exits (or, with ``wait``,
waits for them to be mounted); the next run continues from what was staged. A damaged or missing chunk
stops the import before zfs sees it (exit 13, naming the chunk and its volume); on a zfs without resume
tokens nothing of the partial receive is left.

The replica is left as ``zchunk sync`` leaves one: unmounted (``receive -u``; on zfs-fuse unmounted and
``canmount=noauto``), so that ``zchunk sync SOURCE TARGET`` continues incrementally from the seed snapshot,
and releases the seed's hold on the source once the target has the snapshot.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import agent as A
from . import errors as E
from .plan import sync_snapshot_name
from .progress import human_bytes
from .transport import Host, LocalHost
from .zfs import SEED_PROPERTY, Zfs

FORMAT = "zchunk-seed"
VERSION = 1
HOLD_TAG = "zchunk_seed"
IDENTIFIER = "seed"  # the seed snapshot is zchunk_seed_<host>_<time>
DEFAULT_CHUNK = 32 << 20
Say = Callable[[str], None]


@dataclass(frozen=True)
class ChunkEntry:
    seq: int
    volume: int
    raw_len: int
    stored_len: int
    raw_hash: str
    stored_hash: str

    def line(self) -> str:
        return f"{self.seq} {self.volume} {self.raw_len} {self.stored_len} {self.raw_hash} {self.stored_hash}\n"

    @classmethod
    def parse(cls, line: str) -> ChunkEntry:
        seq, vol, raw, stored, rh, sh = line.split()
        return cls(int(seq), int(vol), int(raw), int(stored), rh, sh)

    @property
    def file_size(self) -> int:
        return A.CHUNK_HEADER_SIZE + self.stored_len


def volume_dir(out: Path, n: int) -> Path:
    return out / f"vol{n:03d}"


def chunk_file(vol: Path, seq: int) -> Path:
    return vol / "chunks" / f"{A.chunk_name(seq)}.chunk"


@dataclass
class ExportResult:
    snapshot: str
    guid: int
    chunks: int
    raw_bytes: int
    stored_bytes: int
    volumes: int
    reused: int  # chunks kept from an interrupted export
    seconds: float


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _local_zfs() -> Zfs:
    return Zfs(LocalHost())


def _codec() -> tuple[int, str, int, str]:
    codec = ("zstd", A.CODEC_ZSTD) if A.zstandard is not None else ("zlib", A.CODEC_ZLIB)
    check = ("xxh3-128", A.HASH_XXH3) if A.xxhash is not None else ("blake2b-128", A.HASH_BLAKE2B)
    return codec[1], codec[0], check[1], check[0]


async def export(source: str, out: Path, snapshot: str | None, volume_size: int | None, chunk_size: int,
                 say: Say) -> ExportResult:
    """Write (or finish writing) the seed of ``source`` into ``out``. See the module's docstring."""
    started = time.monotonic()
    zfs = _local_zfs()
    ds = await zfs.require(source)
    state_path = out / "export.json"
    state = _read_json(state_path) if state_path.exists() else None
    if state is not None:
        if state.get("source") != source:
            raise E.UsageError(reason=f"{out} holds the seed of {state.get('source')}, not of {source}: "
                               "export into an empty directory")
        snap = next((s for s in ds.snapshots if s.name == state["snapshot"]), None)
        if snap is None or snap.guid != int(state["guid"]):
            raise E.UsageError(reason=f"{state['snapshot']}, the snapshot this export was started from, is gone "
                               f"or replaced on {source}: start again in an empty directory")
        if state.get("complete"):
            say(f"{out}: the seed of {snap.name} is complete already")
    else:
        if out.exists() and any(out.iterdir()):
            raise E.UsageError(reason=f"{out} is not empty and holds no zchunk seed export: give an empty or "
                               "new directory")
        free = _free_bytes(out)
        if free < chunk_size + (1 << 20):  # a chunk, the manifests, the journal: before any snapshot is taken
            raise E.SeedDiskFull(dir=str(out), why=f"{human_bytes(free)} free, less than one chunk "
                                 f"({human_bytes(chunk_size)}) and its records")
        if snapshot is not None:
            full = snapshot if "@" in snapshot else f"{source}@{snapshot}"
            snap = next((s for s in ds.snapshots if s.name == full), None)
            if snap is None:
                raise E.NoSnapshot(host="localhost", dataset=full)
        else:
            full = f"{source}@{sync_snapshot_name(IDENTIFIER, socket.gethostname(), time.time())}"
            await zfs.snapshot(full)
            say(f"took seed snapshot {full}")
            snap = (await zfs.require(source)).newest
            assert snap is not None and snap.name == full
        codec, codec_name, check, check_name = _codec()
        enc = await zfs.encryption(source)
        state = {"format": FORMAT, "version": VERSION, "seed": f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-"
                 f"{secrets.token_hex(4)}", "source": source, "host": socket.gethostname(), "snapshot": snap.name,
                 "guid": snap.guid, "send_flags": ["-w"] if enc.on else [], "chunk_size": chunk_size,
                 "codec": codec_name, "checksum": check_name, "volume_size": volume_size, "complete": False}
        with _disk_full(out, []):
            _private_dir(out)
            A.write_json(str(state_path), state)
    if await zfs.holds_supported(snap.name):
        await zfs.hold(HOLD_TAG, snap.name)
    await zfs.set(snap.name, SEED_PROPERTY, str(state["seed"]))  # the first sync that finds it there lets it go
    entries = _journal(out)
    reused = len(entries)
    if not state.get("complete"):
        with _disk_full(out, entries):
            result = _write_stream(out, state, entries, say)
            state.update(complete=True, total=result)
            _write_manifests(out, state, entries)
            A.write_json(str(state_path), state)
    total = state["total"]
    return ExportResult(snap.name, snap.guid, total["chunks"], total["raw_bytes"],
                        sum(e.stored_len + A.CHUNK_HEADER_SIZE for e in entries), max(e.volume for e in entries),
                        min(reused, total["chunks"]), time.monotonic() - started)


def _free_bytes(out: Path) -> int:
    """Room for unprivileged writes on the filesystem of ``out`` (or of its nearest existing parent)."""
    path = out
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@contextmanager
def _disk_full(out: Path, entries: list[ChunkEntry]) -> Iterator[None]:
    """A full disk under the export is its own error, saying how far the export got (it is kept)."""
    try:
        yield
    except OSError as e:
        if e.errno not in A.NO_SPACE:
            raise
        size = sum(entry.file_size for entry in entries)
        raise E.SeedDiskFull(dir=str(out), why=f"{os.strerror(e.errno)} after {len(entries)} chunk(s), "
                             f"{human_bytes(size)} of the seed written") from None


def _journal(out: Path) -> list[ChunkEntry]:
    """The chunks an earlier (interrupted) export wrote, in order, as far as their files are whole."""
    path = out / "export.log"
    entries: list[ChunkEntry] = []
    if not path.exists():
        return entries
    for line in path.read_text().splitlines():
        try:
            entry = ChunkEntry.parse(line)
        except ValueError:
            break  # a line cut by the crash: the chunks from here are written again
        f = chunk_file(volume_dir(out, entry.volume), entry.seq)
        if entry.seq != len(entries) or not f.is_file() or f.stat().st_size != entry.file_size:
            break
        entries.append(entry)
    return entries


def _write_stream(out: Path, state: dict[str, Any], entries: list[ChunkEntry], say: Say) -> dict[str, Any]:
    """Run zfs send and write the chunks ``entries`` does not have yet; ``entries`` ends complete."""
    codec, check = A.CODEC_IDS[state["codec"]], A.HASH_IDS[state["checksum"]]
    chunk_size, volume_size = int(state["chunk_size"]), state.get("volume_size")
    argv = ["zfs", "send", *state["send_flags"], state["snapshot"]]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    stream = A.new_hasher(check)
    raw_total, seq = 0, 0
    kept = len(entries)
    if kept:
        say(f"resuming: {kept} chunk(s) already written; zfs send of {state['snapshot']} again, each chunk "
            "checked against the recorded one")
    journal = open(out / "export.log", "a" if kept else "w")
    try:
        vol, vol_bytes = _last_volume(entries)
        while True:
            raw = A.read_up_to(proc.stdout, chunk_size)
            if not raw:
                break
            stream.update(raw)
            raw_total += len(raw)
            if seq < len(entries):
                if A.digest(check, raw).hex() == entries[seq].raw_hash:
                    seq += 1
                    continue
                say(f"chunk {seq}: zfs send gave other bytes than the interrupted export: writing anew from it")
                del entries[seq:]
                journal.close()
                (out / "export.log").write_text("".join(e.line() for e in entries))
                journal = open(out / "export.log", "a")
                vol, vol_bytes = _last_volume(entries)
            blob = A.encode_chunk(seq, raw, codec, 3, check)
            if volume_size and vol_bytes and vol_bytes + len(blob) > volume_size:
                vol, vol_bytes = vol + 1, 0
            f = chunk_file(volume_dir(out, vol), seq)
            _private_dir(f.parent)
            A.write_atomic(str(f), blob)  # durable: the disk is carried away
            hdr = A.ChunkHeader.unpack(blob[:A.CHUNK_HEADER_SIZE])
            entry = ChunkEntry(seq, vol, hdr.raw_len, hdr.stored_len, hdr.raw_hash.hex(), hdr.stored_hash.hex())
            journal.write(entry.line())
            journal.flush()
            entries.append(entry)
            vol_bytes += len(blob)
            seq += 1
            if seq % 8 == 0:
                say(f"exported {seq} chunks, {raw_total >> 20} MiB of the stream")
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise E.ZfsSendFailed(host="localhost", status=proc.returncode, stderr=err.strip()[:2000])
    finally:
        journal.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if seq < len(entries):  # the recorded export was longer than this stream: impossible for one snapshot
        raise E.IntegrityError(reason=f"zfs send of {state['snapshot']} ended after {seq} chunks; the "
                               f"interrupted export recorded {len(entries)}: start again in an empty directory")
    return {"chunks": seq, "raw_bytes": raw_total, "stream_hash": stream.hexdigest()}


def _last_volume(entries: list[ChunkEntry]) -> tuple[int, int]:
    """The volume the next chunk goes to (until it is full) and the bytes it holds so far."""
    if not entries:
        return 1, 0
    vol = entries[-1].volume
    return vol, sum(e.file_size for e in entries if e.volume == vol)


def _write_manifests(out: Path, state: dict[str, Any], entries: list[ChunkEntry]) -> None:
    count = max(e.volume for e in entries) if entries else 1
    for n in range(1, count + 1):
        mine = [e for e in entries if e.volume == n]
        manifest = {k: state[k] for k in ("format", "version", "seed", "source", "host", "snapshot", "guid",
                                           "send_flags", "chunk_size", "codec", "checksum", "total")}
        manifest.update(volume=n, volumes=count, first_seq=mine[0].seq if mine else None,
                        chunks=[[e.seq, e.raw_len, e.stored_len, e.raw_hash, e.stored_hash] for e in mine])
        vol = volume_dir(out, n)
        _private_dir(vol)
        A.write_json(str(vol / "manifest.json"), manifest)


def _read_json(path: Path) -> dict[str, Any]:
    data = A.read_json(str(path))
    if not isinstance(data, dict):
        raise E.UsageError(reason=f"{path}: not a zchunk seed file")
    return data


# ---------------------------------------------------------------------------------------------- import


@dataclass
class Volume:
    path: Path
    manifest: dict[str, Any]

    @property
    def number(self) -> int:
        return int(self.manifest["volume"])

    def entries(self) -> list[ChunkEntry]:
        return [ChunkEntry(int(c[0]), self.number, int(c[1]), int(c[2]), str(c[3]), str(c[4]))
                for c in self.manifest["chunks"]]


@dataclass
class ImportResult:
    snapshot: str
    guid: int
    chunks: int
    raw_bytes: int
    seconds: float
    done: bool = False


def find_volumes(dirs: list[Path]) -> list[Volume]:
    """The volumes in ``dirs`` (each a volume directory, or a directory holding vol* ones)."""
    found: list[Volume] = []
    for d in dirs:
        candidates = [d] if (d / "manifest.json").is_file() else sorted(d.glob("vol*/"))
        for v in candidates:
            if not (v / "manifest.json").is_file():
                continue
            m = _read_json(v / "manifest.json")
            if m.get("format") != FORMAT or m.get("version") != VERSION:
                raise E.UsageError(reason=f"{v / 'manifest.json'}: not a zchunk seed volume of version {VERSION}")
            found.append(Volume(v, m))
    return found


class _Staging:
    """Verified chunks of volumes present before their turn, kept until the set is complete."""

    def __init__(self, base: Path, seed: str) -> None:
        self.dir = base / f"seed-{seed}"
        self.record = self.dir / "staged.json"

    def volumes(self) -> dict[int, dict[str, Any]]:
        data = A.read_json(str(self.record)) if self.record.exists() else None
        return {int(k): v for k, v in (data or {}).get("volumes", {}).items()}

    def add(self, vol: Volume, say: Say) -> None:
        _private_dir(self.dir / "chunks")
        for entry in vol.entries():
            dest = chunk_file(self.dir, entry.seq)
            if dest.is_file() and dest.stat().st_size == entry.file_size:
                continue
            _verified(vol, entry)
            tmp = dest.with_suffix(".tmp")
            shutil.copyfile(chunk_file(vol.path, entry.seq), tmp)
            os.replace(tmp, dest)
        staged = self.volumes()
        staged[vol.number] = vol.manifest
        A.write_json(str(self.record), {"volumes": {str(k): v for k, v in staged.items()}})
        say(f"staged volume {vol.number} ({len(vol.entries())} chunks, verified) in {self.dir}")

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _verified(vol: Volume, entry: ChunkEntry) -> A.ChunkHeader:
    """The chunk's header after checking it whole and against the manifest; IntegrityError naming it."""
    path = chunk_file(vol.path, entry.seq)
    where = f"chunk {entry.seq} of volume {vol.number} ({path})"
    try:
        with open(path, "rb") as f:
            hdr = A.verify_chunk(f, os.fstat(f.fileno()).st_size, entry.seq)
    except FileNotFoundError:
        raise E.IntegrityError(reason=f"{where} is missing") from None
    except A.AgentError as e:
        raise E.IntegrityError(reason=f"{where} is damaged: {e.reason}") from None
    if hdr.raw_len != entry.raw_len or hdr.raw_hash.hex() != entry.raw_hash:
        raise E.IntegrityError(reason=f"{where} is not the one the manifest lists (its raw checksum differs)")
    return hdr


async def import_seed(dirs: list[Path], target: str, staging_base: Path, wait: float | None,
                      say: Say, repair_from: Host | None = None, repair_dataset: str = "") -> ImportResult:
    """Receive the seed in ``dirs`` into ``target`` (a new dataset). See the module's docstring."""
    started = time.monotonic()
    vols = find_volumes(dirs)
    if not vols:
        raise E.UsageError(reason=f"no seed volume (vol*/manifest.json) in {', '.join(map(str, dirs))}")
    seeds = {v.manifest["seed"] for v in vols}
    if len(seeds) > 1:
        raise E.UsageError(reason=f"the directories hold volumes of different seeds ({', '.join(sorted(seeds))}): "
                           "give one seed's volumes")
    meta = vols[0].manifest
    short = str(meta["snapshot"]).split("@", 1)[1]
    zfs = _local_zfs()
    existing = await zfs.dataset(target)
    if existing is not None:
        if any(s.guid == int(meta["guid"]) for s in existing.snapshots):
            say(f"{target} has {short} (guid {meta['guid']}) already: nothing to import")
            return ImportResult(f"{target}@{short}", int(meta["guid"]), 0, 0, 0.0, done=True)
        raise E.UsageError(reason=f"{target} exists: a seed is received into a new dataset; give a name that "
                           "is not taken (or destroy it first)")
    parent = target.rsplit("/", 1)[0]
    if "/" not in target or await zfs.dataset(parent) is None:
        raise E.UnknownDataset(host="localhost", dataset=parent, dataset_parent=parent.rsplit("/", 1)[0])
    features = await zfs.features()
    if "-w" in meta["send_flags"] and not features.encryption:
        raise E.RawNeedsEncryption(source=meta["source"], target=target, target_zfs=features.version)
    staging = _Staging(staging_base, str(meta["seed"]))
    count = int(meta["volumes"])
    while True:
        present = {v.number: v for v in vols}
        staged = staging.volumes()
        missing = [n for n in range(1, count + 1) if n not in present and n not in staged]
        if not missing:
            break
        for n, v in sorted(present.items()):
            if n not in staged:
                staging.add(v, say)
        need = ", ".join(map(str, missing))
        if wait is None:
            raise E.SeedIncomplete(seed=meta["seed"], need=need, count=count,
                                   staged=", ".join(map(str, sorted(set(staging.volumes()))) or "none"),
                                   where=str(staging.dir))
        say(f"waiting for volume(s) {need} of {count}: mount them at one of {', '.join(map(str, dirs))}")
        await asyncio.sleep(wait)
        vols = [v for v in find_volumes(dirs) if v.manifest["seed"] == meta["seed"]]
    plan = _stream_plan(present, staging, meta)
    if repair_from is not None:
        damaged = _damaged(plan, say)
        if damaged:
            await _repair(repair_from, repair_dataset, meta, damaged, staging, say)
    result = _receive(plan, staging, meta, target, features.receive_unmounted, say)
    got = await zfs.dataset(target)
    snap = next((s for s in got.snapshots if s.short == short), None) if got else None
    if snap is None or snap.guid != int(meta["guid"]):
        raise E.IntegrityError(reason=f"{target}@{short} after the receive has guid "
                               f"{snap.guid if snap else 'none'}, the seed's is {meta['guid']}")
    if not features.receive_unmounted:  # as zchunk sync leaves a replica on a zfs without receive -u
        await zfs.unmount(target)
        await zfs.set(target, "canmount", "noauto")
    staging.remove()
    result.seconds = time.monotonic() - started
    result.done = True
    return result


def _stream_plan(present: dict[int, Volume], staging: _Staging,
                 meta: dict[str, Any]) -> list[tuple[Volume, ChunkEntry]]:
    """Every chunk of the stream in order, each with the volume (present, or staged) it is read from."""
    plan: list[tuple[Volume, ChunkEntry]] = []
    staged = staging.volumes()
    for n in range(1, int(meta["volumes"]) + 1):
        vol = present[n] if n in present else Volume(staging.dir, staged[n])  # staged: <dir>/chunks/ too
        plan += [(vol, e) for e in vol.entries()]
    total = meta["total"]
    if [e.seq for _, e in plan] != list(range(int(total["chunks"]))):
        raise E.IntegrityError(reason=f"the volumes' manifests list {len(plan)} chunks, not the stream's "
                               f"{total['chunks']} in order: a volume of another export?")
    return plan


def _damaged(plan: list[tuple[Volume, ChunkEntry]], say: Say) -> list[ChunkEntry]:
    """With --repair-from: every chunk checked before the receive starts; the damaged and missing ones."""
    say(f"checking all {len(plan)} chunks before the receive (--repair-from)")
    bad = []
    for vol, entry in plan:
        try:
            _verified(vol, entry)
        except E.IntegrityError as e:
            say(str(e))
            bad.append(entry)
    return bad


#: Run on the source with the snapshot's ``zfs send`` on stdin: the raw bytes of the chunks asked for
#: (``chunk_size`` each, by position), zlib-compressed, each after a line "<seq> <length>". Stdlib only.
REGENERATE = r"""
import sys, zlib
size = int(sys.argv[1]); want = set(int(a) for a in sys.argv[2:]); last = max(want)
src, out = sys.stdin.buffer, sys.stdout.buffer
for seq in range(last + 1):
    parts, left = [], size
    while left:
        piece = src.read(left)
        if not piece:
            break
        parts.append(piece); left -= len(piece)
    raw = b"".join(parts)
    if not raw:
        sys.exit("zfs send ended before chunk %d" % seq)
    if seq in want:
        z = zlib.compress(raw, 1)
        out.write(b"%d %d\n" % (seq, len(z))); out.write(z); out.flush()
"""


async def _repair(host: Host, dataset: str, meta: dict[str, Any], damaged: list[ChunkEntry], staging: _Staging,
                  say: Say) -> None:
    """The damaged chunks regenerated on the source from the same snapshot (one ``zfs send``, read up to the
    last of them; only they cross the link), each accepted only if its raw bytes match the manifest."""
    snap = f"{dataset}@{str(meta['snapshot']).split('@', 1)[1]}"
    zfs = Zfs(host)
    guid = await zfs.prop(snap, "guid")
    if guid != str(meta["guid"]):
        raise E.IntegrityError(reason=f"{host.name}: {snap} is " + ("gone" if guid is None else "another snapshot "
                               f"(guid {guid})") + f": the seed's (guid {meta['guid']}) cannot be regenerated "
                               "from it")
    seqs = [str(e.seq) for e in damaged]
    say(f"regenerating chunk(s) {', '.join(seqs)} on {host.name} from {snap}")
    script = f'"$0" send {" ".join(meta["send_flags"])} "$1" | "$2" -c "$3" {int(meta["chunk_size"])} {" ".join(seqs)}'
    res = await host.run(["sh", "-c", script, zfs.command, snap, host.python or "python3", REGENERATE],
                         timeout=None)
    if res.status != 0:
        raise E.ZfsSendFailed(host=host.name, status=res.status, stderr=res.err_text.strip()[:2000])
    out, pos = res.stdout, 0
    by_seq = {e.seq: e for e in damaged}
    check, codec = A.HASH_IDS[meta["checksum"]], A.CODEC_IDS[meta["codec"]]
    repaired = staging.dir / "repaired"
    while pos < len(out):
        end = out.index(b"\n", pos)
        seq, length = (int(x) for x in out[pos:end].split())
        raw = zlib.decompress(out[end + 1:end + 1 + length])
        pos = end + 1 + length
        entry = by_seq.pop(seq)
        if len(raw) != entry.raw_len or A.digest(check, raw).hex() != entry.raw_hash:
            raise E.IntegrityError(reason=f"chunk {seq} regenerated on {host.name} does not match the manifest: "
                                   f"the stream of {snap} differs from the exported one (another zfs version?)")
        f = chunk_file(repaired, seq)
        _private_dir(f.parent)
        A.write_atomic(str(f), A.encode_chunk(seq, raw, codec, 3, check))
        say(f"repaired chunk {seq} of volume {entry.volume} from {host.name}:{snap}")
    if by_seq:
        raise E.IntegrityError(reason=f"{host.name} did not send chunk(s) {', '.join(map(str, by_seq))}")


def _receive(plan: list[tuple[Volume, ChunkEntry]], staging: _Staging, meta: dict[str, Any], target: str,
             unmounted: bool, say: Say) -> ImportResult:
    """Feed every chunk, verified, to zfs receive, in order (a repaired one instead of its damaged
    original); the whole stream checked at the end."""
    total = meta["total"]
    repaired = staging.dir / "repaired"
    argv = ["zfs", "receive", *(["-u"] if unmounted else []), target]
    say(f"receiving {meta['snapshot']} into {target} ({len(plan)} chunks, "
        f"{int(total['raw_bytes']) >> 20} MiB)")
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    stream = A.new_hasher(A.HASH_IDS[meta["checksum"]])
    raw_bytes = 0
    try:
        for i, (vol, entry) in enumerate(plan):
            if chunk_file(repaired, entry.seq).is_file():
                vol = Volume(repaired, {**vol.manifest, "volume": vol.number})
            hdr = _verified(vol, entry)
            path = chunk_file(vol.path, entry.seq)
            with open(path, "rb") as f:
                f.seek(A.CHUNK_HEADER_SIZE)
                for piece in A.raw_pieces(hdr, f):
                    stream.update(piece)
                    raw_bytes += len(piece)
                    proc.stdin.write(piece)
            if (i + 1) % 8 == 0:
                say(f"received {i + 1} of {len(plan)} chunks")
        proc.stdin.close()
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise E.ZfsReceiveFailed(host="localhost", status=proc.returncode, stderr=err.strip()[:2000])
    except (E.IntegrityError, BrokenPipeError) as e:
        # a stream that ends early: zfs receive refuses it and removes what it had received (killed, zfs-fuse
        # would leave the half-received dataset behind)
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        err = proc.stderr.read().decode(errors="replace")
        proc.wait()
        if isinstance(e, BrokenPipeError):
            raise E.ZfsReceiveFailed(host="localhost", status=proc.returncode, stderr=err.strip()[:2000]) from None
        raise
    if raw_bytes != int(total["raw_bytes"]) or stream.hexdigest() != total["stream_hash"]:
        raise E.IntegrityError(reason=f"the stream fed to zfs receive ({raw_bytes} bytes, {stream.hexdigest()}) "
                               f"is not the exported one ({total['raw_bytes']} bytes, {total['stream_hash']})")
    return ImportResult(str(meta["snapshot"]), int(meta["guid"]), len(plan), raw_bytes, 0.0)
