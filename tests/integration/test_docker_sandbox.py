"""DockerSandbox on a real dockerd: the same signals as the subprocess sandbox, and attacks.

A normal strategy must give exactly what ProcessSandbox gives. Each attack is a tiny uploaded
strategy; its test asserts the error kind the user sees, that the host is unharmed (it still
starts processes; nothing of the container runs on it) and that no container is left (the
``sandbox`` fixture lists this process's sandbox containers by label after every test; calls
without a session are checked right after the call). Probes print one line of facts
(``FACTS {...}``) before doing the forbidden thing, so one call gives both the error and
what the strategy could see.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from shared.errors import (
    Cancelled,
    ForbiddenOperation,
    InvalidOutput,
    OutputTooLarge,
    StrategyCrashed,
    StrategyOutOfMemory,
    StrategyTimeout,
    StratorchError,
)
from shared.messages import BacktestResult
from shared.sandbox import ProcessSandbox, SandboxLimits, docker_ahead
from shared.sandbox.docker import (
    LABEL,
    OWNER_LABEL,
    SESSION_LABEL,
    DockerSandbox,
    DockerUnavailable,
)
from shared.sandbox.port import DEFAULT_LIMITS
from shared.sandbox.protocol import BLAS_TUNING_ENV
from shared.strategy import BUILTIN_STRATEGIES, ComponentRef, signal_records
from tests.integration.docker_support import (
    PLACE,
    ROOT,
    DockerEnv,
    Watch,
    assert_host_fine,
    bars,
    docker_up,
    facts,
    our_containers,
    source,
)

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
SYMBOLS = ["ADAUSDT", "BTCUSDT", "DOGEUSDT", "ETHUSDT", "LINKUSDT", "LTCUSDT", "SOLUSDT", "XRPUSDT"]
#: A probe decides on one bar: three bars, the last one simulated.
PROBE = {"BTCUSDT": (bars(n=3), 2)}
PROBE_LIMITS = SandboxLimits(timeout_s=30)


@pytest.fixture(scope="session")
def docker_env() -> DockerEnv:
    return docker_up()


@pytest.fixture
async def docker(docker_env: DockerEnv) -> AsyncIterator[aiodocker.Docker]:
    """A plain Docker client: what the tests look at the engine with."""
    async with aiodocker.Docker(url=docker_env.url) as client:
        yield client


@pytest.fixture
async def sandbox(docker_env: DockerEnv, docker: aiodocker.Docker) -> AsyncIterator[DockerSandbox]:
    """A DockerSandbox on the test image; after the test, no container of it may be left."""
    async with DockerSandbox(image=docker_env.image, docker_url=docker_env.url) as sandbox:
        yield sandbox
    assert await our_containers(docker) == []


@pytest.fixture
async def process_sandbox() -> AsyncIterator[ProcessSandbox]:
    async with ProcessSandbox() as sandbox:
        yield sandbox


async def attack(
    sandbox: DockerSandbox,
    docker: aiodocker.Docker,
    code: ComponentRef,
    error: type[StratorchError],
    limits: SandboxLimits = PROBE_LIMITS,
) -> tuple[StratorchError, Watch, float]:
    """Run ``code`` on :data:`PROBE` in a container of its own; expect ``error``; check that
    the container is gone and the host fine. The error, the watch, the seconds it took."""
    started = time.monotonic()
    async with Watch(docker) as watch:
        with pytest.raises(error) as caught:
            await sandbox.signals(code, PROBE, interval="1h", limits=limits)
    took = time.monotonic() - started
    assert watch.seen, "no container was seen"
    assert await our_containers(docker) == []
    assert_host_fine(watch.seen)
    return caught.value, watch, took


# -- the same signals as the subprocess sandbox ----------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILTIN_STRATEGIES))
async def test_builtins_give_the_same_signals_as_the_process_sandbox(
    sandbox: DockerSandbox, process_sandbox: ProcessSandbox, name: str
) -> None:
    code = ComponentRef.from_json({"builtin": name})
    candles = {symbol: (bars(symbol), 200) for symbol in SYMBOLS}

    in_docker, in_process = await asyncio.gather(
        sandbox.signals(code, candles, interval="1h", session="bt-same"),
        process_sandbox.signals(code, candles, interval="1h", session="bt-same"),
    )

    assert in_docker == in_process
    assert sum(len(columns["t"]) for columns in in_docker.values()) > 100


PER_BAR = """
    import numpy as np
    import pandas as pd
    from shared.strategy import BaseStrategy

    class MeanReversion(BaseStrategy):
        '''RSI and Bollinger bands, per bar, with the pandas calls users reach for.'''

        params = {"n": 14, "band": 20}

        def get_required_lookback(self):
            return 60

        def decide(self, df, interval, **kw):
            close = df["close"]
            delta = close.diff()
            alpha = 1 / self.params["n"]
            up = delta.clip(lower=0).ewm(alpha=alpha, adjust=False).mean().iloc[-1]
            down = (-delta.clip(upper=0)).ewm(alpha=alpha, adjust=False).mean().iloc[-1]
            rsi = 100 - 100 / (1 + up / down)
            mid = close.rolling(self.params["band"]).mean().iloc[-1]
            sd = close.rolling(self.params["band"]).std().iloc[-1]
            meta = {
                "rsi": float(rsi),
                "skew": float(np.log(close).diff().skew()),
                "corr": float(close.corr(df["volume"])),
                "hours": float((df.index[-1] - df.index[0]) / pd.Timedelta(hours=1)),
                "t_ns": int(df.index.asi8[-1]),
            }
            last = close.iloc[-1]
            if rsi < 35 and last < mid - 1.5 * sd:
                return {"signal": "BUY", "tp_price": mid, "sl_price": last - 3 * sd, "meta": meta}
            if rsi > 65 and last > mid + 1.5 * sd:
                return {"signal": "SELL", "tp_price": mid, "sl_price": last + 3 * sd, "meta": meta}
            return None
