"""Showing engine events: a live bar on a TTY, JSON lines with ``--json``, plain lines otherwise."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def percent_of(done: int, estimate: int, exact: bool) -> float:
    """Never above 100, and never 100 until the total is known to be exact."""
    if estimate <= 0:
        return 0.0
    p = 100.0 * done / estimate
    return min(p, 100.0 if exact else 99.9)


class JsonRenderer:
    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out

    def __call__(self, kind: str, fields: dict[str, Any]) -> None:
        self.out.write(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}, default=str) + "\n")
        self.out.flush()


_FEATURE_NAMES = {"holds": "holds", "bookmarks": "bookmarks", "resume_tokens": "resume tokens (send -t, receive -s)",
                  "send_estimate": "send -nP estimates", "receive_u": "receive -u", "receive_props": "receive -o",
                  "raw": "raw sends (-w)", "compressed": "compressed sends (-c)", "large_blocks": "large blocks (-L)",
                  "embedded": "embedded data (-e)"}


def describe_zfs(summary: dict[str, Any]) -> str:
    """One host's zfs features (``Features.summary()``) as one readable line for ``-v``."""
    has = [text for key, text in _FEATURE_NAMES.items() if summary.get(key)]
    lacks = [text for key, text in _FEATURE_NAMES.items() if key in summary and not summary[key]]
    head = summary.get("implementation", "zfs")
    version = summary.get("version", "")
    if version and not version.startswith("legacy"):
        head += f" {version}"
    return f"{head}: has {', '.join(has) or 'none of the optional features'}; lacks {', '.join(lacks) or 'nothing'}"


