"""A sweep request, expanded: its combinations, walk-forward windows and child requests.

Pure: no I/O. The order is part of the contract (ties rank in it, child ids number it):

- ``grid``: every combination of the listed values, the params in the order given, the
  last one varying fastest (``itertools.product``).
- ``random``: ``n`` draws from ``random.Random(seed)``, params in the order given; a param
  whose bounds are both ints draws ints (``randint``, both ends included), else floats
  (``uniform``). The same seed gives the same combinations, everywhere.
- walk-forward: fold ``k`` trains on ``[start + k·step, + train)`` and tests on the ``test``
  after it; folds are made while the test window ends by the request's ``end``.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from datetime import UTC, datetime
from typing import Literal

from pydantic import JsonValue

from shared.errors import FieldError, RequestRejected
from shared.messages import BacktestRequest, Message, Metric, Sweep, is_backtest_id
from shared.messages.requests import duration_ms

#: The most child backtests one sweep may start (combinations, twice per walk-forward fold).
MAX_CHILDREN = 5000

#: A child's id: the parent's, ``:``, then ``c<index>`` (a combination over the whole range)
#: or ``f<fold>.<r|t><index>`` (a walk-forward fold's train or test run).
CHILD_ID = re.compile(r"^(?P<parent>.+):(?:c|f[0-9]+\.[rt])[0-9]{4,}$")

Phase = Literal["train", "test"]


class SweepChild(Message):
    """One child backtest of a sweep: a combination, over the whole range or one window."""

    backtest_id: str
    #: The combination's place in the sweep's order (ties rank by it).
    index: int
    params: dict[str, JsonValue]
    start_ms: int
    end_ms: int
    fold: int | None = None
    phase: Phase | None = None


class SweepPlan(Message):
    """What the store keeps of a sweep: how to rank its children once all have ended."""

    backtest_id: str
    metric: Metric
    #: The request's ``initial_cash``: where each walk-forward test window starts.
    initial_cash: float
    combinations: int
    walk_forward: bool
    children: list[SweepChild]


def combinations(sweep: Sweep) -> list[dict[str, JsonValue]]:
    """The sweep's combinations, in the order described in the module docstring."""
    if sweep.grid is not None:
        names = list(sweep.grid)
        return [
            dict(zip(names, values, strict=True))
            for values in itertools.product(*sweep.grid.values())
        ]
    assert sweep.random is not None and sweep.n is not None  # the model's validator
    rng = random.Random(sweep.seed)
    drawn: list[dict[str, JsonValue]] = []
    for _ in range(sweep.n):
        combo: dict[str, JsonValue] = {}
        for name, (low, high) in sweep.random.items():
            if isinstance(low, int) and isinstance(high, int):
                combo[name] = rng.randint(low, high)
            else:
                combo[name] = rng.uniform(low, high)
        drawn.append(combo)
    return drawn


def windows(request: BacktestRequest) -> list[tuple[int, int, int, int]]:
    """The walk-forward folds' ``(train_start, train_end, test_start, test_end)``, in ms."""
    assert request.sweep is not None and request.sweep.walk_forward is not None
    wf = request.sweep.walk_forward
    train, test, step = duration_ms(wf.train), duration_ms(wf.test), duration_ms(wf.step)
    folds = []
    start = request.start_ms
    while start + train + test <= request.end_ms:
        folds.append((start, start + train, start + train, start + train + test))
        start += step
    return folds


def backtest_count(request: BacktestRequest) -> int:
    """How many backtests ``request`` runs: 1, or each of a sweep's combinations (on each
    walk-forward window): what a tenant's quota counts it as."""
    sweep = request.sweep
    if sweep is None:
        return 1
    if sweep.grid is not None:
        combos = math.prod(len(values) for values in sweep.grid.values())
    else:
        assert sweep.n is not None  # the model's validator
        combos = sweep.n
    runs = 1 if sweep.walk_forward is None else 2 * len(windows(request))
    return max(1, combos * runs)


def expand(request: BacktestRequest) -> tuple[SweepPlan, list[BacktestRequest]]:
    """The sweep's plan and its child requests, in order.

    :raises RequestRejected: too many children, no walk-forward fold fits the range, or the
        parent's id is too long to derive the children's ids from.
    """
    sweep = request.sweep
    assert sweep is not None
    combos = combinations(sweep)
    children: list[SweepChild] = []
    if sweep.walk_forward is None:
        for i, combo in enumerate(combos):
            children.append(
                _child(request, f"c{i:04d}", i, combo, request.start_ms, request.end_ms)
            )
    else:
        folds = windows(request)
        if not folds:
            raise _rejected(
                ("sweep", "walk_forward"),
                "the range from 'start' to 'end' is shorter than one train window and the"
                " test window after it",
            )
        for k, (train_start, train_end, test_start, test_end) in enumerate(folds):
            for i, combo in enumerate(combos):
                children.append(
                    _child(request, f"f{k}.r{i:04d}", i, combo, train_start, train_end, k, "train")
                )
                children.append(
                    _child(request, f"f{k}.t{i:04d}", i, combo, test_start, test_end, k, "test")
                )
    if len(children) > MAX_CHILDREN:
        raise _rejected(
            ("sweep",),
            f"the sweep would run {len(children)} backtests ({len(combos)} combinations"
            f"{', twice per walk-forward fold' if sweep.walk_forward else ''}); at most"
            f" {MAX_CHILDREN} are allowed: sweep fewer values",
        )
    longest = max(children, key=lambda c: len(c.backtest_id)).backtest_id
    if not is_backtest_id(longest):
        raise _rejected(
            ("id",),
            f"a sweep's id must leave room for its combinations' ids ({longest!r} is too"
            " long): use an id of at most 48 characters",
        )
    plan = SweepPlan(
        backtest_id=request.id,
        metric=request.metric or "sharpe",
        initial_cash=request.initial_cash,
        combinations=len(combos),
        walk_forward=sweep.walk_forward is not None,
        children=children,
    )
    return plan, [_request(request, child) for child in children]


def parent_of(backtest_id: str) -> str | None:
    """The sweep a child backtest id belongs to, or ``None`` for any other id."""
    found = CHILD_ID.match(backtest_id)
    return found.group("parent") if found else None


def _child(
    request: BacktestRequest,
    suffix: str,
    index: int,
    params: dict[str, JsonValue],
    start_ms: int,
    end_ms: int,
    fold: int | None = None,
    phase: Phase | None = None,
) -> SweepChild:
    return SweepChild(
        backtest_id=f"{request.id}:{suffix}",
        index=index,
        params=params,
        start_ms=start_ms,
        end_ms=end_ms,
        fold=fold,
        phase=phase,
    )


def _request(parent: BacktestRequest, child: SweepChild) -> BacktestRequest:
    """The child as an ordinary request: the parent's, with the combination's params over
    the strategy's and the child's range; no sweep."""
    params = {**parent.strategy.params, **child.params}
    return parent.model_copy(
        update={
            "id": child.backtest_id,
            "strategy": parent.strategy.model_copy(update={"params": params}),
            "start": _time(child.start_ms),
            "end": _time(child.end_ms),
            "sweep": None,
            "metric": None,
        }
    )


def _time(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _rejected(field: tuple[str, ...], message: str) -> RequestRejected:
    return RequestRejected.of_fields([FieldError(field, message)])
