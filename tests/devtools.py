"""Headless Chromium driven over the Chrome DevTools Protocol (CDP), for the tests that look at MLflow's UI.

Why CDP and not selenium: Chromium speaks CDP itself, and its client is one websocket, for which the
``websockets`` package is already installed with the ``server`` extra (MLflow's uvicorn[standard] needs it),
so the tests add no dependency and no driver. Selenium would add selenium and its own dependencies, plus
a chromedriver that must match the browser's version exactly. What the tests need (open a URL, read the
DOM with JavaScript, type into a box, take a screenshot) is four CDP methods.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

# Headless, and nothing that reaches the network or slows the start: no GPU, sync, component updates
# or first-run dialogs; --no-sandbox because tests (and CI containers) run as root.
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """One headless Chromium with a fresh profile in ``profile``, showing one page of ``width`` x ``height``."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 900, start_timeout_s: float = 60):
        profile.mkdir(parents=True, exist_ok=True)
        self.log = open(profile.parent / f"{profile.name}.log", "wb")
        self.process = subprocess.Popen([chromium_binary(), *FLAGS, f"--user-data-dir={profile}",
                                         "--remote-debugging-port=0", f"--window-size={width},{height}",
                                         "about:blank"],
                                        stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                        start_new_session=True)
        port_file = profile / "DevToolsActivePort"  # Chromium writes the port it picked here
        deadline = time.monotonic() + start_timeout_s
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not start; see {self.log.name}")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as answer:
            [page] = [target for target in json.load(answer) if target["type"] == "page"]
        self.page = Page(page["webSocketDebuggerUrl"])

    def close(self) -> None:
        """End the browser's process group (it was started in its own)."""
        if hasattr(self, "page"):
            self.page.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(10)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


class Page:
    """One tab: CDP commands over its websocket, answered in order (no events are enabled)."""

    def __init__(self, websocket_url: str):
        from websockets.sync.client import connect

        self.connection = contextlib.ExitStack()  # websockets wants its connections used as context managers
        self.socket = self.connection.enter_context(connect(websocket_url, max_size=None, open_timeout=30))
        self.last_id = 0

    def close(self) -> None:
        self.connection.close()

    def call(self, method: str, **params):
        self.last_id += 1
        self.socket.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60, what: str = ""):
        """Poll ``expression`` until it is truthy (one that throws, e.g. while the page has no body yet, counts
        as false); fail with the page's text when it never is."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return false; }} }})()")
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''") or ""
                raise AssertionError(f"waited {timeout_s:.0f} s for {what or expression}; the page says: "
                                     f"{' | '.join(text.split(chr(10))[:80])}")
            time.sleep(0.25)

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def type_into(self, selector: str, text: str) -> None:
        """Focus the element and type ``text`` as keyboard input (React sees real input events)."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path
