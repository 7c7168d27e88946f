"""Development tool: a real ComfyUI 0.3.75 server process with this repo linked in as the `tadisr` pack.

The host venv and base directory come from devtools.comfy_host (`install`, `prepare`); this client
runs from the development .venv:

    with ComfyServer() as server:
        assert "LoadImage" in server.object_info()
        pid = server.queue(prompt)                 # API-format dict; PromptRejected on HTTP 400
        entry = server.wait(pid, timeout=120)      # the /history entry
        assert entry["status"]["status_str"] == "success"
"""

from __future__ import annotations

import atexit
import json
import mimetypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import websocket

from . import comfy_host

REPO = comfy_host.REPO
PACK_NAME = comfy_host.PACK_NAME


def ensure_host(python: str | None = None) -> None:
    """Run `comfy_host install` and `prepare` (both idempotent); raises with the output on failure."""
    for step in ("install", "prepare"):
        res = subprocess.run([python or sys.executable, "-m", "devtools.comfy_host", step], cwd=REPO,
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"devtools.comfy_host {step} failed ({res.returncode}):\n"
                               f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyError(RuntimeError):
    """The server misbehaved: did not start, crashed, timed out, or answered unexpectedly."""


class PromptRejected(ComfyError):
    """POST /prompt answered with an error (HTTP 400: validation). `.body` is the parsed JSON."""

    def __init__(self, status: int, body):
        self.status, self.body = status, body
        self.error = body.get("error") if isinstance(body, dict) else None
        self.node_errors = body.get("node_errors", {}) if isinstance(body, dict) else {}
        super().__init__(f"prompt rejected (HTTP {status}): {json.dumps(body)[:2000]}")


class ComfyServer:
    """A ComfyUI server in a background process group; a context manager that always stops it."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_path: str | Path | None = None,
                 base: str | Path | None = None, output_dir: str | Path | None = None,
                 extra_args: list[str] | None = None, startup_timeout: float = 60.0, pack: str = PACK_NAME,
                 allow_pack_import_failure: bool = False):
        self.host, self.port = host, port or free_port()
        self.base = Path(base or comfy_host.BASE)
        self.input_dir = self.base / "input"
        self.output_dir = Path(output_dir) if output_dir else self.base / "output"
        self.log_path = Path(log_path or comfy_host.ROOT / "logs" / f"server-{self.port}.log")
        self.extra_args = list(extra_args or [])
        if output_dir:
            self.extra_args += ["--output-directory", str(self.output_dir)]
        self.startup_timeout, self.pack = startup_timeout, pack
        self.allow_pack_import_failure = allow_pack_import_failure
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Base URL with a trailing slash."""
        return f"http://{self.host}:{self.port}/"

    # ---- process ---------------------------------------------------------------------------------
    def start(self) -> "ComfyServer":
        """Start the process and wait until /object_info answers (ComfyError with the log tail if not)."""
        if not comfy_host.is_installed():
            raise ComfyError("host venv missing: run `python3 -m devtools.comfy_host install` first")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.base / "user").mkdir(parents=True, exist_ok=True)
        cmd = comfy_host.server_command(self.port, self.host, self.base, self.extra_args)
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=comfy_host.server_env(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=comfy_host.die_with_parent)
        atexit.register(self.stop)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise ComfyError(f"ComfyUI exited with code {self.proc.returncode} during startup")
                self._check_pack()
                if self._answers():
                    break
                if time.monotonic() - t0 > self.startup_timeout:
                    raise ComfyError(f"ComfyUI did not answer /object_info within {self.startup_timeout:.0f} s")
                time.sleep(0.2)
            self._check_pack()
        except ComfyError as e:
            self.stop()
            raise ComfyError(f"{e}\n--- {self.log_path} (tail) ---\n{self.log_tail()}") from None
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "object_info", timeout=10) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _check_pack(self) -> None:
        if not self.allow_pack_import_failure and (lines := self.pack_import_failures()):
            raise ComfyError(f"custom node pack '{self.pack}' failed to import: {lines[0].strip()}")

    def pack_import_failures(self) -> list[str]:
        """Log lines saying our pack failed to import ('IMPORT FAILED' / 'Cannot import' / 'Skip')."""
        needle = f"custom_nodes{os.sep}{self.pack}"
        marks = ("IMPORT FAILED", "Cannot import", "Skip ")
        return [ln for ln in self.log_text().splitlines() if needle in ln and any(m in ln for m in marks)]

    def stop(self) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after 10 s. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # stray children of the group, if any
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def alive(self) -> bool:
        """True while the server process runs."""
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        """The whole server log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        """The last `chars` characters of the server log."""
        return self.log_text()[-chars:]

    # ---- HTTP --------------------------------------------------------------------------------------
    def request(self, method: str, path: str, data: bytes | None = None, headers: dict | None = None,
                timeout: float = 30.0) -> tuple[int, bytes]:
        """One HTTP request; returns (status, body) for any status code."""
        req = urllib.request.Request(self.url + path.lstrip("/"), data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str, timeout: float = 30.0):
        """GET path and parse JSON (ComfyError on a non-200 answer)."""
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyError(f"GET /{path.lstrip('/')} -> HTTP {status}: {body[:500]!r}")
        return json.loads(body)

    def post_json(self, path: str, payload, timeout: float = 30.0) -> tuple[int, bytes]:
        """POST a JSON body; returns (status, body)."""
        return self.request("POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"},
                            timeout)

    def object_info(self, node_class: str | None = None) -> dict:
        """GET /object_info (all node types) or /object_info/<class> (that entry's dict)."""
        if node_class:
            return self.get_json(f"object_info/{urllib.parse.quote(node_class)}")[node_class]
        return self.get_json("object_info")

    def queue(self, prompt: dict, extra_pnginfo: dict | None = None, client_id: str | None = None) -> str:
        """POST /prompt with an API-format prompt; returns the prompt_id. PromptRejected on an error answer."""
        payload = {"prompt": prompt, "client_id": client_id or self.client_id}
        if extra_pnginfo is not None:
            payload["extra_data"] = {"extra_pnginfo": extra_pnginfo}
        status, body = self.post_json("prompt", payload)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {"raw": body.decode(errors="replace")}
        if status != 200 or "prompt_id" not in parsed:
            raise PromptRejected(status, parsed)
        return parsed["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.1) -> dict:
        """Poll /history/<id> until the prompt finished (success or error); returns the history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get_json(f"history/{prompt_id}").get(prompt_id)
            if entry and (entry.get("status") or {}).get("completed") is not None:
                return entry
            if not self.alive():
                raise ComfyError(f"server died while running {prompt_id}\n{self.log_tail()}")
            time.sleep(poll)
        raise ComfyError(f"prompt {prompt_id} not finished after {timeout:.0f} s\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 120.0, extra_pnginfo: dict | None = None) -> dict:
        """queue() + wait(); returns the history entry whatever its status."""
        return self.wait(self.queue(prompt, extra_pnginfo), timeout)

    def wait_idle(self, timeout: float = 180.0, settle: float = 0.5) -> None:
        """Wait until the queue has nothing running or pending (after `settle` s for a just-queued prompt)."""
        deadline = time.monotonic() + timeout
        time.sleep(settle)
        while time.monotonic() < deadline:
            q = self.get_json("queue")
            if not q["queue_running"] and not q["queue_pending"]:
                return
            time.sleep(0.3)
        raise ComfyError(f"the queue did not drain in {timeout:.0f} s\n{self.log_tail()}")

    def interrupt(self) -> None:
        """POST /interrupt (stops the running prompt at its next interruption check)."""
        self.post_json("interrupt", {})

    def upload_image(self, path: str | Path, name: str | None = None, subfolder: str = "",
                     overwrite: bool = True) -> dict:
        """POST /upload/image (multipart); returns {"name", "subfolder", "type"} as the server answers."""
        path = Path(path)
        name = name or path.name
        boundary = uuid.uuid4().hex
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        fields = [("overwrite", "true" if overwrite else "false"), ("type", "input"), ("subfolder", subfolder)]
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in fields]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        status, body = self.request("POST", "upload/image", b"".join(parts),
                                    {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if status != 200:
            raise ComfyError(f"upload of {path} failed: HTTP {status}: {body[:500]!r}")
        return json.loads(body)

    def output_file(self, image: dict) -> Path:
        """Path of an output entry such as history["outputs"][node]["images"][0]."""
        roots = {"output": self.output_dir, "input": self.input_dir, "temp": self.base / "temp"}
        return roots[image.get("type", "output")] / image.get("subfolder", "") / image["filename"]

    def progress(self) -> "ProgressCollector":
        """A websocket listener for this server's client_id; use as a context manager around queue()."""
        return ProgressCollector(self)


class ProgressCollector:
    """Collects the JSON messages ComfyUI sends on /ws for one client id (progress, executing, ...)."""

    def __init__(self, server: ComfyServer):
        self.messages: list[dict] = []
        self._cond = threading.Condition()
        self._ws = websocket.create_connection(f"ws://{server.host}:{server.port}/ws?clientId={server.client_id}",
                                               timeout=None)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                msg = self._ws.recv()
                item = json.loads(msg) if isinstance(msg, str) else {"type": "binary", "size": len(msg)}
                with self._cond:
                    self.messages.append(item)
                    self._cond.notify_all()
        except (websocket.WebSocketException, OSError, ValueError):
            pass

    def of_type(self, kind: str, prompt_id: str | None = None) -> list[dict]:
        """The `data` of messages of one type (e.g. "progress"), optionally for one prompt."""
        with self._cond:
            out = [m.get("data", {}) for m in self.messages if m.get("type") == kind]
        return [d for d in out if prompt_id is None or d.get("prompt_id") == prompt_id]

    def wait_for(self, predicate, timeout: float = 30.0) -> dict:
        """Block until a message satisfies predicate(message); returns it (TimeoutError if none)."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for m in self.messages[seen:]:
                    if predicate(m):
                        return m
                seen = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching websocket message in {timeout:.0f} s")
                self._cond.wait(left)

    def close(self) -> None:
        """Close the websocket."""
        self._ws.close()
        self._thread.join(5)

    def __enter__(self) -> "ProgressCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
