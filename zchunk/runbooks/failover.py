"""``zchunk failover``: make a replica usable, for a test or a disaster, and lock it against replication.

Seed 002, section 6, as one command run against the replica's host. Failing over:

1. the replica must exist and hold a snapshot (the last one replicated: what the failover starts from);
2. its settings as replication left them (canmount, readonly, mountpoint: value and whether set here) are
   kept in the user property ``zchunk:failover`` (JSON, with the snapshot and its guid, who, when, test or
   not), so that ending a test puts them back exactly;
3. the lock ``zchunk:locked`` ("who@host TIME: failover[ test]: why") goes on the dataset itself: every
   ``zchunk sync`` and job into it (or a replica below it, which inherits it) refuses with exit 9, also when
   the source comes back unannounced, because the lock travels with the data;
4. readonly=off, canmount=on, ``--mountpoint`` if given, mounted.

Ending a test (``--end``): the plan first (the snapshots taken on the replica since, the bytes written,
all discarded); with ``--yes``, unmounted, rolled back to the failover's snapshot (``zfs rollback -r``), its
settings put back, the lock and the record removed: the next sync continues incrementally. A real
failover ends with ``zchunk failback``: ``--end`` refuses it, since rolling back would
destroy what was written on the replica in production.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import errors as E
from ..endpoint import Endpoint
from ..transport import SshOptions, first_contact, make_host
from ..zfs import LOCK_PROPERTY, Dataset, Zfs

RECORD_PROPERTY = "zchunk:failover"
SETTINGS = ("canmount", "readonly", "mountpoint")
NOT_INHERITABLE = ("canmount",)


@dataclass
class Step:
    """One change, said before it is made: what and the zfs command."""

    what: str
    argv: tuple[str, ...]


@dataclass
class FailoverPlan:
    target: str
    snapshot: str
    test: bool
    steps: list[Step] = field(default_factory=list)
    discarded_snapshots: list[str] = field(default_factory=list)  # --end: taken on the replica since
    written: str = ""  # --end: bytes written since the failover's snapshot ("unknown" where zfs cannot say)
    done: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "snapshot": self.snapshot, "test": self.test, "done": self.done,
                "steps": [{"what": s.what, "command": " ".join(s.argv)} for s in self.steps],
                "discarded_snapshots": self.discarded_snapshots, "written": self.written}


async def failover(target: Endpoint, ssh: SshOptions, test: bool, mountpoint: str | None, why: str,
                   dry_run: bool, say: Callable[[str], None], connect_patience: float = 30.0) -> FailoverPlan:
    host = make_host(target, ssh)
    try:
        await first_contact(host, 0.0, connect_patience)
        zfs = Zfs(host)
        ds = await zfs.require(target.dataset)
        if ds.locked:
            raise E.TargetLocked(target=str(target), lock=ds.locked)
        newest = ds.newest
        if newest is None:
            raise E.NoSnapshot(host=host.name, dataset=ds.name)
        settings = {p: await _setting(zfs, ds.name, p) for p in SETTINGS}
        who = f"{getpass.getuser()}@{socket.gethostname()}"
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        lock = f"{who} {when}: failover{' test' if test else ''}" + (f": {why}" if why else "")
        record = json.dumps({"test": test, "snapshot": newest.name, "guid": newest.guid, "by": who, "at": when,
                             "settings": settings}, separators=(",", ":"))
        plan = FailoverPlan(str(target), newest.name, test)
        z = zfs.command
        plan.steps = [
            Step(f"record the replica's settings and {newest.short}, to end a test with", (
                z, "set", f"{RECORD_PROPERTY}={record}", ds.name)),
            Step("lock it against replication (every zchunk sync and job into it refuses)", (
                z, "set", f"{LOCK_PROPERTY}={lock}", ds.name)),
        ]
        if settings["readonly"][0] != "off":
            plan.steps.append(Step("make it writable", (z, "set", "readonly=off", ds.name)))
        if settings["canmount"][0] != "on":
            plan.steps.append(Step("let it mount", (z, "set", "canmount=on", ds.name)))
        if mountpoint:
            plan.steps.append(Step(f"mount it at {mountpoint}", (z, "set", f"mountpoint={mountpoint}", ds.name)))
        plan.steps.append(Step("mount it", (z, "mount", ds.name)))
        await _perform(zfs, plan, dry_run, say, mounted_ok=True)
        return plan
    finally:
        await host.close()


async def end_test(target: Endpoint, ssh: SshOptions, yes: bool, say: Callable[[str], None],
                   connect_patience: float = 30.0) -> FailoverPlan:
    host = make_host(target, ssh)
    try:
        await first_contact(host, 0.0, connect_patience)
        zfs = Zfs(host)
        ds = await zfs.require(target.dataset)
        record = await _record(zfs, ds)
        if not record.get("test"):
            raise E.UsageError(reason=f"{target} was failed over for real ({ds.locked}): ending it would roll "
                               "back what was written there since; bring the changes home with zchunk failback")
        snap = str(record["snapshot"])
        base = next((s for s in ds.snapshots if s.name == snap), None)
        if base is None or base.guid != int(record.get("guid", 0)):
            raise E.UsageError(reason=f"{snap}, the snapshot {target} was failed over from, is gone or replaced: "
                               "roll back by hand to the newest snapshot the source has too, then zfs inherit "
                               f"{LOCK_PROPERTY} {ds.name}")
        plan = FailoverPlan(str(target), snap, True)
        plan.discarded_snapshots = [s.name for s in ds.snapshots if s.createtxg > base.createtxg]
        plan.written = await zfs.prop(ds.name, f"written@{base.short}") or "unknown (this zfs cannot say)"
        z = zfs.command
        plan.steps = [Step("unmount it", (z, "unmount", ds.name)),
                      Step(f"roll back to {base.short}, discarding what the test wrote"
                           + (f" and {len(plan.discarded_snapshots)} snapshot(s)" if plan.discarded_snapshots
                              else ""), (z, "rollback", "-r", snap))]
        plan.steps += await _back_to_replica(zfs, ds.name, record)
        await _perform(zfs, plan, not yes, say, mounted_ok=False)
        return plan
    finally:
        await host.close()


async def _back_to_replica(zfs: Zfs, name: str, record: dict[str, Any]) -> list[Step]:
    """The steps that make a failed-over dataset a replica again: its recorded settings back (only those that
    differ now), the record removed, the lock lifted."""
    z = zfs.command
    steps = []
    for prop, (value, source) in dict(record.get("settings", {})).items():
        if prop not in SETTINGS or await _setting(zfs, name, prop) == (value, source):
            continue
        if source == "local" or prop in NOT_INHERITABLE:  # canmount's default can only be set again
            steps.append(Step(f"put {prop} back", (z, "set", f"{prop}={value}", name)))
        else:
            steps.append(Step(f"put {prop} back ({source or 'default'})", (z, "inherit", prop, name)))
    return steps + [Step("remove the failover record", (z, "inherit", RECORD_PROPERTY, name)),
                    Step("unlock it: replication into it continues from its newest snapshot", (
                        z, "inherit", LOCK_PROPERTY, name))]


async def failed_over(replica: Endpoint, ssh: SshOptions, connect_patience: float = 30.0) -> dict[str, Any]:
    """The failover record of a replica failed over for real (UsageError when it is not, or a test)."""
    host = make_host(replica, ssh)
    try:
        await first_contact(host, 0.0, connect_patience)
        zfs = Zfs(host)
        record = await _record(zfs, await zfs.require(replica.dataset))
    finally:
        await host.close()
    if record.get("test"):
        raise E.UsageError(reason=f"{replica} is failed over for a test: end it with zchunk failover --end "
                           "(what the test wrote is discarded); failback is for a real failover")
    return record


async def finish_failback(replica: Endpoint, source: Endpoint, ssh: SshOptions, yes: bool,
                          say: Callable[[str], None], connect_patience: float = 30.0) -> FailoverPlan:
    """After the last pass: the source primary again (canmount=on, mounted: replication kept it unmounted
    while it received), the replica a replica again (unmounted, its settings back, unlocked)."""
    hosts = [make_host(source, ssh), make_host(replica, ssh)]
    try:
        for host in hosts:
            await first_contact(host, 0.0, connect_patience)
        src_zfs, rep_zfs = Zfs(hosts[0]), Zfs(hosts[1])
        rep = await rep_zfs.require(replica.dataset)
        record = await _record(rep_zfs, rep)
        newest = rep.newest
        plan = FailoverPlan(str(replica), newest.name if newest else "", False)
        z = rep_zfs.command
        src_steps = [Step(f"make {source} primary again: let it mount", (z, "set", "canmount=on", source.dataset)),
                     Step("mount it", (z, "mount", source.dataset))]
        rep_steps = [Step(f"make {replica} a replica again: unmount it", (z, "unmount", rep.name))]
        rep_steps += await _back_to_replica(rep_zfs, rep.name, record)
        plan.steps = src_steps + rep_steps
        source_plan = FailoverPlan(str(source), plan.snapshot, False, src_steps)
        await _perform(src_zfs, source_plan, not yes, say, mounted_ok=True)
        replica_plan = FailoverPlan(str(replica), plan.snapshot, False, rep_steps)
        await _perform(rep_zfs, replica_plan, not yes, say, mounted_ok=True)
        plan.done = yes
        return plan
    finally:
        for host in hosts:
            await host.close()


async def _setting(zfs: Zfs, dataset: str, prop: str) -> tuple[str, str]:
    """A property's value and where it comes from (local, default, inherited, received)."""
    res = await zfs.run("get", "-H", "-o", "value,source", prop, dataset, dataset=dataset)
    value, _, source = res.stdout.decode().strip().partition("\t")
    return value, "local" if source == "local" else source.split(" ")[0]


