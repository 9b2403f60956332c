"""The table ``python -m benchmarks`` prints: each figure beside its target, and whether it
is met."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class Figure:
    name: str
    value: str
    target: str = ""
    met: bool | None = None  # None: no target, or not measured


def verdict(figure: Figure) -> str:
    if not figure.target:
        return ""
    return {True: "met", False: "NOT met", None: "not measured"}[figure.met]


def print_section(title: str, figures: list[Figure]) -> None:
    """A Markdown table, so the README can hold it as printed."""
    print(f"\n### {title}\n", flush=True)
    print("| figure | value | target | |")
    print("| --- | --- | --- | --- |")
    for f in figures:
        print(f"| {f.name} | {f.value} | {f.target} | {verdict(f)} |", flush=True)


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×" if reference > 0 else "–"
