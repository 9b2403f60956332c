"""A throwaway stratorch stack on this machine's servers, for the integration tests and
``benchmarks/stack.py``.

- :func:`servers_up` runs ``scripts/services-up.sh --no-docker`` (idempotent: seconds when
  RabbitMQ and the Mongo wire-protocol server already run) and returns their URLs.
- :func:`create_vhost` gives a fresh RabbitMQ vhost: the topology's queue names are fixed, so
  isolation is per vhost, deleted again with :func:`delete_vhost`.
- :func:`load_sample` writes the bundled real sample candles into a Mongo database.
- :class:`PrivateMongo` is a Mongo wire-protocol server of a test's own (the FerretDB binary
  ``scripts/start-mongo.sh`` builds, on its own port and data directory), for tests that stop
  it: the shared one on :27017 is everybody's.
- :class:`PrivateRabbit` is a RabbitMQ node of a test's own, for the test that restarts the
  broker.
- :class:`Stack` runs the services as separate OS processes (``python -m services.<name>``)
  with ``STRATORCH_*`` pointing at that vhost and database, waits until they consume, and
  stops them with SIGTERM (then SIGKILL), keeping their stderr for failure messages.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


class ServersUnavailable(RuntimeError):
    """The local RabbitMQ or Mongo server could not be started."""


@dataclass(frozen=True)
class Servers:
    amqp_url: str
    mongo_url: str
    candles_mongo_url: str


def servers_up(timeout_s: float = 900) -> Servers:
    """Start (or reuse) RabbitMQ and the Mongo wire-protocol server; their URLs."""
    script = ROOT / "scripts" / "services-up.sh"
    try:
        out = subprocess.run(
            ["bash", str(script), "--no-docker"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServersUnavailable(f"{script} did not finish: {exc}") from exc
    if out.returncode != 0:
        raise ServersUnavailable(f"{script} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    env = dict(
        line.split("=", 1) for line in out.stdout.splitlines() if "=" in line and line[0].isupper()
    )
    try:
        return Servers(
            env["STRATORCH_AMQP_URL"],
            env["STRATORCH_MONGO_URL"],
            env["STRATORCH_CANDLES_MONGO_URL"],
        )
    except KeyError as exc:
        raise ServersUnavailable(f"{script} printed no {exc.args[0]}: {out.stdout!r}") from exc


def _rabbitmqctl(*args: str) -> None:
    out = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if out.returncode != 0:
        raise ServersUnavailable(f"rabbitmqctl {' '.join(args)}: {out.stderr.strip()}")


def create_vhost(amqp_url: str, prefix: str = "stratorch-test") -> tuple[str, str]:
    """A new vhost the URL's user may use fully: ``(name, URL of it)``."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    user = urlsplit(amqp_url).username or "guest"
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
    return name, vhost_url(amqp_url, name)


def delete_vhost(name: str) -> None:
    _rabbitmqctl("delete_vhost", name)


def vhost_url(amqp_url: str, vhost: str) -> str:
    parts = urlsplit(amqp_url)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


def add_user(
    amqp_url: str,
    vhost: str,
    user: str,
    *,
    permissions: tuple[str, str, str] = (".*", ".*", ".*"),
    topic_permissions: Mapping[str, tuple[str, str]] | None = None,
    tags: tuple[str, ...] = (),
) -> str:
    """A new RabbitMQ user with ``permissions`` (configure, write, read) on ``vhost`` and
    ``topic_permissions`` (exchange: (write, read)); the URL it connects with. Remove it
    with :func:`delete_user`."""
    password = uuid.uuid4().hex
    _rabbitmqctl("add_user", user, password)
    if tags:
        _rabbitmqctl("set_user_tags", user, *tags)
    _rabbitmqctl("set_permissions", "-p", vhost, user, *permissions)
    for exchange, (write, read) in (topic_permissions or {}).items():
        _rabbitmqctl("set_topic_permissions", "-p", vhost, user, exchange, write, read)
    parts = urlsplit(vhost_url(amqp_url, vhost))
    netloc = f"{quote(user, safe='')}:{password}@{parts.hostname}:{parts.port or 5672}"
    return urlunsplit(parts._replace(netloc=netloc))


def delete_user(user: str) -> None:
    _rabbitmqctl("delete_user", user)


