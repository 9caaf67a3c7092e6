"""What ``pip install zchunk`` puts into site-packages: the one package ``zchunk``, the agent inside it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_wheel(out: Path) -> Path:
    """The wheel pip would install, built from this checkout (no network: setuptools comes from the venv)."""
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    wheels = list(out.glob("zchunk-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_installs_zchunk_only_with_the_agent_inside(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
        assert top == {"zchunk"}, f"top-level names in {wheel.name}: {sorted(top)}"
        assert "zchunk/agent.py" in names
        # uploaded byte for byte: the file in the wheel is the agent the coordinator sends to hosts
        assert zf.read("zchunk/agent.py") == (REPO / "zchunk" / "agent.py").read_bytes()
        # build leftovers of the package (e.g. a lab's data) do not travel either
        assert not [n for n in names if n.startswith("zchunk/") and "__pycache__" in n]
