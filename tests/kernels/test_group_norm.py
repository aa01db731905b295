"""Fused GroupNorm + FiLM + SiLU (kernels/group_norm/) against a float64 eager expression.

Checks the output and every gradient (x, γ, β, scale, shift) with the per-dtype table of
tests/kernels/tolerances.py, on fresh random inputs, with every op buffer poisoned with NaN (conftest).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.kernels.tolerances import (DEVICES, DTYPE_IDS, DTYPES, REL_TOL, assert_close, float64_leaf,
                                      leaf)

gn = pytest.importorskip("kernels.group_norm.op", reason="Triton is not installed")


def gn_film_silu_float64(x, num_groups, weight, bias, scale, shift, eps, silu):
    """The op's definition written out in float64 (independent of kernels.reference)."""
    n, c, h, w = x.shape
    xg = x.reshape(n, num_groups, -1)                                   # (N, G, C/G·H·W)
    mean = xg.mean(dim=-1, keepdim=True)
    var = xg.var(dim=-1, unbiased=False, keepdim=True)
    xhat = ((xg - mean) / torch.sqrt(var + eps)).reshape(n, c, h, w)
    a = xhat * weight[None, :, None, None] + bias[None, :, None, None]
    if scale is not None:
        a = a * (1 + scale[:, :, None, None])
    if shift is not None:
        a = a + shift[:, :, None, None]
    return a * torch.sigmoid(a) if silu else a


# (N, C, H, W, groups, FiLM terms given, SiLU): batch 1; 7×7, 14×14, 28×28, 32×32; groups 8 and 32;
# sizes are small because the CPU interpreter's cost grows with the number of programs;
# channels per group 1, 2, 3, 6 (not a power of two: masked channel rows); odd 5×3 spatial size.
CASES = [
    pytest.param(1, 16, 7, 7, 8, "both", True, id="n1-c16-7x7-g8-film-silu"),
    pytest.param(2, 32, 14, 14, 8, "both", False, id="n2-c32-14x14-g8-film"),
    pytest.param(1, 32, 28, 28, 32, "none", True, id="n1-c32-28x28-g32-silu"),
    pytest.param(2, 16, 32, 32, 8, "both", True, id="n2-c16-32x32-g8-film-silu"),
    pytest.param(3, 48, 7, 7, 8, "scale", True, id="n3-c48-7x7-g8-scale-silu"),
    pytest.param(2, 24, 5, 3, 8, "shift", False, id="n2-c24-5x3-g8-shift"),
]


def make_inputs(n, c, h, w, film, dtype, device, param_dtype=None):
    """x with a non-zero mean (exercises the centring), γ, β and FiLM terms, all fresh random."""
    param_dtype = param_dtype or dtype
    x = (torch.randn(n, c, h, w, device=device) * 2.0 + 0.5).to(dtype)
    weight = (1.0 + 0.5 * torch.randn(c, device=device)).to(param_dtype)
    bias = (0.5 * torch.randn(c, device=device)).to(param_dtype)
    scale = (0.5 * torch.randn(n, c, device=device)).to(dtype) if film in ("both", "scale") else None
    shift = (0.5 * torch.randn(n, c, device=device)).to(dtype) if film in ("both", "shift") else None
    return x, weight, bias, scale, shift