async def _record(zfs: Zfs, ds: Dataset) -> dict[str, Any]:
    raw = await zfs.prop(ds.name, RECORD_PROPERTY)
    if not ds.locked or raw is None:
        raise E.UsageError(reason=f"{ds.name} is not failed over (no {RECORD_PROPERTY} and {LOCK_PROPERTY} on it)")
    try:
        record = json.loads(raw)
    except ValueError:
        raise E.UsageError(reason=f"{ds.name}: {RECORD_PROPERTY} is not zchunk's record: {raw[:80]!r}") from None
    if not isinstance(record, dict) or "snapshot" not in record:
        raise E.UsageError(reason=f"{ds.name}: {RECORD_PROPERTY} is not zchunk's record: {raw[:80]!r}")
    return record


async def _perform(zfs: Zfs, plan: FailoverPlan, dry_run: bool, say: Callable[[str], None],
                   mounted_ok: bool) -> None:
    for step in plan.steps:
        say(("would " if dry_run else "") + f"{step.what}: {' '.join(step.argv)}")
        if dry_run:
            continue
        res = await zfs.run(*step.argv[1:], check=False, dataset=plan.target, action=step.argv[1])
        if res.status != 0:
            err = res.err_text.strip()
            if step.argv[1] in ("mount", "unmount") and ("already mounted" in err or "not currently mounted" in
                                                          err or "not mounted" in err):
                continue
            raise E.CommandFailed(host=zfs.host.name, command=" ".join(step.argv), status=res.status, stderr=err)
    plan.done = not dry_run
