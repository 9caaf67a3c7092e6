"""The link under the user's control: bandwidth limits (fixed, or by day and time of day) and their pacing.

``parse_rate`` reads a rate as admins write it (``8M`` bytes/s, ``50mbit``);
``Bandwidth.parse`` reads a limit or a weekly schedule,
``"Mon-Fri 08:00-18:00=2M, Sat-Sun=unlimited, *=20M"`` (first matching rule
wins; a time range may cross midnight); ``Pacer`` is the token bucket the
engine's moves spend their bytes from. Pure apart from the clock, which is
passed in, so every rule is tested without waiting (tests/test_link.py).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, tzinfo

from .errors import UsageError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
UNLIMITED_WORDS = ("unlimited", "none", "off")

_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?b)?|([kmgt]?)bit|([kmgt]?)bps|b)?(?:/s)?$", re.I)
_BYTES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_BITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_rate(text: str, what: str = "--bwlimit") -> float | None:
    """Bytes per second from ``8M``, ``512K``, ``1.5G`` (binary bytes), ``50mbit``/``50Mbps`` (decimal bits),
    ``1048576``; None for ``unlimited``. A rate of 0 is refused: that is ``zchunk pause``."""
    t = text.strip().lower()
    if t in UNLIMITED_WORDS:
        return None
    m = _RATE.match(t)
    if not m:
        raise UsageError(reason=f"{what} {text!r}: expected a rate like 8M (bytes/s), 50mbit or unlimited")
    value = float(m.group(1))
    if m.group(2) is not None:
        rate = value * _BYTES[m.group(2)]
    elif m.group(4) is not None or m.group(5) is not None:
        rate = value * _BITS[(m.group(4) or m.group(5) or "")] / 8
    else:
        rate = value
    if rate < 1024:
        raise UsageError(reason=f"{what} {text!r}: at least 1K per second (to stop moving data: zchunk pause)")
    return rate


def human_rate(rate: float | None) -> str:
    if rate is None:
        return "unlimited"
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if rate >= size:
            value = rate / size
            return f"{value:.0f}{unit}/s" if value == int(value) else f"{value:.1f}{unit}/s"
    return f"{rate:.0f}B/s"


@dataclass(frozen=True)
class Rule:
    """One rule of a schedule: on these weekdays (0 = Monday), in this time range (minutes since midnight,
    end exclusive, may wrap past midnight; None = all day), this rate (None = unlimited)."""

    days: frozenset[int]
    start: int | None
    end: int | None
    rate: float | None

    def matches(self, when: datetime) -> bool:
        minute = when.hour * 60 + when.minute
        if self.start is None or self.end is None:
            return when.weekday() in self.days
        if self.start < self.end:
            return when.weekday() in self.days and self.start <= minute < self.end
        # crosses midnight: the part after midnight belongs to the day the range started on
        if minute >= self.start:
            return when.weekday() in self.days
        return minute < self.end and (when.weekday() - 1) % 7 in self.days


@dataclass(frozen=True)
class Bandwidth:
    """A bandwidth limit: one rate, or rules by weekday and time (the first that matches; none: unlimited)."""

    rules: tuple[Rule, ...] = ()
    text: str = "unlimited"

    @classmethod
    def parse(cls, text: str | None, what: str = "--bwlimit") -> Bandwidth:
        if text is None or not text.strip():
            return cls()
        if "=" not in text:
            return cls((Rule(frozenset(range(7)), None, None, parse_rate(text, what)),), text.strip())
        rules = [_rule(part.strip(), what) for part in text.split(",") if part.strip()]
        return cls(tuple(rules), text.strip())

    def rate_at(self, when: datetime) -> float | None:
        for rule in self.rules:
            if rule.matches(when):
                return rule.rate
        return None

    @property
    def scheduled(self) -> bool:
        return len(self.rules) > 1 or any(r.start is not None or len(r.days) < 7 for r in self.rules)


def _rule(part: str, what: str) -> Rule:
    when, _, rate_text = part.rpartition("=")
    words = when.lower().split()
    if not words:
        raise UsageError(reason=f"{what}: rule {part!r} has no days or times before '='")
    rate = parse_rate(rate_text, what)
    if words == ["*"]:
        return Rule(frozenset(range(7)), None, None, rate)
    days: frozenset[int] = frozenset(range(7))
    start = end = None
    for word in words:
        if re.fullmatch(r"\d{1,2}:\d{2}-\d{1,2}:\d{2}", word):
            start, end = (_minutes(t, part, what) for t in word.split("-"))
            if start == end:
                raise UsageError(reason=f"{what}: rule {part!r}: the time range is empty")
        else:
            days = _days(word, part, what)
    return Rule(days, start, end, rate)


def _days(word: str, part: str, what: str) -> frozenset[int]:
    out: set[int] = set()
    for piece in word.split("+"):
        a, _, b = piece.partition("-")
        if a not in DAYS or (b and b not in DAYS):
            raise UsageError(reason=f"{what}: rule {part!r}: {word!r} is not a day or range like Mon-Fri, Sat-Sun, "
                             "Wed or HH:MM-HH:MM")
        i, j = DAYS.index(a), DAYS.index(b or a)
        out.update(range(i, j + 1) if i <= j else [*range(i, 7), *range(0, j + 1)])
    return frozenset(out)


def _minutes(text: str, part: str, what: str) -> int:
    h, m = (int(x) for x in text.split(":"))
    if h > 24 or m > 59 or (h == 24 and m):
        raise UsageError(reason=f"{what}: rule {part!r}: {text} is not a time of day")
    return h * 60 + m


class Pacer:
    """The token bucket one transfer's moves take their bytes from, so that the bytes zchunk puts on the
    link stay within the rate over any window longer than a piece's time at that rate.

    Moves take their turn in the order they ask (a lock), so parallel moves are spaced, not released
    together. ``rate`` None is no limit. The rate may change at any time (a schedule's boundary, ``zchunk
    limit``): a waiting move sees the new one within ``STEP`` seconds."""

    STEP = 0.25

    def __init__(self, rate: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.rate = rate
        self.level = 0.0  # bytes that may go now; below 0: owed, paid back at the rate
        self.last = clock()
        self._lock: asyncio.Lock | None = None

    def set_rate(self, rate: float | None) -> None:
        self._refill()
        self.rate = rate
        if rate is None:
            self.level = 0.0

    def _refill(self) -> None:
        now = self.clock()
        if self.rate is not None:
            # at most a short burst of credit: an idle link does not save up for later
            self.level = min(self.rate * self.STEP, self.level + (now - self.last) * self.rate)
        self.last = now

    def delay(self) -> float:
        """How long the next move must wait before it may send (0: now), at most ``STEP``."""
        self._refill()
        if self.rate is None or self.level > -1.0:  # less than a byte owed: rounding, not debt
            return 0.0
        return min(self.STEP, -self.level / self.rate)

    def charge(self, n: int) -> None:
        """``n`` bytes go on the link now."""
        self._refill()
        if self.rate is not None:
            self.level -= n

    async def take(self, n: int) -> None:
        """Wait for this move's turn, then charge its ``n`` bytes."""
        if self.rate is None:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            while (d := self.delay()) > 0:
                await asyncio.sleep(d)
            self.charge(n)