"""


async def test_an_uploaded_per_bar_strategy_gives_the_same_signals_as_the_process_sandbox(
    sandbox: DockerSandbox, process_sandbox: ProcessSandbox
) -> None:
    code = source(PER_BAR, "MeanReversion")
    candles = {symbol: (bars(symbol, 1500), 100) for symbol in ("BTCUSDT", "DOGEUSDT")}

    in_docker, in_process = await asyncio.gather(
        sandbox.signals(code, candles, interval="1h", session="bt-same"),
        process_sandbox.signals(code, candles, interval="1h", session="bt-same"),
    )

    assert in_docker == in_process
    records = [r for symbol in candles for r in signal_records(in_docker[symbol])]
    assert len(records) > 20
    # the frame's index is in nanoseconds under any pandas (3.x alone would give microseconds)
    assert all(r["meta"]["t_ns"] == r["t"] * 1_000_000 for r in records)


ON_ARRAYS = """
    class OnArrays(MeanReversion):
        '''The same rule on the numpy window: its arrays checked, its DataFrame for pandas.'''

        window = "numpy"

        def decide(self, window, interval, **kw):
            assert isinstance(window.close, np.ndarray) and not window.close.flags.writeable
            assert window.time[-1] == np.datetime64(window.df.index[-1].tz_convert(None))
            return super().decide(window.df, interval, **kw)
