"""Development tool: headless Chromium driven over the DevTools protocol (CDP).

    with Browser() as b:
        b.goto(server.url)
        b.wait_for("window.app && window.app.graph && window.LiteGraph", timeout=60)
        n = b.eval("Object.keys(LiteGraph.registered_node_types).length")
        b.screenshot("artifacts/screenshots/x.png")
        errors = b.console_errors()

Synchronous: a reader thread files CDP replies by id and collects console messages and page errors.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import websocket

from .comfy_host import die_with_parent

CHROMIUM = os.environ.get("TADISR_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio"]

# Console errors the offline ComfyUI 0.3.75 frontend always logs: optional files it probes for (404; the
# core templates when the template browser opens),
# its content-security policy blocking outside hosts, and one TypeError in its own bundle at load.
KNOWN_NOISE = [
    (r"Failed to load resource.*404", r"/(user\.css|favicon\.ico|api/userdata|templates/index\.json)"),
    (r"^Error loading core workflow templates", ""),  # comfyui-workflow-templates is not installed
    (r"violates the following Content Security Policy directive", ""),
    (r"^TypeError: Cannot read properties of undefined \(reading 'id'\)\n\s+at onChange \(\S+/assets/", ""),
]


def is_known_noise(message: dict) -> bool:
    """True for a console entry that the host's own frontend produces offline (not our pack's doing)."""
    return any(re.search(text, message["text"]) and re.search(url, message.get("url", ""))
               for text, url in KNOWN_NOISE)


class CDPError(RuntimeError):
    """A DevTools command failed, or the browser went away."""


class JSError(RuntimeError):
    """The evaluated JavaScript threw; the message is the exception's description."""


def _format_remote(obj: dict) -> str:
    if "value" in obj:
        v = obj["value"]
        return v if isinstance(v, str) else json.dumps(v)
    return obj.get("description") or obj.get("unserializableValue") or obj.get("type", "?")


