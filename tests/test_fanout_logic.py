"""The fan-out's meeting point (zchunk/fanout.py) as pure asyncio: which targets' streams become one group,
who waits for whom, and who installs the group's daemon. The real thing is tests/test_fanout.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from zchunk import errors as E
from zchunk.fanout import Fanout, Member


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_the_same_stream_is_one_group_and_another_runs_alone() -> None:
    async def go() -> list[Member | None]:
        fan = Fanout()
        a, b, c = fan.slot(), fan.slot(), fan.slot()
        return list(await asyncio.gather(a.join(("x",)), b.join(("x",)), c.join(("y",))))

    ma, mb, mc = run(go())
    assert ma is not None and mb is not None and ma.group_dir == mb.group_dir
    assert mc is None, "a stream no other target needs runs alone"


def test_a_target_that_leaves_is_not_waited_for_and_rounds_follow_each_targets_streams() -> None:
    async def go() -> tuple[Any, ...]:
        fan = Fanout()
        a, b = fan.slot(), fan.slot()

        async def b_flow() -> Member | None:
            first = await b.join(("full",))
            b.leave()  # done after one stream
            return first

        first_a, first_b = await asyncio.gather(a.join(("full",)), b_flow())
        second_a = await asyncio.wait_for(a.join(("incremental",)), 1.0)  # b is not waited for
        return first_a, first_b, second_a

    first_a, first_b, second_a = run(go())
    assert first_a is not None and first_b is not None and first_a.group_dir == first_b.group_dir
    assert second_a is None


def test_a_target_that_never_says_is_waited_for_join_wait_then_runs_alone_later() -> None:
    async def go() -> tuple[Any, ...]:
        fan = Fanout(join_wait=0.2)
        a, b = fan.slot(), fan.slot()
        loop = asyncio.get_running_loop()
        started = loop.time()
        alone = await a.join(("x",))
        waited = loop.time() - started
        late = await asyncio.wait_for(b.join(("x",)), 1.0)  # the round went on without it
        return alone, waited, late

    alone, waited, late = run(go())
    assert alone is None and 0.15 <= waited < 1.0 and late is None


def test_the_last_member_installs_the_group_once_and_a_failed_one_is_left_out() -> None:
    installs: list[tuple[str, dict[str, Any]]] = []

    async def install(name: str, cfg: dict[str, Any]) -> str:
        installs.append((name, cfg))
        return "/spool/" + name

    async def go() -> None:
        fan = Fanout(detach_after=7.0)
        slots = [fan.slot() for _ in range(3)]
        members = await asyncio.gather(*(s.join(("x",)) for s in slots))
        assert all(m is not None for m in members)
        m0, m1, m2 = members
        assert m0 is not None and m1 is not None and m2 is not None
        cfg = {"role": "send", "member_of": m0.group_dir, "id": "s0"}
        await asyncio.gather(m0.installed("/spool/s0-send", cfg, install), m1.give_up(),
                             m2.installed("/spool/s2-send", dict(cfg, id="s2"), install))

    run(go())
    assert len(installs) == 1
    name, cfg = installs[0]
    assert cfg["fanout"] == ["s0-send", "s2-send"] and cfg["id"] == name and cfg["detach_after"] == 7.0
    assert "member_of" not in cfg


def test_a_failed_group_install_fails_every_member_that_waited_for_it() -> None:
    async def install(name: str, cfg: dict[str, Any]) -> str:
        raise E.UsageError(reason="no room")

    async def go() -> list[Any]:
        fan = Fanout()
        a, b = fan.slot(), fan.slot()
        ma, mb = await asyncio.gather(a.join(("x",)), b.join(("x",)))
        assert ma is not None and mb is not None
        return list(await asyncio.gather(ma.installed("/s/a-send", {}, install), mb.installed("/s/b-send", {}, install),
                                         return_exceptions=True))

    results = run(go())
    assert all(isinstance(r, E.UsageError) for r in results), results


@pytest.mark.parametrize("reported", [0, 1])
def test_no_member_waits_forever_when_the_others_give_up(reported: int) -> None:
    async def install(name: str, cfg: dict[str, Any]) -> str:
        return name

    async def go() -> Any:
        fan = Fanout()
        a, b = fan.slot(), fan.slot()
        ma, mb = await asyncio.gather(a.join(("x",)), b.join(("x",)))
        assert ma is not None and mb is not None
        await mb.give_up()
        if reported:
            return await asyncio.wait_for(ma.installed("/s/a-send", {}, install), 1.0)
        await ma.give_up()
        return None

    assert run(go()) is None
