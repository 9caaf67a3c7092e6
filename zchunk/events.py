"""What the library reports while it works: every event kind, its fields, and the ``Emitter`` that carries them.

The library never prints: it calls an ``Emitter`` with a kind and named
fields, and the CLI decides how to show them (``progress.TextRenderer``, or
one JSON line per event with ``--json``). The kinds and fields below are a
public API for scripts that read ``--json``: ``docs/events.md`` is generated
from this table (``python -m zchunk.events``), and a test checks that every
``emit(...)`` in the package names a kind and fields declared here. New
fields may be added to a kind; readers should ignore fields they do not know.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: A renderer: called with the kind and the fields of each event.
Sink = Callable[[str, dict[str, Any]], None]


class Emitter:
    """The library's side of events: ``emit("kind", field=value, ...)``; a ``None`` sink drops them."""

    def __init__(self, sink: Sink | None) -> None:
        self.sink = sink

    def __call__(self, kind: str, **fields: Any) -> None:
        if self.sink is not None:
            self.sink(kind, fields)

    def bound(self, **extra: Any) -> Emitter:
        """An emitter that adds ``extra`` to every event it carries (a field the event has itself wins):
        each dataset's events in a recursive run carry ``dataset``, as their streams run side by side."""
        sink = self.sink
        if sink is None:
            return self
        return Emitter(lambda kind, fields: sink(kind, {**extra, **fields}))


@dataclass(frozen=True)
class EventKind:
    name: str
    doc: str
    fields: dict[str, str]


_HOST = "the host (name as given, or an ssh_config alias)"


def _kinds(*kinds: EventKind) -> dict[str, EventKind]:
    return {k.name: k for k in kinds}


