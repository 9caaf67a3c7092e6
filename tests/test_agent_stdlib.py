"""The agent runs on a host's plain ``python3`` (>= 3.9): standard library only.

zstandard and xxhash are optional speed-ups, imported inside a try block; the
agent must work, with the stdlib codecs, when they are absent.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parents[1] / "zchunk" / "agent.py"
SOURCE = AGENT.read_text()
OPTIONAL = {"zstandard", "xxhash"}
# Handlers that catch a failed import (ImportError or something broader).
IMPORT_CATCHERS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def tree() -> ast.Module:
    return ast.parse(SOURCE, filename=str(AGENT))


def imported_modules(node: ast.AST) -> list[tuple[str, ast.stmt]]:
    out: list[tuple[str, ast.stmt]] = []
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            out += [(a.name.split(".")[0], n) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            assert n.level == 0, f"line {n.lineno}: relative import in the agent"
            assert n.module is not None
            out.append((n.module.split(".")[0], n))
    return out


def guarded_imports(module: ast.Module) -> set[int]:
    """ids of import statements that sit in the body of a try whose handler catches ImportError."""
    ids: set[int] = set()
    for n in ast.walk(module):
        if not isinstance(n, ast.Try):
            continue
        catches = False
        for h in n.handlers:
            names = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
            if h.type is None or any(isinstance(t, ast.Name) and t.id in IMPORT_CATCHERS for t in names):
                catches = True
        if catches:
            for stmt in n.body:
                ids.update(id(x) for x in ast.walk(stmt) if isinstance(x, (ast.Import, ast.ImportFrom)))
    return ids


def test_agent_imports_only_the_standard_library() -> None:
    mods = imported_modules(tree())
    assert mods, "no imports found: the parser is broken"
    foreign = sorted({m for m, _ in mods if m not in sys.stdlib_module_names and m not in OPTIONAL})
    assert foreign == [], f"the agent imports non-stdlib modules: {foreign}"
    # sys.stdlib_module_names is this interpreter's; these joined the stdlib after 3.9
    too_new = sorted({m for m, _ in mods} & {"tomllib"})
    assert too_new == [], f"not in Python 3.9's standard library: {too_new}"


def test_optional_speedups_are_imported_inside_try_except_importerror() -> None:
    module = tree()
    guarded = guarded_imports(module)
    optional = [(m, n) for m, n in imported_modules(module) if m in OPTIONAL]
    assert {m for m, _ in optional} == OPTIONAL  # both are actually used when present
    for m, node in optional:
        assert id(node) in guarded, f"line {node.lineno}: import {m} is not inside try/except ImportError"


def test_the_import_checker_catches_violations() -> None:
    """The two checks above must be able to fail."""
    bad = ast.parse("import requests\nimport zstandard\ntry:\n    import xxhash\nexcept KeyError:\n    pass\n")
    assert [m for m, _ in imported_modules(bad) if m not in sys.stdlib_module_names] == [
        "requests", "zstandard", "xxhash"]
    assert guarded_imports(bad) == set()
    good = ast.parse("try:\n    import xxhash\nexcept ImportError:\n    xxhash = None\n")
    assert len(guarded_imports(good)) == 1


def test_agent_parses_as_python_3_9() -> None:
    """No match statements, no except* ... (the grammar of 3.9, as far as ast checks it)."""
    ast.parse(SOURCE, filename=str(AGENT), feature_version=(3, 9))
    compile(SOURCE, str(AGENT), "exec", dont_inherit=True)


def find_python39() -> str | None:
    """A real 3.9 interpreter, if this machine has one (PATH, pyenv, /usr/bin)."""
    candidates = [shutil.which("python3.9"), "/usr/bin/python3.9", "/usr/local/bin/python3.9"]
    candidates += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.9*/bin/python3.9"))
    for c in candidates:
        if not c or not Path(c).is_file():
            continue
        try:
            res = subprocess.run([c, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
                                 capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if res.returncode == 0 and res.stdout.strip() == "True":
            return c
    return None


PY39 = find_python39()


def test_agent_runs_under_python_3_9() -> None:
    """Under a real 3.9 when there is one; else the grammar check above is the fallback."""
    if PY39 is None:
        banned = (ast.Match,) if hasattr(ast, "Match") else ()
        assert not any(isinstance(n, banned) for n in ast.walk(tree()))
        return
    res = subprocess.run([PY39, "-I", "-S", "-c", BLOCK_OPTIONAL + "import json\n" + STDLIB_RUN, str(AGENT)],
                         capture_output=True, text=True, timeout=60, env=NO_ZSTD_COMMAND)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["zstd"] == "unsupported"


def test_annotations_are_not_evaluated_at_runtime() -> None:
    """``from __future__ import annotations`` first, so ``X | None`` in hints is fine on 3.9."""
    body = tree().body
    first = body[1] if isinstance(body[0], ast.Expr) else body[0]  # after the docstring
    assert isinstance(first, ast.ImportFrom) and first.module == "__future__"
    assert any(a.name == "annotations" for a in first.names)


TYPE_NAMES = {"int", "str", "bytes", "float", "bool", "dict", "list", "tuple", "set", "None",
              "Any", "Optional", "Dict", "List", "Tuple", "BinaryIO", "Callable"}


def _annotation_nodes(module: ast.Module) -> set[int]:
    ids: set[int] = set()
    for n in ast.walk(module):
        anns: list[ast.AST | None] = []
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            anns.append(n.returns)
        elif isinstance(n, ast.arg):
            anns.append(n.annotation)
        elif isinstance(n, ast.AnnAssign):
            anns.append(n.annotation)
        for a in anns:
            if a is not None:
                ids.update(id(x) for x in ast.walk(a))
    return ids


def _is_type(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and node.value is None:
        return True
    if isinstance(node, ast.Name):
        return node.id in TYPE_NAMES
    if isinstance(node, ast.Subscript):
        return _is_type(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _is_type(node.left) or _is_type(node.right)
    return False


def runtime_type_unions(src: str) -> list[int]:
    module = ast.parse(src)
    in_annotations = _annotation_nodes(module)
    return [n.lineno for n in ast.walk(module)
            if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) and id(n) not in in_annotations
            and (_is_type(n.left) or _is_type(n.right))]


def test_no_type_unions_evaluated_at_runtime() -> None:
    assert runtime_type_unions(SOURCE) == []
    # the check itself can fail:
    assert sorted(runtime_type_unions(
        "x: int | None = None\nisinstance(x, int | str)\nT = Dict[str, int] | None\n")) == [2, 3]


NEWER_THAN_39 = {
    ("zip", "strict"),         # 3.10
    ("dataclass", "slots"),    # 3.10
    ("dataclass", "kw_only"),  # 3.10
}
# 3.10+: int.bit_count, itertools.pairwise, typing.TypeAlias/ParamSpec/TypeGuard;
# 3.11+: typing.Self/LiteralString, asyncio.TaskGroup
NEWER_ATTRS = {"bit_count", "pairwise", "TypeAlias", "ParamSpec", "TypeGuard", "Self", "LiteralString",
               "TaskGroup"}


def test_no_library_calls_newer_than_3_9() -> None:
    found = []
    for n in ast.walk(tree()):
        if isinstance(n, ast.Call):
            fname = n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
            for kw in n.keywords:
                if (fname, kw.arg) in NEWER_THAN_39:
                    found.append(f"line {n.lineno}: {fname}({kw.arg}=)")
        if isinstance(n, ast.Attribute) and n.attr in NEWER_ATTRS:
            found.append(f"line {n.lineno}: .{n.attr}")
        if isinstance(n, ast.Name) and n.id in {"aiter", "anext", "EncodingWarning"}:
            found.append(f"line {n.lineno}: {n.id}")
    assert found == []


BLOCK_OPTIONAL = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("zstandard", "xxhash"):
            raise ImportError("blocked for the test: " + name)
        return None
sys.meta_path.insert(0, Block())
"""

