"""Tolerances and helpers shared by the kernel tests.

Every check is a relative error ‖out − ref‖ / ‖ref‖ of a fused result against a float64 eager
reference computed from the same (rounded) inputs. The table bounds what rounding alone explains:
fp32 keeps ~7 significant digits; fp16 (11-bit mantissa) and bf16 (8-bit mantissa) round every stored
element once, ~2^-11 and ~2^-8 relative, plus the rounding of intermediate products fed to tl.dot
(attention casts P to the input dtype, as every flash attention does). Gradients pass through more
roundings than outputs, hence their looser column.
"""
from __future__ import annotations

import pytest
import torch

# dtype: (output, gradients), relative L2 error against float64.
REL_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 3e-3),
    torch.bfloat16: (1.6e-2, 2.4e-2),
}

DTYPES = list(REL_TOL)
DTYPE_IDS = ["fp32", "fp16", "bf16"]

_NO_GPU = "no CUDA GPU here: the CUDA variants of the kernel tests need one (the CPU variants run " \
          "through Triton's interpreter)"
_INTERPRETER_OFF = "Triton interpreter off (TRITON_INTERPRET unset because a GPU is present): CPU " \
                   "tensors cannot reach the kernels"


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _interpreting(), reason=_INTERPRETER_OFF)),
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason=_NO_GPU)]),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere in out gives NaN (which fails every `<` check)."""
    ref = ref.detach().double()
    return ((out.detach().double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite elements (unwritten outputs stay NaN)"
    err = rel_err(out, ref)
    assert err < tol, f"{name}: relative error {err:.3e} ≥ tolerance {tol:.1e}"


def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    """A fresh leaf that requires grad (None stays None)."""
    return None if t is None else t.detach().requires_grad_(True)


def float64_leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    """The same values in float64 on the CPU, as a leaf for the reference's autograd."""
    return None if t is None else t.detach().to("cpu", torch.float64).requires_grad_(True)