"""


async def test_a_numpy_window_strategy_gives_the_pandas_windows_signals(
    sandbox: DockerSandbox,
) -> None:
    code = textwrap.dedent(PER_BAR) + textwrap.dedent(ON_ARRAYS)
    candles = {"DOGEUSDT": (bars("DOGEUSDT", 1500), 100)}

    on_arrays, on_frames = await asyncio.gather(
        sandbox.signals(source(code, "OnArrays"), candles, interval="1h", session="bt-arrays"),
        sandbox.signals(source(code, "MeanReversion"), candles, interval="1h", session="bt-df"),
    )

    assert on_arrays == on_frames
    assert len(on_arrays["DOGEUSDT"]["t"]) > 5


async def test_describe_in_docker(sandbox: DockerSandbox) -> None:
    code = ComponentRef.from_json({"builtin": "sma_cross", "params": {"fast": 5, "slow": 20}})

    info = await sandbox.describe(code, ["BTCUSDT", "ETHUSDT"])

    assert (info.lookback, info.units) == (21, [["BTCUSDT"], ["ETHUSDT"]])


def test_stratorch_run_with_the_docker_sandbox_gives_the_process_sandboxs_result(
    docker_env: DockerEnv,
    run_cli: Callable[..., tuple[int, BacktestResult]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STRATORCH_SANDBOX_IMAGE", docker_env.image)
    monkeypatch.setenv("DOCKER_HOST", docker_env.url)
    request = json.loads((ROOT / "examples" / "sma_cross.json").read_text())

    docker_code, in_docker = run_cli(request, "--sandbox", "docker")
    process_code, in_process = run_cli(request, "--sandbox", "process")

    assert docker_code == process_code == 0
    assert in_docker.metrics == in_process.metrics
    assert in_docker.trades == in_process.trades
    assert in_docker.equity_curve == in_process.equity_curve


async def stratorch_command(
    docker: aiodocker.Docker, tmp_path: Path, request: bytes, env: dict[str, str], *args: str
) -> tuple[int, bytes, BacktestResult, dict[str, dict[str, str]]]:
    """Run the installed ``stratorch run`` (``stratorch.cli_start``) on ``request`` in a
    process of its own: its exit code, stderr and result, and the labels of each sandbox
    container it had (polled every 20 ms)."""
    path, out = tmp_path / "request.json", tmp_path / "result.json"
    path.write_bytes(request)
    command = "import sys; from stratorch.cli_start import main; sys.argv[0] = 'stratorch'; main()"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", command, "run", str(path), "--quiet", "--out", str(out), *args,
        stderr=asyncio.subprocess.PIPE,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("STRATORCH_")}, **env},
    )  # fmt: skip
    seen: dict[str, dict[str, str]] = {}
    owner = f"{PLACE}:{process.pid}:"
    finished = asyncio.ensure_future(process.communicate())
    while not finished.done():
        for found in await docker.containers.list(all=True, filters={"label": [f"{LABEL}=1"]}):
            if found["Labels"].get(OWNER_LABEL, "").startswith(owner):
                seen.setdefault(found.id, found["Labels"])
        await asyncio.wait([finished], timeout=0.02)
    _, stderr = await finished
    assert process.returncode is not None
    assert await our_containers(docker, owner) == []  # nothing left behind
    return process.returncode, stderr, BacktestResult.model_validate_json(out.read_text()), seen


async def test_the_stratorch_command_adopts_a_container_started_ahead_and_leaves_nothing(
    docker_env: DockerEnv, docker: aiodocker.Docker, tmp_path: Path
) -> None:
    """The command starts its first container while it imports; the run's first call takes
    it (it has no session label: it was started before the backtest had an id)."""
    request = json.loads((ROOT / "examples" / "sma_cross.json").read_text())
    request.update(symbols=["BTCUSDT"], end="2021-01-15")
    raw = json.dumps(request).encode()
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"DOCKER_HOST": docker_env.url, "STRATORCH_SANDBOX_IMAGE": docker_env.image}

    code, stderr, result, seen = await stratorch_command(
        docker, tmp_path, raw, {**env, "TMPDIR": str(temp)}, "--sandbox", "docker"
    )
    _, _, expected, _ = await stratorch_command(docker, tmp_path, raw, {}, "--sandbox", "process")

    assert (code, stderr) == (0, b"")
    assert result.metrics == expected.metrics and result.trades == expected.trades
    # describe and the one unit in the container started ahead: no other was started
    assert [SESSION_LABEL in labels for labels in seen.values()] == [False]
    assert list(temp.iterdir()) == []  # its runner-code copy and candle directory too


@pytest.mark.parametrize(
    ("request_bytes", "docker_host", "status"),
    [
        (b"{not json", None, "rejected"),  # no sandbox call takes it: removed at exit
        (None, "unix:///nonexistent/docker.sock", "rejected"),  # no dockerd: no wait
    ],
    ids=["untaken", "no-dockerd"],
)
async def test_a_container_started_ahead_and_not_taken_is_removed_at_exit(
    docker_env: DockerEnv,
    docker: aiodocker.Docker,
    tmp_path: Path,
    request_bytes: bytes | None,
    docker_host: str | None,
    status: str,
) -> None:
    raw = request_bytes or (ROOT / "examples" / "sma_cross.json").read_bytes()
    env = {
        "DOCKER_HOST": docker_host or docker_env.url,
        "STRATORCH_SANDBOX_IMAGE": docker_env.image,
    }
    started = time.monotonic()

    code, _, result, _ = await stratorch_command(docker, tmp_path, raw, env, "--sandbox", "docker")

    assert code != 0 and result.status == status  # and no container left (checked there)
    assert time.monotonic() - started < 60


async def test_a_container_started_ahead_that_does_not_fit_is_removed(
    docker_env: DockerEnv, docker: aiodocker.Docker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sandbox configured otherwise than the container started ahead (here its pids
    limit) starts its own and removes the one started ahead."""
    monkeypatch.setenv("DOCKER_HOST", docker_env.url)
    monkeypatch.setenv("STRATORCH_SANDBOX_IMAGE", docker_env.image)
    docker_ahead.start_ahead(DEFAULT_LIMITS.memory_bytes)
    code = ComponentRef.from_json({"builtin": "sma_cross"})

    async with (
        Watch(docker) as watch,
        DockerSandbox(image=docker_env.image, docker_url=docker_env.url, pids_limit=32) as sandbox,
    ):
        await sandbox.describe(code, ["BTCUSDT"])

    assert len(watch.seen) == 2  # the one started ahead, and the sandbox's own
    assert await our_containers(docker) == []
    assert docker_ahead.take() is None


