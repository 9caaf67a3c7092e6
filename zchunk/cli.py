"""The ``zchunk`` command: parse, call one library function, render. Nothing else."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import typer

from . import __version__
from . import errors as E
from . import sync as lib
from .progress import JsonRenderer, TextRenderer, human_bytes, human_duration
from .replicate import ReplicateOptions, ReplicationResult, replicate
from .session import default_state_dir
from .transport import LinkDown, SshOptions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Replicate ZFS datasets over flaky links: the zfs send stream is spooled as checksummed, "
    "compressed chunks by agents on both hosts, so an outage costs only its own duration.",
)

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?$", re.I)
_DUR = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def parse_size(text: str, what: str) -> int:
    m = _SIZE.match(text.strip())
    if not m:
        raise E.UsageError(reason=f"{what} {text!r}: expected a size like 32M, 2G or 1048576")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def parse_duration(text: str, what: str) -> float:
    m = _DUR.match(text.strip())
    if not m:
        raise E.UsageError(reason=f"{what} {text!r}: expected a duration like 90s, 30m, 24h or 2d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _run(coro: Any, json_out: bool) -> Any:
    try:
        return asyncio.run(coro)
    except E.ZchunkError as e:
        _fail(e, json_out)
    except LinkDown as e:  # a link failure outside the engine's retries: say so, it is not a bug
        _fail(E.HostUnreachable(host=e.host, reason=e.reason), json_out)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted: the agents keep their spools; continue with `zchunk resume ID` "
                         "(see `zchunk sessions`)\n")
        raise typer.Exit(130) from None


def _fail(e: E.ZchunkError, json_out: bool) -> None:
    if json_out:
        print(json.dumps({"event": "error", "error": type(e).__name__, "message": str(e),
                          "hint": e.hint, "exit_code": e.exit_code}))
    sys.stderr.write(f"zchunk: error: {e}\n")
    if e.hint:
        sys.stderr.write(f"zchunk: fix: {e.hint}\n")
    raise typer.Exit(e.exit_code)


def _options(**kw: Any) -> lib.SyncOptions:
    ssh = SshOptions.from_cli(kw.pop("ssh_config"), kw.pop("ssh_key"), kw.pop("ssh_port"),
                              kw.pop("ssh_option") or [])
    chunk = parse_size(kw.pop("chunk_size"), "--chunk-size")
    if not (64 << 10) <= chunk <= (256 << 20):
        raise E.UsageError(reason=f"--chunk-size {human_bytes(chunk)}: must be 64K to 256M")
    spool_max = parse_size(kw.pop("spool_max"), "--spool-max")
    if spool_max < chunk:
        raise E.UsageError(reason="--spool-max must hold at least one chunk (--chunk-size)")
    parallel = kw.pop("parallel")
    if not 1 <= parallel <= 64:
        raise E.UsageError(reason="--parallel must be between 1 and 64")
    compress = kw.pop("compress")
    if compress.split(":")[0] not in ("auto", "zstd", "zlib", "none"):
        raise E.UsageError(reason=f"--compress {compress!r}: use zstd[:LEVEL], zlib[:LEVEL] or none")
    return lib.SyncOptions(
        spool_dir=kw.pop("spool_dir"), chunk_size=chunk, compress=compress, spool_max=spool_max,
        parallel=parallel, patience=parse_duration(kw.pop("patience"), "--patience"),
        connect_patience=parse_duration(kw.pop("connect_patience", "30s"), "--connect-patience"),
        agent_idle_timeout=parse_duration(kw.pop("agent_idle_timeout"), "--agent-idle-timeout"),
        state_dir=kw.pop("state_dir") or default_state_dir(), ssh=ssh, keep=kw.pop("keep"),
        verbose=kw.pop("verbose"), python=kw.pop("python"))


# Options shared by the commands that talk to hosts.
SpoolDir = typer.Option("/var/tmp/zchunk", "--spool-dir", help="Base directory for session directories "
                        "(spools) on each host; created 0700, must not be group/world-writable.")
ChunkSize = typer.Option("32M", "--chunk-size", help="Raw bytes of zfs send stream per chunk (64K-256M).")
Compress = typer.Option("auto", "--compress", help="Chunk compression: zstd[:LEVEL] (default when both "
                        "agents can), zlib[:LEVEL] or none. Without a LEVEL it adapts per chunk: 1 while the "
                        "link takes chunks as fast as they are made, 3 once they wait for it (2 s).")
SpoolMax = typer.Option("2G", "--spool-max", help="Spool cap per host; a full spool pauses zfs send.")
Parallel = typer.Option(4, "--parallel", help="Chunks in flight at once.")
Patience = typer.Option("24h", "--patience", help="Keep retrying through outages until this long passes "
                        "without progress (e.g. 90s, 30m, 24h, 2d).")
ConnectPatience = typer.Option("30s", "--connect-patience", help="How long to retry the first connection "
                               "to a host before giving up (nothing has started yet).")
IdleTimeout = typer.Option("24h", "--agent-idle-timeout", help="Agents exit after this long without "
                           "hearing from the coordinator.")
StateDir = typer.Option(None, "--state-dir", help="Where the coordinator keeps session records "
                        "(default $XDG_STATE_HOME/zchunk).")
SshConfig = typer.Option(None, "--ssh-config", help="OpenSSH client config file (Host aliases, HostName, "
                         "User, Port, IdentityFile, UserKnownHostsFile, StrictHostKeyChecking).")
SshKey = typer.Option(None, "--ssh-key", help="Private key file for SSH.")
SshPort = typer.Option(None, "--ssh-port", help="SSH port.")
SshOption = typer.Option(None, "-o", "--ssh-option", help="SSH option KEY=VALUE, e.g. "
                         "StrictHostKeyChecking=accept-new (repeatable).")
Keep = typer.Option(False, "--keep", help="Keep the session directories at the end, for inspection.")
Json = typer.Option(False, "--json", help="Print JSON lines: one per event, progress at most once a second.")
Verbose = typer.Option(False, "-v", "--verbose", help="Show host features, retries and chunk details.")
Python = typer.Option(None, "--python", help="Python interpreter for the agents (default: python3 on "
                      "remote hosts, zchunk's own interpreter for a local side).")


def _renderer(json_out: bool, verbose: bool) -> Any:
    return JsonRenderer() if json_out else TextRenderer(verbose=verbose)


def _finish(result: lib.SyncResult, json_out: bool) -> None:
    if json_out:
        print(json.dumps({"event": "result", **result.to_json()}, default=str))
        return
    if result.up_to_date or result.transfer is None:
        return
    t = result.transfer
    sys.stderr.write(
        f"done: {result.target_snapshot} ({human_bytes(t.raw_bytes)} in {t.total_chunks} chunks, "
        f"{human_bytes(t.wire_bytes)} on the wire, {human_duration(t.elapsed)}"
        + (f", {t.outages} outages {human_duration(t.outage_seconds)}" if t.outages else "")
        + (f", {t.discarded_chunks} damaged chunks moved again" if t.discarded_chunks else "") + ")\n")


@app.command()
def sync(
    source: str = typer.Argument(..., metavar="SOURCE", help="pool/dataset or \\[user@]host:pool/dataset"),
    target: str = typer.Argument(..., metavar="TARGET", help="pool/dataset or \\[user@]host:pool/dataset"),
    recursive: bool = typer.Option(False, "-r", "--recursive", help="Also replicate every child dataset "
                                   "(parents first, one session each)."),
    exclude: Optional[list[str]] = typer.Option(None, "--exclude", help="With -r: skip datasets whose name "
                                                "matches this regex (repeatable). A dataset with the user "
                                                "property zchunk:sync=false is skipped too."),
    identifier: Optional[str] = typer.Option(None, "--identifier", help="Names this replication's sync "
                                             "snapshots (zchunk_<identifier>_<host>_<UTC time>) and holds; "
                                             "default: derived from TARGET."),
    no_sync_snap: bool = typer.Option(False, "--no-sync-snap", help="Send the newest existing snapshot "
                                      "instead of taking a sync snapshot."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Send with -i (only the newest snapshot) "
                                   "instead of -I (every snapshot in between)."),
    include_snaps: Optional[list[str]] = typer.Option(None, "--include-snaps", help="Send only snapshots "
                                                      "matching this regex (repeatable)."),
    exclude_snaps: Optional[list[str]] = typer.Option(None, "--exclude-snaps", help="Do not send snapshots "
                                                      "matching this regex (repeatable)."),
    keep_sync_snaps: int = typer.Option(1, "--keep-sync-snaps", help="How many of zchunk's own sync "
                                        "snapshots (this identifier) to keep on each side."),
    rollback: bool = typer.Option(False, "--rollback", help="Allow rolling the target back to the common "
                                  "snapshot, destroying target-only snapshots and changes (listed first)."),
    force_delete: bool = typer.Option(False, "--force-delete", help="Allow destroying a target that shares "
                                      "no snapshot with the source, to re-seed it."),
    create_bookmark: bool = typer.Option(False, "--create-bookmark", help="Keep a bookmark of the newest "
                                         "common snapshot on the source (OpenZFS): an incremental base even "
                                         "after the snapshot is gone."),
    preserve_properties: bool = typer.Option(False, "--preserve-properties", help="Copy the source's local "
                                             "properties (mountpoint, shares, encryption keys excluded)."),
    dry_run: bool = typer.Option(False, "-n", "--dry-run", help="Print the plan (snapshots to send with "
                                 "estimated sizes, holds, prunes, rollbacks) and change nothing."),
    spool_dir: str = SpoolDir, chunk_size: str = ChunkSize, compress: str = Compress,
    spool_max: str = SpoolMax, parallel: int = Parallel, patience: str = Patience,
    connect_patience: str = ConnectPatience, agent_idle_timeout: str = IdleTimeout,
    state_dir: Optional[Path] = StateDir,
    ssh_config: Optional[Path] = SshConfig, ssh_key: Optional[Path] = SshKey,
    ssh_port: Optional[int] = SshPort, ssh_option: Optional[list[str]] = SshOption,
    keep: bool = Keep, json_out: bool = Json, verbose: bool = Verbose, python: Optional[str] = Python,
) -> None:
    """Replicate SOURCE to TARGET: snapshot, send what is missing, verify, prune.

    Takes a sync snapshot, then sends a full stream when TARGET does not exist,
    else an incremental (-I) from the newest snapshot both sides share,
    matched by guid. The common base is held on both sides (where zfs has
    holds); only zchunk's own sync snapshots are ever pruned. A target that
    changed or diverged is refused unless --rollback; a target with no common
    snapshot is never destroyed without --force-delete.

    Survives any outage shorter than --patience; if the coordinator dies, run
    the same command again (or `zchunk resume ID`) to continue where it stopped.
    Exit codes: docs/errors.md (15: some datasets of a recursive run failed).
    """
    local = locals()
    try:
        opts = _options(**{k: local[k] for k in _ENGINE_KEYS})
        if keep_sync_snaps < 1:
            raise E.UsageError(reason="--keep-sync-snaps must be at least 1 (the newest common snapshot stays)")
        ropts = ReplicateOptions(
            identifier=identifier, sync_snap=not no_sync_snap, stream=not no_stream,
            include_snaps=include_snaps or [], exclude_snaps=exclude_snaps or [], rollback=rollback,
            force_delete=force_delete, keep_sync_snaps=keep_sync_snaps, create_bookmark=create_bookmark,
            recursive=recursive, exclude=exclude or [], preserve_properties=preserve_properties,
            dry_run=dry_run)
    except E.ZchunkError as e:
        _fail(e, json_out)
    _setup_logging(verbose)
    result = _run(replicate(source, target, opts, ropts, _renderer(json_out, verbose)), json_out)
    _finish_replication(result, json_out)


_ENGINE_KEYS = ("spool_dir", "chunk_size", "compress", "spool_max", "parallel", "patience", "connect_patience",
                "agent_idle_timeout",
                "state_dir", "ssh_config", "ssh_key", "ssh_port", "ssh_option", "keep", "verbose", "python")


def _finish_replication(result: ReplicationResult, json_out: bool) -> None:
    for outcome in result.outcomes:
        for stream in outcome.streams:
            _finish(stream, json_out)
    if json_out:
        print(json.dumps({"event": "replication", **result.to_json()}, default=str))
    failed = result.failed
    if failed:
        _fail(E.PartialFailure(failed=len(failed), total=len(result.outcomes),
                               names=", ".join(o.source for o in failed)), json_out)


@app.command()
def resume(
    session: str = typer.Argument(..., metavar="ID", help="Session id (see `zchunk sessions`)."),
    spool_dir: str = SpoolDir, chunk_size: str = ChunkSize, compress: str = Compress,
    spool_max: str = SpoolMax, parallel: int = Parallel, patience: str = Patience,
    connect_patience: str = ConnectPatience, agent_idle_timeout: str = IdleTimeout,
    state_dir: Optional[Path] = StateDir,
    ssh_config: Optional[Path] = SshConfig, ssh_key: Optional[Path] = SshKey,
    ssh_port: Optional[int] = SshPort, ssh_option: Optional[list[str]] = SshOption,
    keep: bool = Keep, json_out: bool = Json, verbose: bool = Verbose, python: Optional[str] = Python,
) -> None:
    """Reattach to a session's live agents and continue it (no acknowledged chunk moves twice)."""
    try:
        opts = _options(**{k: v for k, v in locals().items() if k not in ("session", "json_out")})
    except E.ZchunkError as e:
        _fail(e, json_out)
    _setup_logging(verbose)
    _finish(_run(lib.resume(session, opts, _renderer(json_out, verbose)), json_out), json_out)


