"""The ``zchunk`` command: parse, call one library function, render. Nothing else.

Options that several commands share are declared once, in groups (``HOST_OPTIONS``,
``STREAM_OPTIONS``); ``shared_options`` adds a group's options to a command and hands
the command one ``SyncOptions`` built from them by ``sync_options``, which checks and
parses each value. A parameter's name is the option's long name with underscores, and
the field of ``SyncOptions`` it fills (the key a job's config file will use).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import json
import logging
import os
import re
import shlex
import sys
import time
import traceback
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import typer

from . import __version__
from . import errors as E
from . import stream as streams
from .endpoint import check_dataset_name, parse_endpoint
from .flags import stream_options
from .hooks import Hook, Hooks
from .link import Bandwidth
from .plan import Retention, common_snapshot
from .progress import JsonRenderer, TextRenderer, human_bytes, human_duration
from .replicate import IDENTIFIER, ReplicateOptions, ReplicationResult, replicate, replicate_many
from .service import config as jobs_file
from .session import default_state_dir
from .stream import SyncOptions
from .transport import LinkDown, SshOptions, first_contact, make_host

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


def _fail(e: E.ZchunkError, json_out: bool) -> typing.NoReturn:
    if json_out:
        JsonRenderer()("error", {"error": type(e).__name__, "message": str(e), "hint": e.hint,
                                 "exit_code": e.exit_code})
    sys.stderr.write(f"zchunk: error: {e}\n")
    if e.hint:
        sys.stderr.write(f"zchunk: fix: {e.hint}\n")
    raise typer.Exit(e.exit_code)


@dataclass(frozen=True)
class Shared:
    """An option several commands take: its parameter name (= ``SyncOptions`` field, config key), type,
    and typer declaration."""

    name: str
    annotation: Any
    option: Any


#: Options whose values are paths (a job's config gives them as strings).
PATH_OPTIONS = ("state_dir", "ssh_config", "ssh_key")

HOST_OPTIONS = (
    Shared("state_dir", Optional[Path], typer.Option(
        None, "--state-dir", help="Where the coordinator keeps session records (default $XDG_STATE_HOME/zchunk).")),
    Shared("ssh_config", Optional[Path], typer.Option(
        None, "--ssh-config", help="OpenSSH client config file (Host aliases, HostName, User, Port, IdentityFile, "
        "UserKnownHostsFile, StrictHostKeyChecking).")),
    Shared("ssh_key", Optional[Path], typer.Option(None, "--ssh-key", help="Private key file for SSH.")),
    Shared("ssh_port", Optional[int], typer.Option(None, "--ssh-port", help="SSH port.")),
    Shared("ssh_option", Optional[list[str]], typer.Option(
        None, "-o", "--ssh-option", help="SSH option KEY=VALUE, e.g. StrictHostKeyChecking=accept-new "
        "(repeatable).")),
    Shared("python", Optional[str], typer.Option(
        None, "--python", help="Python interpreter for the agents (default: python3 on remote hosts, zchunk's "
        "own interpreter for a local side).")),
)

STREAM_OPTIONS = (
    Shared("spool_dir", str, typer.Option(
        "/var/tmp/zchunk", "--spool-dir", help="Base directory for session directories (spools) on each host; "
        "created 0700, must not be group/world-writable.")),
    Shared("chunk_size", str, typer.Option(
        "32M", "--chunk-size", help="Raw bytes of zfs send stream per chunk (64K-256M).")),
    Shared("direct_max", str, typer.Option(
        "4M", "--direct-max", help="A stream estimated at this size or less goes without a session: zfs send "
        "piped straight into zfs receive, nothing spooled or installed, sent again whole after a failure "
        "(a small dataset, an incremental of a few files). 0: every stream gets a session.")),
    Shared("compress", str, typer.Option(
        "auto", "--compress", help="Chunk compression: zstd[:LEVEL] (default when both agents can), "
        "zlib[:LEVEL] or none. Without a LEVEL it adapts per chunk: 1 while the link takes chunks as fast as "
        "they are made, 3 once they wait for it (2 s).")),
    Shared("spool_max", str, typer.Option(
        "2G", "--spool-max", help="Spool cap per host; a full spool pauses zfs send.")),
    Shared("parallel", int, typer.Option(4, "--parallel", help="Chunks in flight at once.")),
    Shared("patience", str, typer.Option(
        "24h", "--patience", help="Keep retrying through outages until this long passes without progress "
        "(e.g. 90s, 30m, 24h, 2d).")),
    Shared("connect_patience", str, typer.Option(
        "30s", "--connect-patience", help="How long to retry the first connection to a host before giving up "
        "(nothing has started yet).")),
    Shared("agent_idle_timeout", str, typer.Option(
        "24h", "--agent-idle-timeout", help="Agents exit after this long without hearing from the coordinator.")),
    Shared("bwlimit", Optional[str], typer.Option(
        None, "--bwlimit", help="Cap the bytes put on the link: a rate (8M = 8 MiB/s, 50mbit) or a weekly "
        "schedule, first matching rule wins: \"Mon-Fri 08:00-18:00=2M, Sat-Sun=unlimited, *=20M\". A running "
        "session follows the schedule as the clock crosses a boundary; change it live with `zchunk limit`.")),
    Shared("timezone", Optional[str], typer.Option(
        None, "--timezone", help="Time zone of the --bwlimit schedule, e.g. Europe/Berlin (default: this "
        "machine's local time).")),
    Shared("keep", bool, typer.Option(
        False, "--keep", help="Keep the session directories at the end, for inspection.")),
    Shared("verbose", bool, typer.Option(
        False, "-v", "--verbose", help="Show host features, retries and chunk details.")),
)


def sync_options(values: Mapping[str, Any]) -> SyncOptions:
    """``SyncOptions`` from shared option values (the CLI's now, a job's config later), each checked and
    parsed; an option not given keeps the library's default. Bad values raise ``UsageError``."""
    opts = SyncOptions()
    v = dict(values)
    ssh = SshOptions.from_cli(v.pop("ssh_config", None), v.pop("ssh_key", None), v.pop("ssh_port", None),
                              v.pop("ssh_option", None) or [])
    changes: dict[str, Any] = {"ssh": ssh, "state_dir": v.pop("state_dir", None) or default_state_dir()}
    if "chunk_size" in v:
        changes["chunk_size"] = parse_size(v.pop("chunk_size"), "--chunk-size")
        if not (64 << 10) <= changes["chunk_size"] <= (256 << 20):
            raise E.UsageError(reason=f"--chunk-size {human_bytes(changes['chunk_size'])}: must be 64K to 256M")
    if "direct_max" in v:
        changes["direct_max"] = parse_size(v.pop("direct_max"), "--direct-max")
        if changes["direct_max"] > (256 << 20):
            raise E.UsageError(reason=f"--direct-max {human_bytes(changes['direct_max'])}: at most 256M (a "
                               "direct stream is sent again whole after a failure)")
    if "spool_max" in v:
        changes["spool_max"] = parse_size(v.pop("spool_max"), "--spool-max")
        if changes["spool_max"] < changes.get("chunk_size", opts.chunk_size):
            raise E.UsageError(reason="--spool-max must hold at least one chunk (--chunk-size)")
    if "parallel" in v and not 1 <= v["parallel"] <= 64:
        raise E.UsageError(reason="--parallel must be between 1 and 64")
    if "compress" in v and v["compress"].split(":")[0] not in ("auto", "zstd", "zlib", "none"):
        raise E.UsageError(reason=f"--compress {v['compress']!r}: use zstd[:LEVEL], zlib[:LEVEL] or none")
    if v.get("bwlimit") is not None:
        Bandwidth.parse(v["bwlimit"])
    if v.get("timezone") is not None:
        try:
            ZoneInfo(v["timezone"])
        except (ValueError, ZoneInfoNotFoundError):
            raise E.UsageError(reason=f"--timezone {v['timezone']!r}: not a time zone (e.g. Europe/Berlin, "
                               "UTC; see timedatectl list-timezones)") from None
    for name in ("patience", "connect_patience", "agent_idle_timeout"):
        if name in v:
            changes[name] = parse_duration(v.pop(name), "--" + name.replace("_", "-"))
    unknown = set(v) - {f.name for f in dataclasses.fields(SyncOptions)}
    if unknown:
        raise E.UsageError(reason=f"unknown option(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(opts, **v, **changes)


def shared_options(*groups: tuple[Shared, ...]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Adds the groups' options to a command, which receives them as ``opts: SyncOptions`` (built by
    ``sync_options``; a bad value is the command's usage error, said as JSON too with ``--json``)."""
    shared = [o for group in groups for o in group]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(command)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(command).parameters.values() if p.name != "opts"]
        added = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.option, annotation=o.annotation)
                 for o in shared]

        @functools.wraps(command)
        def run(**kw: Any) -> Any:
            values = {o.name: kw.pop(o.name) for o in shared}
            try:
                opts = sync_options(values)
            except E.ZchunkError as e:
                _fail(e, bool(kw.get("json_out")))
            return command(opts=opts, **kw)

        run.__signature__ = inspect.Signature(own + added)  # type: ignore[attr-defined]
        run.__annotations__ = {}
        return run

    return decorate