# -- containers: per call, per session, always removed ---------------------------------------


ENDLESS = """
    from shared.strategy import BaseStrategy

    class S(BaseStrategy):
        def decide(self, df, interval, **kw):
            while True:
                pass
"""


async def test_a_cancelled_call_removes_its_container(
    sandbox: DockerSandbox, docker: aiodocker.Docker
) -> None:
    call = asyncio.create_task(
        sandbox.signals(source(ENDLESS), PROBE, interval="1h", session="bt-cancel")
    )
    deadline = time.monotonic() + 30
    while not (running := await our_containers(docker)):
        assert time.monotonic() < deadline, "no container started"
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # inside the endless loop by now

    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    assert await our_containers(docker) == []
    assert_host_fine([c["id"] for c in running])


async def test_stopping_a_session_kills_its_call_and_removes_its_containers(
    sandbox: DockerSandbox, docker: aiodocker.Docker
) -> None:
    """What a cancelled backtest's worker does: ``stop`` its session."""
    await sandbox.describe(source(ENDLESS), ["BTCUSDT"], session="bt-other")  # warm, idle
    call = asyncio.create_task(
        sandbox.signals(source(ENDLESS), PROBE, interval="1h", session="bt-stop")
    )
    deadline = time.monotonic() + 30
    while len(running := await our_containers(docker)) < 2:
        assert time.monotonic() < deadline, "no container started"
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # inside the endless loop by now

    await sandbox.stop("bt-stop")

    with pytest.raises(Cancelled, match="bt-stop"):
        await asyncio.wait_for(call, 30)
    assert len(await our_containers(docker)) == 1  # the other session's is untouched
    with pytest.raises(Cancelled):  # later calls of the session are refused
        await sandbox.describe(source(ENDLESS), ["BTCUSDT"], session="bt-stop")
    await sandbox.stop("bt-other")
    assert await our_containers(docker) == []
    assert_host_fine([c["id"] for c in running])


@pytest.mark.parametrize("after_s", [0.0, 1.0], ids=["starting", "running"])
async def test_closing_the_sandbox_during_a_call_removes_its_container(
    docker_env: DockerEnv, docker: aiodocker.Docker, after_s: float
) -> None:
    sandbox = DockerSandbox(image=docker_env.image, docker_url=docker_env.url)
    call = asyncio.create_task(sandbox.signals(source(ENDLESS), PROBE, interval="1h"))
    deadline = time.monotonic() + 30
    while not (running := await our_containers(docker)):
        assert time.monotonic() < deadline, "no container started"
        await asyncio.sleep(0.01)
    await asyncio.sleep(after_s)

    await sandbox.aclose()

    with pytest.raises(RuntimeError, match="closed while"):
        await call
    assert await our_containers(docker) == []
    assert_host_fine([c["id"] for c in running])


IMPORTS_PYDANTIC = """
import pydantic  # installed beside stratorch, not in the sandbox image
from shared.strategy import BaseStrategy

class S(BaseStrategy):
    def decide(self, df, interval, **kw):
        return None
"""


async def test_both_sandboxes_refuse_an_import_the_image_lacks_the_same_way(
    sandbox: DockerSandbox, process_sandbox: ProcessSandbox
) -> None:
    code = ComponentRef.from_json({"source": IMPORTS_PYDANTIC, "class": "S"})
    errors = []
    for box in (sandbox, process_sandbox):
        with pytest.raises(StrategyCrashed) as caught:
            await box.signals(code, PROBE, interval="1h", limits=PROBE_LIMITS)
        errors.append(caught.value.message)
    assert errors[0] == errors[1]
    assert "only the standard library and numpy, pandas, shared, not 'pydantic'" in errors[0]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"image": "stratorch-sandbox:no-such-tag"}, "build it"),
        ({"runtime": "runsc-not-installed"}, "no runtime 'runsc-not-installed'"),
    ],
    ids=["missing image", "unknown runtime"],
)
async def test_a_docker_problem_is_docker_unavailable_at_start(
    docker_env: DockerEnv, options: dict[str, str], says: str
) -> None:
    sandbox = DockerSandbox(**{"image": docker_env.image, "docker_url": docker_env.url, **options})

    with pytest.raises(DockerUnavailable, match=says):
        async with sandbox:
            pass


