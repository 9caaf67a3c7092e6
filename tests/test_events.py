"""The --json events are a public API: every kind and field the code emits is declared in zchunk/events.py,
and docs/events.md is generated from that table."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

from zchunk.events import EVENTS
from zchunk.replicate import DatasetOutcome
from zchunk.stream import SyncResult

ROOT = Path(__file__).resolve().parents[1]
EMITTERS = {"emit", "on_event"}  # the names the library calls its Emitter / sink by


def emitted() -> list[tuple[str, int, str, set[str]]]:
    """(file, line, kind, fields) of every event the package emits with a literal kind: ``emit("k", f=..)``,
    a sink called ``sink("k", {"f": ..})``, and the CLI's ``JsonRenderer()("k", {...})``."""
    out = []
    for path in sorted((ROOT / "zchunk").glob("*.py")):
        for n in ast.walk(ast.parse(path.read_text())):
            if not isinstance(n, ast.Call) or not n.args or not isinstance(n.args[0], ast.Constant):
                continue
            f = n.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            renderer = isinstance(f, ast.Call) and getattr(f.func, "id", None) == "JsonRenderer"
            if name not in EMITTERS and not renderer:
                continue
            fields = {k.arg for k in n.keywords if k.arg}
            if len(n.args) > 1 and isinstance(n.args[1], ast.Dict):
                fields |= {k.value for k in n.args[1].keys if isinstance(k, ast.Constant)}
            out.append((path.name, n.lineno, str(n.args[0].value), fields))
    return out


def test_the_scan_finds_the_emitters() -> None:
    found = {(file, kind) for file, _, kind, _ in emitted()}
    for expected in [("engine.py", "progress"), ("replicate.py", "dataset_plan"), ("stream.py", "verified"),
                     ("demo.py", "demo_step"), ("cli.py", "error")]:
        assert expected in found
    assert len(found) > 30


def test_every_emitted_kind_and_field_is_declared() -> None:
    problems = []
    for file, line, kind, fields in emitted():
        if kind not in EVENTS:
            problems.append(f"zchunk/{file}:{line}: event {kind!r} is not declared in zchunk/events.py")
            continue
        extra = fields - set(EVENTS[kind].fields)
        if extra:
            problems.append(f"zchunk/{file}:{line}: {kind} fields {sorted(extra)} are not declared")
    assert problems == []


def test_every_declared_kind_is_emitted_somewhere() -> None:
    """A kind nobody emits any more is a stale promise to the scripts that read --json."""
    emitted_kinds = {kind for _, _, kind, _ in emitted()} | {"result", "replication"}  # via to_json()
    assert set(EVENTS) - emitted_kinds == set()


def test_result_fields_are_declared() -> None:
    declared = set(EVENTS["result"].fields)
    assert {f.name for f in dataclasses.fields(SyncResult)} <= declared
    outcomes = EVENTS["replication"].fields["outcomes"]
    assert [f.name for f in dataclasses.fields(DatasetOutcome) if f.name not in outcomes] == []


def test_docs_events_md_is_generated() -> None:
    res = subprocess.run([sys.executable, "-m", "zchunk.events"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True)
    doc = (ROOT / "docs" / "events.md").read_text()
    assert doc == res.stdout, "docs/events.md is stale: .venv/bin/python -m zchunk.events > docs/events.md"
    for kind in EVENTS:
        assert f"## `{kind}`" in doc