@dataclass(frozen=True)
class LinkState:
    """What a running transfer is allowed now."""

    rate: float | None  # bytes/s; None: no limit
    limit: str  # what decides it, as the user wrote it ("unlimited" when nothing does)
    paused: bool


class LinkControl:
    """A session's limit and pause, asked for every poll: its ``Bandwidth`` (a rate, or a schedule read in
    ``tz``, the coordinator's local time by default), replaced by what the user asked since (``zchunk
    limit``, ``pause``, ``resume``: ``asked`` returns the limit text or None, and paused). ``asked`` is
    called again only when ``stamp`` changes (the control file's mtime), so a poll costs one stat."""

    def __init__(self, bandwidth: Bandwidth, tz: tzinfo | None = None,
                 asked: Callable[[], tuple[str | None, bool]] | None = None,
                 stamp: Callable[[], float] | None = None, now: Callable[[tzinfo | None], datetime] = datetime.now
                 ) -> None:
        self.bandwidth, self.tz, self.asked, self.stamp, self.now = bandwidth, tz, asked, stamp, now
        self._seen: float | None = None
        self._override: Bandwidth | None = None
        self._paused = False

    def _read(self) -> None:
        if self.asked is None:
            return
        stamp = self.stamp() if self.stamp is not None else None
        if stamp is not None and stamp == self._seen:
            return
        self._seen = stamp
        limit, self._paused = self.asked()
        try:
            self._override = Bandwidth.parse(limit, "zchunk limit") if limit is not None else None
        except UsageError:
            pass  # written by zchunk limit, which checked it: keep what was in force

    def state(self) -> LinkState:
        self._read()
        bw = self._override or self.bandwidth
        return LinkState(bw.rate_at(self.now(self.tz)), bw.text, self._paused)


class LinkRate:
    """The link's rate as the user should see it: bytes moved over the recent seconds in which the link
    was up and the session not paused. An outage or a pause starts afresh (the last rate stands
    meanwhile), so the ETA it gives counts neither.

    The window is half the time moved so far, from ``MIN_WINDOW`` up to ``WINDOW`` seconds: a transfer's
    first seconds (TCP finding the link's rate, the chunks' ramp) say little about the rest, and a fixed
    10 s window kept them in the rate, and the ETA pessimistic, for the first quarter of a half-minute
    transfer. Later the long window smooths the steps in which the target's bytes move."""

    WINDOW = 10.0
    MIN_WINDOW = 3.0
    MIN_SPAN = 1.5  # seconds of samples before a first rate is said

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque()
        self.rate = 0.0
        self.moving_since: float | None = None

    def window(self, now: float) -> float:
        moved_for = now - self.moving_since if self.moving_since is not None else 0.0
        return min(self.WINDOW, max(self.MIN_WINDOW, moved_for / 2))

    def sample(self, now: float, moved: int, moving: bool) -> float:
        """``moved``: bytes moved so far (a counter); ``moving``: the link is up and not paused."""
        if not moving:
            self.samples.clear()
            self.moving_since = None
            return self.rate
        if self.moving_since is None:
            self.moving_since = now
        self.samples.append((now, moved))
        window = self.window(now)
        while len(self.samples) > 2 and self.samples[1][0] <= now - window:
            self.samples.popleft()
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        if t1 - t0 >= self.MIN_SPAN:
            self.rate = (b1 - b0) / (t1 - t0)
        return self.rate