Json = typer.Option(False, "--json", help="Print JSON lines: one per event (docs/events.md), progress at most "
                    "once a second.")


def _renderer(json_out: bool, verbose: bool) -> Any:
    return JsonRenderer() if json_out else TextRenderer(verbose=verbose)


def _finish(result: streams.SyncResult, json_out: bool) -> None:
    if json_out:
        JsonRenderer()("result", result.to_json())
        return
    if result.up_to_date or result.transfer is None:
        return
    t = result.transfer
    how = f"in {t.total_chunks} chunks" if result.session is not None else "directly, without a session"
    sys.stderr.write(
        f"done: {result.target_snapshot} ({human_bytes(t.raw_bytes)} {how}, "
        f"{human_bytes(t.wire_bytes)} on the wire, {human_duration(t.elapsed)}"
        + (f", {t.outages} outages {human_duration(t.outage_seconds)}" if t.outages else "")
        + (f", {t.discarded_chunks} damaged chunks moved again" if t.discarded_chunks else "") + ")\n")


@app.command()
@shared_options(HOST_OPTIONS, STREAM_OPTIONS)
def sync(
    source: str = typer.Argument(..., metavar="SOURCE", help="pool/dataset or \\[user@]host:pool/dataset"),
    targets: list[str] = typer.Argument(..., metavar="TARGET...", help="pool/dataset or "
                                        "\\[user@]host:pool/dataset; several: fan-out (one zfs send feeds them all)"),
    recursive: bool = typer.Option(False, "-r", "--recursive", help="Also replicate every child dataset: "
                                   "one sync snapshot for the whole tree (zfs snapshot -r, one moment), "
                                   "--jobs datasets at a time, each after its parent, one stream session each "
                                   "(none for a stream within --direct-max); "
                                   "a dataset that fails does not stop the others (exit 15)."),
    jobs: int = typer.Option(4, "-j", "--jobs", metavar="N", help="With -r: replicate up to N datasets at "
                             "once. They share --spool-max (each stream gets 1/N of it) and --bwlimit (the "
                             "limit is the run's, not each stream's)."),
    detach_after: str = typer.Option("5m", "--detach-after", metavar="DURATION", help="With several TARGETs: "
                                     "how long one target that takes no chunks may hold the others back once "
                                     "--spool-max is full, before it is left behind (exit 15; its next run "
                                     "continues it from its own common snapshot)."),
    exclude: Optional[list[str]] = typer.Option(None, "--exclude", help="With -r: skip datasets whose name "
                                                "matches this regex (repeatable), and their children (as zfs "
                                                "send -X). A dataset with the user property zchunk:sync=false "
                                                "is skipped too."),
    identifier: Optional[str] = typer.Option(None, "--identifier", help="Names this replication's sync "
                                             "snapshots (zchunk_<identifier>_<host>_<UTC time>) and holds; "
                                             "default: derived from TARGET (the TARGETs)."),
    no_sync_snap: bool = typer.Option(False, "--no-sync-snap", help="Send the newest existing snapshot "
                                      "instead of taking a sync snapshot."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Send with -i (only the newest snapshot) "
                                   "instead of -I (every snapshot in between)."),
    include_snaps: Optional[list[str]] = typer.Option(None, "--include-snaps", help="Send only snapshots "
                                                      "matching this regex (repeatable)."),
    exclude_snaps: Optional[list[str]] = typer.Option(None, "--exclude-snaps", help="Do not send snapshots "
                                                      "matching this regex (repeatable); zchunk's own sync "
                                                      "snapshot is always sent (it is what the run sends)."),
    keep_sync_snaps: str = typer.Option("1", "--keep-sync-snaps", metavar="N|GRID", help="Which of zchunk's "
                                        "own sync snapshots (this identifier) to keep on each side: the newest "
                                        "N, or a grid \"10,1h1d,1d1w,1w1m\" (the newest 10, then one per hour "
                                        "for a day, one per day for a week, one per week for a month; units s, "
                                        "min, h, d, w, m, y). The newest common one always stays."),
    keep_target_snaps: Optional[str] = typer.Option(None, "--keep-target-snaps", metavar="N|GRID", help="On "
                                                    "the target, keep these of zchunk's sync snapshots instead "
                                                    "(default: as --keep-sync-snaps), e.g. 3 here and a long "
                                                    "grid on a backup host."),
    pre_snapshot: Optional[str] = typer.Option(None, "--pre-snapshot", metavar="CMD", help="Run CMD on this "
                                               "host before the sync snapshot (split into words as a shell "
                                               "would, but run without one: no pipes, no $VARS), e.g. to put a "
                                               "database into backup mode. If it fails or outlives "
                                               "--hook-timeout, nothing is snapshotted or sent (exit 18). It "
                                               "gets ZCHUNK_SOURCE, ZCHUNK_TARGET and ZCHUNK_SNAPSHOT."),
    post_snapshot: Optional[str] = typer.Option(None, "--post-snapshot", metavar="CMD", help="Run CMD after "
                                                "the sync snapshot (as --pre-snapshot), whenever --pre-snapshot "
                                                "succeeded, whatever became of the snapshot; failing, it is a "
                                                "warning."),
    hook_timeout: str = typer.Option("5m", "--hook-timeout", help="Kill --pre-snapshot or --post-snapshot "
                                     "(its whole process group) after this long."),
    rollback: bool = typer.Option(False, "--rollback", help="Allow rolling the target back to the common "
                                  "snapshot, destroying target-only snapshots and changes (listed first)."),
    force_delete: bool = typer.Option(False, "--force-delete", help="Allow destroying a target that shares "
                                      "no snapshot with the source, to re-seed it."),
    create_bookmark: bool = typer.Option(False, "--create-bookmark", help="Keep a bookmark of the newest "
                                         "common snapshot on the source (OpenZFS): an incremental base even "
                                         "after the snapshot is gone."),
    preserve_properties: bool = typer.Option(False, "--preserve-properties", help="Copy the source's local "
                                             "properties (mountpoint, shares, encryption keys excluded)."),
    no_raw: bool = typer.Option(False, "--no-raw", help="Send an encrypted source decrypted (its key must be "
                                "loaded): the replica is unencrypted, or encrypted under the target parent's "
                                "key. Default: raw (zfs send -w), the replica keeps the source's keys and the "
                                "target never has them."),
    send_option: Optional[list[str]] = typer.Option(None, "--send-option", metavar="OPT", help="Add a zfs send "
                                                    "flag (repeatable): -L -e -c -w -h or their long forms. "
                                                    "zchunk already sends -L -e where both hosts run OpenZFS "
                                                    "and -w for encrypted sources; flags that change which "
                                                    "stream is sent (-R -I -i -p -t -D) are refused."),
    recv_option: Optional[list[str]] = typer.Option(None, "--recv-option", metavar="OPT", help="Add to zfs "
                                                    "receive (repeatable): '-o NAME=VALUE' or '-x NAME'. Flags "
                                                    "that change where or how the stream lands (-F -d -e -u -s) "
                                                    "are refused: zchunk decides those."),
    set_property: Optional[list[str]] = typer.Option(None, "--set-property", metavar="NAME=VALUE", help="Set "
                                                     "a property on the replica (receive -o; where zfs lacks it, "
                                                     "the replica is created with it before its full stream and "
                                                     "it is set again after each receive). Repeatable."),
    exclude_property: Optional[list[str]] = typer.Option(None, "--exclude-property", metavar="NAME",
                                                         help="Never copy this property to the replica "
                                                         "(receive -x where zfs has it; dropped from "
                                                         "--preserve-properties). Repeatable."),
    dry_run: bool = typer.Option(False, "-n", "--dry-run", help="Print the plan (snapshots to send with "
                                 "estimated sizes, holds, prunes, rollbacks) and change nothing."),
    json_out: bool = Json, *, opts: SyncOptions,
) -> None:
    """Replicate SOURCE to TARGET: snapshot, send what is missing, verify, prune.

    Takes a sync snapshot, then sends a full stream when TARGET does not exist,
    else an incremental (-I) from the newest snapshot both sides share,
    matched by guid. The common base is held on both sides (where zfs has
    holds); only zchunk's own sync snapshots are ever pruned. A target that
    changed or diverged is refused unless --rollback; a target with no common
    snapshot is never destroyed without --force-delete.

    Between OpenZFS hosts streams carry -L -e; an encrypted source is sent raw
    (-w): the replica keeps its keys and the target never loads them (--no-raw
    sends it decrypted). With -r, an encrypted tree is seeded as one raw -R
    stream so that its encryption roots stay as they are.

    Several TARGETs (fan-out): one sync snapshot and one zfs send feed them all
    through one source spool; a chunk leaves it once every target has it.
    Each target has its own session, link retries, verification and holds
    (zchunk_<identifier>_<target hash>). A target that is down holds the
    others back only once --spool-max is full; after 5 minutes of that it is
    left behind (exit 15) and its next run continues from its own snapshot.

    Survives any outage shorter than --patience; if the coordinator dies, run
    the same command again (or `zchunk resume ID`) to continue where it stopped.
    Exit codes: docs/errors.md (15: some datasets of a recursive run, or some
    targets of a fan-out, failed).
    """
    try:
        try:
            retention = Retention.parse(keep_sync_snaps)
        except ValueError as e:
            raise E.UsageError(reason=f"--keep-sync-snaps {e}") from None
        try:
            keep_target = Retention.parse(keep_target_snaps) if keep_target_snaps is not None else None
        except ValueError as e:
            raise E.UsageError(reason=f"--keep-target-snaps {e}") from None
        if not 1 <= jobs <= 64:
            raise E.UsageError(reason=f"--jobs {jobs}: give 1 to 64 datasets at a time")
        hooks = _hooks(pre_snapshot, post_snapshot, parse_duration(hook_timeout, "--hook-timeout"))
        left_behind_after = parse_duration(detach_after, "--detach-after")
        ropts = ReplicateOptions(
            identifier=identifier, sync_snap=not no_sync_snap, stream=not no_stream,
            include_snaps=include_snaps or [], exclude_snaps=exclude_snaps or [], rollback=rollback,
            force_delete=force_delete, keep_sync_snaps=retention, create_bookmark=create_bookmark,
            recursive=recursive, jobs=jobs, exclude=exclude or [], preserve_properties=preserve_properties,
            dry_run=dry_run, stream_opts=stream_options(not no_raw, send_option or [], recv_option or [],
                                                        set_property or [], exclude_property or []),
            hooks=hooks, keep_target_snaps=keep_target)
    except E.ZchunkError as e:
        _fail(e, json_out)
    _setup_logging(opts.verbose)
    render = _renderer(json_out, opts.verbose)
    if len(targets) == 1:
        result = _run(replicate(source, targets[0], opts, ropts, render), json_out)
    else:
        result = _run(replicate_many(source, targets, opts, ropts, render, left_behind_after), json_out)
    _finish_replication(result, json_out, "targets" if len(targets) > 1 else "datasets")


