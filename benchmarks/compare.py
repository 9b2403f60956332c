"""``stratorch run`` beside the numpy reference, vectorbt and backtesting.py: the same SYNTHETIC
candles (a seeded random walk, clearly not market data), the same rules
(:mod:`benchmarks.reference`), each engine a whole process of its own (imports included, as a
user sees it), run in turn and repeated; the medians, peak RSS of each process tree, and
whether trades and final equity equal stratorch's.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import perbar
from benchmarks.procs import Run, timed
from benchmarks.reference import Outcome, Trade, request
from benchmarks.report import Figure, MiB, ratio

ROOT = Path(__file__).resolve().parents[1]
STRATORCH = str(Path(sys.executable).with_name("stratorch"))


@dataclass
class Engine:
    label: str
    command: Callable[[Path], list[str]]  # given the path its outcome goes to
    outcome: Callable[[Path], Outcome]
    runs: list[Run] = field(default_factory=list)
    result: Outcome | None = None
    failure: str = ""

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def peak_rss(self) -> int:
        return max(r.peak_rss for r in self.runs)


def child_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "TQDM_DISABLE": "1"}


def child(label: str, name: str, store: Path, symbols: list[str]) -> Engine:
    """An engine of :mod:`benchmarks.child`."""

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "benchmarks.child", name, str(store), str(out), *symbols]

    def outcome(out: Path) -> Outcome:
        return Outcome.from_json(json.loads(out.read_text()))

    return Engine(label, command, outcome)


def stratorch(
    label: str,
    store: Path,
    symbols: list[str],
    work: Path,
    *,
    sandbox: str = "process",
    strategy: dict[str, Any] | None = None,
) -> Engine:
    """``stratorch run`` on ``store``, as a user runs it."""
    spec = work / f"{label.replace(' ', '_')}.request.json"
    spec.write_text(json.dumps(request(symbols, strategy=strategy)))

    def command(out: Path) -> list[str]:
        return [
            STRATORCH,
            "run",
            str(spec),
            "--candles",
            str(store),
            "--sandbox",
            sandbox,
            "--quiet",
            "--out",
            str(out),
        ]

    def outcome(out: Path) -> Outcome:
        result = json.loads(out.read_text())
        if result["status"] != "completed":
            raise RuntimeError(f"{result['status']}: {result['errors'][0]['message']}")
        trades = [
            Trade(t["symbol"], t["entry_time"], t["exit_time"], t["exit_reason"])
            for t in result["trades"]
        ]
        return Outcome(trades, result["metrics"]["final_equity"])

    return Engine(label, command, outcome)


def run_all(engines: list[Engine], work: Path, repeat: int) -> None:
    """Each engine ``repeat`` times, in turn (so load on the machine hits all alike); an engine
    that fails is reported, not retried."""
    for i in range(repeat):
        for engine in engines:
            if engine.failure:
                continue
            out = work / f"{engine.label.replace(' ', '_')}.{i}.json"
            try:
                engine.runs.append(timed(engine.command(out), env=child_env()))
                if engine.result is None:
                    engine.result = engine.outcome(out)
            except Exception as exc:  # reported in the table
                reason = str(exc).strip().splitlines()
                engine.failure = reason[-1] if reason else type(exc).__name__
                if out.exists():  # stratorch's --out says why (e.g. no dockerd)
                    try:
                        engine.outcome(out)
                    except Exception as why:
                        engine.failure = str(why)


def agreement(subject: Outcome, other: Outcome) -> tuple[bool, str]:
    """Whether ``other`` has ``subject``'s trades (symbol, entry and exit bar, and exit reason
    where both say) and final equity; the differences if not."""

    def keys(outcome: Outcome, reasons: bool) -> list[tuple[Any, ...]]:
        return sorted(
            (t.symbol, t.entry_time, t.exit_time, t.exit_reason if reasons else "")
            for t in outcome.trades
        )

    reasons = all(t.exit_reason for t in other.trades)
    ours, theirs = keys(subject, reasons), keys(other, reasons)
    if ours == theirs:
        trades = f"same {len(ours):,} trades"
    else:
        common = len(set(ours) & set(theirs))
        trades = f"{len(theirs):,} trades vs {len(ours):,} ({common:,} the same)"
    delta = other.final_equity / subject.final_equity - 1
    if other.final_equity == subject.final_equity:
        equity = "final equity identical"
    elif math.isnan(delta):
        equity = "final equity not comparable"
    else:
        equity = (
            f"final equity {delta:+.2%}" if abs(delta) >= 1e-4 else f"final equity {delta:+.1e}"
        )
    return ours == theirs and other.final_equity == subject.final_equity, f"{trades}; {equity}"


def rivals_available() -> bool:
    return all(importlib.util.find_spec(m) for m in ("vectorbt", "backtesting"))


def engines_section(
    store: Path, symbols: list[str], bars: int, work: Path, repeat: int, *, docker: bool
) -> list[Figure]:
    """The table's rows for one data set: time, ratio to the reference, RSS, agreement."""
    subject = stratorch("stratorch run, process sandbox", store, symbols, work)
    reference = child("numpy reference", "reference", store, symbols)
    engines = [reference, subject]
    if docker:
        engines.append(
            stratorch("stratorch run --sandbox docker", store, symbols, work, sandbox="docker")
        )
    if rivals_available():
        engines += [
            child("vectorbt 1.2, Rust engine", "vectorbt-rust", store, symbols),
            child("vectorbt 1.2, numba", "vectorbt-numba", store, symbols),
            child("backtesting.py 0.6.6", "backtesting", store, symbols),
        ]
    run_all(engines, work, repeat)
    shape = f"{len(symbols)} × {bars:,} bars"
    figures = []
    for engine in engines:
        if engine.failure or not engine.runs:
            figures.append(Figure(f"{shape}: {engine.label}", f"failed: {engine.failure}"))
            continue
        value = f"{engine.seconds:.2f} s"
        if engine is not reference and reference.runs:
            value += f" ({ratio(engine.seconds, reference.seconds)} the reference)"
        value += f"; peak RSS {engine.peak_rss / MiB:,.0f} MiB"
        if "docker" in engine.label:
            value += " (without its containers)"
        if engine is not subject and engine.result and subject.result:
            same, how = agreement(subject.result, engine.result)
            value += f"; {how}" + (" ✓" if same else "")
        elif engine is subject and engine.result:
            value += f"; {len(engine.result.trades):,} trades"
        figures.append(Figure(f"{shape}: {engine.label}", value))
    figures += targets(engines, subject, reference, shape)
    if not rivals_available():
        figures.append(
            Figure("vectorbt, backtesting.py", "not installed: pip install -e '.[bench]'")
        )
    return figures


