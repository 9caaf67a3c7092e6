"""The text output of a recursive run: its datasets' streams run side by side, so without -v each dataset
says one line when it is finished and the run shows one progress line; -v shows every stream's lines."""

from __future__ import annotations

import io
from typing import Any

from zchunk.progress import TextRenderer


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress(on_target: int, rate: float) -> dict[str, Any]:
    return {"raw_bytes": on_target, "on_target": on_target, "estimate": 4 << 20, "exact": False, "rate": rate,
            "eta": 3.0, "chunks_spooled": 1, "chunks_moved": 1, "chunks_received": 0, "percent": 10.0}


def tree_events(r: TextRenderer) -> None:
    r("snapshot", {"snapshot": "tank/t@zchunk_x_h_20260101T000000Z", "datasets": 2})
    for ds in ("tank/t", "tank/t/a"):
        r("dataset_plan", {"dataset": ds, "source": ds, "target": "bt" + ds[6:], "steps": ["full of " + ds],
                           "dry_run": False})
        r("session", {"dataset": ds, "session": "S-" + ds})
    r("progress", {"dataset": "tank/t", **progress(1 << 20, 1 << 20)})
    r("progress", {"dataset": "tank/t/a", **progress(2 << 20, 2 << 20)})
    r("verified", {"dataset": "tank/t", "snapshot": "tank/t@x", "guid": 1})
    r("dataset_done", {"dataset": "tank/t", "source": "tank/t", "target": "bt", "status": "sent",
                       "raw_bytes": 3 << 20, "seconds": 2.0, "done": 1, "total": 2})
    r("dataset_failed", {"dataset": "tank/t/a", "source": "tank/t/a", "target": "bt/a", "error": "no space",
                         "hint": "make room"})
    r("dataset_done", {"dataset": "tank/t/a", "source": "tank/t/a", "target": "bt/a", "status": "failed",
                       "raw_bytes": 0, "seconds": 1.0, "done": 2, "total": 2})


def test_a_tree_says_one_line_per_dataset_and_one_progress_line() -> None:
    out = Tty()
    tree_events(TextRenderer(out))
    text = out.getvalue()
    assert "datasets: 2 moving: 3.0 MiB on the target  3.0 MiB/s" in text, text
    lines = [line.replace("\033[K", "") for line in text.splitlines()]
    assert "[1/2] tank/t -> bt: sent 3.0 MiB (2s)" in lines, lines
    assert "[2/2] tank/t/a -> bt/a: failed (1s)" in lines
    assert "FAILED tank/t/a: no space (fix: make room)" in lines
    assert "took tank/t@zchunk_x_h_20260101T000000Z" in lines, "the run's own lines stay"
    for chatter in ("session S-", "send full of", "verified:"):
        assert chatter not in text, f"{chatter!r}: a stream's own line without -v"


def test_verbose_shows_every_streams_lines() -> None:
    out = io.StringIO()
    tree_events(TextRenderer(out, verbose=True))
    text = out.getvalue()
    for line in ("session S-tank/t/a", "tank/t -> bt: send full of tank/t", "verified: tank/t@x guid 1",
                 "[1/2] tank/t -> bt: sent 3.0 MiB (2s)"):
        assert line in text, text


def test_a_dry_run_plan_is_shown_without_verbose() -> None:
    out = io.StringIO()
    r = TextRenderer(out)
    r("dataset_plan", {"dataset": "tank/t", "source": "tank/t", "target": "bt", "steps": ["full"], "dry_run": True,
                       "hold": "zchunk_x"})
    assert "tank/t -> bt: would send full" in out.getvalue()


def test_a_fan_out_says_one_line_per_target_and_one_progress_line() -> None:
    """Fan-out: each target's own lines name it; its streams' chatter only with -v; one progress line."""
    out = Tty()
    r = TextRenderer(out)
    r("snapshot", {"snapshot": "tank/ds@zchunk_f1_h_20260101T000000Z", "targets": 2})
    for t in ("a:tank/r", "b:tank/r"):
        r("session", {"fanout_target": t, "session": "S-" + t, "fanout": "fanout-1-send"})
        r("progress", {"fanout_target": t, **progress(1 << 20, 1 << 20)})
    r("dataset_failed", {"fanout_target": "b:tank/r", "source": "tank/ds", "target": "tank/r",
                         "error": "left behind", "hint": ""})
    r("dataset_done", {"fanout_target": "a:tank/r", "source": "tank/ds", "target": "tank/r", "status": "sent",
                       "raw_bytes": 1 << 20, "seconds": 2.0, "done": 1, "total": 2})
    text = out.getvalue()
    assert "targets: 2 moving: 2.0 MiB on the target  2.0 MiB/s" in text, text
    lines = [line.replace("\033[K", "") for line in text.splitlines()]
    assert "[1/2] tank/ds -> a:tank/r: sent 1.0 MiB (2s)" in lines, lines
    assert "b:tank/r: FAILED tank/ds: left behind" in lines, lines
    assert "took tank/ds@zchunk_f1_h_20260101T000000Z" in lines
    assert "session S-" not in text