def _hooks(pre: str | None, post: str | None, timeout: float) -> Hooks:
    def hook(option: str, command: str | None) -> Hook | None:
        if command is None:
            return None
        try:
            argv = shlex.split(command)
        except ValueError as e:
            raise E.UsageError(reason=f"{option} {command!r}: {e}") from None
        if not argv:
            raise E.UsageError(reason=f"{option}: give the command to run")
        return Hook(tuple(argv), timeout)

    return Hooks(hook("--pre-snapshot", pre), hook("--post-snapshot", post))


def _finish_replication(result: ReplicationResult, json_out: bool, what: str = "datasets") -> None:
    for outcome in result.outcomes:
        for stream in outcome.streams:
            _finish(stream, json_out)
    if json_out:
        JsonRenderer()("replication", result.to_json())
    failed = result.failed
    if failed:
        _fail(E.PartialFailure(failed=len(failed), total=len(result.outcomes), what=what,
                               names=", ".join(o.target if what == "targets" else o.source for o in failed)),
              json_out)


@app.command()
@shared_options(HOST_OPTIONS, STREAM_OPTIONS)
def resume(
    session: str = typer.Argument(..., metavar="ID", help="Session id (see `zchunk sessions`)."),
    json_out: bool = Json, *, opts: SyncOptions,
) -> None:
    """Continue a session: a paused one moves chunks again; one whose coordinator is gone is reattached to
    its live agents (no acknowledged chunk moves twice).

    When another zchunk process is running the session (paused from another terminal), that one continues
    it and this command returns at once.
    """
    _setup_logging(opts.verbose)
    try:
        view, was_paused = streams.unpause(session, opts)
    except E.ZchunkError as e:
        _fail(e, json_out)
    if view.running:
        if json_out:
            JsonRenderer()("result", {"session": session, "state": view.record.state, "paused": False})
        elif was_paused:
            sys.stderr.write(f"resumed {session}: its running coordinator moves chunks again\n")
        else:
            sys.stderr.write(f"{session} is not paused and another zchunk process is running it: nothing to do\n")
        return
    _finish(_run(streams.resume(session, opts, _renderer(json_out, opts.verbose)), json_out), json_out)


@app.command()
@shared_options(HOST_OPTIONS)
def limit(
    session: str = typer.Argument(..., metavar="ID", help="Session id (see `zchunk sessions`)."),
    rate: str = typer.Argument(..., metavar="RATE", help="8M (MiB/s), 50mbit, a schedule as --bwlimit takes, "
                               "or unlimited."),
    json_out: bool = Json, *, opts: SyncOptions,
) -> None:
    """Change a session's bandwidth limit while it runs (within a second or two), or for when it resumes."""
    try:
        view = streams.set_limit(session, opts, rate)
    except E.ZchunkError as e:
        _fail(e, json_out)
    _said(view, json_out, f"limit of {session}: {view.control.limit}")


@app.command()
@shared_options(HOST_OPTIONS)
def pause(
    session: str = typer.Argument(..., metavar="ID", help="Session id (see `zchunk sessions`)."),
    json_out: bool = Json, *, opts: SyncOptions,
) -> None:
    """Stop moving a session's chunks until `zchunk resume ID`: the agents, the zfs pipes and the spools stay
    (the sender stops at the spool cap). Paused time counts against neither --patience nor the agents'
    idle timeout while the session's coordinator runs."""
    try:
        view = streams.pause(session, opts)
    except E.ZchunkError as e:
        _fail(e, json_out)
    _said(view, json_out, f"paused {session}; continue with: zchunk resume {session}")


def _said(view: streams.SessionView, json_out: bool, text: str) -> None:
    if json_out:
        JsonRenderer()("result", {"session": view.record.id, "state": view.record.state,
                                  "paused": view.control.paused, "limit": view.control.limit})
        return
    if not view.running:
        text += " (no coordinator runs it now: it applies when `zchunk resume` reattaches it)"
    sys.stderr.write(text + "\n")


