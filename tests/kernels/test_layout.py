"""The kernels package is a leaf with one op namespace, and importing it stays cheap.

Each check runs in a fresh interpreter, so what another test imported cannot hide an import here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(code: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernels_import_nothing_from_shared():
    """Every module of the package, the compiled op and the Triton ops included, loads without `shared`."""
    found = _run(
        "import json, sys, kernels\n"
        "from kernels import build, costs, reference\n"
        "from kernels.sampling_step import op, philox_op, philox_reference\n"
        "from kernels.sampling_step.op import load_extension\n"
        "for name in ('group_norm_film_silu', 'attention', 'ddpm_step', 'ddim_step'):\n"
        "    kernels.load(name)\n"
        "load_extension()\n"
        "import kernels.triton_common, kernels.compile_check\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'shared' or m.startswith('shared.'))))")
    assert found == []


def test_import_kernels_loads_no_triton_and_no_extension():
    """The fused entry points load on first use: `import kernels` (what the U-Net does) is torch only."""
    found = _run(
        "import json, sys, kernels, kernels.reference\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "                        if m.split('.')[0] == 'triton' or m.endswith('._C') and 'kernels' in m)))")
    assert found == []


def test_every_op_lives_in_one_namespace():
    ops = _run(
        "import json, torch, kernels\n"
        "from kernels.sampling_step.op import load_extension\n"
        "for name in ('group_norm_film_silu', 'attention'):\n"
        "    kernels.load(name)\n"
        "load_extension()  # the compiled op registers on load, the Triton ops on import\n"
        "ns = getattr(torch.ops, kernels.OP_NAMESPACE)\n"
        "names = ['group_norm_film_silu_fwd', 'group_norm_film_silu_bwd', 'flash_attention_fwd',\n"
        "         'flash_attention_bwd', 'ddpm_step', 'ddim_step']\n"
        "print(json.dumps({n: hasattr(ns, n) for n in names}))")
    assert all(ops.values()), ops
