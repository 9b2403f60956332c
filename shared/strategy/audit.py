"""The look-ahead audit's logic: which prefixes to cut, and which bars' signals changed.

A strategy looks ahead when its signal at bar ``t`` depends on a bar after ``t``. Then
removing the later bars changes it: run ``signals(df)`` on the whole history and on a prefix
ending at bar ``c``, and every bar ``<= c`` whose signal differs is a leak. Pure: signal
records in, findings out; running the strategy is the caller's (in the sandbox).

Which prefixes: every prefix costs a run of the strategy on its bars, so they are sampled.
A leak shows where the prefix ends (``shift(-1)`` changes bar ``c`` only, a centred window
its last few bars) or everywhere (a statistic of the whole column), so each prefix is
checked on all its bars and the cuts are placed where leaks matter most: at the bars where
the full history gives a signal (would this trade exist without the future?), plus cuts
spread evenly over the series (signals that only appear without the future).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Change", "SymbolAudit", "changed_bars", "cut_points", "describe_signal"]

#: Relative tolerance for prices and confidence: a clean strategy gives the same numbers on a
#: prefix, but a reduction may round differently in its last bit.
_REL_TOL = 1e-9
_NUMBERS = ("entry_price", "tp_price", "sl_price", "confidence")


@dataclass(frozen=True)
class Change:
    """One bar whose signal differs between the whole history and a prefix."""

    #: The bar's open time, ms since the epoch (UTC).
    t: int
    #: Its signal on the whole history, e.g. ``"BUY tp=101.5"``, or ``"hold"``.
    full: str
    #: Its signal on the prefix.
    truncated: str
    #: Open time of the prefix's last bar.
    cut: int


@dataclass
class SymbolAudit:
    """One symbol's findings; clean when ``changes`` is empty."""

    symbol: str
    #: Bars the strategy saw (warm-up included) and the first simulated one's position.
    bars: int
    first: int
    #: Open times of the sampled prefixes' last bars, ascending.
    cuts: list[int] = field(default_factory=list)
    #: One entry per changed bar (found at the shortest prefix that contains it), by time.
    changes: list[Change] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.changes


def cut_points(
    bars: int, first: int, signal_bars: Sequence[int], *, spread: int = 12, at_signals: int = 12
) -> list[int]:
    """Positions of the prefixes' last bars: ``spread`` evenly over the simulated bars and up
    to ``at_signals`` of ``signal_bars`` (the full history's signals, evenly picked).

    Never the last bar (that prefix is the whole history); ascending, without duplicates.
    """
    last = bars - 2
    if last < first:
        return []
    cuts = {round(x) for x in _linspace(first, last, spread)}
    inside = sorted(b for b in set(signal_bars) if first <= b <= last)
    if len(inside) > at_signals:
        inside = [inside[round(x)] for x in _linspace(0, len(inside) - 1, at_signals)]
    return sorted(cuts.union(inside))


def _linspace(low: float, high: float, n: int) -> list[float]:
    if n <= 0:
        return []
    if n == 1:
        return [high]
    return [low + (high - low) * i / (n - 1) for i in range(n)]


def changed_bars(
    full: Sequence[Mapping[str, Any]], truncated: Sequence[Mapping[str, Any]], cut: int
) -> list[Change]:
    """The bars up to ``cut`` (an open time) whose record differs between the two runs.

    Records are the sandbox's signal records (``{"t", "signal", "entry_price", ...}``, one
    per BUY/SELL bar; a bar without one holds).
    """
    before = {int(r["t"]): r for r in full if int(r["t"]) <= cut}
    after = {int(r["t"]): r for r in truncated if int(r["t"]) <= cut}
    return [
        Change(t, describe_signal(before.get(t)), describe_signal(after.get(t)), cut)
        for t in sorted(before.keys() | after.keys())
        if not _same(before.get(t), after.get(t))
    ]


def _same(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    if a is None or b is None:
        return a is b
    if a.get("signal") != b.get("signal") or a.get("meta") != b.get("meta"):
        return False
    for key in _NUMBERS:
        x, y = a.get(key), b.get(key)
        if (x is None) != (y is None):
            return False
        if x is not None and y is not None and not math.isclose(x, y, rel_tol=_REL_TOL):
            return False
    return True


def describe_signal(record: Mapping[str, Any] | None) -> str:
    """``"hold"``, or the signal with its levels: ``"BUY entry=99.5 tp=101 sl=98"``."""
    if record is None:
        return "hold"
    parts = [str(record.get("signal"))]
    for key, name in (("entry_price", "entry"), ("tp_price", "tp"), ("sl_price", "sl")):
        if record.get(key) is not None:
            parts.append(f"{name}={record[key]:.6g}")
    if record.get("confidence", 1.0) != 1.0:
        parts.append(f"confidence={record['confidence']:.6g}")
    return " ".join(parts)
