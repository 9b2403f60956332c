"""The package's public names are exactly its `__all__` (after httpx's test of the same name)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import shared.strategy

PACKAGE = Path(shared.strategy.__file__).parent


def test_all_matches_exports() -> None:
    exported = {
        name
        for name, value in vars(shared.strategy).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("shared.")
    } | {"BUILTIN_STRATEGIES"}
    assert set(shared.strategy.__all__) == exported
    assert sorted(shared.strategy.__all__) == [
        "BUILTIN_STRATEGIES",
        "BaseStrategy",
        "ComponentError",
        "ComponentRef",
        "StrategyOutputError",
        "compute_signals",
        "load_component",
    ]
    for name in shared.strategy.__all__:
        assert hasattr(shared.strategy, name)


def test_only_what_the_sandbox_image_has_is_imported() -> None:
    """The sandbox has the stdlib, numpy and pandas, and of `shared` only this package."""
    allowed = set(sys.stdlib_module_names) | {"numpy", "pandas", "shared"}
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
                if name.startswith("shared."):
                    assert name.startswith(("shared.strategy", "shared.intervals")), (
                        f"{path.name} imports {name}, which the sandbox image does not have"
                    )