@app.command()
@shared_options(HOST_OPTIONS)
def abort(
    session: str = typer.Argument(..., metavar="ID", help="Session id (see `zchunk sessions`)."),
    patience: str = typer.Option("1m", "--patience", help="How long to retry a host through an outage "
                                 "before giving up on removing its session directory."),
    json_out: bool = Json, *, opts: SyncOptions,
) -> None:
    """Stop a session's agents (the partial zfs receive is aborted) and remove both session directories."""
    try:
        opts = dataclasses.replace(opts, patience=parse_duration(patience, "--patience"))
    except E.ZchunkError as e:
        _fail(e, json_out)
    rec = _run(streams.abort(session, opts, _renderer(json_out, False)), json_out)
    if json_out:
        JsonRenderer()("result", {"session": rec.id, "state": rec.state})
    elif rec.state == "aborted":
        sys.stderr.write(f"aborted {rec.id}\n")
    else:  # it had ended already: only what it left on the hosts was removed
        sys.stderr.write(f"removed what session {rec.id} ({rec.state}) left on the hosts\n")


@app.command()
def sessions(
    state_dir: Optional[Path] = HOST_OPTIONS[0].option,
    json_out: bool = Json,
) -> None:
    """List sessions: id, hosts, datasets, state, bytes done/estimated, chunks, age."""
    views = streams.list_sessions(SyncOptions(state_dir=state_dir or default_state_dir()))
    if json_out:
        print(json.dumps([v.to_json() for v in views], indent=1))
        return
    if not views:
        print("no sessions")
        return
    now = time.time()
    rows = [("ID", "STATE", "SOURCE", "TARGET", "DONE/ESTIMATE", "CHUNKS", "LIMIT", "AGE")]
    for v in views:
        r = v.record
        chunks = f"{r.chunks_received}/{r.total_chunks}" if r.total_chunks else f"{r.chunks_received}/?"
        state = f"{r.state} (directories left: zchunk abort {r.id})" if r.leftover else r.state
        if r.active:
            state += " paused" if v.control.paused else ""
            state += "" if v.running else " (no coordinator: zchunk resume)"
        limit = (v.control.limit or r.bwlimit or "unlimited") if r.active else ""
        rows.append((r.id, state, r.snapshot if r.source.count(":") == 0 else r.source, r.target,
                     f"{human_bytes(r.raw_bytes)}/{human_bytes(r.estimate)}", chunks, limit,
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


seed_app = typer.Typer(no_args_is_help=True, help="The first copy of a dataset on disks instead of over the "
                       "link: export its stream as verified chunk files, carry the disks, import them.")
app.add_typer(seed_app, name="seed")


@seed_app.command("export")
def seed_export(
    source: str = typer.Argument(..., metavar="SOURCE", help="pool/dataset on this host (run it where the "
                                 "disk is attached to the source)."),
    directory: Path = typer.Argument(..., metavar="DIR", help="Where the seed goes (empty or new; or the "
                                     "directory of an interrupted export of SOURCE, to finish it)."),
    snapshot: Optional[str] = typer.Option(None, "--snapshot", metavar="SNAP", help="Export this snapshot "
                                           "(default: take zchunk_seed_<host>_<time>)."),
    volume_size: Optional[str] = typer.Option(None, "--volume-size", metavar="SIZE", help="Split into volumes "
                                              "DIR/vol001, vol002, ... of at most SIZE each (one per disk)."),
    chunk_size: str = typer.Option("32M", "--chunk-size", metavar="SIZE", help="Raw stream bytes per chunk."),
    json_out: bool = Json,
) -> None:
    """Write a dataset's full zfs send stream into DIR as chunk files.

    The stream of SNAP (or of a seed snapshot taken now) is cut into chunks
    in zchunk's chunk format (compressed, each with its checksums), written
    to DIR/vol001/chunks/..., and every volume gets a manifest.json listing
    its chunks and the whole stream's size and checksum. The snapshot is
    held (tag zchunk_seed) until a zchunk sync finds it on the target.
    Interrupted, the same command finishes the export: chunks already
    written are kept (each checked against zfs send's regenerated bytes);
    a full disk stops it with exit 20 (make room, or copy DIR to a larger
    disk and run the same command on the copy). Then copy each volume
    directory to its disk and, at the other site, run zchunk seed import.
    """
    from . import seed

    try:
        check_dataset_name(source)
        if ":" in source:
            raise E.UsageError(reason=f"{source}: seed export reads a dataset of this host: run it on the source "
                               "host, where the disk is attached")
        size = parse_size(chunk_size, "--chunk-size")
        if not 1 << 20 <= size <= 256 << 20:
            raise E.UsageError(reason=f"--chunk-size {chunk_size}: between 1M and 256M")
        vol = parse_size(volume_size, "--volume-size") if volume_size else None
        if vol is not None and vol < size + (1 << 20):
            raise E.UsageError(reason=f"--volume-size {volume_size}: at least a chunk ({chunk_size}) and 1M more")
    except E.ZchunkError as e:
        _fail(e, json_out)
    result = _run(seed.export(source, directory, snapshot, vol, size, _seed_say(json_out)), json_out)
    if json_out:
        JsonRenderer()("seed_exported", dataclasses.asdict(result))
    else:
        sys.stderr.write(f"exported {result.snapshot} (guid {result.guid}) to {directory}: {result.chunks} chunks, "
                         f"{human_bytes(result.raw_bytes)} of stream in {human_bytes(result.stored_bytes)}, "
                         f"{result.volumes} volume(s)" + (f", {result.reused} kept from before" if result.reused
                                                          else "") + f", {human_duration(result.seconds)}\n")


@seed_app.command("import")
@shared_options(HOST_OPTIONS)
def seed_import(
    paths: list[str] = typer.Argument(..., metavar="DIR... TARGET", help="The seed's volume directories (or "
                                      "directories holding vol*), in any order, then the new dataset."),
    staging: Path = typer.Option(Path("/var/tmp/zchunk"), "--staging-dir", metavar="DIR", help="Where volumes "
                                 "present before their turn are kept, verified, until the set is complete."),
    wait: bool = typer.Option(False, "--wait", help="Wait for missing volumes to be mounted (checked every "
                              "10 s) instead of exiting."),
    repair_from: Optional[str] = typer.Option(None, "--repair-from", metavar="[[USER@]HOST:]SOURCE", help="Check "
                                              "every chunk first, and regenerate the damaged or missing ones on "
                                              "the source from the seed's snapshot (only they cross the link)."),
    json_out: bool = Json, *, opts: SyncOptions,
) -> None:
    """Receive a seed written by zchunk seed export into TARGET, a new dataset on this host.

    Every chunk is verified (its framing, its checksums and the manifest's)
    before any of its bytes reach zfs receive; the whole stream's checksum
    and the snapshot's guid are checked at the end. With every volume given
    the stream goes straight to zfs receive. Otherwise the volumes present
    are staged (copied, verified) in --staging-dir and the command says
    which volumes it still needs and exits 19 (or waits, with --wait): run
    it again with them. A damaged or missing chunk stops it before zfs sees
    it (exit 13, naming the chunk and its volume); with --repair-from, every
    chunk is checked before the receive starts and the damaged ones are made
    again on the source by one zfs send of the same snapshot, accepted only
    if their raw bytes match the manifest. The replica is left as
    zchunk sync leaves one: after the import, zchunk sync SOURCE TARGET
    continues incrementally from the seed's snapshot.
    """
    from . import seed

    try:
        if len(paths) < 2:
            raise E.UsageError(reason="give the seed's directories and then TARGET")
        *dirs, target = paths
        check_dataset_name(target)
        if ":" in target:
            raise E.UsageError(reason=f"{target}: seed import receives into a dataset of this host: run it on "
                               "the target host, where the disk is attached")
        for d in dirs:
            if not Path(d).is_dir():
                raise E.UsageError(reason=f"{d}: not a directory (give the seed's volume directories, then TARGET)")
        repair = parse_endpoint(repair_from) if repair_from else None
    except E.ZchunkError as e:
        _fail(e, json_out)

    async def run() -> seed.ImportResult:
        host = make_host(repair, opts.ssh, opts.python) if repair is not None else None
        try:
            if host is not None:
                await first_contact(host, 0.0, opts.connect_patience)
            return await seed.import_seed([Path(d) for d in dirs], target, staging, 10.0 if wait else None,
                                          _seed_say(json_out), host, repair.dataset if repair else "")
        finally:
            if host is not None:
                await host.close()

    result = _run(run(), json_out)
    if json_out:
        JsonRenderer()("seed_imported", dataclasses.asdict(result))
    elif result.chunks:
        sys.stderr.write(f"imported {result.snapshot} into {target}: {result.chunks} chunks, "
                         f"{human_bytes(result.raw_bytes)}, guid {result.guid} verified, "
                         f"{human_duration(result.seconds)}\n")


def _seed_say(json_out: bool) -> Any:
    def say(line: str) -> None:
        if json_out:
            JsonRenderer()("note", {"host": "localhost", "detail": line})
        else:
            sys.stderr.write(line + "\n")

    return say


config_app = typer.Typer(no_args_is_help=True, help="The jobs file (default /etc/zchunk/zchunk.toml, or "
                         "$ZCHUNK_CONFIG): what `zchunk run` and `zchunk daemon` will replicate, when and how.")
app.add_typer(config_app, name="config")

ConfigFile = typer.Option(None, "--config", metavar="FILE", help="The jobs file (default: $ZCHUNK_CONFIG, else "
                          "/etc/zchunk/zchunk.toml).")


@config_app.command("check")
def config_check(config: Optional[Path] = ConfigFile, json_out: bool = Json) -> None:
    """Check the jobs file and say every problem, each with its line and key.

    Reads the TOML file, refuses unknown keys (a typo must not silently
    change a job), checks each job's source, target, schedule (every or
    cron), retries, pre/post snapshot commands, retention (keep: a count or
    a grid like "10,1h1d,1d1w") and every zchunk sync option it sets, with
    the same checks as the command line. A file or directory that others
    may write is refused: its commands run as the service's user. Changes
    nothing and contacts no host. Exit 0: no problem; 16: problems.
    """
    checked, problems = _read_config(config)
    jobs = sorted(checked.config.jobs) if checked.config is not None and not problems else []
    if json_out:
        JsonRenderer()("config_check", {"config": str(checked.path), "ok": not problems, "jobs": jobs,
                                        "problems": [dataclasses.asdict(p) for p in problems]})
    else:
        for p in problems:
            print(p)
        print(f"{checked.path}: " + (f"{len(problems)} problem(s)" if problems else
                                     f"{len(jobs)} job(s), no problem: {', '.join(jobs)}"))
    if problems:
        raise typer.Exit(E.ConfigError.exit_code)


def _read_config(config: Path | None) -> tuple[jobs_file.Checked, list[jobs_file.Problem]]:
    """The jobs file and every problem in it, the values of its sync options included."""
    checked = jobs_file.read(jobs_file.config_path(config))
    problems = list(checked.problems)
    for name, options in checked.options.items():
        problems += _job_option_problems(checked, name, options)
    return checked, sorted(dict.fromkeys(problems), key=lambda p: (p.line, p.key))  # [defaults]' once


def _load_config(config: Path | None) -> jobs_file.Config:
    """The jobs file, or ConfigError (exit 16) naming its first problem: nothing runs on a file with any."""
    checked, problems = _read_config(config)
    if problems or checked.config is None:
        raise E.ConfigError(path=str(checked.path), count=len(problems) or 1,
                            first=str(problems[0]) if problems else "it does not parse")
    return checked.config


def _job_option_problems(checked: jobs_file.Checked, name: str,
                         job: jobs_file.JobOptions) -> list[jobs_file.Problem]:
    """The values of the zchunk sync options a job sets, checked as the command line's are, each said where
    it was written (a problem between several options, at the job)."""
    out = []
    shared = {o.name for o in HOST_OPTIONS + STREAM_OPTIONS}
    values: dict[str, Any] = {k: Path(v) if k in PATH_OPTIONS else v for k, v in job.sync.items()}

    def check(keys: list[str], step: Callable[[], Any]) -> None:
        try:
            step()
        except E.ZchunkError as e:
            where = job.origin[keys[0]] if len(keys) == 1 else ("jobs", name)
            out.append(checked.problem(where, str(e)))

    for key in [k for k in values if k in shared]:
        check([key], functools.partial(sync_options, {key: values[key]}))
    if not out:
        check([k for k in values if k in shared], functools.partial(sync_options,
                                                                    {k: v for k, v in values.items() if k in shared}))
    if "identifier" in values and not IDENTIFIER.fullmatch(values["identifier"]):
        out.append(checked.problem(job.origin["identifier"], f"{values['identifier']!r}: use 1-40 letters, "
                                   "digits, '.', ':' or '-'"))
    if "detach_after" in values:
        check(["detach_after"], functools.partial(parse_duration, values["detach_after"], "--detach-after"))
    if "jobs" in values and not 1 <= values["jobs"] <= 64:
        out.append(checked.problem(job.origin["jobs"], f"{values['jobs']}: give 1 to 64 datasets at a time"))
    for key in ("exclude", "include_snaps", "exclude_snaps"):
        for pattern in values.get(key, []):
            try:
                re.compile(pattern)
            except re.error as e:
                out.append(checked.problem(job.origin[key], f"{pattern!r} is not a regular expression: {e}"))
    flags = ["send_option", "recv_option", "set_property", "exclude_property"]
    if any(k in values for k in flags + ["no_raw"]):
        given = [k for k in flags + ["no_raw"] if k in values]
        check(given, functools.partial(stream_options, not values.get("no_raw", False), values.get("send_option", []),
                                       values.get("recv_option", []), values.get("set_property", []),
                                       values.get("exclude_property", [])))
    return out


# -- the service: jobs from the jobs file --------------------------------------------------------------


def _service_state(cfg: jobs_file.Config) -> Path:
    return cfg.state_dir or default_state_dir()


def _named(cfg: jobs_file.Config, names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in cfg.jobs]
    if unknown:
        raise E.UsageError(reason=f"no job {unknown[0]!r} in {cfg.path} (its jobs: {', '.join(sorted(cfg.jobs))})")
    return names


def _job(config: Path | None, name: str) -> tuple[jobs_file.Config, jobs_file.Job]:
    """The jobs file and its job ``name`` (UsageError naming the jobs there when it has none of that name)."""
    cfg = _load_config(config)
    job = cfg.jobs[_named(cfg, [name])[0]]
    if job.targets:  # a runbook works on one replica
        raise E.UsageError(reason=f"job {job.name} replicates to several targets ({job.target}): give its source "
                           "and the one target instead of the job")
    return cfg, job


def _job_options(cfg: jobs_file.Config, job: jobs_file.Job, *groups: tuple[Shared, ...]) -> SyncOptions:
    """The job's own values of these option groups, as the command line gives them: a runbook run for a JOB
    reaches its hosts as the job does, and keeps its session records where the job's runs do."""
    names = {o.name for group in groups for o in group}
    values = {k: Path(v) if k in PATH_OPTIONS else v for k, v in job.sync.items() if k in names}
    if "state_dir" in names:
        values.setdefault("state_dir", _service_state(cfg) / "sessions")  # as service.runner.sync_argv
    return sync_options(values)


def _say(line: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
    sys.stderr.flush()


@app.command("run")
def run_jobs(
    jobs: Optional[list[str]] = typer.Argument(None, metavar="[JOB]...", help="Run these jobs now, due or not "
                                               "(default: every enabled job that is due)."),
    config: Optional[Path] = ConfigFile,
    dry_run: bool = typer.Option(False, "-n", "--dry-run", help="Print each job's plan (zchunk sync "
                                 "--dry-run) and change nothing; nothing is recorded."),
    json_out: bool = Json,
) -> None:
    """Run the jobs that are due, once, and exit: for a systemd timer or cron.

    A job is due when its schedule (every or cron) says so since its last
    run; after a failed run, again after retry_delay, doubling, up to
    retries times; after a run cut short (a crash, kill -9, a reboot), at
    once: the transfer continues where it stands. Jobs run side by side up
    to max_parallel, one run per job (also against a running `zchunk
    daemon`: a job it runs is left to it) and one per target. Each run is
    `zchunk sync` with the job's options, recorded in the history; its
    events go to <state_dir>/logs/JOB.jsonl. Exit 0 when every run
    succeeded (or none was due), else the exit code of the first that did
    not (18: its pre-snapshot command failed and it was skipped). A job
    whose target is locked against replication (zchunk:locked, a
    failover) is skipped and shown locked, without failing the run.
    """
    from .service.daemon import Service

    try:
        cfg = _load_config(config)
        names = _named(cfg, jobs or [])
        outcomes = asyncio.run(Service(cfg, _service_state(cfg), _say).run_once(names, dry_run))
    except E.ZchunkError as e:
        _fail(e, json_out)
    if json_out:
        for o in outcomes:
            JsonRenderer()("job_run", dataclasses.asdict(o))
    bad = [o for o in outcomes if o.outcome not in ("ok", "busy", "locked")]  # locked: on purpose (failover)
    if bad:
        raise typer.Exit(bad[0].exit_code or 1)


@app.command()
def daemon(
    config: Optional[Path] = ConfigFile,
    metrics_listen: Optional[str] = typer.Option(None, "--metrics-listen", metavar="[ADDR:]PORT", help="Serve "
                                                 "Prometheus metrics on http://ADDR:PORT/metrics (ADDR "
                                                 "default 127.0.0.1: give 0.0.0.0 to open it to the network)."),
) -> None:
    """Run the jobs file's schedule until stopped: the zchunk service.

    Starts each job when it is due (see `zchunk run`), up to max_parallel at
    once, one run per job and per target. SIGHUP reloads the jobs file: one
    with problems is not loaded and the old one stays, said on stderr.
    SIGTERM (systemctl stop) takes no new runs and ends the running ones'
    coordinators, leaving their transfers to the agents: the next start
    continues each where it stands, with no chunk moved twice. So does a
    start after kill -9 or a crash. Logs one line per run start and end on
    stderr (the journal under systemd). Exit 16 on a jobs file with problems
    at start.
    """
    from .service.daemon import Service
    from .service.monitor import registry
    from .service.status import job_status

    try:
        cfg = _load_config(config)
        listen = _listen_address(metrics_listen) if metrics_listen else None
        state = _service_state(cfg)

        def reload() -> jobs_file.Config:
            new = _load_config(config)
            if _service_state(new) != state:
                _say(f"SIGHUP: state_dir changes only with a restart; keeping {state}")
            return dataclasses.replace(new, state_dir=cfg.state_dir)

        async def serve() -> None:
            service = Service(cfg, state, _say, reload)

            def ready() -> None:
                if listen is None:
                    return
                from prometheus_client import start_http_server

                from .service.history import History

                def rows() -> list[Any]:
                    history = History(state / "history.sqlite")  # one connection per scrape: its own thread
                    try:
                        return job_status(service.config, history, state, time.time())
                    finally:
                        history.close()

                try:
                    start_http_server(listen[1], listen[0], registry(rows))
                except OSError as e:
                    raise E.UsageError(reason=f"--metrics-listen {metrics_listen}: cannot listen: "
                                       f"{e.strerror or e}") from None
                _say(f"metrics on http://{listen[0]}:{listen[1]}/metrics")

            await service.serve(ready)

        asyncio.run(serve())
    except E.ZchunkError as e:
        _fail(e, False)


def _listen_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise E.UsageError(reason=f"--metrics-listen {text!r}: give [ADDR:]PORT, e.g. 9187 or 127.0.0.1:9187")
    return host.strip("[]") or "127.0.0.1", int(port)


def _rows(config: Path | None, names: list[str] | None = None) -> list[Any]:
    from .service.history import History
    from .service.status import job_status

    cfg = _load_config(config)
    keep = set(_named(cfg, names or []))
    state = _service_state(cfg)
    history = History(state / "history.sqlite")
    try:
        return [r for r in job_status(cfg, history, state, time.time()) if not keep or r.job in keep]
    finally:
        history.close()


@app.command()
def status(config: Optional[Path] = ConfigFile, json_out: bool = typer.Option(
        False, "--json", help="A JSON list: one object per job.")) -> None:
    """One row per job: is it in sync, and if not, why.

    STATE is ok, failed (failures in a row since the last success), running
    (with percent, rate and ETA), disabled, locked (its target carries
    zchunk:locked: a failover), or pending (never run). LAST SYNC
    is when the snapshot the last successful run left on the target was
    taken; LAG is now minus that. NEXT is when the job is due (now: due and
    waiting for a free slot or for `zchunk run`). Reads the history in the
    state directory; contacts no host.
    """
    try:
        rows = _rows(config)
    except E.ZchunkError as e:
        _fail(e, False)
    if json_out:
        print(json.dumps([r.to_json() for r in rows], indent=1))
        return
    now = time.time()

    def when(t: float | None) -> str:
        if t is None:
            return "-"
        if t <= now + 1 and t > now - 60:
            return "now"
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))

    table = [("JOB", "STATE", "LAST SYNC", "LAG", "DURATION", "NEXT", "FAIL", "SOURCE -> TARGET / ERROR")]
    for r in rows:
        state = r.state
        if r.live is not None:
            live = r.live
            state += (f" {live['percent']:.0f}%" if live.get("percent") is not None else "") + \
                (f" {human_bytes(live['rate'])}/s" if live.get("rate") else "") + \
                (f" ETA {human_duration(live['eta'])}" if live.get("eta") is not None else "")
        last = r.last_error if r.failures or r.state == "disabled" else ""
        if r.state == "disabled":
            last = r.disabled_why
        table.append((r.job, state, when(r.last_success), "-" if r.lag_seconds is None else
                      human_duration(r.lag_seconds), "-" if r.last_duration is None else
                      human_duration(r.last_duration), when(r.next_run), str(r.failures),
                      f"{r.source} -> {r.target}" + (f": {last}" if last else "")))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])


