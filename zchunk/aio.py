"""Small asyncio shapes used everywhere: steps at once that all finish before a failure, a bounded quiet close."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


def raise_first(results: Sequence[Any]) -> None:
    """The first exception among ``asyncio.gather(..., return_exceptions=True)``'s results, raised."""
    for r in results:
        if isinstance(r, BaseException):
            raise r


async def all_of(*steps: Awaitable[Any]) -> list[Any]:
    """The steps at once (each is a round trip); all finish before a failure (the first in this order) is
    raised, so none is left running. Their results."""
    results = list(await asyncio.gather(*steps, return_exceptions=True))
    raise_first(results)
    return results


async def quietly(step: Awaitable[Any], timeout: float = 5.0) -> None:
    """A clean-up step (a channel's close) that must neither fail nor hang the caller's own clean-up."""
    try:
        await asyncio.wait_for(step, timeout)
    except (Exception, asyncio.TimeoutError):
        pass


def backoff(first: float, most: float, jitter: float = 1.0) -> Callable[[Any], float]:
    """A tenacity ``wait``: ``first`` x 2^(n-1) seconds before the n-th retry plus up to ``jitter`` at random,
    at most ``most``. What ``wait_exponential_jitter(initial=first, ...)`` does, whose first argument is
    ``initial`` in tenacity 8.2 (no ``multiplier``) and deprecated for ``multiplier`` in 9."""
    def wait(retry_state: Any) -> float:
        try:
            exp = first * 2 ** (retry_state.attempt_number - 1)
        except OverflowError:
            exp = most
        return max(0.0, min(exp + random.uniform(0, jitter), most))
    return wait