@app.command()
def abort(
    session: str = typer.Argument(..., metavar="ID", help="Session id (see `zchunk sessions`)."),
    state_dir: Optional[Path] = StateDir, ssh_config: Optional[Path] = SshConfig,
    ssh_key: Optional[Path] = SshKey, ssh_port: Optional[int] = SshPort,
    ssh_option: Optional[list[str]] = SshOption, json_out: bool = Json, python: Optional[str] = Python,
) -> None:
    """Stop a session's agents (the partial zfs receive is aborted) and remove both session directories."""
    try:
        opts = _options(state_dir=state_dir, ssh_config=ssh_config, ssh_key=ssh_key, ssh_port=ssh_port,
                        ssh_option=ssh_option, spool_dir="/var/tmp/zchunk", chunk_size="32M",
                        compress="auto", spool_max="2G", parallel=1, patience="1m",
                        agent_idle_timeout="24h", keep=False, verbose=False, python=python)
    except E.ZchunkError as e:
        _fail(e, json_out)
    rec = _run(lib.abort(session, opts, _renderer(json_out, False)), json_out)
    if json_out:
        print(json.dumps({"event": "result", "session": rec.id, "state": rec.state}))
    elif rec.state == "aborted":
        sys.stderr.write(f"aborted {rec.id}\n")
    else:  # it had ended already: only what it left on the hosts was removed
        sys.stderr.write(f"removed what session {rec.id} ({rec.state}) left on the hosts\n")