def targets(engines: list[Engine], subject: Engine, reference: Engine, shape: str) -> list[Figure]:
    """The issue's targets for one data set (``shape``: "1 × 1,000,000 bars" or the like)."""
    if not (subject.runs and reference.runs):
        return []
    speed = subject.seconds / reference.seconds
    figures = [
        Figure(f"{shape}, embedded: time vs the reference", f"{speed:.2f}×", "≤ 2.5×", speed <= 2.5)
    ]
    by_label = {e.label: e for e in engines if e.runs and not e.failure}
    if shape.startswith("1 ×"):
        rss = subject.peak_rss / reference.peak_rss
        figures.append(
            Figure(f"{shape}: peak RSS vs the reference's", f"{rss:.2f}×", "≤ 2×", rss <= 2)
        )
        rust = by_label.get("vectorbt 1.2, Rust engine")
        if rust:
            figures.append(
                Figure(
                    f"{shape}: stratorch run vs vectorbt's Rust engine",
                    ratio(subject.seconds, rust.seconds),
                    "< 1× (faster)",
                    subject.seconds < rust.seconds,
                )
            )
    docker = by_label.get("stratorch run --sandbox docker")
    if docker:
        ratio_docker = docker.seconds / subject.seconds
        figures.append(
            Figure(
                f"{shape}: Docker sandbox vs process sandbox",
                f"{ratio_docker:.2f}×",
                "≤ 1.2×",
                ratio_docker <= 1.2,
            )
        )
    return figures


