"""The strategy SDK runs inside the sandbox image: it imports only what the image has.

(Its exports are checked with every package's, in ``tests/unit/test_exports.py``.)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import shared.strategy

PACKAGE = Path(shared.strategy.__file__).parent


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