class Browser:
    """One headless Chromium with one page; a context manager that always kills the browser."""

    def __init__(self, chromium: str = CHROMIUM, window_size: tuple[int, int] = (1400, 900),
                 startup_timeout: float = 30.0):
        self.chromium, self.window_size, self.startup_timeout = chromium, window_size, startup_timeout
        self.console: list[dict] = []  # {"type": "log"|"error"|"warning"|"exception"|..., "text": str}
        self.proc: subprocess.Popen | None = None
        self._ws: websocket.WebSocket | None = None
        self._ids = itertools.count(1)
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._tmp: str | None = None

    # ---- process ---------------------------------------------------------------------------------
    def start(self) -> "Browser":
        """Launch Chromium, attach to its page and enable the Page/Runtime/Log domains."""
        if not Path(self.chromium).exists():
            raise CDPError(f"{self.chromium} not found: run scripts/install_test_deps.sh")
        self._tmp = tempfile.mkdtemp(prefix="tadisr-chromium-")
        w, h = self.window_size
        cmd = [self.chromium, *FLAGS, f"--window-size={w},{h}", "--remote-debugging-port=0",
               f"--user-data-dir={self._tmp}", "about:blank"]
        log = open(Path(self._tmp) / "chromium.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=die_with_parent)
        log.close()
        try:
            port = self._devtools_port()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                targets = json.load(r)
            page = next(t for t in targets if t.get("type") == "page")
            # no Origin header: Chromium refuses DevTools connections from unknown origins
            self._ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=None, suppress_origin=True)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
            for domain in ("Page", "Runtime", "Log"):
                self.send(f"{domain}.enable")
            # --window-size includes the (invisible) browser frame: pin the page's viewport exactly
            self.send("Emulation.setDeviceMetricsOverride", {"width": w, "height": h, "deviceScaleFactor": 1,
                                                            "mobile": False})
        except Exception as e:
            tail = self.log_tail()
            self.close()
            raise CDPError(f"Chromium did not start: {e}\n--- chromium log ---\n{tail}") from None
        return self

    def _devtools_port(self) -> int:
        """Chromium writes the port it picked (we pass 0, so no port races) into DevToolsActivePort."""
        f = Path(self._tmp) / "DevToolsActivePort"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CDPError(f"chromium exited with code {self.proc.returncode}")
            if f.is_file():
                lines = f.read_text().split()
                if lines:
                    return int(lines[0])
            time.sleep(0.05)
        raise CDPError(f"no DevTools port after {self.startup_timeout:.0f} s")

    def log_tail(self, chars: int = 3000) -> str:
        """The end of Chromium's own stdout/stderr."""
        try:
            return (Path(self._tmp) / "chromium.log").read_text(errors="replace")[-chars:]
        except (TypeError, OSError):
            return ""

    def close(self) -> None:
        """Close the connection, kill Chromium's process group, remove its profile. Idempotent."""
        if self._ws is not None:
            self._ws.close()
            self._ws = None
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
                except ProcessLookupError:
                    pass
            try:  # renderer/zygote children left in the group
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "Browser":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- protocol --------------------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                msg = json.loads(self._ws.recv())
                with self._cond:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self._on_event(msg.get("method", ""), msg.get("params", {}))
                    self._cond.notify_all()
        except (websocket.WebSocketException, OSError, ValueError, AttributeError):
            with self._cond:
                self._cond.notify_all()

    def _on_event(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(_format_remote(a) for a in params.get("args", []))
            self.console.append({"type": params.get("type", "log"), "text": text})
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            text = (d.get("exception") or {}).get("description") or d.get("text", "")
            self.console.append({"type": "exception", "text": text})
        elif method == "Page.javascriptDialogOpening":
            # e.g. "leave with unsaved changes?" on navigation: accept, without waiting (this is the reader thread)
            with self._send_lock:
                self._ws.send(json.dumps({"id": next(self._ids), "method": "Page.handleJavaScriptDialog",
                                          "params": {"accept": True}}))
        elif method == "Log.entryAdded":
            e = params.get("entry", {})
            self.console.append({"type": e.get("level", "info"), "text": e.get("text", ""),
                                 "url": e.get("url", ""), "source": e.get("source", "")})

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        """Send one CDP command and return its `result` (CDPError on an error reply or timeout)."""
        if self._ws is None:
            raise CDPError("browser not started")
        msg_id = next(self._ids)
        with self._send_lock:
            self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        with self._cond:
            while msg_id not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CDPError(f"{method}: no reply within {timeout:.0f} s")
                if self._reader is None or not self._reader.is_alive():
                    raise CDPError(f"{method}: connection to Chromium lost")
                self._cond.wait(min(left, 0.5))
            reply = self._replies.pop(msg_id)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    # ---- page API --------------------------------------------------------------------------------
    def eval(self, js: str, await_promise: bool = True, timeout: float = 30.0):
        """Evaluate a JS expression in the page; returns its JSON value (JSError if it throws).

        For statements use an async IIFE, e.g. `(async () => { ...; return x; })()`, or run().
        """
        res = self.send("Runtime.evaluate", {"expression": js, "awaitPromise": await_promise,
                                             "returnByValue": True, "userGesture": True}, timeout=timeout)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise JSError((d.get("exception") or {}).get("description") or d.get("text", "JS error"))
        return res.get("result", {}).get("value")

    def run(self, body: str, timeout: float = 30.0):
        """Run a function body (may use await and return) in the page; returns its JSON value."""
        return self.eval(f"(async () => {{\n{body}\n}})()", timeout=timeout)

    def goto(self, url: str, timeout: float = 30.0) -> None:
        """Navigate and wait until document.readyState is 'complete' (the console log starts afresh)."""
        self.console = []
        res = self.send("Page.navigate", {"url": url}, timeout=timeout)
        if res.get("errorText"):
            raise CDPError(f"navigation to {url} failed: {res['errorText']}")
        self.wait_for(f"document.readyState === 'complete' && location.href.startsWith({json.dumps(url)})",
                      timeout=timeout)

    def leave_page(self) -> None:
        """Go to a blank page: an open ComfyUI page keeps redrawing its canvas (a tenth of a core while it
        stays open)."""
        self.goto("about:blank")

    def wait_for(self, js_expr: str, timeout: float = 30.0, interval: float = 0.1):
        """Poll a JS expression until it is truthy; returns its value (TimeoutError with console tail)."""
        deadline = time.monotonic() + timeout
        last_error = None
        while True:
            try:
                value = self.eval(js_expr, timeout=max(1.0, deadline - time.monotonic()))
                if value:
                    return value
            except (JSError, CDPError) as e:  # e.g. context destroyed while navigating
                last_error = e
            if time.monotonic() >= deadline:
                tail = "\n".join(f"[{m['type']}] {m['text'][:300]}" for m in self.console[-15:])
                raise TimeoutError(f"not true after {timeout:.0f} s: {js_expr}\nlast error: {last_error}\n"
                                   f"--- console (tail) ---\n{tail}")
            time.sleep(interval)

    def screenshot(self, path: str | Path, full_page: bool = False) -> Path:
        """Save a PNG of the viewport (or the whole page) to path; returns the path."""
        params = {"format": "png", "captureBeyondViewport": full_page}
        data = self.send("Page.captureScreenshot", params, timeout=60)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def console_errors(self, include_noise: bool = False) -> list[str]:
        """Texts of console errors and uncaught exceptions of this page (KNOWN_NOISE left out unless asked)."""
        return [m["text"] for m in self.console if m["type"] in ("error", "exception", "assert")
                and (include_noise or not is_known_noise(m))]
