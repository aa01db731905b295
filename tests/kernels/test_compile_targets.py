"""Every Triton kernel compiles for sm_80, sm_86, sm_89 and sm_90 (kernels/compile_check.py).

The interpreter that runs the other kernel tests accepts code the GPU compiler rejects, so this test
runs the real compiler (triton.compile with a GPUTarget; no GPU needed) in a subprocess with
TRITON_INTERPRET unset, on the CI subset (`--quick`; its coverage is argued in kernels/README.md).
A second test shows the check does fail: a kernel with a 8 x 8 tl.dot (the interpreter runs it; the
compiler needs every dot dimension ≥ 16) is reported as a failure.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl

pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")

REPO = Path(__file__).resolve().parents[2]
KERNELS = ("gn_forward_kernel", "gn_backward_kernel", "gn_param_grad_kernel", "attn_forward_kernel",
           "attn_backward_preprocess_kernel", "attn_backward_dkdv_kernel", "attn_backward_dq_kernel")
TARGETS = ("sm_80", "sm_86", "sm_89", "sm_90")
# Generous: a shared 2-core runner can be several times slower than the ~1.5 min the set takes alone.
TIMEOUT_S = 1800


def _compiler_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def test_every_kernel_compiles_for_every_target():
    out = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--quick", "--jobs", "2"],
                         env=_compiler_env(), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-6000:]
    ok_lines = [line for line in out.stdout.splitlines() if line.startswith("ok ")]
    for target in TARGETS:
        for kernel in KERNELS:
            assert any(f" {target} {kernel} " in line for line in ok_lines), f"{kernel} not compiled for {target}"
    assert " 0 failed" in out.stdout.splitlines()[-1]


@triton.jit
def too_small_dot_kernel(A, OUT, BLOCK: tl.constexpr):
    """Valid for the interpreter, rejected by the GPU compiler when BLOCK < 16."""
    r = tl.arange(0, BLOCK)
    a = tl.load(A + r[:, None] * BLOCK + r[None, :])
    tl.store(OUT + r[:, None] * BLOCK + r[None, :], tl.dot(a, a))


_FAILING = """
import sys
from kernels import compile_check as cc
v = cc.Variant("tests.kernels.test_compile_targets:too_small_dot_kernel", "BLOCK=8",
               {"A": "*fp16", "OUT": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 8}, ("A", "OUT"), 4)
r = cc.run([(80, v)], 1)[0]
print(cc._format(r))
sys.exit(1 if "error" in r else 0)
"""


def test_a_kernel_the_compiler_rejects_is_reported():
    out = subprocess.run([sys.executable, "-c", _FAILING], env=_compiler_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout.startswith("FAIL sm_80 tests.kernels.test_compile_targets:too_small_dot_kernel")

