"""What the Triton ops share: interpreter detection, entry checks, output allocation, the device guard,
the dot helper, the launch-grid limits and the choice between GPU and interpreter configurations.

Launch configurations are pinned, not autotuned: each op picks its configuration from the shape and
dtype with a fixed rule, so two processes given the same inputs run the same programs in the same order
and produce the same bits (autotuning by timing can pick a different tile in another process, and a
different tile sums in a different order).

Triton chooses between compiling for a GPU and interpreting on the CPU when it is first imported
(TRITON_INTERPRET=1 selects the interpreter), so `INTERPRET` is read once here, from Triton itself.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from kernels import OP_NAMESPACE, FusedKernelsUnavailable

# True when Triton runs kernels in its NumPy interpreter (CPU tensors, no GPU needed).
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tests set this to "1" so every buffer an op allocates starts as NaN: an element a kernel forgets to
# write then shows up as NaN in the result (or in a gradient) instead of as plausible stale memory.
# Read once, when this module is imported (tests/kernels/conftest.py sets it before any kernel loads):
# an environment lookup per buffer would cost more host time than the allocation itself.
POISON_ENV = "KERNELS_POISON_OUTPUTS"
POISON_OUTPUTS: bool = os.environ.get(POISON_ENV) == "1"


# CUDA's launch-grid limits: 2^31 − 1 programs along axis 0, 65,535 along axes 1 and 2.
MAX_GRID = (2 ** 31 - 1, 65_535, 65_535)

# Tests set this to True (monkeypatch.setattr) so that, under the interpreter, the ops use the tile
# sizes they use on a GPU (the interpreter otherwise uses fixed tiles that keep it fast). A module
# attribute rather than an environment variable: it is read at every launch, and an attribute costs the
# host far less to read.
INTERPRET_WITH_GPU_CONFIGS = False


def use_gpu_configs() -> bool:
    """True on a GPU, and under the interpreter when INTERPRET_WITH_GPU_CONFIGS is set (read at each launch)."""
    return not INTERPRET or INTERPRET_WITH_GPU_CONFIGS


def check_grid(name: str, grid: tuple[int, ...]) -> tuple[int, ...]:
    """Returns grid, or raises ValueError when an axis exceeds its CUDA limit (the interpreter has none,
    so the same check runs there too)."""
    for axis, (size, limit) in enumerate(zip(grid, MAX_GRID)):
        if size > limit:
            raise ValueError(f"{name}: the input needs {size:,} programs along launch-grid axis {axis}, "
                             f"over CUDA's limit of {limit:,}; split the batch")
    return grid


def launch_options(config: triton.Config) -> dict:
    """A pinned config as launch keywords: its block sizes plus num_warps and num_stages."""
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def runs_here(t: torch.Tensor) -> bool:
    """Whether the kernels can take t: a CUDA tensor, or a CPU tensor under the interpreter (the cheap
    test an op runs on every call; check_device says what is wrong when it fails)."""
    return t.is_cuda or (INTERPRET and t.is_cpu)


def check_device(name: str, *tensors: torch.Tensor) -> None:
    """Raises FusedKernelsUnavailable (CPU without the interpreter) or ValueError (any other device)."""
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu":
            if INTERPRET:
                continue
            raise FusedKernelsUnavailable(
                f"{name}: got a CPU tensor, but fused kernels need a CUDA GPU, or Triton's CPU "
                "interpreter selected with TRITON_INTERPRET=1 before Triton is imported")
        raise ValueError(f"{name}: unsupported device {t.device}; fused kernels run on CUDA "
                         "(or on the CPU through TRITON_INTERPRET=1)")


def check_dtype(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: unsupported dtype {t.dtype}; supported: float32, float16, bfloat16")


def new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous buffer of a non-empty `shape` that a kernel is expected to fill
    completely (NaN-filled under POISON_ENV)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)  # sizes unpacked: parsed faster than a tuple


def new_buffer_like(t: torch.Tensor) -> torch.Tensor:
    """new_buffer with t's shape, dtype and device; t must be contiguous (the buffer takes its strides)."""
    if POISON_OUTPUTS:
        return torch.full_like(t, float("nan"))
    return torch.empty_like(t)


# One no-op context serves every CPU launch (contextlib.nullcontext is reusable).
_NO_GUARD = contextlib.nullcontext()


def device_guard(t: torch.Tensor):
    """Launch on t's GPU (Triton uses the current device's current stream); a no-op on the CPU."""
    return torch.cuda.device(t.get_device()) if t.is_cuda else _NO_GUARD


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether tl.dot operands must be upcast to fp32: the interpreter has no bf16 arithmetic."""
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 products (like torch.matmul's default), not TF32's 10-bit mantissa."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def mma(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST feeds fp32 copies (interpreter bf16); else native inputs."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c
