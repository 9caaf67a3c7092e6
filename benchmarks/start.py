"""What a run costs before its first command on the target: zchunk's coordinator against one OpenSSH command.

    .venv/bin/python benchmarks/start.py [--runs 9]

On run.py's lab (zfs-fuse, the namespaced WAN, an sshd in the "dst" namespace, no rate limit), each of these
is started ``--runs`` times after one warm-up, from a compiled copy of ``zchunk/`` as an installed zchunk
runs, and its wall time printed as a Markdown row (median, min-max):

- the coordinator's interpreter doing nothing;
- ``import zchunk.cli``, what the ``zchunk`` command imports before it parses its arguments;
- the same, then asyncssh, the SSH handshake with the lab's target and ``true`` run there: what every
  ``zchunk`` run pays before its first command on a remote host;
- ``ssh dst true``: the same for OpenSSH, what syncoid and the ``pipe`` floor of ``tree.py`` pay once per
  run (they keep one ControlMaster connection).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import run as bench  # noqa: E402
from tools import VENV_BIN  # noqa: E402

CONNECT = """
import asyncio
from pathlib import Path

import zchunk.cli  # noqa: F401  (what the command imports)
from zchunk.endpoint import parse_endpoint
from zchunk.transport import SshOptions, first_contact, make_host


async def main() -> None:
    host = make_host(parse_endpoint({target!r}), SshOptions(config=Path({config!r})))
    await first_contact(host)
    assert (await host.run(["true"])).status == 0
    await host.close()

asyncio.run(main())
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    b = bench.Bench(bench.parse_args(["--size", "16M", "--out", str(HERE / "out" / "start")]))
    b.work.mkdir(parents=True, exist_ok=True)
    bench.snapshot_code(b.work / "code")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # compiled, as installed
    env.update(PATH=bench.PATH, LC_ALL="C", PYTHONPATH=str(b.work / "code"))
    python = str(VENV_BIN / "python")

    def timed(argv: list[str]) -> float:
        start = time.monotonic()
        proc = subprocess.run(argv, env=env, capture_output=True, timeout=60)
        took = time.monotonic() - start
        if proc.returncode:
            raise SystemExit(f"{argv[:3]}: exit {proc.returncode}: {proc.stderr.decode()[-2000:]}")
        return took

    with b.lab():
        config = str(b.far.ssh_config)
        rows = {
            "the coordinator's interpreter, `-c pass`": [python, "-c", "pass"],
            "`import zchunk.cli` (what `zchunk` imports)": [python, "-c", "import zchunk.cli"],
            "zchunk: its imports, asyncssh, the handshake, `true` on the target":
                [python, "-c", CONNECT.format(target=f"dst:{b.dst.name}", config=config)],
            "OpenSSH: `ssh dst true`": ["ssh", "-F", config, "dst", "true"],
        }
        print(f"runs: {args.runs} each, after one warm-up\n\n| what | median | min-max |\n|---|---:|---:|")
        for what, argv in rows.items():
            timed(argv)
            times = [timed(argv) for _ in range(args.runs)]
            print(f"| {what} | {statistics.median(times) * 1000:.0f} ms | "
                  f"{min(times) * 1000:.0f}-{max(times) * 1000:.0f} ms |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
