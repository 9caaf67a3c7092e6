"""SOURCE and TARGET arguments: ``pool/ds`` (local) or ``[user@]host:pool/ds``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BadDatasetName

# zfs_namecheck.c: letters, digits, _ - . : and space; '/' separates components.
_COMPONENT = re.compile(r"[A-Za-z0-9_.: -]+")
_HOST = re.compile(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]")
_USER = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Endpoint:
    """Where a dataset lives: ``host`` is None for this machine."""

    dataset: str
    host: str | None = None
    user: str | None = None

    @property
    def is_local(self) -> bool:
        return self.host is None

    @property
    def host_label(self) -> str:
        if self.host is None:
            return "localhost"
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        return self.dataset if self.host is None else f"{self.host_label}:{self.dataset}"


def check_dataset_name(name: str, snapshot_ok: bool = False) -> str:
    """Refuse anything zfs would refuse, and anything that could be taken for an option."""
    if not name:
        raise BadDatasetName(name=name, reason="it is empty")
    if name.startswith("-"):
        raise BadDatasetName(name=name, reason="it starts with '-'")
    if len(name) > 255:
        raise BadDatasetName(name=name, reason="it is longer than 255 characters")
    base, at, snap = name.partition("@")
    if at and not snapshot_ok:
        raise BadDatasetName(name=name, reason="give a dataset, not a snapshot")
    parts = base.split("/")
    for part in parts + ([snap] if at else []):
        if not part:
            raise BadDatasetName(name=name, reason="it has an empty component")
        if not _COMPONENT.fullmatch(part):
            bad = sorted({c for c in part if not _COMPONENT.fullmatch(c)})
            raise BadDatasetName(name=name, reason=f"it contains {''.join(bad)!r}")
        if part in (".", ".."):
            raise BadDatasetName(name=name, reason="'.' and '..' are not dataset names")
    return name


def parse_endpoint(spec: str) -> Endpoint:
    """``pool/ds``, ``host:pool/ds``, ``user@host:pool/ds``, ``[::1]:pool/ds``."""
    host: str | None = None
    user: str | None = None
    rest = spec
    bracket = spec.find("[")
    if bracket >= 0 and (bracket == 0 or spec[bracket - 1] == "@") and "]:" in spec:
        close = spec.find("]:")
        host, rest = spec[: close + 1], spec[close + 2 :]
    elif ":" in spec and "/" not in spec.split(":", 1)[0]:
        host, rest = spec.split(":", 1)
    if host is not None:
        if "@" in host:
            user, host = host.rsplit("@", 1)
            if not _USER.fullmatch(user):
                raise BadDatasetName(name=spec, reason=f"bad user name {user!r}")
        if not host or not _HOST.fullmatch(host) or host.startswith("-"):
            raise BadDatasetName(name=spec, reason=f"bad host name {host!r}")
        if host.startswith("["):
            host = host[1:-1]
    return Endpoint(dataset=check_dataset_name(rest), host=host, user=user)
