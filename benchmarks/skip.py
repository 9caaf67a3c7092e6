#!/usr/bin/env python3
"""CPU and stored (wire) bytes of the sender's chunk encoding, with and without skipping chunks whose first
piece does not compress (agent.ChunkEncoder, ``skip_incompressible``), on real ``zfs send`` streams.

    python3 benchmarks/skip.py STREAM.zfs...        # with each interpreter you want to measure

Streams are files of ``zfs send`` output (plain, ``-L -e -c``, ``-w``), made in the OpenZFS VM by
benchmarks/make-streams.sh. Each is cut into chunks (``--chunk-mib``, default 32) of 1 MiB pieces, as
the sender daemon does, encoded with the codec this interpreter has (zstd if importable, else zlib) at
level 1 and 3 (the sender's adaptive levels), with the daemon's rule for storing a chunk as it is (only
after a chunk that did not compress either) and without; CPU is this process's user+sys time, the best
of ``--runs``, children included (the ``zstd`` command's, where this python has no zstandard).
Prints one JSON line per stream and level.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from zchunk import agent  # noqa: E402

CHUNK = 32 << 20
PIECE = 1 << 20


def encode(data: bytes, codec: int, level: int, skip: bool, size: int = CHUNK) -> tuple[float, int, int]:
    """(CPU seconds, stored bytes, chunks stored as they are)"""
    stored = plain = 0
    barely = False  # as SenderDaemon.run: only after a chunk that shrank by under 2 %
    start = cpu()
    for off in range(0, len(data), size):
        enc = agent.ChunkEncoder(codec, level, agent.HASH_XXH3 if agent.xxhash else agent.HASH_BLAKE2B,
                                 skip_incompressible=skip and barely)
        chunk = data[off:off + size]
        for p in range(0, len(chunk), PIECE):
            enc.update(chunk[p:p + PIECE])
        parts = enc.finish(off // size)
        stored += sum(len(x) for x in parts)
        barely = sum(len(x) for x in parts[1:]) > agent.STORE_ABOVE * enc.raw_len
        plain += enc.codec == agent.CODEC_NONE
    return cpu() - start, stored, plain


def cpu() -> float:
    """This process's CPU and its children's: the zstd command's, where the agent compresses through it."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("streams", nargs="+")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--chunk-mib", type=int, default=CHUNK >> 20, help="chunk size (default: zchunk's, 32)")
    args = ap.parse_args()
    codec = agent.CODEC_ZSTD if agent.zstandard is not None else agent.CODEC_ZLIB
    via = agent.ZSTD_VIA if codec == agent.CODEC_ZSTD else None
    for path in args.streams:
        with open(path, "rb") as f:
            data = f.read()
        for level in (1, 3):
            row: dict[str, object] = {"stream": os.path.basename(path), "bytes": len(data),
                                      "chunk_mib": args.chunk_mib,
                                      "python": sys.executable, "codec": "zstd" if codec == agent.CODEC_ZSTD
                                      else "zlib", "via": via, "level": level}
            for skip in (False, True):
                best = min((encode(data, codec, level, skip, args.chunk_mib << 20) for _ in range(args.runs)),
                           key=lambda r: r[0])
                key = "skip" if skip else "always"
                row[f"{key}_cpu_s"] = round(best[0], 3)
                row[f"{key}_stored"] = best[1]
                row[f"{key}_plain_chunks"] = best[2]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
