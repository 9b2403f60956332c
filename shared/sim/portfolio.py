"""Portfolio managers: decide whether an entry is taken, and with how much cash.

A manager is any object with :meth:`PortfolioManager.budget`; the replay enforces the rules
every portfolio shares (one open position per symbol, ``min_notional``, never spending more
cash than there is). Builtins are resolved by name through the same component loader as
strategies, so users can plug in ``{"module": "pkg.mod", "class": "Name"}`` too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

from shared.messages import ComponentSpec
from shared.strategy import load_component


@dataclass(frozen=True)
class OpenPosition:
    proposal_id: str
    quantity: float
    entry_price: float
    cost: float  # cash spent, fee included
    entry_fee: float


@dataclass(frozen=True)
class Rejection:
    """Why an entry was not taken; ``reason`` is a short snake_case word, counted in the WAL."""

    reason: str


class PortfolioManager(Protocol):
    def budget(
        self, symbol: str, price: float, cash: float, positions: Mapping[str, OpenPosition]
    ) -> float | Rejection:
        """Cash to spend on this entry (fee included), or why not."""


class FixedFraction:
    """Spend ``fraction`` of the cash available at entry; hold at most ``max_positions``.

    ``fraction`` 1.0 with ``max_positions`` 1 (the defaults) is "all in, one at a time".
    With several symbols, e.g. ``fraction`` 0.25 and ``max_positions`` 4 splits the cash
    roughly evenly (each entry takes a quarter of what is left).
    """

    def __init__(self, fraction: float = 1.0, max_positions: int = 1) -> None:
        number = isinstance(fraction, int | float) and not isinstance(fraction, bool)
        if not number or not 0 < fraction <= 1:
            raise ValueError(
                f"fixed_fraction: 'fraction' must be a number in (0, 1], got {fraction!r}"
            )
        if type(max_positions) is not int or max_positions < 1:
            raise ValueError(
                f"fixed_fraction: 'max_positions' must be a positive integer, got {max_positions!r}"
            )
        self.fraction = float(fraction)
        self.max_positions = max_positions

    def budget(
        self, symbol: str, price: float, cash: float, positions: Mapping[str, OpenPosition]
    ) -> float | Rejection:
        if len(positions) >= self.max_positions:
            return Rejection("max_positions")
        return self.fraction * cash


BUILTIN_PORTFOLIOS: dict[str, Any] = {"fixed_fraction": FixedFraction}


def load_portfolio(spec: ComponentSpec) -> PortfolioManager:
    """The portfolio manager ``spec`` names, with its params.

    :raises shared.strategy.ComponentError: unknown name, failed import, rejected params.
    """
    manager = load_component(spec.ref(), registry=BUILTIN_PORTFOLIOS, kind="portfolio")
    return cast(PortfolioManager, manager)
