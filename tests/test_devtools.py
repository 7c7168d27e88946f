"""Fast tests of the developer tools (devtools.comfy_host, devtools.build_workflows) without the real host:
subprocess, the host's folders and the browser are replaced; ports are real sockets."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from devtools import build_workflows, comfy_host
from devtools.server import free_port

POPEN = subprocess.Popen  # real children for the tests (the `host` fixture forbids comfy_host's)


def _sleeper() -> subprocess.Popen:
    """A child process that sleeps for a minute (a stand-in for a server)."""
    return POPEN([sys.executable, "-c", "import time; time.sleep(60)"])


@pytest.fixture
def host(tmp_path, monkeypatch) -> Path:
    """comfy_host with its folders under tmp_path, install/prepare as no-ops and Popen forbidden."""
    root = tmp_path / "comfyhost"
    root.mkdir()
    monkeypatch.setattr(comfy_host, "ROOT", root)
    monkeypatch.setattr(comfy_host, "BASE", root / "base")
    monkeypatch.setattr(comfy_host, "install", lambda force=False: None)
    monkeypatch.setattr(comfy_host, "prepare", lambda: None)

    def no_popen(*args, **kwargs):
        raise AssertionError("a server was started")

    monkeypatch.setattr(comfy_host.subprocess, "Popen", no_popen)
    return root


@pytest.fixture
def listener():
    """A socket listening on 127.0.0.1 (another program's server); yields its port."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield s.getsockname()[1]


def _one_line_error(capsys, argv: list[str]) -> str:
    """Run comfy_host's main(argv), expect exit code 2 and, after any progress lines, one error line
    (no traceback); return that line."""
    assert comfy_host.main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if not ln.startswith("[comfy_host] ")]
    assert len(lines) == 1 and lines[0].startswith(f"comfy_host {argv[0]}: "), err
    return lines[0]


@pytest.mark.parametrize("cmd", ["start", "serve"])
def test_start_and_serve_refuse_a_port_in_use(host, listener, capsys, cmd):
    log = host / f"server-{listener}.log"
    log.write_text("the first server's log")
    err = _one_line_error(capsys, [cmd, "--port", str(listener)])
    assert f"port {listener} is in use: stop what listens there or pass --port" in err
    assert log.read_text() == "the first server's log"
    assert not (host / f"server-{listener}.pid").exists()


@pytest.mark.parametrize("address, reason", [("192.0.2.1", "Cannot assign requested address"),
                                             ("999.1.1.1", ""), ("{0}", "")])
def test_start_refuses_a_host_address_this_machine_lacks_in_one_line(host, capsys, address, reason):
    """Defect: an unknown name was a socket traceback, and an address of another machine was called a
    port in use."""
    err = _one_line_error(capsys, ["start", "--host", address, "--port", str(free_port())])
    assert f"--host {address}: not an address of this machine ({reason}" in err
    assert err.endswith("pass one it has, such as 127.0.0.1")


def test_start_refuses_while_its_pidfile_server_runs(host, capsys):
    port = free_port()
    child = _sleeper()
    try:
        (host / f"server-{port}.pid").write_text(str(child.pid))
        (host / f"server-{port}.log").write_text("the first server's log")
        err = _one_line_error(capsys, ["start", "--port", str(port)])
        assert f"pid {child.pid}" in err and f"stop --port {port}" in err
        assert (host / f"server-{port}.pid").read_text() == str(child.pid)
        assert (host / f"server-{port}.log").read_text() == "the first server's log"
    finally:
        child.kill()
        child.wait()


def test_start_ignores_a_stale_pidfile(host, monkeypatch):
    port = free_port()
    (host / f"server-{port}.pid").write_text("999999999")  # no such process
    class Reached(Exception):
        pass

    def port_check(*args):
        raise Reached

    monkeypatch.setattr(comfy_host, "check_port_free", port_check)
    with pytest.raises(Reached):  # went on past the pidfile to the port check
        comfy_host.start(port)


def test_wait_ready_ignores_an_answer_from_another_process():
    """The server we started exits while another program answers on the port: that is a failure."""
    proc = _sleeper()

    class Other(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            proc.kill()  # ours dies (say, its port was taken) while the other program answers
            proc.wait()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RuntimeError, match="ComfyUI exited with code"):
            comfy_host.wait_ready(f"http://127.0.0.1:{other.server_port}/", proc, timeout=10)
    finally:
        other.shutdown()
        other.server_close()
        proc.kill()
        proc.wait()


def _gone(pid: int) -> bool:
    """True when pid no longer runs (a zombie nobody reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (FileNotFoundError, ProcessLookupError):
        return True


SERVE_SCRIPT = """
import sys, time
from devtools import comfy_host
comfy_host.install = comfy_host.prepare = lambda *a, **k: None
comfy_host.server_command = lambda port, host: [sys.executable, "-c",
    "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)", {pidfile!r}]
