"""Bandwidth limits and schedules (zchunk/link.py): rates as admins write them, rules by day and time,
and the pacing of the bytes, with the clock passed in (no waiting)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest

from zchunk.errors import UsageError
from zchunk.link import Bandwidth, LinkControl, LinkRate, LinkState, Pacer, human_rate, parse_rate

MiB = 1 << 20


@pytest.mark.parametrize("text,rate", [
    ("8M", 8 * MiB), ("8MiB", 8 * MiB), ("8MB/s", 8 * MiB), ("512K", 512 << 10), ("1.5G", 1.5 * (1 << 30)),
    ("50mbit", 50e6 / 8), ("50Mbps", 50e6 / 8), ("1gbit", 1e9 / 8), ("1048576", MiB), ("unlimited", None),
])
def test_rates_as_admins_write_them(text: str, rate: float | None) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "8 furlongs", "-1M", "0", "100", "M"])
def test_a_rate_that_is_not_one_is_refused_naming_it(text: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_rate(text)
    assert repr(text) in str(e.value)


def test_human_rate() -> None:
    assert human_rate(2 * MiB) == "2M/s" and human_rate(None) == "unlimited" and human_rate(1536) == "1.5K/s"


MON_10 = datetime(2026, 11, 30, 10, 0)  # a Monday
SCHEDULE = "Mon-Fri 08:00-18:00=2M, Sat-Sun=unlimited, *=20M"


@pytest.mark.parametrize("when,rate", [
    (MON_10, 2 * MiB),
    (datetime(2026, 11, 30, 7, 59), 20 * MiB),  # before working hours
    (datetime(2026, 11, 30, 18, 0), 20 * MiB),  # the end is exclusive
    (datetime(2026, 12, 4, 17, 59), 2 * MiB),  # Friday
    (datetime(2026, 12, 5, 10, 0), None),  # Saturday
    (datetime(2026, 12, 6, 23, 59), None),  # Sunday
])
def test_the_first_matching_rule_decides(when: datetime, rate: float | None) -> None:
    assert Bandwidth.parse(SCHEDULE).rate_at(when) == rate


def test_a_night_range_crosses_midnight_on_the_day_it_started() -> None:
    bw = Bandwidth.parse("Fri 22:00-06:00=unlimited, *=1M")
    assert bw.rate_at(datetime(2026, 12, 4, 23, 0)) is None  # Friday night
    assert bw.rate_at(datetime(2026, 12, 5, 5, 59)) is None  # early Saturday: still Friday's range
    assert bw.rate_at(datetime(2026, 12, 5, 6, 0)) == MiB
    assert bw.rate_at(datetime(2026, 12, 4, 5, 0)) == MiB  # early Friday belongs to Thursday's night


def test_no_matching_rule_is_unlimited_and_a_plain_rate_always_applies() -> None:
    assert Bandwidth.parse("Mon=1M").rate_at(datetime(2026, 12, 1, 12, 0)) is None  # a Tuesday
    assert Bandwidth.parse("8M").rate_at(MON_10) == 8 * MiB and not Bandwidth.parse("8M").scheduled
    assert Bandwidth.parse(SCHEDULE).scheduled and Bandwidth.parse(None).rate_at(MON_10) is None


def test_day_lists_and_wrapping_day_ranges() -> None:
    bw = Bandwidth.parse("Sat-Mon=1M, Wed+Fri 12:00-13:00=2M")
    week = [MON_10 + timedelta(days=d, hours=2, minutes=30) for d in range(7)]
    assert [bw.rate_at(day) for day in week] == [
        MiB, None, 2 * MiB, None, 2 * MiB, MiB, MiB]


@pytest.mark.parametrize("text,words", [
    ("Mon-Fry=1M", "'mon-fry' is not a day"), ("Mon 25:00-26:00=1M", "25:00 is not a time of day"),
    ("Mon 08:00-08:00=1M", "empty"), ("=1M", "no days or times"), ("Mon=fast", "'fast'"),
])
def test_a_bad_schedule_names_the_rule(text: str, words: str) -> None:
    with pytest.raises(UsageError) as e:
        Bandwidth.parse(text)
    assert words in str(e.value)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def saturate(pacer: Pacer, clock: Clock, seconds: float, piece: int = MiB) -> list[tuple[float, int]]:
    """A sender that always has a piece ready: when each went on the link."""
    sent = []
    end = clock.t + seconds
    while clock.t < end:
        d = pacer.delay()
        if d > 0:
            clock.t += d
            continue
        pacer.charge(piece)
        sent.append((clock.t, piece))
    return sent


@pytest.mark.parametrize("rate", [512 << 10, 2 * MiB, 12.5e6])
def test_any_30_s_window_carries_the_rate_within_5_percent(rate: float) -> None:
    clock = Clock()
    pacer = Pacer(rate, clock)
    sent = saturate(pacer, clock, 120)
    start = sent[0][0]
    for offset in range(0, 90, 5):
        lo = start + offset
        moved = sum(n for t, n in sent if lo <= t < lo + 30)
        assert abs(moved / 30 - rate) <= 0.05 * rate, (offset, moved / 30, rate)


def test_a_new_rate_applies_at_once_and_unlimited_stops_waiting() -> None:
    clock = Clock()
    pacer = Pacer(MiB, clock)
    pacer.charge(4 * MiB)
    assert pacer.delay() == Pacer.STEP, "owing: wait in steps, to see a change of rate soon"
    pacer.set_rate(None)
    assert pacer.delay() == 0.0
    pacer.set_rate(MiB)
    sent = saturate(pacer, clock, 10)
    pacer.set_rate(4 * MiB)
    faster = saturate(pacer, clock, 10)
    assert sum(n for _, n in faster) > 3 * sum(n for _, n in sent)


def test_parallel_moves_take_turns_instead_of_bursting() -> None:
    async def go() -> list[float]:
        pacer = Pacer(8 * MiB)
        times: list[float] = []
        loop = asyncio.get_running_loop()

        async def move() -> None:
            for _ in range(4):
                await pacer.take(MiB)
                times.append(loop.time())

        await asyncio.gather(*(move() for _ in range(4)))
        return times

    times = asyncio.run(go())
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(times) == 16 and min(gaps[1:]) > 0.08, gaps  # 1 MiB at 8 MiB/s: 0.125 s apart


def test_a_running_session_follows_the_schedule_and_what_the_user_asks() -> None:
    """LinkControl, the engine's view, with the clock injected: a boundary crossed, then zchunk limit and
    pause (read again only when the control file's stamp changes)."""
    clock = [datetime(2026, 11, 30, 17, 59)]  # Monday, in working hours
    asked: dict[str, object] = {"limit": None, "paused": False, "stamp": 0.0, "reads": 0}

    def read() -> tuple[str | None, bool]:
        asked["reads"] = int(asked["reads"]) + 1  # type: ignore[call-overload]
        return asked["limit"], bool(asked["paused"])  # type: ignore[return-value]

    ctl = LinkControl(Bandwidth.parse(SCHEDULE), None, read, lambda: float(asked["stamp"]),  # type: ignore[arg-type]
                      now=lambda tz: clock[0])
    assert ctl.state() == LinkState(2 * MiB, SCHEDULE, False)
    clock[0] = datetime(2026, 11, 30, 18, 0)
    assert ctl.state().rate == 20 * MiB, "the clock crossed 18:00"
    asked.update(limit="unlimited", stamp=1.0)
    assert ctl.state() == LinkState(None, "unlimited", False)
    asked.update(paused=True, stamp=2.0)
    assert ctl.state().paused
    reads = asked["reads"]
    ctl.state()
    assert asked["reads"] == reads, "unchanged stamp: not read again"
    asked.update(limit=None, paused=False, stamp=3.0)
    assert ctl.state() == LinkState(20 * MiB, SCHEDULE, False), "the session's own --bwlimit again"


def test_the_link_rate_leaves_out_outages_and_pauses() -> None:
    meter = LinkRate()
    for t in range(0, 20):  # 1 MiB/s for 20 s
        meter.sample(float(t), t * MiB, moving=True)
    assert meter.rate == pytest.approx(MiB)
    assert meter.sample(20.0, 19 * MiB, moving=False) == pytest.approx(MiB), "down: the last rate stands"
    meter.sample(60.0, 19 * MiB, moving=True)  # 40 s later, back: nothing moved meanwhile
    meter.sample(61.0, 21 * MiB, moving=True)
    assert meter.rate == pytest.approx(MiB), "a window of 1 s is too short to say"
    meter.sample(62.0, 23 * MiB, moving=True)
    assert meter.rate == pytest.approx(2 * MiB), "the outage is not in the window"


def test_the_link_rate_forgets_a_slow_start_sooner_than_a_steady_past() -> None:
    """A slow first few seconds (TCP finding the link, the chunks' ramp) leave the rate once the window,
    half the time moved so far, has passed them; later the window is the full 10 s."""
    meter = LinkRate()
    moved = 0.0
    for tenth in range(0, 81):  # 0..8 s: 0.5 MiB/s for 3 s, then 2 MiB/s
        t = tenth / 10
        moved += (0.5 if t <= 3 else 2.0) * MiB / 10 if tenth else 0
        meter.sample(t, int(moved), moving=True)
    assert meter.window(8.0) == pytest.approx(4.0)
    assert meter.rate == pytest.approx(2 * MiB, rel=0.02), "at 8 s the window (4 s) holds only the fast part"
    assert moved / 8 < 1.7 * MiB, "what a fixed 10 s window said (everything since 0) was far below"
    for tenth in range(81, 301):  # 30 s: the window is 10 s, a dip of 1 s moves the rate by a tenth at most
        t = tenth / 10
        moved += (0.0 if 25 <= t < 26 else 2.0) * MiB / 10
        meter.sample(t, int(moved), moving=True)
    assert meter.window(30.0) == pytest.approx(10.0)
    assert meter.rate == pytest.approx(1.8 * MiB, rel=0.02)
