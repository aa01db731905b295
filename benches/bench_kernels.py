"""Fused Triton kernels against eager PyTorch, torch.compile of the eager expression and,
for attention, F.scaled_dot_product_attention. The kernel timings are CUDA only: Triton's CPU
interpreter checks correctness, its speed means nothing.

The host cost of one call (kernels/host_cost.py: the op's Python, checks, allocations and autograd
bookkeeping, with the Triton launch stubbed out) is measured on any device, against the eager
reference's host time in the same run; without a GPU it runs in a subprocess through the interpreter.

Sizes come from the presets at the seeds' batch of 128 (mnist: 28² × 64 ch, 7² × 128 ch with attention
at L = 49; cifar10: 16² × 256 ch with attention at L = 256) plus a large GroupNorm (256×128×32×32) and
attention at L = 64, 196 and 1024. Every input is random (never zeros). bf16 unless a case says fp32.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from benches.measure import budget_skip_reason, module_missing, record, record_bandwidth, record_flops, time_call
from kernels import host_cost, reference
from kernels.costs import attention_flops

CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="Triton kernels are timed on CUDA only (the CPU interpreter is a "
                                      "correctness tool; its speed means nothing)")

# Seconds a torch.compile of one small expression takes on a cold cache (inductor, 16 cores), so that
# compile variants skip instead of overrunning the GPU script's 10 minutes.
COMPILE_ESTIMATE_S = 25
GN_GROUPS = 32
GN_EPS = 1e-5

# (label, N, C, H, W): the U-Net's GroupNorm+FiLM+SiLU inputs at batch 128, and one large size.
GN_SHAPES = [
    ("mnist 28²", 128, 64, 28, 28),
    ("mnist 7²", 128, 128, 7, 7),
    ("cifar10 16²", 128, 256, 16, 16),
    ("large", 256, 128, 32, 32),
]
# (label, N, heads, L, d): spatial self-attention as the U-Net calls it.
ATTN_SHAPES = [
    ("mnist 7² L=49", 128, 2, 49, 64),
    ("8² L=64", 128, 4, 64, 64),
    ("tiny 14² L=196", 128, 2, 196, 64),
    ("cifar10 16² L=256", 128, 4, 256, 64),
    ("32² L=1024", 32, 4, 1024, 64),
]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
IMPLS = ["eager", "fused", "compile"]


def _impl(impl: str, eager_fn, kernel_file: str, kernel_name: str):
    """eager: the reference function; compile: torch.compile of it; fused: kernels.<kernel_name>
    (skipped when its Triton file is absent)."""
    if impl == "eager":
        return eager_fn
    if impl == "compile":
        return torch.compile(eager_fn, dynamic=False)
    reason = module_missing(kernel_file)
    if reason:
        pytest.skip(reason)
    return getattr(kernels, kernel_name)


def _maybe_skip_compile(impl: str) -> None:
    if "compile" in impl:
        reason = budget_skip_reason(COMPILE_ESTIMATE_S)
        if reason:
            pytest.skip(reason)


def _gn_params(shape, dtype, device, gen):
    _, n, c, h, w = shape
    x = torch.randn(n, c, h, w, device=device, dtype=dtype, generator=gen)
    weight = 1 + 0.1 * torch.randn(c, device=device, dtype=dtype, generator=gen)
    bias = 0.1 * torch.randn(c, device=device, dtype=dtype, generator=gen)
    scale = 0.1 * torch.randn(n, c, device=device, dtype=dtype, generator=gen)
    shift = 0.1 * torch.randn(n, c, device=device, dtype=dtype, generator=gen)
    return x, weight, bias, scale, shift


def _shape_id(shape) -> str:
    return "x".join(map(str, shape[1:]))  # ASCII test ids; the report uses the labelled case


def _gn_cases():
    for shape in GN_SHAPES:
        for impl in IMPLS:
            marks = [pytest.mark.priority(60 if impl == "compile" else 10)]
            yield pytest.param(shape, "bf16", impl, marks=marks, id=f"{_shape_id(shape)}-bf16-{impl}")
    large = GN_SHAPES[-1]
    for impl in IMPLS:
        yield pytest.param(large, "fp32", impl, marks=[pytest.mark.priority(70)],
                           id=f"{_shape_id(large)}-fp32-{impl}")


@CUDA_ONLY
@pytest.mark.parametrize("shape,dtype_name,impl", list(_gn_cases()))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_group_norm_film_silu(benchmark, device, ceilings, shape, dtype_name, impl, pass_):
    _maybe_skip_compile(impl)
    fn = _impl(impl, reference.group_norm_film_silu, "kernels/group_norm/op.py", "group_norm_film_silu")
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    x, weight, bias, scale, shift = _gn_params(shape, dtype, device, gen)
    label, n, c, h, w = shape
    numel, elem = x.numel(), x.element_size()
    if pass_ == "fwd":
        def call():
            return fn(x, GN_GROUPS, weight, bias, scale, shift, GN_EPS, True)
        # Fewest bytes: read x once, write y once (γ, β, scale, shift are N·C or C values: negligible).
        bytes_per_call, formula = 2 * numel * elem, "2 · N·C·H·W · bytes/elem (read x, write y)"
    else:
        inputs = [t.requires_grad_() for t in (x, weight, bias, scale, shift)]
        dy = torch.randn_like(x)

        def call():
            y = fn(x, GN_GROUPS, weight, bias, scale, shift, GN_EPS, True)
            return torch.autograd.grad(y, inputs, dy)
        # Fewest bytes: forward reads x and writes y; backward reads x and dy and writes dx.
        bytes_per_call, formula = 5 * numel * elem, "5 · N·C·H·W · bytes/elem (fwd: x, y; bwd: x, dy, dx)"
    seconds = time_call(benchmark, call, device, rounds=5, kernel=True)
    record(benchmark, family="kernel", case=f"GN+FiLM+SiLU {pass_} {dtype_name} {label} ({n}×{c}×{h}×{w})",
           impl=impl, op=f"gn_{pass_}", dtype=dtype_name, size=label, shape=[n, c, h, w])
    record_bandwidth(benchmark, seconds, bytes_per_call, formula, ceilings)


def _attn_cases():
    for shape in ATTN_SHAPES:
        for impl in IMPLS + ["sdpa"]:
            marks = [pytest.mark.priority(65 if impl == "compile" else 15)]
            yield pytest.param(shape, impl, marks=marks, id=f"{_shape_id(shape)}-{impl}")


@CUDA_ONLY
@pytest.mark.parametrize("shape,impl", list(_attn_cases()))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_attention(benchmark, device, ceilings, shape, impl, pass_):
    _maybe_skip_compile(impl)
    fn = (F.scaled_dot_product_attention if impl == "sdpa"
          else _impl(impl, reference.attention, "kernels/flash_attention/op.py", "attention"))
    label, n, heads, length, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(n, heads, length, d, device=device, dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    # Forward: S = q kᵀ and O = P v, each 2·L²·d multiply-adds-as-two per head.
    fwd_flops = attention_flops(n, heads, length, d)
    if pass_ == "fwd":
        def call():
            return fn(q, k, v)
        flops, formula = fwd_flops, "4 · N·heads·L²·d (q kᵀ and P v)"
    else:
        for t in (q, k, v):
            t.requires_grad_()
        do = torch.randn_like(q)

        def call():
            return torch.autograd.grad(fn(q, k, v), (q, k, v), do)
        # Backward: dV = Pᵀ dO, dP = dO Vᵀ, dQ = dS K, dK = dSᵀ Q: four more products, 2.5× the forward's
        # FLOP count as FlashAttention counts it (recomputing S in backward is not counted).
        flops = fwd_flops + attention_flops(n, heads, length, d, backward=True)
        formula = "14 · N·heads·L²·d (fwd 4 + bwd 10)"
    seconds = time_call(benchmark, call, device, rounds=5, kernel=True)
    record(benchmark, family="kernel", case=f"attention {pass_} bf16 {label} ({n}×{heads}×{length}×{d})",
           impl=impl, op=f"attn_{pass_}", dtype="bf16", size=label, L=length, shape=[n, heads, length, d])
    record_flops(benchmark, seconds, flops, formula, ceilings)


# --------------------------------------------------------------------------------------------------
# host cost per call


@pytest.fixture(scope="module")
def host_costs(device) -> dict:
    """Every host-cost case of kernels/host_cost.py, fused and eager, from one measurement: in this
    process on CUDA, in a subprocess through the interpreter on the CPU (CPU tensors need it)."""
    if device.type == "cuda":
        return host_cost.measure(device)
    return host_cost.measure_in_subprocess()


@pytest.mark.priority(20)
@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("case", host_cost.CASES)
def test_host_cost(benchmark, host_costs, case, impl):
    """Host µs per call: fused with its launches stubbed, eager (the reference) as it runs. The figure
    (time_ms) comes from kernels/host_cost.py; pytest-benchmark is handed one trivial call only so
    that the row is written to the JSON."""
    us = host_costs[case][impl]
    benchmark.pedantic(lambda: None, rounds=1)
    shape = host_cost.GN_SHAPE if case.startswith("gn") else host_cost.ATTN_SHAPE
    what = "launch stubbed" if impl == "fused" else "reference, kernels run"
    benchmark.extra_info.update(
        time_ms=us * 1e-3, custom_op_ms=host_costs[case]["custom op"] * 1e-3,
        timer=(f"perf_counter_ns: smallest of {host_cost.REPEATS} medians of {host_cost.CALLS} calls "
               f"(kernels/host_cost.py), {what}"))
    record(benchmark, family="kernel", case=f"host per call: {case} fp32 ({'×'.join(map(str, shape))})",
           impl=impl, op=f"host_{case}", dtype="fp32", size="host", shape=list(shape))
