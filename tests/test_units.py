"""The systemd units shipped in systemd/: valid for systemd itself (systemd-analyze verify), running commands
zchunk has, and stopping only the daemon (KillMode=process: agents outlive a stop, so the next start
continues their transfers)."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import need

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "systemd"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser


def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    need(shutil.which("systemd-analyze") is not None, "needs systemd-analyze (Debian: systemd)")
    zchunk = Path(sys.executable).with_name("zchunk")
    assert zchunk.exists(), "the zchunk entry point of this environment"
    for f in UNITS.iterdir():
        (tmp_path / f.name).write_text(f.read_text().replace("/usr/local/bin/zchunk", str(zchunk)))
    names = sorted(str(p) for p in tmp_path.iterdir())
    assert [Path(n).name for n in names] == ["zchunk-run.service", "zchunk-run.timer", "zchunk.service"]
    res = subprocess.run(["systemd-analyze", "verify", *names], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "" and res.stderr.strip() == "", res.stdout + res.stderr


def test_the_units_run_zchunk_commands_and_stop_only_the_coordinator() -> None:
    for name, command in (("zchunk.service", "daemon"), ("zchunk-run.service", "run")):
        service = unit(name)["Service"]
        argv = shlex.split(service["ExecStart"])
        assert argv[:2] == ["/usr/local/bin/zchunk", command] and argv[2:] == ["--config", "/etc/zchunk/zchunk.toml"]
        res = subprocess.run([sys.executable, "-m", "zchunk", *argv[1:], "--help"], capture_output=True, text=True,
                             timeout=60, cwd=REPO)
        assert res.returncode == 0 and "--config" in res.stdout, res.stderr
        assert service["KillMode"] == "process", "a stop must leave the agents to continue the transfers"
        assert service["StateDirectory"] == "zchunk" and service["StateDirectoryMode"] == "0700"
    assert unit("zchunk.service")["Service"]["ExecReload"] == "/bin/kill -HUP $MAINPID"
    timer = unit("zchunk-run.timer")
    assert timer["Timer"]["OnCalendar"] and timer["Install"]["WantedBy"] == "timers.target"
    assert unit("zchunk.service")["Unit"]["Conflicts"] == "zchunk-run.timer", "one of the two, not both"
