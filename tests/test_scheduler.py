"""The chunk scheduler's decisions (zchunk/scheduler.py), from hand-made agent reports: no I/O, no asyncio."""

from __future__ import annotations

from typing import Any

from zchunk.client import AgentStatus
from zchunk.scheduler import (
    RAMP_CHUNKS,
    RAMP_SECONDS,
    Reports,
    already_there,
    may_overtake,
    next_chunk,
    poll_delay,
    turn_wait,
)


def sender(spooled: set[int], **daemon: Any) -> AgentStatus:
    return AgentStatus("send", dict(daemon), frozenset(spooled), {}, 0, 0)


def receiver(chunks: set[int] = frozenset(), next_seq: int = 0, parts: dict[int, int] | None = None) -> AgentStatus:
    return AgentStatus("receive", {"next_seq": next_seq}, frozenset(chunks), parts or {}, 0, 0)


def test_the_lowest_spooled_chunk_the_target_lacks_moves_first() -> None:
    r = Reports(sender({3, 4, 5, 6}), receiver({4}, next_seq=3))
    assert next_chunk(r, in_flight=(), window=8) == 3


def test_chunks_held_consumed_or_in_flight_are_not_moved_again() -> None:
    r = Reports(sender({0, 1, 2, 3}), receiver({2}, next_seq=1))
    assert next_chunk(r, in_flight={1}, window=8) == 3
    assert next_chunk(r, in_flight={1, 3}, window=8) is None


def test_a_chunk_stored_since_the_last_report_is_not_moved_again() -> None:
    r = Reports(sender({0, 1}), receiver()).with_stored(0)
    assert next_chunk(r, in_flight=(), window=8) == 1
    assert r.stored == {0}


def test_nothing_beyond_the_target_spools_window_moves() -> None:
    r = Reports(sender({10, 11, 12}), receiver(next_seq=10))
    assert next_chunk(r, in_flight={10, 11}, window=2) is None
    assert next_chunk(r, in_flight={10}, window=2) == 11


def test_an_empty_source_spool_gives_nothing_to_move() -> None:
    assert next_chunk(Reports(), in_flight=(), window=4) is None


def test_already_there_means_held_or_consumed() -> None:
    t = receiver({7}, next_seq=5)
    assert already_there(7, t) and already_there(4, t)
    assert not already_there(5, t) and not already_there(8, t)


def test_releasable_once_the_source_holds_consumed_chunks() -> None:
    assert Reports(sender({0, 1, 2}), receiver(next_seq=2)).releasable()
    assert not Reports(sender({2, 3}), receiver(next_seq=2)).releasable()
    assert not Reports(sender({0}), receiver(next_seq=0)).releasable()


def test_progress_mark_changes_when_the_stream_moves() -> None:
    a = Reports(sender({0, 1}, chunks=2), receiver(next_seq=0))
    assert a.progress_mark() == Reports(sender({0, 1}, chunks=2), receiver(next_seq=0)).progress_mark()
    assert a.progress_mark() != Reports(sender({0, 1}, chunks=2), receiver(next_seq=1)).progress_mark()
    assert a.progress_mark() != Reports(sender({0, 1, 2}, chunks=3), receiver(next_seq=0)).progress_mark()


def test_a_second_move_overtakes_only_while_the_lowest_is_idle() -> None:
    assert not may_overtake({}, now=10.0, overtake_idle=0.02)
    assert not may_overtake({3: 9.99, 4: 9.0}, now=10.0, overtake_idle=0.02), "chunk 3 forwarded 10 ms ago"
    assert may_overtake({3: 9.9, 4: 10.0}, now=10.0, overtake_idle=0.02), "chunk 3 idle for 100 ms"


def test_the_lowest_chunk_in_flight_always_has_its_turn() -> None:
    moving = {3: 10.0, 4: 10.0}
    assert turn_wait(3, moving, now=10.0, overtake_idle=0.02) == 0.0
    wait = turn_wait(4, moving, now=10.005, overtake_idle=0.02)
    assert abs(wait - 0.015) < 1e-9, "a later chunk waits until the lowest has been idle long enough"
    assert turn_wait(4, moving, now=10.03, overtake_idle=0.02) == 0.0


def test_polls_are_quick_during_the_ramp_and_the_tail_only() -> None:
    normal, quick = 0.1, 0.1 / 5

    def delay(src: AgentStatus, *, in_flight: bool = False, finish_sent: bool = False,
              running_for: float = 1.0, fresh: bool = False) -> float:
        return poll_delay(Reports(src, receiver()), normal, in_flight=in_flight, finish_sent=finish_sent,
                          running_for=running_for, fresh=fresh)

    assert delay(sender(set())) == quick, "the first chunks: zfs receive waits for each"
    assert delay(sender(set(), chunks=RAMP_CHUNKS)) == normal, "past the ramp an idle link waits for the source"
    assert delay(sender(set(), chunks=1, paused="no-space")) == normal, "a paused source is not polled quickly"
    assert delay(sender(set(), chunks=1), running_for=RAMP_SECONDS + 30) == normal, \
        "a source slow to make its first chunks is not polled quickly for long"
    assert delay(sender(set(), chunks=1, eof=True)) == normal, "a stream that has ended has no ramp"
    late = sender(set(), chunks=RAMP_CHUNKS, eof=True)
    assert delay(late, in_flight=True, finish_sent=True) == normal, \
        "a chunk in flight: its move wakes the workers, not the poll"
    assert delay(late, finish_sent=True) == quick, "the tail: everything moved, the receiver finishing"
    busy = sender(set(), chunks=RAMP_CHUNKS + 3)
    assert delay(busy, in_flight=True, fresh=True) == quick, \
        "a source that made a chunk since the poll before: the next one is seen soon, moves in flight or not"
    assert delay(busy, in_flight=True) == normal and delay(busy) == normal, "a source that made none: normal"
    assert delay(sender(set(), chunks=RAMP_CHUNKS + 3, eof=True), in_flight=True, fresh=True) == normal, \
        "zfs send has ended: no chunk comes after its last"


def test_what_is_on_the_target_counts_half_moved_chunks() -> None:
    dst = AgentStatus("receive", {"next_seq": 3, "stored_fed": 3000}, frozenset({4}), {5: 200}, 1200, 0)
    assert Reports(sender(set()), dst).on_target() == 4200


def test_the_expected_total_is_the_estimate_at_the_ratio_seen_so_far_then_exact() -> None:
    src = sender(set(), raw_bytes=1000, stored_bytes=400)
    assert Reports(src, receiver()).expected_on_target(10_000) == 4000
    assert Reports(sender(set()), receiver()).expected_on_target(10_000) == 10_000, "no ratio yet: the estimate"
    big = sender(set(), raw_bytes=20_000, stored_bytes=8000)
    assert Reports(big, receiver()).expected_on_target(10_000) == 8000, "a stream beyond its estimate"
    done = sender(set(), raw_bytes=20_000, stored_bytes=9000, eof=True)
    assert Reports(done, receiver()).expected_on_target(10_000) == 9000, "exact once zfs send ended"