CHILD = """
import asyncio, sys
import pandas as pd
from shared.sandbox import SandboxLimits
from shared.strategy import ComponentRef
from shared.sandbox.docker import DockerSandbox

async def main(image, url, code):
    frame = pd.read_parquet("stratorch/sample/1h/BTCUSDT.parquet").iloc[:3]
    sandbox = DockerSandbox(image=image, mount_runner=True, docker_url=url)
    code = ComponentRef.from_json({"source": code, "class": "S"})
    limits = SandboxLimits(timeout_s=3600)
    await sandbox.signals(code, {"BTCUSDT": (frame, 2)}, interval="1h", limits=limits)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_containers_of_a_killed_worker_are_removed_by_the_next_sandbox(
    docker_env: DockerEnv, docker: aiodocker.Docker
) -> None:
    worker = subprocess.Popen(
        [sys.executable, "-c", CHILD, docker_env.image, docker_env.url, textwrap.dedent(ENDLESS)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    owner = f"{PLACE}:{worker.pid}:"
    try:
        deadline = time.monotonic() + 60
        while not (left := await our_containers(docker, owner)):
            assert time.monotonic() < deadline, "the worker started no container"
            assert worker.poll() is None, "the worker ended early"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # busy in the endless loop
    finally:
        worker.send_signal(signal.SIGKILL)  # no cleanup of its own: a crash
        worker.wait()
    [still] = await our_containers(docker, owner)
    assert still["state"] == "running"  # busy: its stdin closing does not end it

    async with DockerSandbox(image=docker_env.image, docker_url=docker_env.url):
        assert await our_containers(docker, owner) == []  # removed as the sandbox opened

    assert_host_fine([c["id"] for c in left])


# -- attacks ----------------------------------------------------------------------------------


async def test_an_endless_loop_is_killed_at_the_timeout(
    sandbox: DockerSandbox, docker: aiodocker.Docker
) -> None:
    error, _, took = await attack(
        sandbox, docker, source(ENDLESS), StrategyTimeout, SandboxLimits(timeout_s=3)
    )

    assert error.kind == "timeout"
    assert "did not finish within 3 s" in error.message
    assert took < 3 + 5


MEMORY_BOMB = """
    from shared.strategy import BaseStrategy

    class S(BaseStrategy):
        def decide(self, df, interval, **kw):
            print("allocating")
            hoard = []
            while True:
                hoard.append(b"x" * (16 << 20))
"""


async def test_a_memory_bomb_is_out_of_memory(
    sandbox: DockerSandbox, docker: aiodocker.Docker
) -> None:
    limits = SandboxLimits(timeout_s=60, memory_bytes=256 * MiB)

    error, _, took = await attack(sandbox, docker, source(MEMORY_BOMB), StrategyOutOfMemory, limits)

    assert error.kind == "oom"
    assert "memory limit (256 MiB)" in error.message
    assert took < 20


CHILD_MEMORY_BOMB = """
    import os
    from shared.strategy import BaseStrategy

    class S(BaseStrategy):
        def decide(self, df, interval, **kw):
            child = os.fork()
            if child == 0:
                hoard = []
                while True:
                    hoard.append(b"x" * (16 << 20))
            _, status = os.waitpid(child, 0)
            print("child ended with status", status)
            return {"signal": "BUY"}  # as if nothing happened
"""


async def test_a_memory_bomb_in_a_child_process_is_out_of_memory_too(
    sandbox: DockerSandbox, docker: aiodocker.Docker
) -> None:
    """The OOM killer ends the child; the strategy carries on and returns a signal. Docker's
    ``OOMKilled`` would say so only once the container exits (and with exit code 0), so the
    runner counts the container's OOM kills around each job."""
    limits = SandboxLimits(timeout_s=60, memory_bytes=256 * MiB)

    error, _, _ = await attack(
        sandbox, docker, source(CHILD_MEMORY_BOMB), StrategyOutOfMemory, limits
    )

    assert error.kind == "oom"
    assert "OOM killer ended 1 process" in error.message
    assert "child ended with status 9" in error.log_tail  # SIGKILL


