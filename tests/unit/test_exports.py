"""Each package of ``shared`` exports exactly its public names (after httpx's test of exported
members): ``__all__`` lists every name its ``__init__`` takes from its own modules, each one
resolves, and every name the package's docstring, the README or an example names from it is
among them."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import shared
from tests.conftest import ROOT

#: ``shared`` and each package in it.
PACKAGES = [
    "shared",
    *sorted(f"shared.{m.name}" for m in pkgutil.iter_modules(shared.__path__) if m.ispkg),
]
#: A name a docstring refers to in its own package: ``:class:`Sandbox``` (not a dotted path).
_REFERENCE = re.compile(r":(?:class|func|data|exc|obj):`~?([A-Za-z_]\w*)`")
_IMPORT = re.compile(r"from (shared(?:\.\w+)*) import ([\w, ]+(?: as \w+)?)")
#: What users read: the README, the docs and the examples.
_USER_TEXTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "examples").glob("*.py")),
]


def reexported(package: ModuleType) -> set[str]:
    """The names ``package``'s ``__init__`` imports from its own modules (lazily too)."""
    assert package.__file__ is not None
    tree = ast.parse(Path(package.__file__).read_text())
    return {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and (node.level > 0 or (node.module or "").startswith(f"{package.__name__}."))
        for alias in node.names
    }


def imported_by_users(package: str) -> set[str]:
    """The names the README, the docs and the examples import from ``package``."""
    names = set()
    for text in _USER_TEXTS:
        for module, imported in _IMPORT.findall(text.read_text()):
            if module == package:
                names |= {part.split(" as ")[0].strip() for part in imported.split(",")}
    return names


def test_every_package_and_what_the_readme_imports_is_found() -> None:
    packages = {"shared.candles", "shared.messages", "shared.mongo", "shared.sandbox"}
    assert packages | {"shared.sim", "shared.strategy"} <= set(PACKAGES)
    assert "BaseStrategy" in imported_by_users("shared.strategy")  # "Writing a strategy"
    assert "BacktestRequest" in imported_by_users("shared.messages")  # the JSON Schemas


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_exactly_what_the_package_exports(name: str) -> None:
    package = importlib.import_module(name)
    exported = list(getattr(package, "__all__", []))
    assert len(exported) == len(set(exported)), "a name is listed twice"
    assert set(exported) == reexported(package)
    for member in exported:
        assert getattr(package, member) is not None, member


@pytest.mark.parametrize("name", PACKAGES)
def test_what_users_are_told_to_use_is_exported(name: str) -> None:
    package = importlib.import_module(name)
    exported = set(getattr(package, "__all__", []))
    documented = set(_REFERENCE.findall(package.__doc__ or "")) | imported_by_users(name)
    assert documented <= exported, f"named but not exported: {sorted(documented - exported)}"