@app.command()
def check(
    jobs: Optional[list[str]] = typer.Argument(None, metavar="[JOB]...", help="The jobs to check."),
    all_jobs: bool = typer.Option(False, "--all", help="Check every job of the jobs file."),
    warn: str = typer.Option("1h", "--warn", help="WARNING when a job's lag reaches this."),
    crit: str = typer.Option("4h", "--crit", help="CRITICAL when a job's lag reaches this."),
    warn_failures: int = typer.Option(1, "--warn-failures", metavar="N", help="WARNING after N failed runs in a "
                                      "row."),
    crit_failures: int = typer.Option(3, "--crit-failures", metavar="N", help="CRITICAL after N failed runs in "
                                      "a row."),
    config: Optional[Path] = ConfigFile,
) -> None:
    """A Nagios / Icinga plugin: is replication keeping up?

    Exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (a job never replicated, a
    jobs file or history that cannot be read, bad options), with one line:
    the state word, each job's lag and failures, and perfdata
    (lag=123s;3600;14400;0 failures=0;1;3;0; JOB_lag=... for several jobs).
    A disabled job is a WARNING; several jobs: the worst state. Reads the
    history; contacts no host.
    """
    from .service.monitor import Thresholds
    from .service.monitor import check as judge

    try:
        if not jobs and not all_jobs:
            raise E.UsageError(reason="name the jobs to check, or give --all")
        t = Thresholds(parse_duration(warn, "--warn"), parse_duration(crit, "--crit"), warn_failures,
                       crit_failures)
        rows = _rows(config, jobs or [])
    except E.ZchunkError as e:
        print(f"ZCHUNK UNKNOWN - {e}")
        raise typer.Exit(3) from None
    code, line = judge(rows, t)
    print(line)
    raise typer.Exit(code)


