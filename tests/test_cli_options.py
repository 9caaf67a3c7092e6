"""The shared options are declared once (zchunk/cli.py) and turned into the library's ``SyncOptions`` by one
function, which a job's config file will call with the same names."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from zchunk import cli
from zchunk import errors as E
from zchunk.stream import SyncOptions

SSH = {"ssh_config", "ssh_key", "ssh_port", "ssh_option"}


def test_every_shared_option_fills_a_field_of_sync_options() -> None:
    fields = {f.name for f in dataclasses.fields(SyncOptions)}
    for opt in cli.HOST_OPTIONS + cli.STREAM_OPTIONS:
        assert opt.name in fields or opt.name in SSH, opt.name
        assert opt.option.param_decls[-1] == "--" + opt.name.replace("_", "-"), "the long name is the field's"


def test_values_are_parsed_and_checked() -> None:
    opts = cli.sync_options({"chunk_size": "1M", "spool_max": "8M", "patience": "90s", "agent_idle_timeout": "2h",
                             "parallel": 2, "ssh_option": ["Port=2222"], "keep": True})
    assert (opts.chunk_size, opts.spool_max, opts.patience, opts.agent_idle_timeout) == (1 << 20, 8 << 20, 90, 7200)
    assert opts.parallel == 2 and opts.keep and opts.ssh.options == {"port": "2222"}
    assert cli.sync_options({}) == dataclasses.replace(SyncOptions(), state_dir=opts.state_dir), "defaults kept"


@pytest.mark.parametrize("values,words", [
    ({"chunk_size": "1K"}, "--chunk-size"),
    ({"chunk_size": "1M", "spool_max": "512K"}, "--spool-max"),
    ({"parallel": 0}, "--parallel"),
    ({"compress": "lz4"}, "--compress"),
    ({"patience": "soon"}, "--patience"),
    ({"ssh_option": ["NoEquals"]}, "KEY=VALUE"),
    ({"chunk_sise": "1M"}, "unknown option(s): chunk_sise"),
])
def test_a_bad_value_is_a_usage_error_naming_it(values: dict[str, object], words: str) -> None:
    with pytest.raises(E.UsageError) as e:
        cli.sync_options(values)
    assert words in str(e.value)


def test_commands_take_the_groups_and_no_locals_filtering() -> None:
    source = inspect.getsource(cli)
    assert "locals()" not in source
    params = {p.name for p in inspect.signature(cli.sync).parameters.values()}
    assert {o.name for o in cli.HOST_OPTIONS + cli.STREAM_OPTIONS} <= params
    abort = {p.name for p in inspect.signature(cli.abort).parameters.values()}
    assert {o.name for o in cli.HOST_OPTIONS} <= abort and "chunk_size" not in abort


def test_a_bad_shared_option_exits_2_before_anything_runs(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "zchunk", "resume", "nosuch", "--state-dir", str(tmp_path),
                          "--spool-max", "1K", "--json"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == ["zchunk: error: --spool-max must hold at least one chunk (--chunk-size)"]
    assert '"event": "error"' in res.stdout and not list(tmp_path.iterdir())
