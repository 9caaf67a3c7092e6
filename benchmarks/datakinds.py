"""The kinds of data a replication tool meets, written reproducibly into a directory.

- ``text``: text-like lines (logs, source, configuration), highly compressible;
- ``random``: incompressible files (media, archives, encrypted data);
- ``vmimage``: one VM disk image: runs of zeros between random and text-like extents;
- ``smallfiles``: many files of 200 B to 16 KB, half random, half repeated lines.

Used by benchmarks/kinds.py (time and wire bytes per kind) and benchmarks/make-streams.sh (streams for
skip.py). The same seed gives the same bytes.
"""

from __future__ import annotations

import random
from pathlib import Path

from zchunk import lab

KINDS = ("text", "random", "vmimage", "smallfiles")


def write(root: Path, kind: str, size: int, seed: int = 5) -> None:
    """``size`` bytes of ``kind`` under ``root`` (an existing directory)."""
    if kind == "text":
        lab.write_dataset(root / "d", size, seed=seed, compressible_fraction=1.0)
    elif kind == "mixed":  # twice the size: text, then half text, half random
        lab.write_dataset(root / "d", size, seed=seed, compressible_fraction=1.0)
        lab.write_dataset(root / "m", size, seed=seed + 1, compressible_fraction=0.5)
    elif kind == "random":
        lab.write_dataset(root / "d", size, seed=seed, compressible_fraction=0.0)
    elif kind == "vmimage":
        rng = random.Random(seed + 2)
        with open(root / "disk.img", "wb") as f:
            while f.tell() < size:
                r, n = rng.random(), rng.choice([64, 256, 1024]) * 1024
                f.write(bytes(n) if r < 0.4 else rng.randbytes(n) if r < 0.7
                        else (b"config line %d\n" % rng.randrange(10**6)) * (n // 20))
    elif kind == "smallfiles":
        rng, n = random.Random(seed + 4), 0
        while n < size:
            d = root / ("d%03d" % rng.randrange(200))
            d.mkdir(exist_ok=True)
            k = rng.randrange(200, 16000)
            (d / ("f%06d" % n)).write_bytes(rng.randbytes(k // 2) + b"x = %d\n" % k * (k // 16))
            n += k
    else:
        raise ValueError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}, mixed")