FORK_BOMB = """
    import os
    from shared.strategy import BaseStrategy

    class S(BaseStrategy):
        def decide(self, df, interval, **kw):
            while True:
                os.fork()
"""


async def test_a_fork_bomb_hits_the_pids_limit(
    sandbox: DockerSandbox, docker: aiodocker.Docker
) -> None:
    error, _, took = await attack(sandbox, docker, source(FORK_BOMB), StrategyCrashed)

    assert error.kind == "crashed"
    assert "BlockingIOError" in error.message  # fork() refused: the pids limit
    assert "os.fork()" in error.log_tail
    assert took < 15


NETWORK = """
    import errno, json, os, socket
    from shared.strategy import BaseStrategy

    class S(BaseStrategy):
        params = {"gateway": ""}

        def decide(self, df, interval, **kw):
            tried = {}
            for host in ("127.0.0.1", self.params["gateway"]):
                try:
                    socket.create_connection((host, 5672), timeout=3).close()
                    tried[host] = "connected"
                except OSError as exc:
                    tried[host] = errno.errorcode.get(exc.errno, str(exc))
            devices = [line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:]]
            net = sorted(os.listdir("/sys/class/net"))
            print("FACTS " + json.dumps({"tried": tried, "dev": devices, "net": net}))
            socket.create_connection((self.params["gateway"], 5672), timeout=3)
"""


def bridge_gateway(network: dict[str, Any]) -> str:
    """The host's address on a Docker bridge network, as containers see it.

    dockerd lists ``Gateway`` in the network's IPAM config only sometimes: a bridge it has just
    created on a fresh machine shows only its ``Subnet``. The gateway is then the subnet's
    first host (dockerd's own default, e.g. 172.17.0.1 on ``docker0``), so derive it from that.
    """
    config = network["IPAM"]["Config"][0]
    if config.get("Gateway"):
        return str(config["Gateway"])
    return str(next(ipaddress.ip_network(config["Subnet"], strict=False).hosts()))


@pytest.fixture
async def broker_ports(docker: aiodocker.Docker) -> AsyncIterator[tuple[str, list[socket.socket]]]:
    """Port 5672 open at 127.0.0.1 and at the docker bridge's gateway (the host, as seen
    from containers): the broker's, or a listener of this fixture's. So a failed connect from
    the sandbox proves isolation, not an empty port. Yields the gateway and our listeners."""
    bridge = await (await docker.networks.get("bridge")).show()
    gateway = bridge_gateway(bridge)
    ours = []
    for host in ("127.0.0.1", gateway):
        with contextlib.suppress(OSError):  # taken: the broker listens there
            ours.append(socket.create_server((host, 5672)))
        with socket.create_connection((host, 5672), timeout=3):
            pass  # something listens, reachable from the host
    for listener in ours:
        listener.accept()[0].close()
        listener.setblocking(False)
    yield gateway, ours
    for listener in ours:
        listener.close()


async def test_the_network_is_out_of_reach(
    sandbox: DockerSandbox,
    docker: aiodocker.Docker,
    broker_ports: tuple[str, list[socket.socket]],
) -> None:
    gateway, listeners = broker_ports

    error, _, _ = await attack(
        sandbox, docker, source(NETWORK, gateway=gateway), ForbiddenOperation
    )

    assert error.kind == "forbidden"
    seen = facts(error.log_tail)
    assert seen["net"] == seen["dev"] == ["lo"]  # no interface but loopback
    assert seen["tried"] == {"127.0.0.1": "ECONNREFUSED", gateway: "ENETUNREACH"}
    for listener in listeners:
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing came through


FILE_SYSTEM = """
    import errno, json, os
    import shared
    from shared.strategy import BaseStrategy

    def attempt(path):
        try:
            with open(path, "w") as file:
                file.write("x")
        except OSError as exc:
            return errno.errorcode[exc.errno]
        return "written"

    class S(BaseStrategy):
        def decide(self, df, interval, **kw):
            own = os.path.join(os.path.dirname(shared.__file__), "sandbox", "runner.py")
            mounts = [line.split()[3:5] for line in open("/proc/self/mountinfo")]
            print("FACTS " + json.dumps({
                "root": attempt("/pwned"),
                "own_code": attempt(own),
                "etc": attempt("/etc/passwd"),
                "tmp": attempt("/tmp/scratch"),
                "candles": attempt("/candles/pwned"),
                "candle_files": os.listdir("/candles"),
                "code_mount": [m for m in mounts if m[1] == "/opt/stratorch/shared"],
                "candle_mount": [m for m in mounts if m[1] == "/candles"],
            }))
            open("/pwned", "w")
"""


