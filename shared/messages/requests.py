"""``BacktestRequest``: what a user submits (HTTP, the broker, or ``stratorch run``)."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import Field, JsonValue, field_validator, model_validator

from shared.intervals import Interval
from shared.messages.common import SCHEMA_VERSION, ComponentSpec, Message, Symbol

TieBreak = Literal["stop_loss_first", "take_profit_first"]

#: What a backtest id may be: it becomes a routing key, a Mongo ``_id`` and, in ``stratorch
#: run``'s state directory, a directory name, so no ``/``, no empty string, nothing long.
_ID_TEXT = r"[A-Za-z0-9_.:-]{1,64}"
BACKTEST_ID = re.compile(f"^{_ID_TEXT}$")

BacktestId = Annotated[str, Field(pattern=BACKTEST_ID.pattern)]


def is_backtest_id(value: object) -> bool:
    """Whether ``value`` is a string a backtest id may be (:data:`BACKTEST_ID`)."""
    return isinstance(value, str) and BACKTEST_ID.match(value) is not None


def peek_id(body: bytes, field: str = "id") -> str | None:
    """The id under ``field`` of a body that may be no valid message (a malformed request, a
    dead letter), if it can be read and is a valid id (:data:`BACKTEST_ID`): so whoever sent
    it can still be answered under it.

    A JSON object's own ``field``; in a body that is not JSON at all (cut off, say), the first
    ``"<field>": "<id>"`` of its first 4 KiB.
    """
    try:
        value = json.loads(body)
    except ValueError:
        found = re.search(rf'"{re.escape(field)}"\s*:\s*"({_ID_TEXT})"'.encode(), body[:4096])
        return found.group(1).decode() if found else None
    value = value.get(field) if isinstance(value, dict) else None
    return value if is_backtest_id(value) else None


#: The longest ``deadline_s`` a request may ask for: a week.
MAX_DEADLINE_S = 7 * 86_400


def new_backtest_id() -> str:
    return uuid.uuid4().hex


#: A span of time for walk-forward windows: a count and a unit (minutes, hours, days, weeks).
DURATION = re.compile(r"^([1-9][0-9]*)([mhdw])$")
_UNIT_MS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}
Duration = Annotated[str, Field(pattern=DURATION.pattern)]

#: What a sweep may rank by: a field of ``Metrics``. Each ranks highest first except those
#: in :data:`LOWER_IS_BETTER`.
Metric = Literal[
    "initial_cash",
    "final_equity",
    "total_return",
    "cagr",
    "sharpe",
    "sortino",
    "max_drawdown",
    "calmar",
    "win_rate",
    "profit_factor",
    "expectancy",
    "exposure",
    "trade_count",
    "fees_paid",
    "rejected_entries",
]
LOWER_IS_BETTER = frozenset({"max_drawdown", "fees_paid", "rejected_entries"})


def duration_ms(text: str) -> int:
    """Milliseconds of a :data:`DURATION` such as ``"90d"``."""
    found = DURATION.match(text)
    if found is None:
        raise ValueError(f"{text!r} is not a duration; write e.g. 90d, 12h, 4w or 30m")
    return int(found.group(1)) * _UNIT_MS[found.group(2)]


class WalkForward(Message):
    """Walk-forward windows: train on ``train``, test on the ``test`` after it, move by
    ``step``; the first train window starts at the request's ``start``."""

    train: Duration
    test: Duration
    step: Duration

    @model_validator(mode="after")
    def _check(self) -> WalkForward:
        if duration_ms(self.step) < duration_ms(self.test):
            raise ValueError(
                f"'step' ({self.step}) must be at least 'test' ({self.test}): the test windows"
                " are stitched into one out-of-sample curve, so they may not overlap"
            )
        return self


class Sweep(Message):
    """A parameter sweep: the request's strategy run once per combination of params.

    Exactly one of ``grid`` (every combination of the listed values) or ``random`` (``n``
    draws, each param uniform in ``[low, high]``, ints when both bounds are ints, seeded by
    ``seed``). See :mod:`shared.sweep` for the order and the ranking.
    """

    grid: dict[str, Annotated[list[JsonValue], Field(min_length=1)]] | None = None
    random: dict[str, tuple[int | float, int | float]] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    seed: int = 0
    walk_forward: WalkForward | None = None

    @model_validator(mode="after")
    def _check(self) -> Sweep:
        space = self.grid if self.grid is not None else self.random
        if (self.grid is None) == (self.random is None):
            raise ValueError("give exactly one of 'grid' or 'random'")
        if not space:
            raise ValueError("name at least one parameter to sweep")
        if self.random is not None:
            if self.n is None:
                raise ValueError("a 'random' sweep needs 'n', the number of combinations")
            for name, (low, high) in self.random.items():
                if isinstance(low, bool) or isinstance(high, bool) or low > high:
                    raise ValueError(f"random.{name}: give [low, high] numbers, low <= high")
        elif self.n is not None:
            raise ValueError("'n' is for a 'random' sweep; a grid runs every combination")
        return self