@app.command()
def metrics(
    config: Optional[Path] = ConfigFile,
    textfile: Optional[Path] = typer.Option(None, "--textfile", metavar="DIR", help="Write DIR/zchunk.prom "
                                            "(atomically: node_exporter's textfile collector) instead of "
                                            "printing."),
) -> None:
    """Print the jobs' metrics in Prometheus text format.

    Per job: last success timestamp, lag, consecutive failures, last run's
    duration, next run, running, enabled; totals of runs, failures, bytes on
    the wire and outage seconds (over the history kept); for a running
    transfer, bytes done, expected and its rate. `zchunk daemon
    --metrics-listen` serves the same on /metrics.
    """
    from .service.monitor import exposition, write_textfile

    try:
        rows = _rows(config)
        if textfile is not None:
            if not textfile.is_dir():
                raise E.UsageError(reason=f"--textfile {textfile}: not a directory (node_exporter's "
                                   "--collector.textfile.directory)")
            write_textfile(str(textfile / "zchunk.prom"), rows)
        else:
            sys.stdout.write(exposition(rows).decode())
    except E.ZchunkError as e:
        _fail(e, False)


@app.command()
def disable(job: str = typer.Argument(..., metavar="JOB"),
            why: str = typer.Option("", "--why", metavar="TEXT", help="Said by zchunk status and check."),
            config: Optional[Path] = ConfigFile) -> None:
    """Stop scheduling JOB until `zchunk enable JOB` (a running run goes on)."""
    _toggle(config, job, why, enable=False)


