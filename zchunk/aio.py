"""Small asyncio shapes used everywhere: steps at once that all finish before a failure, a bounded quiet close."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
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