async def load_sample(
    mongo_url: str,
    db_name: str,
    symbols: list[str] | None = None,
    *,
    start_ms: int = 0,
    end_ms: int = 2**62,
    warm_up: int = 0,
) -> int:
    """Write the bundled sample's 1h candles to ``db_name`` in the columnar layout, as
    ``stratorch ingest --mongo`` does: all symbols or ``symbols``, the bars in
    ``[start_ms, end_ms)`` and ``warm_up`` bars before them. The number written."""
    from shared import mongo
    from shared.candles import ParquetCandleStore
    from stratorch.paths import SAMPLE_STORE

    sample = ParquetCandleStore(SAMPLE_STORE)
    client = await mongo.connect(mongo_url)
    try:
        db = client[db_name]
        await mongo.ensure_indexes(db)
        written = 0
        for symbol in symbols or sample.symbols("1h"):
            frame = sample.read(symbol, "1h", start_ms=start_ms, end_ms=end_ms, lookback=warm_up)
            written += (await mongo.write_chunks(db, symbol, "1h", frame)).new
        return written
    finally:
        await client.close()


async def drop_database(mongo_url: str, db_name: str) -> None:
    from shared import mongo

    client = await mongo.connect(mongo_url)
    try:
        await client.drop_database(db_name)
    finally:
        await client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def listening(process: subprocess.Popen[bytes], port: int, timeout_s: float) -> bool:
    """Wait until something accepts on 127.0.0.1:``port``; False if ``process`` exits first or
    ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return True
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.1)


#: The FerretDB binary ``scripts/start-mongo.sh`` builds and caches (see that script).
FERRETDB = (
    Path(os.environ.get("STRATORCH_CACHE", Path.home() / ".cache" / "stratorch"))
    / "bin"
    / "ferretdb-v1.24.2"
)


class PrivateMongo:
    """A FerretDB process of a test's own: start it, SIGKILL it (an outage), start it again on
    the same port and data (the server coming back)."""

    def __init__(self, directory: Path) -> None:
        if not FERRETDB.exists():
            raise ServersUnavailable(f"no FerretDB at {FERRETDB}: run scripts/start-mongo.sh")
        self.directory = directory
        self.port = free_port()
        self.url = f"mongodb://127.0.0.1:{self.port}/"
        self.process: subprocess.Popen[bytes] | None = None
        (directory / "data").mkdir(parents=True, exist_ok=True)
        (directory / "state").mkdir(exist_ok=True)

    def start(self, timeout_s: float = 30.0) -> None:
        with (self.directory / "log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(FERRETDB),
                    "--handler=sqlite",
                    f"--sqlite-url=file:{self.directory}/data/",
                    f"--listen-addr=127.0.0.1:{self.port}",
                    f"--state-dir={self.directory}/state",
                    f"--debug-addr=127.0.0.1:{free_port()}",
                    "--telemetry=disable",
                    "--log-level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not listening(self.process, self.port, timeout_s):
            raise ServersUnavailable(f"FerretDB did not start: {self.directory}/log")

    def kill(self) -> None:
        """SIGKILL: connections drop, nothing answers on the port until :meth:`start`."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class PrivateRabbit:
    """A RabbitMQ node of a test's own (Debian's ``rabbitmq-server``, on its own port, node
    name and data directory), for tests that restart the broker: the shared one on :5672 is
    everybody's. Its data survives :meth:`shutdown`, as a real broker restart's does."""

    def __init__(self) -> None:
        if shutil.which("rabbitmq-server") is None or os.geteuid() != 0:
            raise ServersUnavailable("a private RabbitMQ node needs rabbitmq-server and root")
        # Not under pytest's tmp_path: the node runs as the rabbitmq user, who cannot enter it.
        self.directory = Path(tempfile.mkdtemp(prefix="stratorch-rabbit-"))
        self.node = f"stratorch-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self._env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbit.conf"),
            # Not /etc/rabbitmq/conf.d: that one binds the shared node's port.
            "RABBITMQ_CONFIG_FILES": str(self.directory / "conf.d"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.directory / "pid"),
        }
        for sub in ("mnesia", "log", "conf.d"):
            (self.directory / sub).mkdir()
        (self.directory / "rabbit.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
        )
        (self.directory / "enabled_plugins").write_text("[].\n")
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.directory)], check=True)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the node and wait until its AMQP listener (opened last) accepts."""
        with (self.directory / "out").open("ab") as out:
            self.process = subprocess.Popen(
                ["rabbitmq-server"],
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if not listening(self.process, self.port, timeout_s):
            out = (self.directory / "out").read_text(errors="replace")[-3000:]
            raise ServersUnavailable(f"private RabbitMQ did not start:\n{out}")

    def shutdown(self) -> None:
        """Stop the node as ``systemctl stop`` does: clients see their connections closed,
        nothing answers until :meth:`start`; durable queues and their messages stay."""
        if self.process is None or self.process.poll() is not None:
            return
        subprocess.run(
            ["rabbitmqctl", "-q", "-n", self.node, "shutdown"],
            capture_output=True,
            timeout=120,
            check=False,
        )
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # kill the node itself, not only its su parent
            pid = (self.directory / "pid").read_text().strip()
            subprocess.run(["kill", "-9", pid], check=False)
            self.process.kill()
            self.process.wait()

    def remove(self) -> None:
        self.shutdown()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class Service:
    """One service process; its stderr (JSON log lines) goes to ``log_path``."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def records(self) -> Iterator[dict[str, Any]]:
        """The JSON log lines (others, such as uvicorn's, are skipped)."""
        for line in self.text().splitlines():
            if line.startswith("{"):
                try:
                    yield json.loads(line)
                except ValueError:
                    continue

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == event]

    def stop(self, timeout_s: float = 20.0, *, signalled: bool = False) -> int:
        """SIGTERM (unless ``signalled`` already), wait, then SIGKILL; the exit code
        (negative: ended by that signal)."""
        if self.process.poll() is None:
            if not signalled:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass
