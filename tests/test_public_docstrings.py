"""Every public function and class of the library and of training says what it is (house rule)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import tadisr_core
import training


def _undocumented(package) -> list[str]:
    """Public functions and classes defined in `package`'s modules with no docstring of their own (a
    dataclass's generated "Name(field, ...)" does not count)."""
    missing = []
    for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
        if info.name.endswith(".__main__"):  # runs a command when imported
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            doc = (obj.__doc__ or "").strip()
            if not doc or (inspect.isclass(obj) and doc.startswith(f"{name}(")):
                missing.append(f"{module.__name__}.{name}")
    return missing


def test_library_and_training_document_every_public_function_and_class():
    """Review: model.Encoded / Denoised / Decoded, the CLI's add_* builders, ldm_names.strip_prefix and
    evaluate.build_parser had none."""
    assert _undocumented(tadisr_core) == []
    assert _undocumented(training) == []
