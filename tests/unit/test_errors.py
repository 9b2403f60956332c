"""Errors: the lowest layer imports nothing of the wire layer; a user's error travels as an
``ErrorInfo``, a rejected request with each invalid field apart."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

import shared.errors
from shared.errors import FieldError, RequestRejected, StrategyCrashed
from shared.messages import BacktestRequest, BacktestResult, ErrorInfo, rejection


def test_errors_import_nothing_but_the_standard_library() -> None:
    # Anywhere in the module: under TYPE_CHECKING and inside functions too.
    tree = ast.parse(Path(shared.errors.__file__).read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name) or ""
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert {name.split(".")[0] for name in imported} <= sys.stdlib_module_names | {"__future__"}
    # And in a fresh interpreter (this one has imported everything already): the sandbox's
    # runner imports shared.errors, where pydantic may not be.
    probe = (
        "import json, sys, shared.errors;"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('shared', 'pydantic'))))"
    )
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=True)
    assert json.loads(found.stdout) == ["shared", "shared.errors"]


def test_a_users_error_travels_with_its_kind_place_and_output() -> None:
    crashed = StrategyCrashed("S raised ZeroDivisionError", symbol="BTCUSDT", log_tail="line 3")
    crashed.unit_id = "u0001"
    info = ErrorInfo.from_error(crashed)
    assert info == ErrorInfo(
        kind="crashed",
        symbol="BTCUSDT",
        unit_id="u0001",
        message="S raised ZeroDivisionError",
        log_tail="line 3",
    )
    assert info.fields == []


def test_a_rejected_request_carries_each_invalid_field() -> None:
    with pytest.raises(ValidationError) as caught:
        BacktestRequest.model_validate_json(
            '{"strategy": {"module": "m"}, "symbols": [], "interval": "1h",'
            ' "start": "2021-01-01", "end": "2021-02-01"}'
        )
    rejected = rejection(caught.value.errors())
    assert [f.loc for f in rejected.fields] == [("strategy",), ("symbols",)]
    # The one-line message is as it always was: every field named, "; " between them.
    assert rejected.message == (
        "strategy: 'module' needs 'class': the name of the class to load;"
        " symbols: List should have at least 1 item after validation, not 0"
    )

    result = BacktestResult(
        backtest_id="bt-1", status="rejected", errors=[ErrorInfo.from_error(rejected)]
    )
    [error] = json.loads(result.model_dump_json())["errors"]
    assert error["kind"] == "rejected" and error["message"] == rejected.message
    assert error["fields"] == [
        {"loc": ["strategy"], "message": "'module' needs 'class': the name of the class to load"},
        {"loc": ["symbols"], "message": "List should have at least 1 item after validation, not 0"},
    ]
    assert BacktestResult.model_validate_json(result.model_dump_json()) == result


def test_a_rejection_for_the_request_as_a_whole_names_no_field() -> None:
    whole = RequestRejected.of_fields([FieldError((), "'end' must be after 'start'")])
    assert whole.message == "request: 'end' must be after 'start'"
    assert ErrorInfo.from_error(RequestRejected("no tenant")).fields == []
