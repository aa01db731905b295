"""Loading a stage script (or scripts/*.py) as a module, so tests can call its main() in-process."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def load_script(path: Path, name: str | None = None):
    """The module of the script at `path` (its top-level code run once), named `name` or <stem>_under_test."""
    spec = importlib.util.spec_from_file_location(name or f"{Path(path).stem}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