def check_against_float64(x, num_groups, weight, bias, scale, shift, silu, dtype, eps=1e-5):
    """Runs the fused op forward and backward and compares output and all gradients with float64."""
    inputs = [leaf(t) for t in (x, weight, bias, scale, shift)]
    y = gn.group_norm_film_silu(inputs[0], num_groups, *inputs[1:], eps=eps, silu=silu)
    assert y.dtype == x.dtype and y.device == x.device
    dy = torch.randn_like(y)
    y.backward(dy)

    ref_inputs = [float64_leaf(t) for t in (x, weight, bias, scale, shift)]
    y_ref = gn_film_silu_float64(ref_inputs[0], num_groups, *ref_inputs[1:], eps, silu)
    y_ref.backward(dy.to("cpu", torch.float64))

    out_tol, grad_tol = REL_TOL[dtype]
    assert_close("y", y.cpu(), y_ref, out_tol)
    for name, t, r in zip(("dx", "dweight", "dbias", "dscale", "dshift"), inputs, ref_inputs):
        if t is not None:
            assert t.grad is not None and t.grad.dtype == t.dtype, f"{name}: missing or wrong dtype"
            assert_close(name, t.grad.cpu(), r.grad, grad_tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,c,h,w,groups,film,silu", CASES)
def test_matches_float64_forward_and_backward(device, dtype, n, c, h, w, groups, film, silu):
    x, weight, bias, scale, shift = make_inputs(n, c, h, w, film, dtype, device)
    check_against_float64(x, groups, weight, bias, scale, shift, silu, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_activations_with_fp32_parameters(device, dtype):
    """Mixed precision: half x and FiLM terms with fp32 γ, β (as under autocast); y keeps x's dtype."""
    x, weight, bias, scale, shift = make_inputs(2, 16, 7, 7, "both", dtype, device, param_dtype=torch.float32)
    check_against_float64(x, 8, weight, bias, scale, shift, True, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_contiguous_inputs(device, dtype):
    """channels_last x, γ/β as strided slices, scale/shift as chunks of one (N, 2C) embedding output
    (as a ResBlock produces them): values must be read by position, never by raw memory order."""
    n, c, h, w, groups = 2, 16, 14, 14, 8
    x = (torch.randn(n, c, h, w, device=device) * 2 + 0.5).to(dtype).to(memory_format=torch.channels_last)
    weight = (1 + 0.5 * torch.randn(2 * c, device=device)).to(dtype)[::2]
    bias = (0.5 * torch.randn(c, 3, device=device)).to(dtype)[:, 1]
    scale, shift = (0.5 * torch.randn(n, 2 * c, device=device)).to(dtype).chunk(2, dim=1)
    assert not any(t.is_contiguous() for t in (x, weight, bias, scale, shift))
    check_against_float64(x, groups, weight, bias, scale, shift, True, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_upstream_gradient_non_contiguous_and_eps(device):
    """A transposed upstream gradient and a large eps (which must enter rstd)."""
    x, weight, bias, scale, shift = make_inputs(2, 16, 7, 7, "both", torch.float32, device)
    inputs = [leaf(t) for t in (x, weight, bias, scale, shift)]
    y = gn.group_norm_film_silu(inputs[0], 8, *inputs[1:], eps=0.5, silu=True)
    dy = torch.randn(2, 16, 7, 7, device=device).transpose(2, 3)
    y.backward(dy)
    refs = [float64_leaf(t) for t in (x, weight, bias, scale, shift)]
    y_ref = gn_film_silu_float64(refs[0], 8, *refs[1:], 0.5, True)
    y_ref.backward(dy.to("cpu", torch.float64))
    assert_close("y", y.cpu(), y_ref, REL_TOL[torch.float32][0])
    for name, t, r in zip(("dx", "dweight", "dbias", "dscale", "dshift"), inputs, refs):
        assert_close(name, t.grad.cpu(), r.grad, REL_TOL[torch.float32][1])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """torch.library.opcheck: schema, fake (meta) kernels, autograd registration, AOT dispatch."""
    x, weight, bias, scale, shift = make_inputs(2, 8, 4, 4, "both", torch.float32, device)
    args = [leaf(x), 4, leaf(weight), leaf(bias), leaf(scale), leaf(shift), 1e-5, True]
    torch.library.opcheck(torch.ops.diffusion_kernels.group_norm_film_silu_fwd.default, args)
    torch.library.opcheck(torch.ops.diffusion_kernels.group_norm_film_silu_fwd.default,
                          [x, 4, weight, bias, None, None, 1e-5, False])
    _, mean, rstd = torch.ops.diffusion_kernels.group_norm_film_silu_fwd(x, 4, weight, bias, scale, shift, 1e-5, True)
    torch.library.opcheck(torch.ops.diffusion_kernels.group_norm_film_silu_bwd.default,
                          [torch.randn_like(x), x, weight, bias, scale, shift, mean, rstd, 4, True])


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """The op traces under torch.compile(fullgraph=True) (a graph break would raise), forward and
    backward. On the CPU the backend is aot_eager: the op is opaque to Inductor either way, and
    Inductor's C++ code generation for the surrounding ops would only add minutes on a CPU runner."""
    import torch._dynamo

    torch._dynamo.reset()
    backend = "inductor" if device == "cuda" else "aot_eager"

    def block(x, weight, bias, emb):
        scale, shift = emb.chunk(2, dim=1)
        return gn.group_norm_film_silu(x, 8, weight, bias, scale, shift, 1e-5, True) * 2.0

    x, weight, bias, _, _ = make_inputs(2, 16, 7, 7, "none", torch.float32, device)
    emb = 0.5 * torch.randn(2, 32, device=device)
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    eager_inputs = [leaf(t) for t in (x, weight, bias, emb)]
    compiled_inputs = [leaf(t) for t in (x, weight, bias, emb)]
    y_eager = block(*eager_inputs)
    y_compiled = compiled(*compiled_inputs)
    dy = torch.randn_like(y_eager)
    y_eager.backward(dy)
    y_compiled.backward(dy)
    assert_close("y", y_compiled, y_eager, REL_TOL[torch.float32][0])
    for t_c, t_e in zip(compiled_inputs, eager_inputs):
        assert_close("grad", t_c.grad, t_e.grad, REL_TOL[torch.float32][1])


def test_poisoned_buffers_are_nan():
    """The NaN poisoning the other tests rely on is active: op buffers start as NaN, not zeros."""
    from kernels.triton_common import POISON_ENV, new_buffer
    assert os.environ.get(POISON_ENV) == "1"
    assert torch.isnan(new_buffer((3, 5), torch.bfloat16, torch.device("cpu"))).all()


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    x, weight, bias, scale, shift = make_inputs(2, 12, 4, 4, "both", torch.float32, device)
    with pytest.raises(ValueError, match="not divisible into 8 groups"):
        gn.group_norm_film_silu(x, 8, weight, bias)
    with pytest.raises(TypeError, match="unsupported dtype torch.float64"):
        gn.group_norm_film_silu(x.double(), 4, weight, bias)
    with pytest.raises(TypeError, match="unsupported dtype torch.int32"):
        gn.group_norm_film_silu(x.int(), 4, weight, bias)
    with pytest.raises(ValueError, match="weight must have shape"):
        gn.group_norm_film_silu(x, 4, weight[:6], bias)
    with pytest.raises(ValueError, match="scale must have shape"):
        gn.group_norm_film_silu(x, 4, weight, bias, scale[:1], shift)
    with pytest.raises(ValueError, match="N x C x H x W"):
        gn.group_norm_film_silu(x[0], 4, weight, bias)
    with pytest.raises(ValueError, match="eps must be positive"):
        gn.group_norm_film_silu(x, 4, weight, bias, eps=0.0)
    with pytest.raises(ValueError, match="unsupported device meta"):
        gn.group_norm_film_silu(x.to("meta"), 4, weight.to("meta"), bias.to("meta"))


_CPU_WITHOUT_INTERPRETER = """
import torch, kernels
x = torch.randn(1, 8, 4, 4)
q = torch.randn(1, 1, 16, 32)
for name, call in (("gn", lambda: kernels.group_norm_film_silu(x, 4, torch.ones(8), torch.zeros(8))),
                   ("attention", lambda: kernels.attention(q, q, q))):
    try:
        call()
    except kernels.FusedKernelsUnavailable as err:
        print(name, "raised:", err)
"""


def test_cpu_tensor_without_interpreter_says_what_is_needed():
    """With the interpreter off, CPU tensors get FusedKernelsUnavailable naming both ways out."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _CPU_WITHOUT_INTERPRETER], env=env, capture_output=True,
                         text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["gn", "attention"], out.stdout + out.stderr
    for line in lines:
        assert "need a CUDA GPU" in line and "TRITON_INTERPRET=1" in line, line


# --------------------------------------------------------------------------------------------------
# one tile per group, several tiles per group, and the pinned GPU configurations


# Groups that fit one tile, kept in registers between the statistics and the output (and between the
# sums and dx): the MNIST preset's 7×7 level (2 channels per group) and 4 channels per group at 32×32,
# which fills a 4,096-element tile exactly. Groups larger than one tile: 8 channels per group at 32×32
# (8,192 elements) and 64 at 14×14 (12,544): the statistics merge tiles (Chan's update) and both passes
# loop, over 2 and 4 tiles under the interpreter's 4,096-element tile and with the GPU configurations.
TILE_CASES = [pytest.param(2, 64, 7, 7, 32, True, id="one-tile-2-per-group-7x7"),
              pytest.param(1, 128, 32, 32, 32, True, id="one-tile-4-per-group-32x32"),
              pytest.param(1, 16, 32, 32, 2, False, id="several-tiles-8-per-group-32x32"),
              pytest.param(1, 64, 14, 14, 1, False, id="several-tiles-64-per-group-14x14")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gpu_configs", [False, True], ids=["interpreter-tile", "gpu-tile"])
@pytest.mark.parametrize("n,c,h,w,groups,one_tile", TILE_CASES)
def test_groups_in_one_tile_and_in_several(device, gpu_configs, n, c, h, w, groups, one_tile, monkeypatch):
    from kernels import triton_common

    if gpu_configs:
        monkeypatch.setattr(triton_common, "INTERPRET_WITH_GPU_CONFIGS", True)
    _, block_c, hw_pow2 = gn._block_sizes(c, h * w, groups)
    fits = block_c * hw_pow2 <= gn.group_norm_config(block_c, hw_pow2).kwargs["TILE"]
    assert fits == one_tile, "the case must take the path it is named for"
    x, weight, bias, scale, shift = make_inputs(n, c, h, w, "both", torch.float32, device)
    check_against_float64(x, groups, weight, bias, scale, shift, True, torch.float32)


def test_pinned_config_is_a_compiled_one_and_fits(monkeypatch):
    """The launch configuration is a fixed function of the group's shape (no timing, so every process
    picks the same), one of the GPU configurations compile_check builds, and holds a group's channels."""
    from kernels import triton_common

    monkeypatch.setattr(triton_common, "INTERPRET_WITH_GPU_CONFIGS", True)
    for block_c in (1, 2, 4, 8, 16, 64, 256, 1024):
        for hw_pow2 in (16, 64, 256, 1024, 4096):
            cfg = gn.group_norm_config(block_c, hw_pow2)
            assert any(cfg is c for c in gn.GN_GPU_CONFIGS)
            assert cfg is gn.group_norm_config(block_c, hw_pow2)
            assert cfg.kwargs["TILE"] >= block_c
    assert gn.group_norm_config(4, 256).kwargs["TILE"] == 1024   # a small group: one 1,024 tile
    assert gn.group_norm_config(8, 1024).kwargs["TILE"] == 4096  # 8,192 elements: two 4,096 tiles
    monkeypatch.setattr(triton_common, "INTERPRET_WITH_GPU_CONFIGS", False)
    from kernels.triton_common import INTERPRET
    if INTERPRET:
        assert gn.group_norm_config(8, 1024) is gn.GN_INTERPRET_CONFIG
