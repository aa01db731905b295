"""The layout of the code, read from the source: the layers of shared/, what each folder imports, and the
measures tests/test_layout.py holds the code to (function length and parameters, late imports, repeated
formulas).

    python scripts/layout.py        # prints the picture of the layers that README.md shows

Everything here parses files with `ast`; nothing is imported or run.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterator

# The layers of shared/, bottom first: a folder (or top-level module) imports only from lower layers.
LAYERS = [("errors",), ("flags", "model"), ("data", "diffusion"), ("records",), ("training", "evaluation"),
          ("interface",)]
# Where the project's code lives (tests are references, written independently of it).
CODE_FOLDERS = ("shared", "kernels", "scripts", "benches", "stage1_forward", "stage2_unet", "stage3_train",
                "stage4_sampling", "stage5_guidance")
# Decorators whose function's parameter list is fixed by something else: a Triton kernel's ABI, or a
# torch.library op's schema (the op, its fake and its autograd hooks).
FIXED_SIGNATURES = {"jit", "custom_op", "triton_op", "register_fake", "register_kernel", "register_autograd"}
ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.MatMult)
# A formula: at least this many arithmetic operators, of at least two kinds (x·y·z is a size, not a formula).
FORMULA_OPERATORS = 2


def sources(root: Path, *folders: str) -> Iterator[tuple[str, ast.Module]]:
    """(path relative to root, parsed module) of every .py file below the given folders of root."""
    for folder in folders or CODE_FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            yield path.relative_to(root).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _functions(tree: ast.AST, outer: str | None = None) -> Iterator[tuple[ast.AST, str | None]]:
    """(node, name of the innermost enclosing function or None) for every node of tree."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield child, outer
            yield from _functions(child, child.name)
        else:
            yield child, outer
            yield from _functions(child, outer)


def imports(root: Path, *folders: str) -> Iterator[tuple[str, str, str | None]]:
    """(file, imported module, enclosing function or None) of every import below the folders; for
    `from package import name` the module is package.name (a submodule, or a name the package holds)."""
    for path, tree in sources(root, *folders):
        for node, where in _functions(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, alias.name, where
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    yield path, f"{node.module}.{alias.name}", where


def _folder_of_file(path: str) -> str | None:
    parts = path.split("/")
    if parts[0] != "shared" or parts[-1] == "__init__.py" and len(parts) == 2:
        return None
    return parts[1] if len(parts) > 2 else parts[1][:-len(".py")]


def _folders(root: Path) -> set[str]:
    shared = root / "shared"
    return ({p.name for p in shared.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
            | {p.stem for p in shared.glob("*.py") if p.name != "__init__.py"})


def import_graph(root: Path) -> dict[str, set[str]]:
    """shared/ folder (or top-level module) → the other shared/ folders it imports from."""
    folders, graph = _folders(root), defaultdict(set)
    for path, module, _ in imports(root, "shared"):
        parts, source = module.split("."), _folder_of_file(path)
        # shared.X.Y names folder X; `from shared import X` a folder or module X, else a name the package holds
        is_folder = len(parts) > 2 or len(parts) == 2 and parts[1] in folders
        if source is not None and parts[0] == "shared" and is_folder and parts[1] != source:
            graph[source].add(parts[1])
    return dict(graph)


def parameter_count(fn: ast.FunctionDef) -> int:
    """Parameters of a def, *args and **kwargs included, self and cls not."""
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args]
    count = len(names) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
    return count - (1 if names and names[0] in ("self", "cls") else 0)


def _decorator_names(fn: ast.FunctionDef) -> set[str]:
    names = set()
    for d in fn.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        names.add(target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", ""))
    return names


def signature_is_fixed(fn: ast.FunctionDef) -> bool:
    """Whether a def's parameters are a Triton kernel's ABI or a torch.library op's schema."""
    return bool(_decorator_names(fn) & FIXED_SIGNATURES)


class _Normalise(ast.NodeTransformer):
    """obj.name → name: the same formula on another object's attribute is the same formula."""

    def visit_Attribute(self, node):
        return ast.copy_location(ast.Name(id=node.attr, ctx=ast.Load()), node)


def _operators(node: ast.AST) -> list[type]:
    return [type(n.op) for n in ast.walk(node) if isinstance(n, ast.BinOp) and isinstance(n.op, ARITHMETIC)]


def _is_formula(node: ast.AST) -> bool:
    ops = _operators(node)
    return isinstance(node, ast.BinOp) and len(ops) >= FORMULA_OPERATORS and len(set(ops)) >= 2


def _in_triton_kernel(tree: ast.Module) -> set[str]:
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and "jit" in _decorator_names(n)}


def formulas(root: Path, *folders: str) -> dict[str, set[str]]:
    """Normalised arithmetic expression → the functions ("file:function") that write it. Triton kernel
    bodies are left out: their index arithmetic is addressing, and the kernels are tested against the
    references that hold the formulas."""
    found = defaultdict(set)
    for path, tree in sources(root, *folders):
        kernels = _in_triton_kernel(tree)
        for node, where in _functions(tree):
            if where is None or where in kernels or not _is_formula(node):
                continue
            text = ast.unparse(_Normalise().visit(ast.parse(ast.unparse(node), mode="eval")))
            found[text].add(f"{path}:{where}")
    return dict(found)


def _same(a: ast.AST, b: ast.AST) -> bool:
    return ast.dump(_Normalise().visit(a)) == ast.dump(_Normalise().visit(b))


def _is_guidance(node: ast.AST) -> bool:
    """u + w·(c − u) in either order of the sum and of the product: classifier-free guidance's shape."""
    if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add)):
        return False
    for base, term in ((node.left, node.right), (node.right, node.left)):
        if isinstance(term, ast.BinOp) and isinstance(term.op, ast.Mult):
            for diff in (term.left, term.right):
                if isinstance(diff, ast.BinOp) and isinstance(diff.op, ast.Sub) and _same(diff.right, base):
                    return True
    return False


def guidance_formulas(root: Path, *folders: str) -> set[str]:
    """The functions ("file:function") that write the guidance combination u + w·(c − u)."""
    return {f"{path}:{where}" for path, tree in sources(root, *folders)
            for node, where in _functions(tree) if _is_guidance(node)}


def _modules(root: Path, name: str) -> str:
    folder = root / "shared" / name
    if folder.is_dir():
        return " ".join(sorted(p.stem for p in folder.glob("*.py") if p.name != "__init__.py"))
    return ""


def picture(root: Path) -> str:
    """The layers of shared/, top first: each folder (or module), its modules, and what it imports."""
    graph = import_graph(root)
    lines = ["shared/ in layers, top first: each imports only from the layers below it"]
    for layer in reversed(LAYERS):
        lines.append("  " + "-" * 76)
        for name in layer:
            label = f"{name}/" if (root / "shared" / name).is_dir() else f"{name}.py"
            uses = " ".join(sorted(graph.get(name, ())))
            lines.append(f"  {label:<12} {_modules(root, name)}".rstrip())
            if uses:
                lines.append(f"  {'':<12} ↳ uses {uses}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(picture(Path(__file__).resolve().parents[1]), file=sys.stdout)
