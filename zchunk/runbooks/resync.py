"""``zchunk resync``: repair the chain to the nearest common snapshot (seed 000), or re-seed (seed 001's
Plan B), showing the plan first. The plan and the work are ``zchunk sync``'s own (``replicate`` with
``--rollback``, and ``--force-delete`` for a re-seed; ``--dry-run`` until ``--yes``); what this module adds
is what the runbooks check by hand before: the source is still there (when it is gone, the replica is
kept and, on request, renamed out of the way of a future dataset of that name), and a re-seed fits the
target pool."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .. import errors as E
from ..endpoint import Endpoint
from ..stream import SyncOptions
from ..transport import first_contact, make_host
from ..zfs import Dataset, Zfs


@dataclass(frozen=True)
class Sides:
    source: Dataset | None
    target: Dataset | None


async def look(source: Endpoint, target: Endpoint, opts: SyncOptions) -> Sides:
    """Both datasets as they are (None: not there)."""
    found = []
    for ep in (source, target):
        host = make_host(ep, opts.ssh, opts.python)
        try:
            await first_contact(host, 0.0, opts.connect_patience)
            found.append(await Zfs(host).dataset(ep.dataset))
        finally:
            await host.close()
    return Sides(found[0], found[1])


async def reseed_fits(source: Endpoint, target: Endpoint, opts: SyncOptions, src: Dataset) -> None:
    """TargetFull when the target's pool cannot hold a full stream of the source's newest snapshot (about its
    referenced bytes), counting the space the old replica frees when it is destroyed."""
    host = make_host(target, opts.ssh, opts.python)
    try:
        await first_contact(host, 0.0, opts.connect_patience)
        zfs = Zfs(host)
        room = await zfs.available(target.dataset)
        used = await zfs.prop(target.dataset, "used")
        if room is None:
            return
        where, free = room
        free += int(used) if used and used.isdigit() else 0
        needed = (src.newest.referenced if src.newest else src.referenced) or src.referenced
        if needed * 1.1 > free:
            raise E.TargetFull(host=host.name, dataset=target.dataset, needed=f"{needed >> 20} MiB", where=where,
                               free=f"{free >> 20} MiB", stderr="checked before the re-seed: nothing was changed")
    finally:
        await host.close()


async def rename_target(target: Endpoint, new: str, opts: SyncOptions, yes: bool,
                        say: Callable[[str], None]) -> bool:
    """``zfs rename`` of the orphaned replica (with ``yes``; else said). Whether it was done."""
    say(("" if yes else "would ") + f"rename {target.dataset} to {new} on {target.host_label} "
        "(its snapshots go with it; a future source dataset of the old name gets a fresh replica)")
    if not yes:
        return False
    host = make_host(target, opts.ssh, opts.python)
    try:
        await first_contact(host, 0.0, opts.connect_patience)
        await Zfs(host).run("rename", target.dataset, new, dataset=target.dataset, action="rename")
    finally:
        await host.close()
    return True