async def test_the_file_system_is_read_only_but_tmp(
    sandbox: DockerSandbox, docker: aiodocker.Docker
) -> None:
    error, _, _ = await attack(sandbox, docker, source(FILE_SYSTEM), ForbiddenOperation)

    assert error.kind == "forbidden"
    seen = facts(error.log_tail)
    assert seen["root"] == seen["own_code"] == seen["etc"] == seen["candles"] == "EROFS"
    assert seen["tmp"] == "written"
    [(mounted_from, _)] = seen["code_mount"]
    assert mounted_from.startswith("/tmp/stratorch-sandbox-")  # a neutral path...
    assert str(ROOT) not in mounted_from  # ...not where the service is installed
    # The call's candles, in a directory of the container's own: nothing else of the host.
    assert seen["candle_files"] == ["candles-0.bin"]
    [(candles_from, _)] = seen["candle_mount"]
    assert candles_from.startswith(mounted_from.removesuffix("/shared") + "/candles-")
    assert not Path("/pwned").exists()


SHM = """
    import errno, json, os
    from multiprocessing import shared_memory
    from shared.strategy import BaseStrategy

    class S(BaseStrategy):
        def decide(self, df, interval, **kw):
            mounts = [line.split()[4] for line in open("/proc/self/mountinfo")]
            print("FACTS " + json.dumps({"exists": os.path.exists("/dev/shm"), "mounts": mounts}))
            shared_memory.SharedMemory(create=True, size=1 << 20)
"""


async def test_there_is_no_dev_shm(sandbox: DockerSandbox, docker: aiodocker.Docker) -> None:
    error, _, _ = await attack(sandbox, docker, source(SHM), StrategyCrashed)

    assert error.kind == "crashed"
    assert "FileNotFoundError" in error.message  # shm_open: no /dev/shm to put it in
    seen = facts(error.log_tail)
    assert seen["exists"] is False
    assert "/dev/shm" not in seen["mounts"]


CAPABILITIES = """
    import json, os
    from shared.strategy import BaseStrategy

    class S(BaseStrategy):
        def decide(self, df, interval, **kw):
            status = dict(line.split(":", 1) for line in open("/proc/self/status"))
            keys = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
            print("FACTS " + json.dumps({key: status[key].split() for key in (*keys, "Uid")}))
            os.setuid(0)
"""


async def test_no_capabilities_and_no_way_to_root(
    sandbox: DockerSandbox, docker: aiodocker.Docker
) -> None:
    error, _, _ = await attack(sandbox, docker, source(CAPABILITIES), ForbiddenOperation)

    assert error.kind == "forbidden"
    assert "PermissionError" in error.message
    seen = facts(error.log_tail)
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(seen[key][0], 16) == 0, key
    assert seen["NoNewPrivs"] == ["1"]
    assert seen["Seccomp"] == ["2"]  # dockerd's default profile filters system calls
    assert seen["Uid"] == ["10001"] * 4


ENVIRONMENT = """
    import os
    from shared.strategy import BaseStrategy

    class S(BaseStrategy):
        def decide(self, df, interval, **kw):
            initial = open("/proc/1/environ", "rb").read().decode(errors="replace")
            return {"signal": "BUY", "meta": {"env": dict(os.environ), "initial": initial}}
"""