@app.command()
def sessions(
    state_dir: Optional[Path] = StateDir,
    json_out: bool = Json,
) -> None:
    """List sessions: id, hosts, datasets, state, bytes done/estimated, chunks, age."""
    recs = lib.list_sessions(lib.SyncOptions(state_dir=state_dir or default_state_dir()))
    if json_out:
        print(json.dumps([r.to_json() for r in recs], indent=1))
        return
    if not recs:
        print("no sessions")
        return
    now = time.time()
    rows = [("ID", "STATE", "SOURCE", "TARGET", "DONE/ESTIMATE", "CHUNKS", "AGE")]
    for r in recs:
        chunks = f"{r.chunks_received}/{r.total_chunks}" if r.total_chunks else f"{r.chunks_received}/?"
        state = f"{r.state} (directories left: zchunk abort {r.id})" if r.leftover else r.state
        rows.append((r.id, state, r.snapshot if r.source.count(":") == 0 else r.source, r.target,
                     f"{human_bytes(r.raw_bytes)}/{human_bytes(r.estimate)}", chunks,
                     human_duration(now - r.created)))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


@app.command()
def demo(
    size: str = typer.Option("160M", "--size", help="Size of the seeded dataset."),
    rate: float = typer.Option(60.0, "--rate", help="WAN rate limit in Mbit/s."),
    outages: int = typer.Option(3, "--outages", help="How many times the link is cut."),
    outage_seconds: float = typer.Option(5.0, "--outage-seconds", help="How long each cut lasts."),
    keep: bool = typer.Option(False, "--keep", help="Leave the lab (pools, namespace, sshd) up to explore."),
) -> None:
    """Replicate a throwaway dataset to a namespaced "host" over a flaky simulated WAN (needs root).

    Creates zfs-fuse pools on sparse files, a target host in a network
    namespace with its own sshd behind a rate-limited link, seeds a dataset,
    replicates it while the link is cut several times, verifies the replica by
    guid and content, and cleans everything up.
    """
    from .demo import DemoOptions, run_demo

    try:
        opts = DemoOptions(size=parse_size(size, "--size"), rate_mbit=rate, outages=outages,
                           outage_seconds=outage_seconds, keep=keep)
        renderer = TextRenderer(verbose=False)
        res = run_demo(opts, renderer)
    except E.ZchunkError as e:
        _fail(e, False)
    t = res.result.transfer
    if t is not None:
        sys.stderr.write(f"\ndemo done: {res.target} is a verified replica of {res.source} "
                         f"({human_bytes(t.raw_bytes)} in {human_duration(t.elapsed)}, "
                         f"{t.outages} link outages ridden through, {human_duration(t.outage_seconds)} down)\n")


@app.command()
def version() -> None:
    """Print the zchunk version."""
    print(f"zchunk {__version__}")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


def main() -> None:
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if isinstance(e.code, str):
            sys.stderr.write(e.code + "\n")
    except Exception:  # an unexpected failure: say so, with the traceback, and a distinct code
        traceback.print_exc()
        sys.stderr.write("zchunk: internal error (this is a bug; please report it with the traceback above)\n")
        code = 70
    _leave(code)


def _leave(code: int) -> None:
    """Exit without the interpreter's teardown: by now every connection is closed, every agent
    command answered and every state file written, and freeing the heap of asyncssh and
    cryptography module by module costs a run ~70 ms for nothing. Output is flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 1  # e.g. stdout was a closed pipe: the output did not arrive
    os._exit(code)


if __name__ == "__main__":
    main()