def _default_portfolio() -> ComponentSpec:
    return ComponentSpec(builtin="fixed_fraction", params={"fraction": 1.0, "max_positions": 1})


class BacktestRequest(Message):
    """A backtest: one strategy over some symbols and a time range, one portfolio.

    Times are ISO 8601; a time without an offset is taken as UTC, others are converted.
    Bars with ``start <= open_time < end`` are simulated.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    id: BacktestId = Field(default_factory=new_backtest_id)
    strategy: ComponentSpec
    symbols: Annotated[list[Symbol], Field(min_length=1, max_length=1000)]
    interval: Interval
    start: datetime
    end: datetime
    initial_cash: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 10_000.0
    fee_rate: Annotated[float, Field(ge=0, lt=1)] = 0.001
    slippage_bps: Annotated[float, Field(ge=0, lt=10_000)] = 0.0
    portfolio: ComponentSpec = Field(default_factory=_default_portfolio)
    tie_break: TieBreak = "stop_loss_first"
    max_holding_bars: Annotated[int, Field(ge=1)] | None = None
    min_notional: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 10.0
    unit_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 300.0
    parallel_symbols: Annotated[int, Field(ge=1, le=1024)] | None = None
    #: Seconds from planning until the backtest ends ``failed`` (kind ``timeout``) if it has
    #: not finished; ``None``: the service's ``STRATORCH_DEADLINE_S``.
    deadline_s: Annotated[float, Field(gt=0, le=MAX_DEADLINE_S)] | None = None
    #: Run the strategy once per combination of params and rank them (:mod:`shared.sweep`).
    sweep: Sweep | None = None
    #: What a sweep ranks by; ``None``: ``sharpe``.
    metric: Metric | None = None

    @field_validator("start", "end", mode="before")
    @classmethod
    def _parse_iso(cls, value: object) -> object:
        # Parsed here so "2021-01-01" (how people write a day) is accepted too.
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not an ISO 8601 time; write e.g. 2021-01-01 or"
                    " 2021-01-01T12:00:00Z"
                ) from None
        return value

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    @field_validator("symbols")
    @classmethod
    def _unique(cls, symbols: list[str]) -> list[str]:
        seen = {s for s in symbols if symbols.count(s) > 1}
        if seen:
            raise ValueError(f"symbols are listed twice: {', '.join(sorted(seen))}")
        return symbols

    @model_validator(mode="after")
    def _check(self) -> BacktestRequest:
        if self.end <= self.start:
            raise ValueError(
                f"'end' ({self.end.isoformat()}) must be after 'start' ({self.start.isoformat()})"
            )
        if self.metric is not None and self.sweep is None:
            raise ValueError("'metric' is what a sweep ranks by; give it with 'sweep'")
        if self.portfolio.source is not None or self.portfolio.source_sha256 is not None:
            raise ValueError(
                "'portfolio' runs outside the sandbox, so it must be a builtin or a module,"
                " not uploaded source"
            )
        return self

    def fingerprint(self) -> str:
        """sha256 of the request as it is published, uploaded code counted by its sha256.

        Two requests with one id are "the same request" when their fingerprints are equal:
        sending ``source`` or naming the same code by ``source_sha256`` makes no difference,
        nor does leaving out a field or giving its default, nor the order of keys.
        """
        strategy = self.strategy
        if strategy.source is not None:
            sha = hashlib.sha256(strategy.source.encode()).hexdigest()
            strategy = strategy.model_copy(update={"source": None, "source_sha256": sha})
        # A request without a sweep hashes as it did before sweeps existed.
        unset = {name for name in ("sweep", "metric") if getattr(self, name) is None}
        body = self.model_copy(update={"strategy": strategy}).model_dump(
            mode="json", by_alias=True, exclude=unset
        )
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def start_ms(self) -> int:
        return _ms(self.start)

    @property
    def end_ms(self) -> int:
        return _ms(self.end)


def _ms(value: datetime) -> int:
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
