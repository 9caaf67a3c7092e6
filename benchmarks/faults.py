"""The benchmark scenarios: a link shape set for the whole scenario, plus an
optional fault thread that runs beside each tool run."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from zchunk import lab

FLAP_FIRST_S = 3.0  # the first outage, once every tool is connected and sending
FLAP_UP_S, FLAP_DOWN_S = 10.0, 5.0  # then a 5 s outage every 15 s
UNPLUG_AFTER_S, UNPLUG_S = 5.0, 60.0


@dataclass(frozen=True)
class Scenario:
    name: str
    rate_mbit: float | None
    loss_percent: float | None = None
    fault: str | None = None  # "flap", "unplug" or None
    incremental: bool = False
    about: str = ""

    def outage_allowance(self, baseline: float) -> float:
        """Extra seconds the timeout grants for the outages of this scenario."""
        if self.fault == "flap":
            return 1.5 * baseline * FLAP_DOWN_S / FLAP_UP_S + 2 * FLAP_DOWN_S
        if self.fault == "unplug":
            return UNPLUG_S
        return 0.0


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("nolimit", None, about="the veth at full speed, no faults"),
    Scenario("100mbit", 100, about="tbf at 100 Mbit/s both ways"),
    Scenario("loss1", 100, loss_percent=1,
             about="100 Mbit/s and 1 % of packets dropped each way at random (iptables statistic)"),
    Scenario("flap", 100, fault="flap",
             about=f"100 Mbit/s; every {FLAP_UP_S + FLAP_DOWN_S:.0f} s the ssh port resets every "
                   f"packet for {FLAP_DOWN_S:.0f} s (live connections die: ss -K + REJECT tcp-reset), "
                   f"the first outage {FLAP_FIRST_S:.0f} s after the start"),
    Scenario("unplug", 100, fault="unplug",
             about=f"100 Mbit/s; {UNPLUG_AFTER_S:.0f} s after the start the target's NIC goes down "
                   f"for {UNPLUG_S:.0f} s (packets vanish, nobody gets a reset)"),
    Scenario("incremental", 100, incremental=True,
             about="100 Mbit/s; an incremental @s1 -> @s2 after a small change (the full @s1 is "
                   "replicated first, untimed, without rate limit)"),
)}


def shape_link(wan: lab.Wan, scenario: Scenario) -> None:
    wan.rate("dst", scenario.rate_mbit)
    wan.loss("dst", scenario.loss_percent)


class FaultThread:
    """Makes the scenario's fault while a tool runs; ``stop()`` waits for the
    link to be whole again and returns the outages as (start, end) monotonic times."""

    def __init__(self, wan: lab.Wan, scenario: Scenario) -> None:
        self.wan = wan
        self.scenario = scenario
        self.outages: list[tuple[float, float]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fault")

    def start(self) -> None:
        if self.scenario.fault:
            self._thread.start()

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.error is not None:
            raise self.error
        return self.outages

    def _run(self) -> None:
        try:
            if self.scenario.fault == "flap":
                pause = FLAP_FIRST_S
                while not self._stop.wait(pause):
                    self._timed(self.wan.outage, "dst", 22, FLAP_DOWN_S)
                    pause = FLAP_UP_S
            elif self.scenario.fault == "unplug":
                if not self._stop.wait(UNPLUG_AFTER_S):
                    self._timed(self.wan.unplug, "dst", UNPLUG_S)
        except BaseException as exc:  # surfaced by stop(): a broken lab is not a tool result
            self.error = exc

    def _timed(self, fn: object, *args: object) -> None:
        start = time.monotonic()
        try:
            fn(*args)  # type: ignore[operator]
        finally:
            self.outages.append((start, time.monotonic()))


def overlap(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of ``intervals`` inside [start, end]."""
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals)