async def test_the_host_environment_is_not_visible(
    sandbox: DockerSandbox, docker: aiodocker.Docker, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"canary-{os.urandom(8).hex()}"
    monkeypatch.setenv("STRATORCH_TEST_CANARY", secret)

    async with Watch(docker) as watch:
        result = await sandbox.signals(source(ENVIRONMENT), PROBE, interval="1h")

    [seen] = result["BTCUSDT"]["meta"]
    assert secret not in json.dumps(seen)
    assert set(seen["env"]) <= {
        "PATH", "HOSTNAME", "HOME", "TMPDIR", "LANG", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE",
        "PYTHONFAULTHANDLER", "PYTHONPATH", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
        "MKL_NUM_THREADS", "ARROW_DEFAULT_MEMORY_POOL", "MALLOC_MMAP_THRESHOLD_",
        *BLAS_TUNING_ENV,  # the host's OpenBLAS kernel choice: same bits as the process sandbox
    }  # fmt: skip
    assert seen["env"]["HOSTNAME"] == "sandbox"
    assert await our_containers(docker) == []
    assert_host_fine(watch.seen)


PRINT_FLOOD = """
    import sys
    from shared.strategy import BaseStrategy

    class S(BaseStrategy):
        def decide(self, df, interval, **kw):
            block = ("x" * 1023 + "\\n") * 1024  # 1 MiB
            for _ in range(200):
                sys.stdout.write(block)
"""


async def test_printing_200_mb_is_output_too_large_fast_and_dockerd_keeps_none_of_it(
    sandbox: DockerSandbox, docker: aiodocker.Docker
) -> None:
    root = (await docker.system.info())["DockerRootDir"]
    free_before = shutil.disk_usage(root).free

    error, watch, took = await attack(sandbox, docker, source(PRINT_FLOOD), OutputTooLarge)

    assert error.kind == "output_too_large"
    assert "printed more than 16 MiB" in error.message
    assert error.log_tail.endswith("x" * 100)  # the last lines of what it printed
    assert took < 10
    assert set(watch.seen.values()) == {("none", "")}  # log driver none: no log file at all
    assert free_before - shutil.disk_usage(root).free < 50 * MiB


MALFORMED = """
    from shared.strategy import BaseStrategy

    class S(BaseStrategy):
        def decide(self, df, interval, **kw):
            return {"signal": "MAYBE", "tp_price": "high"}
"""


async def test_a_malformed_signal_is_invalid_output(
    sandbox: DockerSandbox, docker: aiodocker.Docker
) -> None:
    error, _, _ = await attack(sandbox, docker, source(MALFORMED), InvalidOutput)

    assert error.kind == "invalid_output"
    assert "'MAYBE'" in error.message


FORGED_RESULT = """
    import os
    from shared.strategy import BaseStrategy

    class S(BaseStrategy):
        def decide(self, df, interval, **kw):
            for fd in range(3, 16):  # the runner's private result stream is one of these
                try:
                    os.write(fd, b'{"ok": true, "signals": {}}\\n')
                except OSError:
                    pass
"""


async def test_garbage_on_the_result_stream_is_invalid_output(
    sandbox: DockerSandbox, docker: aiodocker.Docker
) -> None:
    error, _, _ = await attack(sandbox, docker, source(FORGED_RESULT), InvalidOutput)

    assert error.kind == "invalid_output"
    assert "wrote something other than its result" in error.message


KILL_PID_1 = """
    import os, signal, time
    from shared.strategy import BaseStrategy

    class S(BaseStrategy):
        params = {"signal": "SIGKILL"}

        def decide(self, df, interval, **kw):
            os.kill(1, getattr(signal, self.params["signal"]))
            time.sleep(0.2)
            return {"signal": "BUY", "meta": {"pid": os.getpid()}}
"""


@pytest.mark.parametrize("name", ["SIGKILL", "SIGTERM"])
async def test_killing_pid_1_from_inside_does_nothing(
    sandbox: DockerSandbox, docker: aiodocker.Docker, name: str
) -> None:
    """The runner IS pid 1 of the container's pid namespace, and the kernel drops signals
    from inside the namespace to its init that it has no handler for — SIGKILL always."""
    async with Watch(docker) as watch:
        result = await sandbox.signals(source(KILL_PID_1, signal=name), PROBE, interval="1h")

    assert result["BTCUSDT"]["meta"] == [{"pid": 1}]
    assert await our_containers(docker) == []
    assert_host_fine(watch.seen)


async def test_interrupting_pid_1_from_inside_crashes_the_strategy(
    sandbox: DockerSandbox, docker: aiodocker.Docker
) -> None:
    """SIGINT is the one signal Python handles: it becomes a KeyboardInterrupt in the
    strategy, which the runner reports as a crash."""
    code = source(KILL_PID_1, signal="SIGINT")

    error, _, _ = await attack(sandbox, docker, code, StrategyCrashed)

    assert error.kind == "crashed"
    assert "KeyboardInterrupt" in error.message


RAISES_ON_IMPORT = """
    print("loading my strategy")
    raise RuntimeError("no API key in the sandbox")
"""


async def test_a_strategy_that_raises_on_import_crashes_with_its_traceback(
    sandbox: DockerSandbox, docker: aiodocker.Docker
) -> None:
    error, _, _ = await attack(sandbox, docker, source(RAISES_ON_IMPORT), StrategyCrashed)

    assert error.kind == "crashed"
    assert "no API key in the sandbox" in error.message
    assert 'raise RuntimeError("no API key in the sandbox")' in error.log_tail
    assert "loading my strategy" in error.log_tail  # attach streams live with log driver none
