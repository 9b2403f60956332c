"""A bad ``STRATORCH_*`` value stops every program at once: one line, exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared.settings import Settings, SettingsError
from tests.conftest import ROOT


def test_the_error_names_each_variable_its_value_and_what_is_allowed() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(sandbox="dokcer", log_level="loud", concurrency=0)
    message = str(caught.value)
    assert "STRATORCH_SANDBOX='dokcer' is not allowed: expected 'process' or 'docker'" in message
    assert "STRATORCH_LOG_LEVEL='loud'" in message and "'warning' or 'error'" in message
    assert "STRATORCH_CONCURRENCY=0" in message
    assert "\n" not in message


def test_a_secret_value_is_never_shown() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(amqp_url=["not", "a", "string"])
    assert "STRATORCH_AMQP_URL=(hidden)" in str(caught.value)


@pytest.mark.parametrize("service", ["scheduler", "symbol_worker", "portfolio_sim", "gateway"])
def test_every_service_refuses_a_bad_value_in_one_line(service: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATORCH_")}
    done = subprocess.run(
        [sys.executable, "-m", f"services.{service}"],
        env={**env, "STRATORCH_LOG_LEVEL": "loud"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "STRATORCH_LOG_LEVEL='loud'" in done.stderr
