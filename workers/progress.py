"""A job's progress as one figure: its stages, how far it is, and when it will finish.

A job is a plan of phases, each counted in its own unit: an evaluation's items, a training's
optimizer steps. :class:`Tracker` measures how many seconds one unit of each kind takes in
this attempt (the seconds between two reports go to the unit of the phase reported; a report
with ``measured=False``, as at a stage's start, restarts the clock, so loading a model or
preparing data is not counted as work per unit), and from those rates reads

- ``percent``: the share of the whole job's estimated time done, across every phase (never
  going back when a new measurement re-weighs the phases);
- ``eta_seconds``: the time the remaining work takes at the measured rates; ``None`` until
  each unit still ahead has been measured (a unit not yet measured counts as one of a measured
  kind for ``percent``, so the figure never waits for a measurement).

``done``/``total``/``stage`` stay the current phase's own count and name, as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Phase:
    name: str
    unit: str  # "items", "steps"
    total: int
    done: int = 0


@dataclass
class _Rate:
    seconds: float = 0.0
    units: int = 0

    @property
    def per_unit(self) -> float | None:
        return self.seconds / self.units if self.units else None


@dataclass
class Tracker:
    """The phases of one job in order; :meth:`at` moves one of them and says where the job is."""

    phases: list[Phase]
    clock: Callable[[], float] = time.monotonic
    _rates: dict[str, _Rate] = field(default_factory=dict)
    _last: float | None = None
    _current: str | None = None
    _shown: float = 0.0

    def phase(self, name: str) -> Phase | None:
        return next((p for p in self.phases if p.name == name), None)

    def _joined(self, name: str, unit: str) -> Phase:
        """Phase ``name``; one not in the plan joins it after the current one (a job learns
        of some work as it goes: a domain evaluation, an interpolation's evaluations)."""
        phase = self.phase(name)
        if phase is None:
            phase = Phase(name, unit, 0)
            names = [p.name for p in self.phases]
            at = names.index(self._current) + 1 if self._current in names else 0
            self.phases.insert(at, phase)
        return phase

    def resize(
        self, name: str, total: int, *, done: int | None = None, unit: str = "items"
    ) -> None:
        """Phase ``name`` turns out to have ``total`` units (``done`` of them done already);
        nothing is reported and no time measured."""
        phase = self._joined(name, unit)
        phase.total = total
        if done is not None:
            phase.done = done

    def at(
        self,
        name: str,
        *,
        done: int | None = None,
        add: int = 0,
        total: int | None = None,
        unit: str = "items",
        stage: str | None = None,
        measured: bool = True,
    ) -> dict[str, Any]:
        """Phase ``name`` (joining the plan if new) has ``done`` (or ``add`` more) of
        ``total`` units; the job's progress as stored.

        ``measured=False``: these units were done without work here (resumed, answered from
        a cache), so they count as done but say nothing about the rate.
        """
        phase = self._joined(name, unit)
        self._current = name
        if add:
            done = phase.done + add
        if total is not None:
            phase.total = total
        now = self.clock()
        if self._last is not None and measured:
            rate = self._rates.setdefault(phase.unit, _Rate())
            rate.seconds += now - self._last
            rate.units += max(0, (done if done is not None else phase.done) - phase.done)
        self._last = now
        if done is not None:
            phase.done = done
            phase.total = max(phase.total, done)
        return {
            "done": phase.done,
            "total": phase.total,
            "stage": stage or name,
            **self.estimate(),
        }

    def skip(self, *names: str) -> None:
        """These phases need no work (done in an earlier attempt, answered from a cache)."""
        for phase in self.phases:
            if phase.name in names:
                phase.done = phase.total

    def estimate(self) -> dict[str, float | None]:
        """``percent`` of the job's estimated time done and ``eta_seconds`` for the rest."""
        measured = {u: r.per_unit for u, r in self._rates.items() if r.per_unit is not None}
        fallback = sum(measured.values()) / len(measured) if measured else 1.0
        done = left = 0.0
        known = True
        for p in self.phases:
            cost = measured.get(p.unit)
            remaining = max(0, p.total - p.done)
            if cost is None and remaining:
                known = False
            done += p.done * (cost if cost is not None else fallback)
            left += remaining * (cost if cost is not None else fallback)
        percent = 100.0 * done / (done + left) if done + left > 0 else 0.0
        # A newly measured rate re-weighs the phases: the figure waits rather than go back.
        self._shown = max(self._shown, round(percent, 1))
        eta = 0.0 if left == 0 else round(left, 1) if known and measured else None
        return {"percent": self._shown, "eta_seconds": eta}


def finished(total: int) -> dict[str, Any]:
    """The progress of a job that is done: ``total`` of ``total``, 100 %, nothing left."""
    return {"done": total, "total": total, "stage": "done", "percent": 100.0, "eta_seconds": 0.0}