class Stack:
    """Services as OS processes sharing one environment (vhost, database, sandbox)."""

    env: Mapping[str, str]
    log_dir: Path
    services: list[Service] = field(default_factory=list)
    gateway_url: str | None = None

    @classmethod
    def configure(
        cls, *, amqp_url: str, mongo_url: str, candles_mongo_url: str, db: str, log_dir: Path
    ) -> Stack:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("STRATORCH_") and not k.endswith("_PROXY") and "proxy" not in k
        }
        env.update(
            STRATORCH_AMQP_URL=amqp_url,
            STRATORCH_MONGO_URL=mongo_url,
            STRATORCH_CANDLES_MONGO_URL=candles_mongo_url,
            STRATORCH_MONGO_DB=db,
            STRATORCH_SANDBOX="process",
            STRATORCH_LOG_LEVEL="info",
            STRATORCH_SHUTDOWN_GRACE_S="10",
            # Tests of tenants start their own gateway with tokens (see test_tenants.py).
            STRATORCH_AUTH="off",
            PYTHONUNBUFFERED="1",
        )
        log_dir.mkdir(parents=True, exist_ok=True)
        return cls(env, log_dir)

    def start(self, name: str, **env: str) -> Service:
        """Start ``python -m services.<name>``; ``env`` adds ``STRATORCH_*`` overrides."""
        n = sum(s.name == name for s in self.services)
        log_path = self.log_dir / f"{name}-{n}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [PYTHON, "-m", f"services.{name}"],
                cwd=ROOT,
                env={**self.env, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        service = Service(name, process, log_path)
        self.services.append(service)
        return service

    def start_gateway(self) -> Service:
        port = free_port()
        self.gateway_url = f"http://127.0.0.1:{port}"
        return self.start(
            "gateway", STRATORCH_GATEWAY_HOST="127.0.0.1", STRATORCH_GATEWAY_PORT=str(port)
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until every consumer logged ``consuming`` and the gateway answers ``/healthz``."""
        import httpx

        deadline = time.monotonic() + timeout_s
        pending = list(self.services)
        while pending:
            for service in list(pending):
                if service.process.poll() is not None:
                    raise RuntimeError(
                        f"{service.name} exited with {service.process.returncode}:\n"
                        f"{service.text()[-4000:]}"
                    )
                if service.name == "gateway":
                    try:
                        ok = httpx.get(f"{self.gateway_url}/healthz", timeout=2).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                else:
                    ok = bool(service.logged("consuming"))
                if ok:
                    pending.remove(service)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(
                    f"not ready after {timeout_s}s: {[s.name for s in pending]}\n{self.dump()}"
                )
            time.sleep(0.1)

    def of(self, name: str) -> list[Service]:
        return [s for s in self.services if s.name == name]

    def stop(self) -> dict[str, int]:
        """Stop every service (all signalled first, so they shut down in parallel)."""
        for service in self.services:
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        return {f"{s.name}[{s.pid}]": s.stop(signalled=True) for s in self.services}

    def dump(self, tail: int = 3000) -> str:
        """Every service's last log lines, for a failing assertion's message."""
        return "\n".join(
            f"--- {s.name} pid {s.pid} (exit {s.process.poll()}) ---\n{s.text()[-tail:]}"
            for s in self.services
        )