@app.command()
def enable(job: str = typer.Argument(..., metavar="JOB"), config: Optional[Path] = ConfigFile) -> None:
    """Schedule JOB again after `zchunk disable` (enabled = false in the jobs file stays the file's)."""
    _toggle(config, job, "", enable=True)


def _toggle(config: Path | None, job: str, why: str, enable: bool) -> None:
    from .service.history import History

    try:
        cfg = _load_config(config)
        _named(cfg, [job])
        history = History(_service_state(cfg) / "history.sqlite")
        if enable:
            was = history.enable(job)
            print(f"{job}: enabled" + ("" if was else " (it was not disabled)") +
                  (" -- but enabled = false in the jobs file keeps it off" if not cfg.jobs[job].enabled else ""))
        else:
            history.disable(job, why)
            print(f"{job}: disabled" + (f" ({why})" if why else "") + "; `zchunk enable " + job + "` undoes it")
    except E.ZchunkError as e:
        _fail(e, False)


# -- the runbooks ----------------------------------------------------------------------------------------


@app.command()
@shared_options(HOST_OPTIONS)
def doctor(
    source: str = typer.Argument(..., metavar="SOURCE|JOB", help="pool/dataset or \\[user@]host:pool/dataset, or "
                                 "a job of the jobs file (then no TARGET)."),
    target: Optional[str] = typer.Argument(None, metavar="[TARGET]", help="pool/dataset or "
                                           "\\[user@]host:pool/dataset"),
    spool_dir: str = typer.Option("/var/tmp/zchunk", "--spool-dir", help="Where zchunk's session directories are "
                                  "on each host (leftovers are reported)."),
    connect_patience: str = typer.Option("10s", "--connect-patience", help="How long to try to reach a host."),
    no_raw: bool = typer.Option(False, "--no-raw", help="The replication sends an encrypted source decrypted "
                                "(zchunk sync --no-raw): check that its key is loaded."),
    config: Optional[Path] = ConfigFile,
    json_out: bool = Json, *, opts: SyncOptions,
) -> None:
    """Say why replication from SOURCE to TARGET works or not. Read-only.

    In the order an admin looks (control plane first): SSH to each host,
    python3 and zfs there (versions, how the interpreter was chosen),
    leftover session directories, clock skew, the link's round trip and
    throughput over SSH; then each pool's health, scrub or resilver and
    fill; the datasets and their types, a lock (failover), whether the
    target's zfs can receive and read the stream; the newest common
    snapshot by guid (the nearest one, and the target snapshots that would
    be lost, when the target's newest is gone from the source), writes on
    the target since, a partial receive, older sync snapshots still held,
    and room on the target for the next stream; for a JOB, its last
    success. Each check is PASS, WARN or FAIL with its evidence and fix.
    Nothing is written on either host. Exit 0: all pass; 1: warnings; 2: a
    failure.
    """
    from .runbooks.doctor import Doctor, Finding, exit_code
    from .service.history import History

    try:
        last, job = None, None
        if target is None:
            cfg, job = _job(config, source)
            opts = _job_options(cfg, job, HOST_OPTIONS)
            history = History(_service_state(cfg) / "history.sqlite")
            last = history.newest_snapshot_time(job.name)
            src, dst = parse_endpoint(job.source), parse_endpoint(job.target)
            spool_dir = str(job.sync.get("spool_dir", spool_dir))
            no_raw = bool(job.sync.get("no_raw", no_raw))
        else:
            src, dst = parse_endpoint(source), parse_endpoint(target)
        opts = dataclasses.replace(opts, spool_dir=spool_dir,
                                   connect_patience=parse_duration(connect_patience, "--connect-patience"))

        def say(f: Finding) -> None:
            if json_out:
                JsonRenderer()("doctor", f.to_json())
            else:
                print(f"{f.status}  {f.check:<21} {f.evidence}" + (f"\n      {'':<21} fix: {f.fix}" if f.fix and
                                                                     f.status != "PASS" else ""))

        findings = asyncio.run(Doctor(src, dst, opts, say, last, job.name if job else None, no_raw).run())
    except E.ZchunkError as e:
        _fail(e, json_out)
    code = exit_code(findings)
    if not json_out:
        print({0: "all checks passed", 1: "warnings: see above", 2: "a check failed: see above"}[code])
    raise typer.Exit(code)


@app.command()
@shared_options(HOST_OPTIONS, STREAM_OPTIONS)
def resync(
    source: str = typer.Argument(..., metavar="SOURCE|JOB", help="pool/dataset or \\[user@]host:pool/dataset, or "
                                 "a job of the jobs file (then no TARGET)."),
    target: Optional[str] = typer.Argument(None, metavar="[TARGET]", help="pool/dataset or "
                                           "\\[user@]host:pool/dataset"),
    yes: bool = typer.Option(False, "-y", "--yes", help="Do it (without: the plan, nothing changed)."),
    reseed: bool = typer.Option(False, "--reseed", help="When no snapshot is common: destroy the target and send "
                                "it all again (refused when its pool cannot hold the stream)."),
    rename_target: Optional[str] = typer.Option(None, "--rename-target", metavar="NEW", help="When the source is "
                                                "gone: rename the orphaned replica to NEW (pool/dataset on the "
                                                "target host)."),
    identifier: Optional[str] = typer.Option(None, "--identifier", help="As zchunk sync's (default: derived "
                                             "from TARGET)."),
    config: Optional[Path] = ConfigFile,
    json_out: bool = Json, *, opts: SyncOptions,
) -> None:
    """Repair the replication chain: roll the target back to the nearest common snapshot and continue.

    Seed 000 as one command. Finds the newest snapshot both sides share (by
    guid) and shows the plan: the target snapshots that would be destroyed
    (a Proxmox @vzdump among them), the rollback and how much written on
    the target since it discards (OpenZFS's written@; zfs-fuse cannot
    say), the streams to send. Only
    with --yes is it done (zchunk sync --rollback). No common snapshot at
    all: the plan is a full re-seed, done only with --reseed --yes, and
    refused when the target's pool cannot hold the stream. Source gone:
    nothing is changed; --rename-target NEW (with --yes) moves the replica
    out of the way of a future dataset of the same name.
    """
    from .runbooks.resync import look, reseed_fits
    from .runbooks.resync import rename_target as rename

    try:
        ident = identifier
        if target is None:
            cfg, job = _job(config, source)
            opts = _job_options(cfg, job, HOST_OPTIONS, STREAM_OPTIONS)
            source, target, ident = job.source, job.target, ident or job.sync.get("identifier")
        src, dst = parse_endpoint(source), parse_endpoint(target)
        new = check_dataset_name(rename_target) if rename_target else None
        if new is not None and new.split("/")[0] != dst.dataset.split("/")[0]:
            raise E.UsageError(reason=f"--rename-target {new}: zfs renames within a pool ({dst.dataset.split('/')[0]})")
        if ident is not None and not IDENTIFIER.fullmatch(ident):
            raise E.UsageError(reason=f"--identifier {ident!r}: use 1-40 letters, digits, '.', ':' or '-'")
        _setup_logging(opts.verbose)
        sides = _run(look(src, dst, opts), json_out)
        if sides.source is None:
            if sides.target is not None and new is not None:
                def say(line: str) -> None:
                    sys.stderr.write(line + "\n")

                if _run(rename(dst, new, opts, yes, say), json_out):
                    return
                sys.stderr.write("nothing changed: run again with --yes to rename it\n")
                return
            raise E.SourceGone(source=str(src), target=str(dst))
        if sides.target is not None and common_snapshot(sides.source, sides.target) is None:
            if not reseed:
                raise E.ReseedNeeded(source=str(src), target=str(dst))
            _run(reseed_fits(src, dst, opts, sides.source), json_out)
        ropts = ReplicateOptions(identifier=ident, rollback=True, force_delete=reseed, dry_run=not yes)
    except E.ZchunkError as e:
        _fail(e, json_out)
    result = _run(replicate(source, target, opts, ropts, _renderer(json_out, opts.verbose)), json_out)
    _finish_replication(result, json_out)
    if not yes and not json_out:
        sys.stderr.write("nothing changed: run again with --yes to do it\n")


