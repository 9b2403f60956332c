"""A sweep's result from its children's: the ranking, walk-forward folds, the stitched curve.

Pure: no I/O. Ranking by the sweep's metric, best first (highest, or lowest for those in
:data:`shared.messages.LOWER_IS_BETTER`); ties keep the combinations' order. Children that
completed with the metric undefined (``None``: a Sharpe without trades) come after those
with a value, and children that did not complete come last, with their errors. The sweep
completes when any child did; its metrics, trades and equity are the best combination's
(for a walk-forward: the chosen combinations' test trades and the stitched test equity).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shared.messages import (
    LOWER_IS_BETTER,
    BacktestResult,
    ErrorInfo,
    Fold,
    Ranked,
    SweepResult,
)
from shared.sweep.expand import SweepChild, SweepPlan

Outcomes = Mapping[str, BacktestResult]


def rank(children: Sequence[SweepChild], outcomes: Outcomes, metric: str) -> list[Ranked]:
    """``children`` ranked by ``metric`` of their outcomes (keyed by child id), best first."""
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0

    def value(child: SweepChild) -> float | None:
        result = outcomes[child.backtest_id]
        if result.status != "completed" or result.metrics is None:
            return None
        found = getattr(result.metrics, metric)
        return None if found is None else float(found)

    def order(child: SweepChild) -> tuple[int, float, int]:
        found = value(child)
        if outcomes[child.backtest_id].status != "completed":
            return (2, 0.0, child.index)
        return (1, 0.0, child.index) if found is None else (0, sign * found, child.index)

    ranked = sorted(children, key=order)
    return [
        Ranked(
            rank=place,
            backtest_id=child.backtest_id,
            params=child.params,
            status=outcomes[child.backtest_id].status,
            value=value(child),
            metrics=outcomes[child.backtest_id].metrics,
            errors=outcomes[child.backtest_id].errors,
        )
        for place, child in enumerate(ranked, start=1)
    ]


def stitch(
    curves: Sequence[Sequence[tuple[int, float]]], initial_cash: float
) -> list[tuple[int, float]]:
    """Equity curves of consecutive windows, each starting from ``initial_cash``, as one:
    each scaled so that it starts from the equity the one before ended with."""
    stitched: list[tuple[int, float]] = []
    scale = 1.0
    for curve in curves:
        stitched.extend((time, equity * scale) for time, equity in curve)
        if curve:
            scale *= curve[-1][1] / initial_cash
    return stitched


def sweep_result(plan: SweepPlan, outcomes: Outcomes) -> BacktestResult:
    """The sweep's result once every child has an outcome (keyed by child id)."""
    if not plan.walk_forward:
        ranking = rank(plan.children, outcomes, plan.metric)
        summary = SweepResult(metric=plan.metric, combinations=plan.combinations, ranking=ranking)
        best = outcomes[ranking[0].backtest_id]
        if best.status != "completed":
            return _failed(plan, summary, best.errors)
        return best.model_copy(
            update={"backtest_id": plan.backtest_id, "cache_hit": False, "sweep": summary}
        )
    folds = [_fold(plan, k, outcomes) for k in range(_fold_count(plan))]
    tested = [
        outcomes[f.test.backtest_id] for f in folds if f.test and f.test.status == "completed"
    ]
    summary = SweepResult(
        metric=plan.metric,
        combinations=plan.combinations,
        walk_forward=folds,
        oos_equity=stitch([r.equity_curve for r in tested], plan.initial_cash),
    )
    if not tested:
        first = next((f.test or f.ranking[0] for f in folds), None)
        return _failed(plan, summary, first.errors if first else [])
    return BacktestResult(
        backtest_id=plan.backtest_id,
        status="completed",
        trades=[t for r in tested for t in r.trades],
        equity_curve=summary.oos_equity,
        sweep=summary,
    )


def _fold(plan: SweepPlan, k: int, outcomes: Outcomes) -> Fold:
    train = [c for c in plan.children if c.fold == k and c.phase == "train"]
    tests = {c.index: c for c in plan.children if c.fold == k and c.phase == "test"}
    ranking = rank(train, outcomes, plan.metric)
    chosen = ranking[0] if ranking[0].status == "completed" else None
    test = None
    if chosen is not None:
        child = tests[next(c.index for c in train if c.backtest_id == chosen.backtest_id)]
        test = rank([child], outcomes, plan.metric)[0]
    first_train, first_test = train[0], next(iter(tests.values()))
    return Fold(
        train_start=first_train.start_ms,
        train_end=first_train.end_ms,
        test_start=first_test.start_ms,
        test_end=first_test.end_ms,
        ranking=ranking,
        params=chosen.params if chosen else None,
        test=test,
    )


def _fold_count(plan: SweepPlan) -> int:
    return 1 + max(c.fold or 0 for c in plan.children)


def _failed(plan: SweepPlan, summary: SweepResult, errors: list[ErrorInfo]) -> BacktestResult:
    """No combination completed: the sweep fails with the first one's errors."""
    note = ErrorInfo(
        kind=errors[0].kind if errors else "internal",
        message=f"none of the sweep's {plan.combinations} combinations completed; the first"
        f" failed with: {errors[0].message if errors else 'no error recorded'}",
    )
    return BacktestResult(
        backtest_id=plan.backtest_id, status="failed", errors=[note, *errors[1:]], sweep=summary
    )
