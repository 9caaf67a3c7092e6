"""``zchunk doctor``: why replication between two datasets works or not, in the order an admin looks (seed
001: the control plane before the data plane), each finding PASS, WARN or FAIL with one line of evidence and
the command that fixes it.

Read-only, on both hosts: only listings and ``zfs get``/``zpool status``/``zfs send -n`` (nothing is
snapshotted, not even a probe; a zfs without ``written`` says "cannot tell"). A check whose host cannot be
reached is not run (said as such). Not here yet: holds by tag (``zfs holds``; ``userrefs`` counts them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .. import compat
from .. import errors as E
from ..endpoint import Endpoint
from ..plan import SYNC_PREFIX, common_snapshot
from ..preflight import HostReport, probe_host
from ..stream import SyncOptions
from ..transport import Host, first_contact, make_host
from ..zfs import Dataset, Zfs

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
CAPACITY_WARN = 90  # percent of the pool


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # PASS | WARN | FAIL
    evidence: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class _Side:
    label: str
    endpoint: Endpoint
    host: Host
    report: HostReport | None = None
    zfs: Zfs | None = None
    dataset: Dataset | None = None


class Doctor:
    """The checks, each appending its findings; ``say`` gets each as it is found."""

    def __init__(self, source: Endpoint, target: Endpoint, opts: SyncOptions, say: Callable[[Finding], None],
                 last_success: float | None = None, job: str | None = None, no_raw: bool = False) -> None:
        self.opts, self.say, self.last_success, self.job, self.no_raw = opts, say, last_success, job, no_raw
        self.src = _Side("source", source, make_host(source, opts.ssh, opts.python))
        self.dst = _Side("target", target, make_host(target, opts.ssh, opts.python))
        self.findings: list[Finding] = []

    def add(self, check: str, status: str, evidence: str, fix: str = "") -> None:
        finding = Finding(check, status, evidence, fix)
        self.findings.append(finding)
        self.say(finding)

    async def run(self) -> list[Finding]:
        try:
            for side in (self.src, self.dst):
                await self._reach(side)
            for side in (self.src, self.dst):
                if side.zfs is not None:
                    await self._clock(side)
                    await self._mtu(side)
                    await self._link(side)
            if self.src.zfs is None or self.dst.zfs is None:
                return self.findings
            for side in (self.src, self.dst):
                await self._pool(side)
            await self._datasets()
            if self.src.dataset is not None:
                await self._encryption()
                await self._chain()
            if self.job is not None:
                self._job()
            return self.findings
        finally:
            await asyncio.gather(self.src.host.close(), self.dst.host.close(), return_exceptions=True)

    # -- control plane ------------------------------------------------------------------------------------

    async def _reach(self, side: _Side) -> None:
        where = side.host.name
        start = time.monotonic()
        try:
            await first_contact(side.host, 0.0, self.opts.connect_patience)
        except E.ZchunkError as e:
            self.add("ssh", FAIL, f"{side.label} {where}: {e}", e.hint)
            return
        if not side.endpoint.is_local:
            self.add("ssh", PASS, f"{side.label} {where}: non-interactive login in {time.monotonic() - start:.2f} s")
        try:
            side.report = await probe_host(side.host, self.opts.spool_dir, choose_python=self.opts.python is None)
        except E.ZchunkError as e:
            self.add("python3 and zfs", FAIL, f"{side.label} {where}: {e}", e.hint)
            return
        r = side.report
        self.add("python3 and zfs", PASS, f"{side.label} {where}: python {'.'.join(map(str, r.python))} "
                 f"({r.interpreter}: {r.why}); {r.features.implementation}"
                 + (f" {r.features.version}" if r.features.openzfs else ""))
        side.zfs = Zfs(side.host)
        side.zfs.user = r.user
        leftovers = [s for s in (r.sessions or [])]
        if leftovers:
            self.add("leftover sessions", WARN, f"{side.label} {where}: {len(leftovers)} session director"
                     f"{'y' if len(leftovers) == 1 else 'ies'} under {self.opts.spool_dir}: "
                     + ", ".join(str(s.get("path", "?")).rsplit("/", 1)[-1] for s in leftovers[:3]),
                     "zchunk sessions lists them; zchunk resume ID continues one, zchunk abort ID removes it")

    async def _clock(self, side: _Side) -> None:
        if side.endpoint.is_local:
            return
        before = time.time()
        res = await side.host.run(["date", "+%s.%N"])
        after = time.time()
        try:
            theirs = float(res.stdout.decode().strip().replace("N", "0"))
        except ValueError:
            self.add("clock", WARN, f"{side.label} {side.host.name}: `date` said {res.stdout[:40]!r}")
            return
        skew = theirs - (before + after) / 2
        status = PASS if abs(skew) < 2 else WARN if abs(skew) < 60 else FAIL
        self.add("clock", status, f"{side.label} {side.host.name} is {abs(skew):.1f} s "
                 f"{'ahead of' if skew > 0 else 'behind'} this machine",
                 "" if status == PASS else "run NTP (chrony, systemd-timesyncd) on both: sync snapshot names "
                 "and retention go by time")

    async def _mtu(self, side: _Side) -> None:
        """The MTU of the interface each end of the SSH connection uses towards the other (a mismatch: big
        packets dropped on the way, a transfer that stalls while small commands work)."""
        if side.endpoint.is_local:
            return
        # netlink, not /sys: right also where sysfs is not the network namespace's own
        script = ('set -- $SSH_CONNECTION; '
                  'dev=$(ip -o route get "$1" 2>/dev/null | awk \'{for (i = 1; i < NF; i++) if ($i == "dev") '
                  'print $(i + 1)}\'); echo "$3 $dev $(ip -o link show dev "$dev" 2>/dev/null | awk \'{for (i = 1; '
                  'i < NF; i++) if ($i == "mtu") print $(i + 1)}\')"')
        res = await side.host.run(["sh", "-c", script])
        theirs = res.stdout.decode().split()
        if len(theirs) != 3 or not theirs[2].isdigit():
            self.add("mtu", PASS, f"{side.label} {side.host.name}: cannot read the interface's MTU there (no `ip`?)")
            return
        server, dev, mtu = theirs
        words = (await _output("ip", "-o", "route", "get", server)).split()
        here = words[words.index("dev") + 1] if "dev" in words[:-1] else ""
        link = (await _output("ip", "-o", "link", "show", "dev", here)).split() if here else []
        value = link[link.index("mtu") + 1] if "mtu" in link[:-1] else ""
        ours = int(value) if value.isdigit() else 0
        if not ours:
            self.add("mtu", PASS, f"{side.label} {side.host.name}: {dev} has MTU {mtu}; this machine's route to it "
                     "cannot be read")
        elif ours == int(mtu):
            self.add("mtu", PASS, f"{side.label} {side.host.name}: MTU {mtu} on both ends ({here} here, {dev} there)")
        else:
            self.add("mtu", WARN, f"{side.label} {side.host.name}: MTU {ours} here ({here}), {mtu} there ({dev})",
                     "make them equal (or make sure path MTU discovery works: ICMP 'fragmentation needed' must "
                     "pass): a mismatch drops big packets and stalls transfers while small commands work")

    async def _link(self, side: _Side) -> None:
        if side.endpoint.is_local:
            return
        rtts = []
        for _ in range(3):
            start = time.monotonic()
            await side.host.run(["true"])
            rtts.append(time.monotonic() - start)
        size = 4 << 20
        start = time.monotonic()
        res = await side.host.run(["head", "-c", str(size), "/dev/urandom"])
        seconds = max(1e-6, time.monotonic() - start)
        got = len(res.stdout)
        rate = got / seconds
        status = PASS if rate >= 1e6 / 8 * 10 else WARN  # under 10 Mbit/s: a seed takes days
        self.add("link", status, f"{side.label} {side.host.name}: round trip {min(rtts) * 1000:.0f} ms (a "
                 f"command over SSH), {got * 8 / seconds / 1e6:.1f} Mbit/s ({got >> 20} MiB in {seconds:.1f} s)",
                 "" if status == PASS else "a slow link: --bwlimit keeps it usable by others, and a first "
                 "seed may be faster by disk (zchunk seed)")

    # -- data plane -----------------------------------------------------------------------------------------

    async def _pool(self, side: _Side) -> None:
        assert side.zfs is not None
        pool = side.endpoint.dataset.split("/")[0]
        res = await side.host.run(["zpool", "status", "-x", pool])
        text = (res.stdout.decode() + res.err_text).strip()
        if res.status != 0 or "no such pool" in text:
            self.add("pool", FAIL, f"{side.label} {side.host.name}: zpool status -x {pool}: {_first(text)}",
                     f"check the name: zpool list on {side.host.name}")
            return
        busy = [line.strip() for line in text.splitlines() if "in progress" in line]
        cap = await side.host.run(["zpool", "list", "-H", "-o", "capacity", pool])
        used = cap.stdout.decode().strip().rstrip("%")
        full = used.isdigit() and int(used) >= CAPACITY_WARN
        if "healthy" in text and not busy and not full:
            self.add("pool", PASS, f"{side.label} {side.host.name}: {pool} is healthy, {used}% used")
        else:
            self.add("pool", FAIL if ("DEGRADED" in text or "FAULTED" in text or "UNAVAIL" in text) else WARN,
                     f"{side.label} {side.host.name}: {pool}: " + ("; ".join(busy) or _first(text))
                     + (f"; {used}% used" if used else ""),
                     f"zpool status -v {pool} on {side.host.name}" + ("; free space: a pool above "
                                                                      f"{CAPACITY_WARN}% slows down" if full else ""))

    async def _datasets(self) -> None:
        src, dst = self.src, self.dst
        assert src.zfs is not None and dst.zfs is not None
        src.dataset, dst.dataset = await asyncio.gather(src.zfs.dataset(src.endpoint.dataset),
                                                         dst.zfs.dataset(dst.endpoint.dataset))
        if src.dataset is None:
            self.add("datasets", FAIL, f"the source {src.endpoint} does not exist",
                     f"check the name (zfs list on {src.host.name}); if it was destroyed on purpose, the replica "
                     "stays as it is: rename it out of the way before a new dataset takes the name")
            return
        if dst.dataset is None:
            self.add("datasets", PASS, f"{src.endpoint} is a {src.dataset.type} with "
                     f"{len(src.dataset.snapshots)} snapshot(s); {dst.endpoint} does not exist yet: the next sync "
                     "seeds it with a full stream")
        elif src.dataset.type != dst.dataset.type:
            self.add("datasets", FAIL, f"{src.endpoint} is a {src.dataset.type}, {dst.endpoint} a "
                     f"{dst.dataset.type}", "replicate into a new target dataset")
        else:
            self.add("datasets", PASS, f"both are {src.dataset.type}s; {len(src.dataset.snapshots)} snapshot(s) on "
                     f"the source, {len(dst.dataset.snapshots)} on the target")
        if dst.dataset is not None and dst.dataset.locked:
            self.add("lock", WARN, f"{dst.endpoint} is locked against replication: {dst.dataset.locked}",
                     "a failover: end it (zchunk failover --end), or clear it: zfs inherit zchunk:locked "
                     f"{dst.endpoint.dataset}")
        assert src.report is not None and dst.report is not None
        try:
            await compat.check_stream(src.zfs, src.report.features, src.endpoint.dataset, dst.zfs,
                                      dst.report.features, dst.endpoint.dataset)
            self.add("stream compatibility", PASS, f"{dst.host.name}'s zfs can receive and read "
                     f"{src.endpoint.dataset}'s stream")
        except E.ZchunkError as e:
            self.add("stream compatibility", FAIL, str(e), e.hint)

    async def _encryption(self) -> None:
        """Keys where a send needs them: the source's for --no-raw; an unencrypted source's replica created
        under an encrypted target parent needs that parent's key loaded."""
        src, dst = self.src, self.dst
        assert src.zfs is not None and dst.zfs is not None and dst.report is not None
        enc = await src.zfs.encryption(src.endpoint.dataset)
        if enc.on and self.no_raw:
            loaded = enc.keystatus == "available"
            self.add("encryption", PASS if loaded else FAIL, f"{src.endpoint} is encrypted ({enc.cipher}, root "
                     f"{enc.root}); --no-raw sends it decrypted: its key is {'' if loaded else 'not '}loaded",
                     "" if loaded else f"zfs load-key {enc.root} on {src.host.name}")
        elif enc.on and not dst.report.features.encryption:
            self.add("encryption", FAIL, f"{src.endpoint} is encrypted ({enc.cipher}) and {dst.host.name}'s zfs has "
                     "no encryption: a raw stream cannot be received there",
                     "--no-raw sends it decrypted (with the key loaded on the source)")
        elif enc.on:
            self.add("encryption", PASS, f"{src.endpoint} is encrypted ({enc.cipher}, root {enc.root}): sent raw, "
                     "the target never needs its key")
        elif dst.dataset is None and "/" in dst.endpoint.dataset:
            parent = dst.endpoint.dataset.rsplit("/", 1)[0]
            penc = await dst.zfs.encryption(parent)
            if penc.on and penc.keystatus != "available":
                self.add("encryption", FAIL, f"the replica would be created under {parent}, encrypted, whose key "
                         "is not loaded", f"zfs load-key {penc.root} on {dst.host.name}")

    async def _chain(self) -> None:
        src, dst = self.src, self.dst
        assert src.dataset is not None and src.zfs is not None and dst.zfs is not None
        if dst.dataset is None:
            await self._space(None)
            return
        pair = common_snapshot(src.dataset, dst.dataset)
        if pair is None:
            self.add("common snapshot", FAIL, f"no snapshot of {dst.endpoint} is on the source (by guid): "
                     "an incremental is impossible",
                     "zchunk sync --force-delete re-seeds it (after checking nothing on it is needed)")
            await self._space(None)
            return
        common, target_common = pair
        newest_dst = dst.dataset.newest
        if newest_dst is not None and newest_dst.guid != common.guid:
            lost = [s for s in dst.dataset.snapshots if s.createtxg > target_common.createtxg]
            vzdump = [s.short for s in lost if s.short == "vzdump"]
            self.add("common snapshot", WARN, f"the target's newest, {newest_dst.short}, is not on the source; the "
                     f"nearest common is {common.short}; {len(lost)} target snapshot(s) after it would be lost: "
                     + ", ".join(s.short for s in lost[:6]) + (" (a Proxmox @vzdump: it differs on both sides by "
                                                                "design)" if vzdump else ""),
                     f"zchunk sync --rollback rolls the target back to {common.short} (listing what goes)")
        else:
            self.add("common snapshot", PASS, f"{common.short} (guid {common.guid}) is the newest on the target and "
                     "on the source")
        written = await dst.zfs.changed_since(dst.endpoint.dataset, target_common.name, probe=False)
        if written is None:
            self.add("target unchanged", PASS, f"cannot tell whether {dst.endpoint} was written since "
                     f"{target_common.short} (this zfs has no `written`); zchunk sync finds out")
        elif written:
            self.add("target unchanged", WARN, f"{dst.endpoint} was written since {target_common.short}: an "
                     "incremental receive refuses it", "zchunk sync --rollback discards those writes")
        else:
            self.add("target unchanged", PASS, f"{dst.endpoint} was not written since {target_common.short}")
        token = await dst.zfs.prop(dst.endpoint.dataset, "receive_resume_token")
        if token:
            probe = await src.zfs.run("send", "-nP", "-t", token, check=False)
            if probe.status == 0:
                self.add("resume token", WARN, f"{dst.endpoint} has a partial receive (resume token "
                         f"{token[:24]}...); the source can still continue it",
                         "zchunk sync finishes it with zfs send -t")
            else:
                self.add("resume token", WARN, f"{dst.endpoint} has a partial receive whose snapshot the source "
                         f"no longer has (stale token: {_first(probe.err_text)})",
                         f"zchunk sync aborts it (zfs receive -A {dst.endpoint.dataset}) and plans afresh")
        await self._holds(common.guid)
        await self._space(common.name)

    async def _holds(self, keep_guid: int) -> None:
        for side in (self.src, self.dst):
            assert side.zfs is not None and side.dataset is not None
            res = await side.zfs.run("get", "-H", "-p", "-d", "1", "-o", "name,value", "userrefs",
                                     side.endpoint.dataset, check=False)  # zfs-fuse's get has no -t
            held = [line.split("\t")[0] for line in res.stdout.decode().splitlines()
                    if line.count("\t") == 1 and "@" in line and line.split("\t")[1].isdigit()
                    and int(line.split("\t")[1]) > 0]
            by_name = {s.name: s for s in side.dataset.snapshots}
            stale = [n for n in held if n in by_name and by_name[n].guid != keep_guid
                     and by_name[n].short.startswith(SYNC_PREFIX)]
            if stale:
                self.add("holds", WARN, f"{side.label}: {len(stale)} older sync snapshot(s) still held: "
                         + ", ".join(n.split("@")[1] for n in stale[:3]),
                         "zfs holds NAME shows the tag; zfs release zchunk_<identifier> NAME frees it")

    async def _space(self, base: str | None) -> None:
        src, dst = self.src, self.dst
        assert src.zfs is not None and dst.zfs is not None and src.dataset is not None
        newest = src.dataset.newest
        if newest is None:
            self.add("space", WARN, f"{src.endpoint} has no snapshot yet: zchunk sync takes one")
            return
        estimate: int | None = 0
        if base != newest.name:  # something to send: zfs send -nP says how much (a full stream: at most referenced)
            estimate = None if base else src.dataset.referenced
            res = await src.zfs.run("send", "-nP", *(["-I", base] if base else []), newest.name, check=False)
            for line in (res.stdout.decode() + res.err_text).splitlines():
                if line.startswith("size") and line.split()[-1].isdigit():
                    estimate = int(line.split()[-1])
        room = await dst.zfs.available(dst.endpoint.dataset)
        if room is None:
            self.add("space", WARN, f"cannot read the free space for {dst.endpoint}")
            return
        where, free = room
        if estimate is None:
            self.add("space", PASS, f"{where} has {_mib(free)} MiB available; this zfs cannot estimate the "
                     "incremental (no zfs send -nP)")
            return
        status = PASS if free > estimate * 1.1 else FAIL
        self.add("space", status, f"the next stream is ~{_mib(estimate)} MiB; {where} has {_mib(free)} MiB "
                 "available (quotas and reservations counted)",
                 "" if status == PASS else f"free space on {dst.host.name}, or raise the quota of {where}")

    def _job(self) -> None:
        if self.last_success is None:
            self.add("job", WARN, f"job {self.job} has never succeeded", "zchunk status; zchunk run " + str(self.job))
            return
        age = time.time() - self.last_success
        self.add("job", PASS if age < 86400 else WARN, f"job {self.job}: last success {age / 3600:.1f} h ago")


async def _output(*argv: str) -> str:
    """A command's stdout on this machine ("" when it cannot run)."""
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.DEVNULL)
    except OSError:
        return ""
    out, _ = await proc.communicate()
    return out.decode()


def _first(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no answer"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def exit_code(findings: list[Finding]) -> int:
    """0 every check passed, 1 warnings, 2 a failure."""
    statuses = {f.status for f in findings}
    return 2 if FAIL in statuses else 1 if WARN in statuses else 0

