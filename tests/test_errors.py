"""Every user-visible error: a message template, a fix, an exit code, a row in docs/errors.md."""

from __future__ import annotations

import ast
import inspect
import string
import subprocess
import sys
from pathlib import Path

import pytest

from zchunk import errors as E

ROOT = Path(__file__).resolve().parents[1]
CLASSES = sorted((c for _, c in inspect.getmembers(E, inspect.isclass) if issubclass(c, E.ZchunkError)),
                 key=lambda c: c.__name__)
SUBCLASSES = [c for c in CLASSES if c is not E.ZchunkError]


def template(cls: type[E.ZchunkError]) -> str:
    return (cls.__doc__ or "").strip().splitlines()[0]


def fields_of(text: str) -> set[str]:
    return {f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(text) if f}


def documented_fields(cls: type[E.ZchunkError]) -> set[str]:
    return fields_of(template(cls)) | fields_of(cls.fix)


@pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
def test_docstring_template_formats_with_its_fields(cls: type[E.ZchunkError]) -> None:
    assert cls.__doc__ and template(cls), f"{cls.__name__} has no message template"
    fields = documented_fields(cls)
    assert fields, f"{cls.__name__}: a template without fields says nothing specific"
    kwargs = {f: f"<{f}>" for f in fields}
    err = cls(**kwargs)
    assert str(err) == template(cls).format(**kwargs)  # not the fallback "template {fields}"
    for f in fields_of(template(cls)):
        assert f"<{f}>" in str(err)
    assert err.hint == cls.fix.format(**kwargs)
    assert "{" not in str(err) and "{" not in err.hint


@pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
def test_missing_fields_never_raise_in_the_message(cls: type[E.ZchunkError]) -> None:
    assert template(cls) in str(cls())


def test_fallback_shows_the_fields_when_the_template_does_not_fit() -> None:
    err = E.UnknownDataset(host="h")
    assert "h" in str(err) and "dataset" in str(err)


# Exit codes are an interface (scripts and monitoring branch on them): one code per
# category, distinct between categories.
CATEGORIES: dict[str, tuple[int, set[str]]] = {
    "nothing to do": (0, {"UpToDate"}),
    "generic": (1, {"ZchunkError"}),
    "bad input": (2, {"UsageError", "BadDatasetName"}),
    "unknown dataset": (3, {"UnknownDataset", "NoSnapshot", "SourceGone"}),
    "plan refused": (4, {"NoCommonSnapshot", "ReseedNeeded", "TargetDiverged", "TypeMismatch", "StreamIncompatible",
                           "RootObjectIncompatible", "RootObjectUnknown", "RawNeedsEncryption",
                           "SourceKeyNotLoaded", "TargetKeyNotLoaded", "RawOntoUnencrypted"}),
    "unreachable": (5, {"HostUnreachable", "HostKeyError", "AuthError"}),
    "missing python3/zfs": (6, {"MissingPython", "OldPython", "MissingZfs"}),
    "permission": (7, {"PermissionDenied"}),
    "unsafe session dir": (8, {"SessionDirError"}),
    "session": (9, {"SessionNotFound", "AlreadyRunning", "TargetLocked"}),
    "protocol": (10, {"ProtocolError", "CapabilityMismatch"}),
    "patience": (11, {"PatienceExhausted"}),
    "zfs failed": (12, {"ZfsSendFailed", "ZfsReceiveFailed", "AgentDied", "TargetFull"}),
    "integrity": (13, {"IntegrityError", "StreamChecksumMismatch"}),
    "remote/command": (14, {"RemoteError", "CommandFailed", "CommandHung", "SpoolFull", "ChunkCorrupt", "NoChunk"}),
    "partial": (15, {"PartialFailure"}),
    "configuration": (16, {"ConfigError"}),
    "run history": (17, {"HistoryError"}),
    "snapshot hook": (18, {"HookFailed"}),
    "seed volumes missing": (19, {"SeedIncomplete"}),
    "seed disk full": (20, {"SeedDiskFull"}),
    "fan-out target left behind": (21, {"LeftBehind"}),
}


def test_every_error_class_has_a_category() -> None:
    categorized = set().union(*(names for _, names in CATEGORIES.values()))
    assert {c.__name__ for c in CLASSES} == categorized