EVENTS = _kinds(
    # -- replication (zchunk sync) --------------------------------------------------------------
    EventKind("preflight", "Both hosts were reached and probed; with -v the text output shows them.", {
        "source": "the source host: host, python (version), interpreter (its path), why (how it was chosen), "
        "capabilities (agent), zfs (features), uid, program (the agent program a run before put there, which "
        "the probe imported instead of being sent the agent's source; empty: none)",
        "target": "the target host, as source",
        "identifier": "names this replication's sync snapshots and holds"}),
    EventKind("dataset_skipped", "With -r: a child dataset left out.", {
        "source": "the dataset", "reason": "`matches --exclude` or `zchunk:sync=false`"}),
    EventKind("dataset_plan", "What will be done for one dataset (with --dry-run: what would be).", {
        "source": "source dataset", "target": "target dataset", "up_to_date": "nothing to send",
        "steps": "the streams to send, described", "rollback": "snapshot the target is rolled back to, or null",
        "destroys": "target snapshots the rollback destroys", "rollback_discards": "bytes the target's "
        "head holds that the rollback snapshot does not (written@ it), or null: no rollback, or this zfs cannot "
        "say (zfs-fuse)", "destroy_target": "the target is destroyed "
        "(--force-delete)", "hold": "the hold tag", "prune_source": "own sync snapshots pruned on the source",
        "prune_target": "own sync snapshots pruned on the target", "properties": "properties set on the replica",
        "send_flags": "flags of zfs send (-L -e where both run OpenZFS, -w for an encrypted source)",
        "encryption": "what becomes of encryption on the replica, or null (neither side encrypted)",
        "dry_run": "nothing is changed"}),
    EventKind("would_snapshot", "--dry-run: the sync snapshot that would be taken.", {"snapshot": "its full name"}),
    EventKind("snapshot", "A sync snapshot was taken on the source.", {
        "snapshot": "its full name (with -r: the tree's root, and `datasets` says how many got it)",
        "datasets": "with -r: how many datasets of the tree got the snapshot, all at one moment (zfs "
        "snapshot -r, or all names in one zfs snapshot)", "targets": "with several TARGETs: how many targets "
        "it is for"}),
    EventKind("hook", "A --pre-snapshot or --post-snapshot command ran (no shell, on the coordinator's host).", {
        "which": "pre-snapshot or post-snapshot", "command": "its argv, joined by spaces", "status": "its exit "
        "status", "seconds": "how long it ran", "output": "the end of what it printed (stdout and stderr)"}),
    EventKind("rolling_back", "The target is being rolled back (--rollback).", {
        "target": "target dataset", "to": "the snapshot rolled back to", "destroys": "snapshots destroyed"}),
    EventKind("destroying", "The target is being destroyed to re-seed it (--force-delete).", {
        "target": "target dataset", "reason": "why"}),
    EventKind("resume_token", "A receive that died left a resume token: it is finished with `zfs send -t`.", {
        "target": "target dataset", "snapshot": "the snapshot the token resumes"}),
    EventKind("resume_token_stale", "A resume token whose snapshot is gone: the partial receive is aborted.", {
        "target": "target dataset", "reason": "what zfs send -t said"}),
    EventKind("pruned", "One of zchunk's own sync snapshots was destroyed. With -r, every dataset's prunes come at "
              "the end of the run, after all `dataset_done` events, and carry `dataset`; a prune that fails there "
              "is a `note`.", {
        "host": _HOST, "snapshot": "its full name"}),
    EventKind("bookmark", "--create-bookmark: the newest common snapshot was bookmarked.", {
        "bookmark": "its full name"}),
    EventKind("properties_skipped", "--preserve-properties: local properties not copied (unsafe on a replica).", {
        "dataset": "source dataset", "properties": "their names"}),
    EventKind("up_to_date", "The target already has everything.", {"detail": "a sentence"}),
    EventKind("dataset_failed", "With -r: one dataset failed; the others go on (exit 15 at the end).", {
        "source": "source dataset", "target": "target dataset", "error": "the error's message",
        "hint": "the command or step that fixes it"}),
    EventKind("dataset_done", "With -r: one dataset is finished (sent, up to date or failed).", {
        "source": "source dataset", "target": "target dataset", "status": "sent, up-to-date, planned or failed",
        "raw_bytes": "stream bytes sent for it", "seconds": "how long it took, waiting for its parent excluded",
        "done": "datasets finished so far", "total": "datasets in the run"}),
    EventKind("agent_program", "The agent program was put on a host, once per host and version of the agent: "
              "by its first run that streams, when its probe did not find it there; every stream's agents after "
              "that, and later runs' probes, import it.", {
        "host": _HOST, "path": "where it is (under the spool directory)",
        "fresh": "it was not there before (false: a run before left this very version)"}),
    EventKind("restart", "An agent died (killed, host rebooted): the stream starts again, said how.", {
        "source": "source dataset", "reason": "what was found", "how": "resume token or from the common snapshot",
        "attempt": "1, 2, ... (0: an unfinished session of an earlier run)"}),
    EventKind("reattach", "An unfinished session of these datasets exists: it is continued first.", {
        "session": "its id"}),
    EventKind("leftovers", "An ended session left its directories (its coordinator died cleaning up): removed.", {
        "session": "its id", "state": "its recorded state"}),
    EventKind("stale_cleaned", "The directories of a dead session receiving into the target were removed.", {
        "host": _HOST, "path": "the session directory", "state": "what its agent reported"}),
    # -- one stream (a session) -----------------------------------------------------------------
    EventKind("plan", "One stream is about to start: what is sent and how.", {
        "plan": "a sentence", "send_kind": "full, incremental or resume", "snapshot": "the snapshot sent",
        "base": "the incremental base, or null", "estimate": "estimated stream bytes (zfs send -nP, else "
        "referenced)", "codec": "chunk compression (null: direct)", "checksum": "chunk checksum (null: direct)",
        "direct": "present and true: the stream goes without a session (--direct-max), zfs send piped into "
        "zfs receive; if it stops, a second plan event follows for its session"}),
    EventKind("session", "The agents of a stream run (or were reattached to).", {
        "session": "session id (zchunk sessions, resume, abort)", "source_dir": "session directory on the source",
        "target_dir": "session directory on the target", "resumed": "present and true when reattached",
        "fanout": "with several TARGETs: the name of the group whose one zfs send feeds this stream (absent when "
        "it runs alone)"}),
    EventKind("channels", "A run's agent channels on one host, as the run ends: each serve process serves one "
              "stream after another.", {
        "host": _HOST, "started": "serve processes the run started there",
        "attached": "times a stream took a channel an earlier stream of the run left (no process started)"}),
    EventKind("progress", "At most once a second while a stream moves.", {
        "raw_bytes": "stream bytes fed to zfs receive", "estimate": "expected stream bytes",
        "exact": "the estimate is the stream's real size (zfs send ended)",
        "wire_bytes": "bytes this coordinator moved over the link (compressed chunks)",
        "on_target": "chunk bytes that have crossed the link, half-moved chunks included (from the agents)",
        "expected": "chunk bytes the whole stream will move: exact once zfs send ended, else the estimate at "
        "the compression ratio seen so far", "percent": "on_target of expected; never 100 before it is exact",
        "rate": "bytes/s reaching the target while the link was up and not paused, over the last 10 s (at the "
                "start, over half the time moved so far, at least 3 s)",
        "eta": "seconds left: (expected - on_target) / rate, or null", "eta_seconds": "the same as eta",
        "chunks_spooled": "chunks the sender has written",
        "chunks_moved": "chunks the target holds or has consumed", "chunks_received": "chunks fed to zfs receive",
        "total_chunks": "chunks in the stream, once zfs send ended", "paused": "why the sender is paused "
        "(spool-full, no-space) or null", "link_down": "hosts whose link is down now",
        "limit": "the bandwidth limit in force, bytes/s, or null", "user_paused": "paused by zchunk pause"}),
    EventKind("limit", "The bandwidth limit in force changed (--bwlimit's schedule, zchunk limit).", {
        "rate": "bytes/s, or null: unlimited", "limit": "what decides it, as written (a rate or a schedule)"}),
    EventKind("paused", "zchunk pause: no chunk moves until zchunk resume; agents, zfs pipes and spools stay.", {
        "session": "session id"}),
    EventKind("unpaused", "zchunk resume: chunks move again.", {"session": "session id"}),
    EventKind("link_down", "A host's link failed; zchunk retries until --patience passes without progress.", {
        "host": _HOST, "reason": "what failed"}),
    EventKind("retrying", "The next try after a link failure.", {
        "host": _HOST, "delay": "seconds until it", "outage": "seconds down so far", "reason": "the last failure"}),
    EventKind("link_up", "A host's link works again.", {"host": _HOST, "outage": "how long it was down, seconds"}),
    EventKind("chunk_resume", "A half-moved chunk continues from the byte the target holds.", {
        "seq": "chunk number", "offset": "bytes of it already on the target"}),
    EventKind("chunk_discarded", "A chunk failed verification on the target and is moved again.", {
        "host": _HOST, "detail": "which chunk and why"}),
    EventKind("sender_restart", "The source's daemon died (killed, its host rebooted) while zfs receive still "
              "runs: it is started again, runs zfs send anew, checks each chunk it cut before by its raw "
              "checksum and writes only the missing ones (a stream that differs is started anew from its base).", {
                  "host": "the source host", "attempt": "restarts in this transfer (at most 3)",
                  "detail": "why"}),
    EventKind("seed_exported", "zchunk seed export finished (or found its export complete).", {
        "snapshot": "the snapshot exported", "guid": "its guid", "chunks": "chunks of the stream",
        "raw_bytes": "the stream's bytes", "stored_bytes": "chunk file bytes written", "volumes": "volumes",
        "reused": "chunks kept from an interrupted export", "seconds": "how long it took"}),
    EventKind("seed_imported", "zchunk seed import finished (chunks 0: the target had the snapshot already).", {
        "snapshot": "the snapshot received", "guid": "its guid, checked", "chunks": "chunks fed to zfs receive",
        "raw_bytes": "the stream's bytes", "seconds": "how long it took",
        "done": "the import is complete"}),
    EventKind("stream_end", "zfs send has finished: the stream's size is known.", {
        "chunks": "chunks in the stream (0: sent directly)", "raw_bytes": "stream bytes",
        "sender_cpu": "CPU seconds the sender daemon and its zfs send used", "sender": "with fan-out: the "
        "group's sender directory on the source (one zfs send for the targets whose events name it), else null"}),
    EventKind("verified", "The target snapshot's guid equals the source's, after the whole-stream checksum.", {
        "snapshot": "the source snapshot", "guid": "its guid",
        "stream_hash": "the whole-stream checksum (null for a direct stream: SSH's own integrity checks carried it)"}),
    EventKind("cleaned", "The session's agents are gone and its directories removed (or kept: --keep).", {
        "kept": "the directories were kept for inspection"}),
    EventKind("removed", "zchunk abort: a session directory was removed.", {
        "host": _HOST, "path": "the session directory"}),
    # -- anywhere ------------------------------------------------------------------------------
    EventKind("warning", "Something the user should know that did not stop the run.", {
        "host": _HOST, "detail": "a sentence"}),
    EventKind("note", "Something worth knowing, not a problem.", {"host": _HOST, "detail": "a sentence"}),
    EventKind("demo_step", "zchunk demo: what the demo does next.", {"text": "a sentence"}),
    # -- printed by the CLI at the end (--json) ------------------------------------------------------
    EventKind("result", "One stream's (or, for abort, the session's) outcome.", {
        "session": "session id (null: sent directly, without a session)", "plan": "what was sent",
        "up_to_date": "nothing was sent",
        "transfer": "raw_bytes, wire_bytes, total_chunks, stream_hash, elapsed, outages, outage_seconds, "
        "discarded_chunks, receiver", "target_snapshot": "the replica's snapshot", "guid": "its guid",
        "state": "(abort, limit, pause, resume) the session's state", "paused": "(limit, pause, resume) "
        "whether it is paused", "limit": "(limit, pause) its bandwidth limit as set by zchunk limit"}),
    EventKind("replication", "zchunk sync's outcome, every dataset.", {
        "outcomes": "per dataset: source, target, status (sent, up-to-date, planned, skipped, failed), "
        "streams (results), error, exit_code"}),
    EventKind("job_run", "zchunk run: one job's run ended.", {
        "job": "the job", "outcome": "ok, failed, skipped (its pre-snapshot command failed), interrupted, or "
        "busy (another zchunk process runs it)", "exit_code": "zchunk sync's exit code", "error": "the error's "
        "line", "wire_bytes": "bytes on the link", "snapshots": "snapshots received", "outage_seconds": "link "
        "down", "snapshot_time": "when the snapshot now on the target was taken (ok)", "seconds": "how long it "
        "took", "run_id": "its row in the history"}),
    EventKind("doctor", "zchunk doctor: one check's finding.", {
        "check": "what was checked", "status": "PASS, WARN or FAIL", "evidence": "one line of what was found",
        "fix": "the command or step that fixes it (WARN, FAIL)"}),
    EventKind("failover", "zchunk failover: the plan, and whether it was done.", {
        "target": "the replica", "snapshot": "the snapshot it was failed over from", "test": "a test failover",
        "done": "the steps were taken (false: --dry-run, or --end without --yes)", "steps": "what and the zfs "
        "command, in order", "discarded_snapshots": "(--end) snapshots taken on the replica since, destroyed",
        "written": "(--end) bytes written since the snapshot, discarded"}),
    EventKind("config_check", "zchunk config check: the jobs file's problems.", {
        "config": "the file", "ok": "no problem", "jobs": "the jobs it defines (when ok)",
        "problems": "file, line, key (dotted: jobs.NAME.KEY), message; line 0: the file as a whole"}),
    EventKind("error", "The run failed: the same error as on stderr, and the exit code.", {
        "error": "the error's class (docs/errors.md)", "message": "the sentence", "hint": "the fix",
        "exit_code": "the process's exit code"}),
)