class TextRenderer:
    """Human output; on a TTY the progress line is redrawn in place."""

    def __init__(self, out: TextIO = sys.stderr, verbose: bool = False) -> None:
        self.out, self.verbose = out, verbose
        self.tty = out.isatty()
        self.last: dict[str, Any] = {}
        self.down: dict[str, str] = {}
        self._bar_shown = False
        self.tree: dict[str, dict[str, Any]] = {}  # -r: each moving dataset's last progress
        self.tree_done: tuple[int, int] = (0, 0)  # -r: datasets finished, in the run
        self.unit = "datasets"  # what tree counts: datasets (-r) or targets (fan-out)
        self.prefix = ""  # fan-out: the target the line is about

    def _line(self, text: str) -> None:
        if self._bar_shown:
            self.out.write("\r\033[K")
            self._bar_shown = False
        self.out.write(self.prefix + text + "\n")
        self.out.flush()

    def _bar(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\033[K" + text)
            self._bar_shown = True
            self.out.flush()

    #: With -r, what is said per dataset only with -v (their streams run side by side): one line per
    #: dataset finished and one progress line for the run say it without the interleaving.
    PER_DATASET = frozenset({"plan", "session", "verified", "pruned", "up_to_date", "stream_end", "snapshot",
                             "limit"})

    def __call__(self, kind: str, f: dict[str, Any]) -> None:
        key = f.get("dataset") or f.get("fanout_target")  # -r's dataset, fan-out's target: side by side
        if key is not None and not self.verbose:
            if kind == "progress":
                self.unit = "datasets" if "dataset" in f else "targets"
                self.tree[key] = f
                return self._tree_bar()
            plain = kind == "dataset_plan" and not (f.get("dry_run") or f.get("rollback") or f.get("destroy_target"))
            if kind in self.PER_DATASET or plain:
                return None
        handler = getattr(self, "on_" + kind, None)
        if handler is not None:
            self.prefix = f"{f['fanout_target']}: " if "fanout_target" in f and kind != "dataset_done" else ""
            try:
                handler(f)
            finally:
                self.prefix = ""

    def _tree_bar(self) -> None:
        moving = self.tree.values()
        done, total = self.tree_done
        on = sum(p.get("on_target", p["raw_bytes"]) for p in moving)
        rate = sum(p["rate"] for p in moving)
        head = f"{self.unit} {done}/{total} done, " if total else f"{self.unit}: "
        self._bar(f"{head}{len(self.tree)} moving: {human_bytes(on)} on the target  {human_bytes(rate)}/s")

    def on_dataset_done(self, f: dict[str, Any]) -> None:
        self.tree.pop(f.get("fanout_target") or f["source"], None)
        self.tree_done = (f["done"], f["total"])
        what = {"sent": f"sent {human_bytes(f['raw_bytes'])}", "up-to-date": "up to date"}.get(f["status"],
                                                                                                f["status"])
        self._line(f"[{f['done']}/{f['total']}] {f['source']} -> {f.get('fanout_target') or f['target']}: {what} "
                   f"({human_duration(f['seconds'])})")

    def on_preflight(self, f: dict[str, Any]) -> None:
        if self.verbose:
            for side in ("source", "target"):
                r = f[side]
                how = f" ({r['interpreter']}: {r['why']})" if r.get("interpreter") else ""
                self._line(f"{side} {r['host']}: python {r['python']}{how}; {describe_zfs(r['zfs'])}; "
                           f"agent capabilities {' '.join(r['capabilities'])}")

    def on_plan(self, f: dict[str, Any]) -> None:
        how = "direct, no session" if f.get("direct") else f"{f['codec']}, {f['checksum']}"
        self._line(f"plan: {f['plan']} (about {human_bytes(f['estimate'])}, {how})")

    def on_up_to_date(self, f: dict[str, Any]) -> None:
        self._line(f["detail"])

    def on_session(self, f: dict[str, Any]) -> None:
        verb = "resuming" if f.get("resumed") else "session"
        self._line(f"{verb} {f['session']}")

    def on_reattach(self, f: dict[str, Any]) -> None:
        self._line(f"an unfinished session for these datasets exists: reattaching to {f['session']}")

    def on_link_down(self, f: dict[str, Any]) -> None:
        self.down[f["host"]] = f.get("reason", "")
        self._line(f"link to {f['host']} down: {f.get('reason', '')}")

    def on_retrying(self, f: dict[str, Any]) -> None:
        text = (f"link down, retrying in {f['delay']:.0f}s "
                f"(outage {human_duration(f['outage'])} so far) [{f['host']}]")
        if self.tty:
            self._bar(text)
        elif self.verbose:
            self._line(text)

    def on_link_up(self, f: dict[str, Any]) -> None:
        self.down.pop(f["host"], None)
        self._line(f"link to {f['host']} back after {human_duration(f['outage'])}")

    def on_chunk_discarded(self, f: dict[str, Any]) -> None:
        self._line(f"{f['host']}: {f['detail']}")

    def on_chunk_resume(self, f: dict[str, Any]) -> None:
        if self.verbose:
            self._line(f"chunk {f['seq']}: resuming at byte {f['offset']}")

    def on_limit(self, f: dict[str, Any]) -> None:
        rate = human_bytes(f["rate"]) + "/s" if f.get("rate") is not None else "unlimited"
        how = f" ({f['limit']})" if f.get("limit") and "=" in f["limit"] else ""
        self._line(f"bandwidth limit: {rate}{how}")

    def on_paused(self, f: dict[str, Any]) -> None:
        self._line(f"paused: no chunk moves until `zchunk resume {f['session']}` (the agents keep their spools)")

    def on_unpaused(self, f: dict[str, Any]) -> None:
        self._line("resumed: chunks move again")

    def on_sender_restart(self, f: dict[str, Any]) -> None:
        self._line(f"{f['host']}: {f['detail']}")

    def on_warning(self, f: dict[str, Any]) -> None:
        self._line(f"warning: {f.get('host', '')}: {f['detail']}")

    def on_progress(self, f: dict[str, Any]) -> None:
        self.last = f
        p = f["percent"] if "percent" in f else percent_of(f["raw_bytes"], f["estimate"], f["exact"])
        state = ("paused" if f.get("user_paused") else "link down, retrying" if f.get("link_down")
                 else "spool full" if f.get("paused") else "")
        text = (f"{p:5.1f}% {human_bytes(f['raw_bytes'])} of {'' if f['exact'] else '~'}"
                f"{human_bytes(f['estimate'])}  {human_bytes(f['rate'])}/s  ETA {human_duration(f['eta'])}  "
                f"chunks {f['chunks_spooled']} spooled/{f['chunks_moved']} moved/{f['chunks_received']} received"
                + (f"  [{state}]" if state else ""))
        if self.tty:
            self._bar(text)

    def on_verified(self, f: dict[str, Any]) -> None:
        self._line(f"verified: {f['snapshot']} guid {f['guid']} matches on the target")

    def on_stream_end(self, f: dict[str, Any]) -> None:
        if self.verbose:
            self._line(f"zfs send finished: {f['chunks']} chunks, {human_bytes(f['raw_bytes'])}")

    def on_dataset_plan(self, f: dict[str, Any]) -> None:
        would = "would " if f.get("dry_run") else ""
        head = f"{f['source']} -> {f['target']}"
        if f.get("up_to_date"):
            self._line(f"{head}: up to date")
        if f.get("destroy_target"):
            self._line(f"{head}: {would}DESTROY the target (--force-delete: it shares no snapshot with the source)")
        if f.get("rollback"):
            lost = f", destroying {', '.join(f['destroys'])}" if f.get("destroys") else ""
            discards = f.get("rollback_discards")
            lost += ("; what was written since is lost (this zfs cannot say how much)" if discards is None else
                     f"; {human_bytes(discards)} on the target since it is discarded" if discards else "")
            self._line(f"{head}: {would}roll the target back to {f['rollback']}{lost}")
        for step in f.get("steps", []):
            flags = f" (zfs send {' '.join(f['send_flags'])})" if self.verbose and f.get("send_flags") else ""
            self._line(f"{head}: {would}send {step}{flags}")
        if f.get("encryption") and f.get("steps"):
            self._line(f"{head}: encryption: {f['encryption']}")
        for key, where in (("prune_source", "source"), ("prune_target", "target")):
            for snap in f.get(key, []):
                self._line(f"{head}: {would}prune {snap} on the {where}")
        if f.get("properties"):
            self._line(f"{head}: {would}set properties {', '.join(k for k, _ in f['properties'])}")
        if f.get("dry_run"):
            self._line(f"{head}: {would}hold the new common snapshot with tag {f['hold']} (where holds exist)")

    def on_would_snapshot(self, f: dict[str, Any]) -> None:
        self._line(f"would take sync snapshot {f['snapshot']}")

    def on_snapshot(self, f: dict[str, Any]) -> None:
        self._line(f"took {f['snapshot']}")

    def on_rolling_back(self, f: dict[str, Any]) -> None:
        lost = f" (destroying {', '.join(f['destroys'])})" if f.get("destroys") else ""
        self._line(f"{f['target']}: rolling back to {f['to']}{lost}")

    def on_destroying(self, f: dict[str, Any]) -> None:
        self._line(f"{f['target']}: destroying it ({f['reason']})")

    def on_pruned(self, f: dict[str, Any]) -> None:
        self._line(f"{f['host']}: pruned {f['snapshot']}")

    def on_dataset_failed(self, f: dict[str, Any]) -> None:
        self._line(f"FAILED {f['source']}: {f['error']}" + (f" (fix: {f['hint']})" if f.get("hint") else ""))

    def on_dataset_skipped(self, f: dict[str, Any]) -> None:
        self._line(f"skipped {f['source']}: {f['reason']}")

    def on_note(self, f: dict[str, Any]) -> None:
        self._line(f"note: {f['host']}: {f['detail']}")

    def on_properties_skipped(self, f: dict[str, Any]) -> None:
        self._line(f"{f['dataset']}: not copying {', '.join(f['properties'])} (unsafe on a replica)")

    def on_resume_token(self, f: dict[str, Any]) -> None:
        self._line(f"{f['target']}: resuming the interrupted receive of {f['snapshot']} from its resume token")

    def on_resume_token_stale(self, f: dict[str, Any]) -> None:
        self._line(f"{f['target']}: its resume token is stale (the snapshot is gone on the source): "
                   "aborted the partial receive (zfs receive -A), planning afresh")

    def on_bookmark(self, f: dict[str, Any]) -> None:
        self._line(f"bookmarked {f['bookmark']}")

    def on_restart(self, f: dict[str, Any]) -> None:
        self._line(f"{f['source']}: {f['reason']}; {f['how']}")

    def on_leftovers(self, f: dict[str, Any]) -> None:
        self._line(f"session {f['session']} ({f['state']}) left its directories on the hosts: removing them")

    def on_stale_cleaned(self, f: dict[str, Any]) -> None:
        self._line(f"{f['host']}: removed the leftovers of a dead session ({f['path']}, {f['state']})")

    def on_demo_step(self, f: dict[str, Any]) -> None:
        self._line(f"==> {f['text']}")

    def on_removed(self, f: dict[str, Any]) -> None:
        self._line(f"{f['host']}: removed {f['path']}")