@pytest.mark.parametrize("category", CATEGORIES)
def test_exit_code_per_category(category: str) -> None:
    code, names = CATEGORIES[category]
    for name in names:
        assert getattr(E, name).exit_code == code, f"{name} ({category})"


def test_categories_have_distinct_exit_codes() -> None:
    codes = [code for code, _ in CATEGORIES.values()]
    assert len(codes) == len(set(codes))
    assert all(0 <= c < 64 for c in codes)  # clear of 64-78 (sysexits) and 126+ (shell)


def test_only_up_to_date_exits_zero() -> None:
    assert [c.__name__ for c in CLASSES if c.exit_code == 0] == ["UpToDate"]


def _error_calls() -> list[tuple[str, int, str, set[str]]]:
    """(file, line, class, keyword names) for every ``SomeError(...)`` in zchunk/."""
    names = {c.__name__ for c in CLASSES}
    out = []
    for path in sorted((ROOT / "zchunk").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if name not in names or any(k.arg is None for k in node.keywords):
                continue  # not one of ours, or **kwargs (checked at runtime)
            if name == "ZchunkError" and not node.keywords:
                continue
            out.append((path.name, node.lineno, name, {k.arg for k in node.keywords if k.arg}))
    return out


def test_the_call_site_scan_finds_the_callers() -> None:
    calls = _error_calls()
    assert any(c[2] == "TargetDiverged" and c[0] == "plan.py" for c in calls)
    assert len(calls) > 20


def test_every_call_site_passes_every_field_of_message_and_fix() -> None:
    """A missing field would print a broken message, or crash the CLI computing ``hint``."""
    problems = []
    for file, line, name, given in _error_calls():
        missing = documented_fields(getattr(E, name)) - given
        if missing:
            problems.append(f"zchunk/{file}:{line}: {name} without {sorted(missing)}")
    assert problems == []


def test_from_remote_table_and_fallback() -> None:
    err = E.from_remote("tgt", {"code": "session-dir", "reason": "owned by uid 0", "details": {}})
    assert type(err) is E.SessionDirError and "tgt" in str(err) and "owned by uid 0" in str(err)
    err = E.from_remote("tgt", {"code": "no-such-code", "reason": "something new"})
    assert type(err) is E.RemoteError
    assert str(err) == "tgt: agent error [no-such-code]: something new"
    err = E.from_remote("tgt", {})
    assert type(err) is E.RemoteError and "unknown" in str(err)


def test_each_agent_code_is_fixed_by_one_class() -> None:
    """asyncssh's shape: a class fixes its wire code; the table is built from the classes, not by hand."""
    codes = [c.remote_code for c in CLASSES if c.remote_code]
    assert len(codes) == len(set(codes))
    for cls in CLASSES:
        if cls.remote_code:
            err = E.from_remote("h", {"code": cls.remote_code, "reason": "r"})
            assert type(err) is cls


def test_a_failed_daemon_is_rebuilt_by_its_code_else_as_the_zfs_failure() -> None:
    err = E.from_daemon("tgt", "receive", {"state": "failed", "code": "stream-checksum",
                                           "reason": "whole-stream checksum mismatch: received a, sender had b"})
    assert type(err) is E.StreamChecksumMismatch and isinstance(err, E.IntegrityError) and err.exit_code == 13
    # no code: the reason's words decide nothing, even when they mention a checksum
    err = E.from_daemon("tgt", "receive", {"state": "failed", "zfs_exit": 1, "reason": "checksum of x",
                                           "zfs_stderr": "cannot receive: checksum mismatch"})
    assert type(err) is E.ZfsReceiveFailed and "status 1" in str(err)
    err = E.from_daemon("src", "send", {"state": "failed", "zfs_exit": 2, "reason": "zfs send exited with status 2"})
    assert type(err) is E.ZfsSendFailed and "zfs send exited" in str(err)


def test_docs_errors_md_is_the_generated_table() -> None:
    res = subprocess.run([sys.executable, "-m", "zchunk.errors"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    doc = (ROOT / "docs" / "errors.md").read_text()
    assert doc == res.stdout, "docs/errors.md is stale: .venv/bin/python -m zchunk.errors > docs/errors.md"
    for cls in SUBCLASSES:
        assert f"| {cls.exit_code} | {cls.__name__} | {template(cls)} |" in doc
