"""The house rules of the code's layout, checked on the source itself (scripts/layout.py reads it):

- the folders of shared/ form layers: each imports only from the layers below it (errors.py and flags.py
  at the bottom, interface/ on top), so no two folders import each other; kernels/ imports nothing
  from shared/;
- no function is over 60 lines and none takes more than 8 parameters (a Triton kernel's or a
  torch.library op's parameter list is fixed by the kernel ABI or the op schema, so those are exempt
  from the count, not from the length);
- a function-local import is one of an optional dependency (or of a module that must load late);
- no arithmetic formula is written in two functions, and classifier-free guidance is written once;
- the README's picture of the layers is the one the code draws.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from scripts import layout

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60
MAX_PARAMETERS = 8

# Function-local imports the rules allow, with the reason: optional extras (setup.py's "test" and
# "serve"), Triton (Linux only, and it must load after TRITON_INTERPRET is chosen), and modules that
# must be imported at a given moment.
LATE_IMPORTS = {
    "fastapi": "the serve extra", "pydantic": "the serve extra (with fastapi)", "uvicorn": "the serve extra",
    "torch_fidelity": "optional: Inception FID", "torchmetrics.image": "needs torch-fidelity / scipy",
    "torch.utils.tensorboard": "optional: --tensorboard", "safetensors": "optional: the diffusers export",
    "triton": "Linux only; loads after TRITON_INTERPRET is chosen",
    "kernels.flash_attention": "imports Triton", "kernels.group_norm": "imports Triton",
    "torchvision": "only for downloads; 1.2 s to import",
}
# (file, module) pairs: a module that must load at one moment in that file.
LATE_IMPORTS_IN = {
    ("kernels/build.py", "torch"): "setup.py reads build.py where torch is not installed yet",
    ("kernels/check_cuda_build.py", "torch"): "cpp_extension reads CUDA_HOME once, when torch loads",
    ("shared/errors.py", "kernels"): "the name guard looks the package up before importing it",
}


def _allowed_late(path: str, module: str) -> bool:
    def within(prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")
    return any(within(m) for m in LATE_IMPORTS) or any(p == path and within(m) for p, m in LATE_IMPORTS_IN)


def test_shared_folders_form_layers():
    graph = layout.import_graph(ROOT)
    rank = {name: i for i, layer in enumerate(layout.LAYERS) for name in layer}
    assert set(graph) <= set(rank), f"place {sorted(set(graph) - set(rank))} in scripts/layout.py's LAYERS"
    upward = [f"{src} imports {dst}" for src, targets in graph.items() for dst in targets
              if dst != src and rank[dst] >= rank[src]]
    assert not upward, "imports that do not go down the layers: " + "; ".join(sorted(upward))


def test_kernels_import_nothing_from_shared():
    found = [f"{path}: {module}" for path, module, _ in layout.imports(ROOT, "kernels")
             if module == "shared" or module.startswith("shared.")]
    assert not found, found


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The checker itself: a model module importing training is reported."""
    (tmp_path / "shared" / "model").mkdir(parents=True)
    (tmp_path / "shared" / "model" / "bad.py").write_text("def f():\n    from shared.training import loop\n")
    assert layout.import_graph(tmp_path) == {"model": {"training"}}


def _functions():
    for path, tree in layout.sources(ROOT):
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def test_no_function_is_longer_than_60_lines():
    long = [f"{path}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
            for path, fn in _functions() if fn.end_lineno - fn.lineno + 1 > MAX_LINES]
    assert not long, long


def test_no_function_takes_more_than_8_parameters():
    many = [f"{path}:{fn.lineno} {fn.name} ({layout.parameter_count(fn)})" for path, fn in _functions()
            if layout.parameter_count(fn) > MAX_PARAMETERS and not layout.signature_is_fixed(fn)]
    assert not many, many


def test_function_local_imports_are_optional_dependencies():
    late = [f"{path}: {module} in {where}" for path, module, where in layout.imports(ROOT, *layout.CODE_FOLDERS)
            if where is not None and not _allowed_late(path, module)]
    assert not late, late


def test_no_formula_is_written_in_two_functions():
    repeated = {formula: sorted(places) for formula, places in layout.formulas(ROOT).items() if len(places) > 1}
    assert not repeated, repeated


def test_the_formula_check_finds_a_copy(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "a.py").write_text("def f(x, m, s):\n    return (x - m) / s * 2\n")
    (tmp_path / "shared" / "b.py").write_text("def g(y, m, s):\n    return (y.x - m) / s * 2\n")
    assert layout.formulas(tmp_path)["(x - m) / s * 2"] == {"shared/a.py:f", "shared/b.py:g"}
    (tmp_path / "shared" / "b.py").write_text("def g(y, m, s):\n    return (y - m) * s * 2\n")
    assert all(len(p) == 1 for p in layout.formulas(tmp_path).values())


def test_guidance_is_written_once():
    """ε̃ = ε_u + w·(ε_c − ε_u), in any names, appears in the code once: in cfg_combine."""
    places = sorted(layout.guidance_formulas(ROOT))
    assert places == ["shared/diffusion/guidance.py:cfg_combine"], places


@pytest.mark.parametrize("code, found", [("u + w * (c - u)", True), ("a.u + w * (c - a.u)", True),
                                         ("u + w * (c - v)", False), ("u * w * (c - u)", False)])
def test_the_guidance_pattern(tmp_path, code, found):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "g.py").write_text(f"def f(u, v, w, c, a):\n    return {code}\n")
    assert bool(layout.guidance_formulas(tmp_path)) is found


def test_readme_draws_the_layers_the_code_has():
    readme = (ROOT / "README.md").read_text()
    picture = layout.picture(ROOT)
    assert picture in readme, "README.md's layer picture is out of date; paste `python scripts/layout.py`:\n" + picture