#: No zstd command either (the agent would compress through it: tests/test_interpreters.py).
NO_ZSTD_COMMAND = {"PATH": "/nonexistent"}

STDLIB_RUN = """
g = {"__name__": "zchunk_agent"}
exec(compile(open(sys.argv[1]).read(), "zchunk_agent", "exec"), g)
assert g["zstandard"] is None and g["xxhash"] is None
raw = b"stdlib only " * 1000
blob = g["encode_chunk"](5, raw, g["CODEC_ZLIB"], None, g["HASH_BLAKE2B"])
assert g["decode_chunk"](blob, 5) == raw
try:
    g["encode_chunk"](5, raw, g["CODEC_ZSTD"], None, g["HASH_BLAKE2B"])
except g["AgentError"] as e:
    zstd_code = e.code
print(json.dumps({"caps": g["capabilities"](), "zstd": zstd_code}))
"""


def test_agent_works_without_the_optional_modules() -> None:
    """Run under ``python -I -S`` (no site-packages) with zstandard/xxhash blocked."""
    res = subprocess.run([sys.executable, "-I", "-S", "-c", BLOCK_OPTIONAL + "import json\n" + STDLIB_RUN,
                          str(AGENT)], capture_output=True, text=True, timeout=60, env=NO_ZSTD_COMMAND)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["caps"] == ["chunk-v1", "resume-offset-v1", "none-v1", "zlib-v1", "blake2b-128-v1"]
    assert out["zstd"] == "unsupported"


@pytest.mark.parametrize("python", [sys.executable] + ([PY39] if PY39 else []))
def test_bootstrap_runs_the_agent_from_stdin(python: str) -> None:
    """``python3 -c BOOTSTRAP probe`` with the source on stdin: nothing installed beforehand."""
    sys.path.insert(0, str(AGENT.parent.parent))
    try:
        from zchunk.agent import BOOTSTRAP
    finally:
        sys.path.pop(0)
    ast.parse(BOOTSTRAP, feature_version=(3, 9))
    res = subprocess.run([python, "-I", "-c", BOOTSTRAP, "probe"], input=SOURCE.encode(),
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.decode().strip().splitlines()[-1])
    assert info["protocol"] == 1
    assert "chunk-v1" in info["capabilities"]
    assert info["python"][:2] >= [3, 9]


def test_unknown_command_is_a_usage_error() -> None:
    res = subprocess.run([sys.executable, "-I", str(AGENT), "format-disk"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2
    assert "usage" in res.stderr


@pytest.mark.parametrize("stmt", ["match x:\n    case 1:\n        pass\n",
                                  "try:\n    pass\nexcept* ValueError:\n    pass\n"])
def test_the_3_9_grammar_check_can_fail(stmt: str) -> None:
    with pytest.raises(SyntaxError):
        ast.parse(stmt, feature_version=(3, 9))