def perbar_section(store: Path, symbol: str, bars: int, work: Path, repeat: int) -> list[Figure]:
    """µs per bar of ``decide`` in ``stratorch run`` on each window (per-bar minus vectorized
    run, whole processes) and of the loops :func:`perbar.in_process` times side by side:
    stratorch's per-bar loop on each window, backtesting.py's ``next()``, the plain loops.
    The targets compare the loops timed side by side; whole processes vary more."""
    from benchmarks.child import read

    vectorized = stratorch("vectorized", store, [symbol], work)
    per_bar = stratorch("per-bar", store, [symbol], work, strategy=perbar.SPEC)
    numpy_window = stratorch(
        "per-bar numpy window", store, [symbol], work, strategy=perbar.SPEC_NUMPY
    )
    engines = [vectorized, per_bar, numpy_window]
    if rivals_available():
        engines.append(child("backtesting.py", "backtesting", store, [symbol]))
    run_all(engines, work, repeat)
    rounds = 3 * repeat
    cost = perbar.in_process(store, read(store, symbol), rounds, rivals=rivals_available())
    n = f"1 × {bars:,} bars"
    side = f"in process ({rounds} rounds of {min(bars, perbar.ROUND_BARS):,} bars)"
    figures = [
        Figure(
            f"{side}: a plain Python loop over numpy arrays", f"{cost['numpy loop']:.1f} µs/bar"
        ),
        Figure(
            f"{side}: the same loop building a pandas window (iloc)",
            f"{cost['pandas loop']:.1f} µs/bar",
        ),
        Figure(
            f"{side}: stratorch's per-bar loop, the pandas window",
            f"{cost['pandas window']:.1f} µs/bar",
        ),
        Figure(
            f"{side}: stratorch's per-bar loop, the numpy window",
            f"{cost['numpy window']:.1f} µs/bar",
        ),
        Figure(
            f"{side}: stratorch's per-bar loop, the numpy window, decide only reading close[-1]",
            f"{cost['numpy window idle']:.1f} µs/bar",
        ),
    ]
    for engine in engines:
        if engine.failure:
            figures.append(Figure(f"per-bar: {engine.label}", f"failed: {engine.failure}"))
    for engine, name in ((per_bar, "pandas window"), (numpy_window, "numpy window")):
        if vectorized.runs and engine.runs and not engine.failure:
            figures.append(
                Figure(
                    f"{n}: stratorch run, per-bar decide on the {name}",
                    f"{(engine.seconds - vectorized.seconds) / bars * 1e6:.1f} µs/bar (whole "
                    f"process {engine.seconds:.2f} s; vectorized {vectorized.seconds:.2f} s)",
                )
            )
    figures.append(
        Figure(
            "per-bar: the pandas window vs a plain numpy loop",
            ratio(cost["pandas window"], cost["numpy loop"]),
            "≤ 4×",
            cost["pandas window"] <= 4 * cost["numpy loop"],
        )
    )
    if len(engines) < 4 or engines[3].failure:
        figures.append(
            Figure(
                "per-bar: the numpy window vs backtesting.py's next()",
                "backtesting.py not installed or failed",
                "< 1× (faster)",
            )
        )
        return figures
    # backtesting.py's own loop time (its run(), stats included), not its imports.
    loop_s = json.loads((work / "backtesting.py.0.json").read_text())["loop_s"]
    next_cost, same_rule = loop_s / bars * 1e6, cost["backtesting.py same rule"]
    figures += [
        Figure(
            f"{n}: backtesting.py's next() loop, SMAs precomputed by self.I",
            f"{next_cost:.1f} µs/bar (whole process {engines[3].seconds:.2f} s)",
        ),
        Figure(f"{side}: backtesting.py's next(), the same rule", f"{same_rule:.1f} µs/bar"),
        Figure(
            "per-bar: the numpy window vs backtesting.py's next(), the same rule",
            ratio(cost["numpy window"], same_rule),
            "< 1× (faster)",
            cost["numpy window"] < same_rule,
        ),
        Figure(
            "per-bar: the numpy window's own cost vs backtesting.py's next() loop",
            ratio(cost["numpy window idle"], next_cost),
            "< 1× (faster)",
            cost["numpy window idle"] < next_cost,
        ),
    ]
    return figures
