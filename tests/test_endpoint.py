"""SOURCE/TARGET parsing: what is accepted, and that hostile names never get through."""

from __future__ import annotations

import pytest

from zchunk.endpoint import Endpoint, check_dataset_name, parse_endpoint
from zchunk.errors import BadDatasetName


@pytest.mark.parametrize("spec,expected", [
    ("pool/ds", Endpoint("pool/ds")),
    ("pool", Endpoint("pool")),
    ("tank/a/b/c", Endpoint("tank/a/b/c")),
    ("host:pool/ds", Endpoint("pool/ds", host="host")),
    ("backup.example.org:tank/x", Endpoint("tank/x", host="backup.example.org")),
    ("user@host:pool/ds", Endpoint("pool/ds", host="host", user="user")),
    ("root@10.0.0.2:pool/ds", Endpoint("pool/ds", host="10.0.0.2", user="root")),
    ("[::1]:pool/ds", Endpoint("pool/ds", host="::1")),
    ("alias:pool/ds", Endpoint("pool/ds", host="alias")),  # an ~/.ssh/config Host alias
    ("pool/ds:with:colons", Endpoint("pool/ds:with:colons")),  # ':' after a '/' is part of the name
    ("pool/my data", Endpoint("pool/my data")),
])
def test_parse_endpoint(spec: str, expected: Endpoint) -> None:
    assert parse_endpoint(spec) == expected


def test_endpoint_text() -> None:
    assert str(parse_endpoint("pool/ds")) == "pool/ds"
    assert parse_endpoint("pool/ds").is_local and parse_endpoint("pool/ds").host_label == "localhost"
    ep = parse_endpoint("user@host:pool/ds")
    assert not ep.is_local
    assert str(ep) == "user@host:pool/ds" and ep.host_label == "user@host"


HOSTILE_DATASETS = [
    "pool/ds;rm -rf /",
    "pool/$(reboot)",
    "pool/ds$HOME",
    "pool/`id`",
    "pool/'quoted'",
    'pool/"quoted"',
    "pool/ds\nzfs destroy -r pool",
    "pool/ds\n",          # a trailing newline too
    "pool/ds\r",
    "pool/ds\t",
    "pool/ds|cat",
    "pool/ds&",
    "pool/ds>file",
    "pool/ds\\x",
    "pool/ds\0",
    "pool/dé",           # zfs allows ASCII only
    "-pool/ds",
    "-o",
    "",
    "/pool/ds",
    "pool//ds",
    "pool/ds/",
    "pool/./ds",
    "pool/../ds",
    "pool/ds@snap",      # a snapshot where a dataset is expected
    "pool/ds#bookmark",
    "pool/" + "x" * 300,
]


@pytest.mark.parametrize("name", HOSTILE_DATASETS)
def test_check_dataset_name_refuses(name: str) -> None:
    with pytest.raises(BadDatasetName) as e:
        check_dataset_name(name)
    assert e.value.exit_code == 2


@pytest.mark.parametrize("name", HOSTILE_DATASETS)
def test_parse_endpoint_refuses_hostile_dataset_local_and_remote(name: str) -> None:
    for spec in (name, f"host:{name}", f"user@host:{name}"):
        with pytest.raises(BadDatasetName):
            parse_endpoint(spec)


@pytest.mark.parametrize("spec", [
    "-oProxyCommand=sh:pool/ds",
    "-host:pool/ds",
    "ho st:pool/ds",
    "host;id:pool/ds",
    "$(id):pool/ds",
    "`id`:pool/ds",
    "host\n:pool/ds",
    "'host':pool/ds",
    ":pool/ds",
    "@host:pool/ds",
    "-l@host:pool/ds",
    "us$er@host:pool/ds",
    "us er@host:pool/ds",
    "user\n@host:pool/ds",
    "user@:pool/ds",
    "[::1;id]:pool/ds",
    "host:",
])
def test_parse_endpoint_refuses_hostile_hosts_and_users(spec: str) -> None:
    with pytest.raises(BadDatasetName):
        parse_endpoint(spec)


@pytest.mark.parametrize("name", ["pool/my data", "pool/a b/c d", "pool/x_y-z.1:2", "p 1"])
def test_check_dataset_name_accepts_spaces_and_zfs_punctuation(name: str) -> None:
    assert check_dataset_name(name) == name


def test_snapshots_only_where_allowed() -> None:
    assert check_dataset_name("pool/ds@snap-1", snapshot_ok=True) == "pool/ds@snap-1"
    for bad in ("pool/ds@", "pool/ds@a@b", "pool/ds@a;b", "pool/ds@a/b", "@snap"):
        with pytest.raises(BadDatasetName):
            check_dataset_name(bad, snapshot_ok=True)


def test_error_names_the_offending_characters() -> None:
    with pytest.raises(BadDatasetName) as e:
        check_dataset_name("pool/a;b")
    assert "';'" in str(e.value) and "pool/a;b" in str(e.value)
