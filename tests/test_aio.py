"""The small asyncio shapes of ``zchunk.aio`` (pure logic)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest

from zchunk.aio import backoff


def test_backoff_doubles_from_its_first_wait_with_jitter_and_stops_at_its_most() -> None:
    wait = backoff(0.25, 5)
    for n, base in ((1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (5, 4.0)):
        waits = [wait(SimpleNamespace(attempt_number=n)) for _ in range(200)]
        assert all(base <= w <= min(base + 1, 5) for w in waits), (n, min(waits), max(waits))
        assert max(waits) - min(waits) > 0.5, "no jitter"
    assert {wait(SimpleNamespace(attempt_number=n)) for n in (6, 60, 6000)} == {5}


def test_backoff_is_built_without_tenacitys_deprecated_initial() -> None:
    """tenacity 9 deprecates ``wait_exponential_jitter(initial=...)``; 8.2, the floor, has no ``multiplier``."""
    import zchunk.engine
    import zchunk.transport

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for module in (zchunk.engine, zchunk.transport):
            assert "wait_exponential_jitter" not in vars(module)
        backoff(0.25, 5)(SimpleNamespace(attempt_number=1))


@pytest.mark.parametrize("most", [0.1, 1.0])
def test_backoff_never_waits_past_its_most_even_with_jitter(most: float) -> None:
    assert all(backoff(0.25, most)(SimpleNamespace(attempt_number=1)) <= most for _ in range(200))