comfy_host.wait_ready = lambda url, proc, timeout: 0.0
sys.exit(comfy_host.main(["serve", "--port", "{port}"]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_serve_takes_its_comfyui_down_with_it(tmp_path, sig):
    pidfile = tmp_path / "child.pid"
    script = SERVE_SCRIPT.format(pidfile=str(pidfile), port=free_port())
    serve = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=comfy_host.REPO,
                             stdout=subprocess.DEVNULL)
    child = None
    try:
        for _ in range(200):
            if pidfile.is_file() and pidfile.read_text():
                child = int(pidfile.read_text())
                break
            time.sleep(0.05)
        assert child is not None, "the fake ComfyUI did not start"
        serve.send_signal(sig)
        serve.wait(20)
        for _ in range(100):
            if _gone(child):
                break
            time.sleep(0.1)
        assert _gone(child), f"ComfyUI (pid {child}) still runs after serve got signal {sig}"
    finally:
        serve.kill()
        serve.wait()
        if child is not None and not _gone(child):
            os.kill(child, signal.SIGKILL)


def test_failed_pip_install_is_one_line(tmp_path, monkeypatch, capsys):
    fake_python = tmp_path / "venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.touch()
    monkeypatch.setattr(comfy_host, "CACHE", tmp_path)
    monkeypatch.setattr(comfy_host, "python", lambda: fake_python)
    monkeypatch.setattr(comfy_host, "is_installed", lambda: False)

    def run(cmd, **kwargs):
        if "install" in cmd:
            raise subprocess.CalledProcessError(1, cmd)
        return subprocess.CompletedProcess(cmd, 0)  # `pip --version`: the venv is whole

    monkeypatch.setattr(comfy_host.subprocess, "run", run)
    err = _one_line_error(capsys, ["install"])
    assert "pip failed installing torch" in err and "pip's error is above" in err
    assert "devtools.comfy_host install" in err and "--force" in err


@pytest.fixture
def stock_comfy(tmp_path, monkeypatch) -> bytes:
    """A vendored ComfyUI tree with input/example.png; returns that file's bytes."""
    comfy = tmp_path / "comfyui"
    (comfy / "input").mkdir(parents=True)
    (comfy / "input" / "example.png").write_bytes(b"stock example")
    monkeypatch.setattr(comfy_host, "comfy_dir", lambda: comfy)
    return b"stock example"


def _prepare(tmp_path, monkeypatch) -> Path:
    """Run comfy_host.prepare() into tmp_path/base (no install, no weights); returns the base."""
    base = tmp_path / "base"
    monkeypatch.setattr(comfy_host, "ROOT", tmp_path)
    monkeypatch.setattr(comfy_host, "BASE", base)
    monkeypatch.setattr(comfy_host, "is_installed", lambda: True)
    monkeypatch.setattr(comfy_host, "make_tiny", lambda: False)
    monkeypatch.delenv("TADISR_KOLORS", raising=False)
    monkeypatch.delenv("TADISR_KOLORS_DIR", raising=False)
    comfy_host.prepare()
    return base


def test_prepare_puts_example_png_and_the_batch_folder_in_the_base(tmp_path, monkeypatch, stock_comfy):
    """The batch example workflow walks input/tadisr_batch: it failed on `make serve`'s host, which had none."""
    from tadisr_core.demo import DEMO_INPUTS

    base = _prepare(tmp_path, monkeypatch)
    assert (base / "input" / "example.png").read_bytes() == stock_comfy
    batch = base / "input" / comfy_host.BATCH_FOLDER
    assert sorted(p.name for p in batch.iterdir()) == sorted(p.name for p in DEMO_INPUTS.glob("*.png"))
    assert (batch / "text_scene_1.png").read_bytes() == (DEMO_INPUTS / "text_scene_1.png").read_bytes()


def test_prepare_keeps_a_users_example_png_and_batch_folder(tmp_path, monkeypatch, stock_comfy):
    (tmp_path / "base" / "input" / "tadisr_batch").mkdir(parents=True)
    (tmp_path / "base" / "input" / "example.png").write_bytes(b"mine")
    base = _prepare(tmp_path, monkeypatch)
    assert (base / "input" / "example.png").read_bytes() == b"mine"
    assert list((base / "input" / "tadisr_batch").iterdir()) == []


def test_build_workflows_leaves_the_dev_hosts_input_alone(tmp_path, monkeypatch, stock_comfy):
    """`make workflows` runs its server in a throwaway base: the serve base's input/ is not changed."""
    base = _prepare(tmp_path, monkeypatch)
    users = {"tadisr_batch/mine.png": b"my photo", "example.png": b"mine", build_workflows.SAMPLE: b"mine too"}
    for rel, data in users.items():
        (base / "input" / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / "input" / rel).write_bytes(data)
    seen = {}

    class FakeServer:
        def __init__(self, base=None, **kwargs):
            self.input_dir = Path(base or comfy_host.BASE) / "input"
            self.url = "http://127.0.0.1:1/"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            seen["inputs"] = sorted(p.relative_to(self.input_dir).as_posix() for p in self.input_dir.rglob("*.png"))
            seen["models"] = (self.input_dir.parent / "models").resolve()

    class FakeBrowser:
        __enter__ = lambda self: self  # noqa: E731
        __exit__ = goto = wait_for = eval = lambda self, *a, **k: None  # noqa: E731

    monkeypatch.setattr(build_workflows, "ComfyServer", FakeServer)
    monkeypatch.setattr(build_workflows, "Browser", FakeBrowser)
    monkeypatch.setattr(build_workflows, "OUT", tmp_path / "example_workflows")
    monkeypatch.setattr(build_workflows, "REPO", tmp_path)  # the template titles go to tmp_path/locales
    monkeypatch.setattr(build_workflows.time, "sleep", lambda s: None)
    build_workflows.build([], graph_thumbnails=True)
    assert {rel: (base / "input" / rel).read_bytes() for rel in users} == users
    assert seen["inputs"] == sorted(["example.png", build_workflows.SAMPLE,
                                     f"tadisr_batch/{build_workflows.BATCH_SCENE.name}"])
    assert seen["models"] == (base / "models").resolve()
