"""Another package named `kernels` first on sys.path (Hugging Face's has that name) is refused in one line.

The other package is simulated by a folder kernels/__init__.py placed before the project root on PYTHONPATH,
the order in which a site-packages `kernels` shadows a project found through a path entry.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import shared.errors as errors

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "stage3_train" / "train.py"
RAN = "the other kernels package ran"


@pytest.fixture
def other_kernels(tmp_path):
    """A folder holding a package named kernels that is not ours; its code says so if it ever runs."""
    package = tmp_path / "elsewhere" / "kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"print({RAN!r})\n")
    return package


def _run(args, pythonpath, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flags", [[], ["--fused-kernels"]], ids=["dry-run", "fused-kernels"])
def test_a_stage_script_names_the_other_package_in_one_line(other_kernels, tmp_path, flags):
    result = _run([str(TRAIN), "--dry-run", *flags], [other_kernels.parent, ROOT], tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert str(other_kernels / "__init__.py") in lines[0] and "pip uninstall kernels" in lines[0]
    assert str(ROOT) in lines[0]  # the fix names the folder to put first
    assert RAN not in result.stdout  # refused by its location, before its code could run
    assert not (tmp_path / "runs").exists()

    result = _run([str(TRAIN), "--dry-run", *flags], [ROOT], tmp_path)  # the same command without it
    assert result.returncode == 0, result.stderr
    assert '"fused_kernels": ' + ("true" if flags else "false") in result.stdout


def test_a_library_import_raises_an_import_error_instead_of_exiting(other_kernels, tmp_path):
    # shared.errors is the module that refuses, so the caller can only catch it as an ImportError
    code = ("try:\n    import shared\nexcept ImportError as err:\n"
            "    print(type(err).__name__ + ': ' + str(err))\n")
    result = _run(["-c", code], [other_kernels.parent, ROOT], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ForeignKernelsPackage: ") and str(other_kernels / "__init__.py") in result.stdout


def test_a_package_installed_over_ours_is_caught_by_the_missing_marker(monkeypatch):
    """Same path as ours (another wheel overwrote site-packages/kernels), but without our marker."""
    impostor = types.ModuleType("kernels")
    impostor.__spec__ = importlib.util.spec_from_file_location("kernels", errors.OUR_KERNELS)
    impostor.__file__ = str(errors.OUR_KERNELS)
    monkeypatch.setitem(sys.modules, "kernels", impostor)
    with pytest.raises(errors.ForeignKernelsPackage, match="another package named kernels"):
        errors._import_our_kernels()


def test_our_kernels_passes_the_guard():
    import kernels

    assert errors._import_our_kernels() is kernels
    assert errors.USER_ERRORS == (errors.UserError, kernels.FusedKernelsUnavailable)


@pytest.mark.parametrize("main_file, ours", [("stage3_train/train.py", True), ("scripts/gpu_bench.py", True),
                                             ("stage3_train/run_figure.py", True), ("shared/records/run_figure.py", False),
                                             (".venv-ci/bin/pytest", False), ("/usr/bin/pytest", False)])
def test_only_the_projects_programs_count_as_started_from_it(monkeypatch, main_file, ours):
    """A virtual environment inside the checkout (CI makes one) runs pytest from there: that program is not
    ours, so the guard raises instead of exiting."""
    monkeypatch.setattr(sys.modules["__main__"], "__file__", str(errors.PROJECT_ROOT / main_file), raising=False)
    assert errors._started_from_this_project() is ours