@app.command()
@shared_options(HOST_OPTIONS, STREAM_OPTIONS)
def failback(
    replica: str = typer.Argument(..., metavar="REPLICA|JOB", help="The failed-over replica, "
                                  "\\[user@]host:pool/dataset or pool/dataset, or a job of the jobs file."),
    source: Optional[str] = typer.Argument(None, metavar="[SOURCE]", help="The old (or rebuilt) source, where "
                                           "the changes go home (with a JOB: its source)."),
    yes: bool = typer.Option(False, "-y", "--yes", help="Do it (without: the plan, nothing changed)."),
    final: bool = typer.Option(False, "--final", help="The last pass (stop the application on the replica "
                                "first): then SOURCE is made primary again (mounted), the replica a replica "
                                "again (unmounted, its settings back, unlocked), and the job re-enabled."),
    identifier: Optional[str] = typer.Option(None, "--identifier", help="Names the failback's sync snapshots "
                                             "(default: derived from SOURCE)."),
    config: Optional[Path] = ConfigFile,
    json_out: bool = Json, *, opts: SyncOptions,
) -> None:
    """Bring the changes made on a failed-over replica home (seed 002, 6.2.2).

    Replicates REPLICA back to SOURCE with the same engine, the other way
    round: from the newest snapshot both share (by guid), rolling SOURCE
    back over what it has after that (listed first: its later snapshots and
    writes are lost). A rebuilt, empty SOURCE gets a full stream. Repeat it
    while the application runs on the replica; then stop the application
    and run it with --final: after that last pass SOURCE is primary again,
    the replica is a replica again, and replication from SOURCE continues
    incrementally. Nothing is changed without --yes. A test failover is
    ended with `zchunk failover --end` instead.
    """
    from .runbooks.failover import failed_over, finish_failback
    from .service.history import History

    try:
        job, cfg = None, None
        if source is None:
            cfg, job = _job(config, replica)
            opts = _job_options(cfg, job, HOST_OPTIONS, STREAM_OPTIONS)
            replica, source = job.target, job.source
        rep, src = parse_endpoint(replica), parse_endpoint(source)
        if identifier is not None and not IDENTIFIER.fullmatch(identifier):
            raise E.UsageError(reason=f"--identifier {identifier!r}: use 1-40 letters, digits, '.', ':' or '-'")
        _setup_logging(opts.verbose)
        _run(failed_over(rep, opts.ssh, opts.connect_patience), json_out)
        ropts = ReplicateOptions(identifier=identifier, rollback=True, dry_run=not yes)
    except E.ZchunkError as e:
        _fail(e, json_out)
    result = _run(replicate(str(rep), str(src), opts, ropts, _renderer(json_out, opts.verbose)), json_out)
    _finish_replication(result, json_out)
    if final:
        def say(line: str) -> None:
            if not json_out:
                sys.stderr.write(line + "\n")

        plan = _run(finish_failback(rep, src, opts.ssh, yes, say, opts.connect_patience), json_out)
        if json_out:
            JsonRenderer()("failover", plan.to_json())
        if yes and job is not None and cfg is not None:
            try:
                History(_service_state(cfg) / "history.sqlite").enable(job.name)
            except E.ZchunkError as e:
                _fail(e, json_out)
    if not yes and not json_out:
        sys.stderr.write("nothing changed: run again with --yes to do it\n")
    elif final and not json_out:
        sys.stderr.write(f"{src} is primary again and {rep} a replica again: replication from {src} "
                         "continues\n")


@app.command()
@shared_options(HOST_OPTIONS)
def failover(
    target: str = typer.Argument(..., metavar="TARGET|JOB", help="The replica, \\[user@]host:pool/dataset or "
                                 "pool/dataset, or a job of the jobs file (its target; the job is disabled too)."),
    test: bool = typer.Option(False, "--test", help="A test: `zchunk failover --end` will discard what it "
                              "writes and resume replication."),
    end: bool = typer.Option(False, "--end", help="End a test failover: roll the replica back to the snapshot "
                             "it was failed over from (what the test wrote is listed, then discarded), put its "
                             "settings back, unlock it, re-enable the job. Only with --yes."),
    mountpoint: Optional[str] = typer.Option(None, "--mountpoint", metavar="PATH", help="Mount the replica "
                                             "here (default: its own mountpoint)."),
    why: str = typer.Option("", "--why", metavar="TEXT", help="Said in the lock, by status and by every "
                            "refused sync."),
    yes: bool = typer.Option(False, "-y", "--yes", help="With --end: do it (without: the plan, nothing "
                             "changed)."),
    dry_run: bool = typer.Option(False, "-n", "--dry-run", help="Say what failing over would do; change "
                                 "nothing."),
    config: Optional[Path] = ConfigFile,
    json_out: bool = Json, *, opts: SyncOptions,
) -> None:
    """Make a replica usable (a test or a disaster) and lock it against replication.

    Run against the replica's host (seed 002, section 6). Keeps the
    replica's settings and its newest snapshot in the user property
    zchunk:failover, locks it with zchunk:locked (who, when, why: on the
    dataset itself, so every zchunk sync or job into it refuses with exit 9
    even when the source comes back unannounced), sets readonly=off and
    canmount=on, and mounts it (--mountpoint to move it). With a JOB, the job
    is disabled too.

    --end (a --test only): shows the snapshots taken and the bytes written
    on the replica since, which are discarded, and with --yes rolls it back,
    restores its settings, unlocks it and re-enables the job: the next sync
    continues incrementally. A real failover is ended by failing back.
    """
    from .runbooks.failover import end_test
    from .runbooks.failover import failover as fail_over
    from .service.history import History

    try:
        job = None
        if "/" not in target:
            cfg, job = _job(config, target)
            opts = _job_options(cfg, job, HOST_OPTIONS)
            endpoint = parse_endpoint(job.target)
        else:
            endpoint = parse_endpoint(target)
        if end and (test or mountpoint):
            raise E.UsageError(reason="--end takes no --test or --mountpoint: it ends what failover did")
        def say(line: str) -> None:
            if not json_out:
                sys.stderr.write(line + "\n")

        if end:
            plan = asyncio.run(end_test(endpoint, opts.ssh, yes, say, opts.connect_patience))
        else:
            plan = asyncio.run(fail_over(endpoint, opts.ssh, test, mountpoint, why, dry_run, say,
                                         opts.connect_patience))
        if job is not None and plan.done:
            history = History(_service_state(cfg) / "history.sqlite")
            if end:
                history.enable(job.name)
            else:
                history.disable(job.name, f"failed over{' (test)' if test else ''}" + (f": {why}" if why else ""))
    except E.ZchunkError as e:
        _fail(e, json_out)
    if json_out:
        JsonRenderer()("failover", plan.to_json())
        return
    if end and not yes:
        sys.stderr.write(f"discarded: {plan.written} written since {plan.snapshot}"
                         + (f", snapshots {', '.join(plan.discarded_snapshots)}" if plan.discarded_snapshots else "")
                         + "\nnothing changed: run again with --yes to end the test\n")
    elif plan.done:
        sys.stderr.write(f"{plan.target}: " + ("test failover ended: replication continues from "
                                               f"{plan.snapshot}" if end else "failed over" + (" (test)" if test
                                               else "") + f" from {plan.snapshot}; locked against replication")
                         + "\n")


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