#: Added to every JSON line.
COMMON_FIELDS = {"event": "the kind", "time": "Unix time of the event, seconds (3 decimals)"}
#: Added to the events of one dataset of a recursive run (their streams run side by side with --jobs).
DATASET_FIELD = ("dataset", "with -r, on every event about one dataset: the source dataset it is about")
#: Added to the events of one target of a fan-out run (``zchunk sync SOURCE T1 T2 ...``).
TARGET_FIELD = ("fanout_target", "with several TARGETs, on every event about one target: that TARGET as given")


def events_doc() -> str:
    """docs/events.md: every kind and its fields."""
    out = ["# zchunk --json events", "",
           "Generated by `python -m zchunk.events` from `zchunk/events.py`; do not edit by hand.", "",
           "With `--json`, zchunk prints one JSON object per line on stdout. Every line has "
           + ", ".join(f"`{k}` ({v})" for k, v in COMMON_FIELDS.items())
           + ". Fields may be added to a kind in later versions: ignore the ones you do not know. "
           + f"In a recursive run (`-r`), every event about one dataset also has `{DATASET_FIELD[0]}` "
           + f"({DATASET_FIELD[1].split(': ', 1)[1]}). "
           + f"With several TARGETs (fan-out), every event about one target also has `{TARGET_FIELD[0]}` "
           + f"({TARGET_FIELD[1].split(': ', 1)[1]}).", ""]
    for kind in EVENTS.values():
        out += [f"## `{kind.name}`", "", kind.doc, "", "| field | meaning |", "|---|---|"]
        out += [f"| `{name}` | {doc} |" for name, doc in kind.fields.items()]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(events_doc(), end="")
