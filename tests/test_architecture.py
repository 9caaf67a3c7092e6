"""The map in docs/architecture.md and the layering in pyproject.toml name every module of the package,
and the layering holds (lint-imports, as scripts/test runs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (ROOT / "zchunk").glob("*.py") if not p.stem.startswith("__"))


def layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["type"] == "layers")
    return list(contract["layers"])


def test_every_module_stands_in_a_layer() -> None:
    named = {m.strip("() ").removeprefix("zchunk.") for layer in layers() for m in layer.split("|")}
    assert [m for m in MODULES if m not in named] == []


def test_every_module_has_a_line_on_the_map() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    rows = set(re.findall(r"^\| \d+ \| `(\w+)\.py` \|", doc, re.M))
    assert [m for m in MODULES if m not in rows] == []
    assert rows - set(MODULES) == set(), "the map names a module that is gone"


def test_the_layers_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    exe = str(lint) if lint.exists() else shutil.which("lint-imports")
    assert exe, "lint-imports (import-linter, in the test extras) is not installed"
    res = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "broken" in res.stdout and "0 broken" in res.stdout
