"""A real headless chromium, driven over the Chrome DevTools Protocol (CDP) with aiohttp's
websocket client: open a page with the network off, and see what a user's browser would —
console errors, uncaught exceptions, every request the page made, the DOM, a screenshot.

``chromium`` finds Debian's chromium, installing it with ``scripts/install-chromium.sh`` when
it is missing; where it cannot, the browser tests skip (fail with
``STRATORCH_REQUIRE_SERVICES=1``, as CI runs them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Self

import aiohttp

from tests.conftest import ROOT

#: How long chromium may take to start, and a page to load, on a loaded 2-core machine.
START_TIMEOUT_S = 60.0
LOAD_TIMEOUT_S = 120.0


def find_chromium() -> str:
    """The chromium executable; installed first if missing.

    :raises RuntimeError: it is not installed and the install script failed.
    """
    if not shutil.which("chromium"):
        script = ROOT / "scripts" / "install-chromium.sh"
        out = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{script} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    found = shutil.which("chromium")
    if found is None:
        raise RuntimeError("chromium is not on PATH")
    return found


class Chromium:
    """One headless chromium with one page, the network cut off (a proxy that does not exist,
    and CDP's offline emulation on top).

    :param executable: the chromium binary.
    :param profile: an empty directory for its profile (it writes its debugging port there).
    """

    def __init__(self, executable: str, profile: Path, *, width: int = 1300) -> None:
        self.executable, self.profile, self.width = executable, profile, width
        #: Console errors, uncaught exceptions and browser log errors, as text.
        self.errors: list[str] = []
        #: Every URL the page requested.
        self.requests: list[str] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._loaded = asyncio.Event()

    async def __aenter__(self) -> Self:
        self.profile.mkdir(parents=True, exist_ok=True)
        self._stderr = (self.profile / "chromium.log").open("wb")
        self._process = subprocess.Popen(
            [
                self.executable,
                "--headless",
                "--no-sandbox",  # we run as root; the page is our own file
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--proxy-server=127.0.0.1:9",  # nothing answers there: no network at all
                f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0",
                f"--window-size={self.width},1000",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        try:
            port = await self._port()
            self._http = aiohttp.ClientSession()
            async with self._http.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            page = next(t for t in targets if t["type"] == "page")
            self._ws = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
            self._reader = asyncio.create_task(self._read())
            for domain in ("Runtime", "Log", "Page", "Network"):
                await self.send(f"{domain}.enable")
            await self.send(
                "Network.emulateNetworkConditions",
                offline=True,
                latency=0,
                downloadThroughput=-1,
                uploadThroughput=-1,
            )
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if hasattr(self, "_reader"):
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if hasattr(self, "_ws"):
            await self._ws.close()
        if hasattr(self, "_http"):
            await self._http.close()
        self._process.terminate()
        try:
            await asyncio.to_thread(self._process.wait, 10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            await asyncio.to_thread(self._process.wait)
        self._stderr.close()

    async def _port(self) -> int:
        """The debugging port chromium chose: the first line of its ``DevToolsActivePort``."""
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = (self.profile / "chromium.log").read_text(errors="replace")
                raise RuntimeError(f"chromium exited ({self._process.returncode}):\n{log[-2000:]}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int(marker.read_text().splitlines()[0])
            await asyncio.sleep(0.1)
        raise TimeoutError(f"chromium gave no debugging port within {START_TIMEOUT_S:g} s")

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call a CDP method; its result, or ``RuntimeError`` with CDP's error."""
        call = next(self._ids)
        answer = self._waiting[call] = asyncio.get_running_loop().create_future()
        await self._ws.send_json({"id": call, "method": method, "params": params})
        message = await asyncio.wait_for(answer, LOAD_TIMEOUT_S)
        if "error" in message:
            raise RuntimeError(f"{method}: {message['error']}")
        result: dict[str, Any] = message["result"]
        return result

    async def _read(self) -> None:
        async for frame in self._ws:
            message = json.loads(frame.data)
            if "id" in message:
                self._waiting.pop(message["id"]).set_result(message)
            else:
                self._event(message["method"], message.get("params", {}))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.loadEventFired":
            self._loaded.set()
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details["text"])
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.errors.append(
                " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.errors.append(f"{entry['source']}: {entry['text']} {entry.get('url', '')}")

    async def open(self, url: str) -> float:
        """Load ``url`` and wait for its load event; the seconds that took."""
        self._loaded.clear()
        started = time.monotonic()
        navigated = await self.send("Page.navigate", url=url)
        if "errorText" in navigated:
            raise RuntimeError(f"cannot open {url}: {navigated['errorText']}")
        await asyncio.wait_for(self._loaded.wait(), LOAD_TIMEOUT_S)
        return time.monotonic() - started

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if a promise)."""
        answer = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression!r} raised: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (not just the window), written to ``path``."""
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
