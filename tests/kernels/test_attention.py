"""Flash attention (kernels/flash_attention/) against the materialised softmax in float64.

Checks the output and the gradients of q, k and v with the per-dtype table of
tests/kernels/tolerances.py, on fresh random inputs, with every op buffer poisoned with NaN (conftest).
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.tolerances import (DEVICES, DTYPE_IDS, DTYPES, REL_TOL, assert_close, float64_leaf,
                                      leaf)

ta = pytest.importorskip("kernels.flash_attention.op", reason="Triton is not installed")


def attention_float64(q, k, v):
    """softmax(q kᵀ / √d) v with the L x L matrix materialised (independent of kernels.reference)."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (N, heads, L, L)
    return torch.softmax(scores, dim=-1) @ v


def check_against_float64(q, k, v, dtype):
    inputs = [leaf(t) for t in (q, k, v)]
    out = ta.attention(*inputs)
    assert out.dtype == q.dtype and out.shape == q.shape
    d_out = torch.randn_like(out)
    out.backward(d_out)
    refs = [float64_leaf(t) for t in (q, k, v)]
    out_ref = attention_float64(*refs)
    out_ref.backward(d_out.to("cpu", torch.float64))
    out_tol, grad_tol = REL_TOL[dtype]
    assert_close("out", out.cpu(), out_ref, out_tol)
    for name, t, r in zip(("dq", "dk", "dv"), inputs, refs):
        assert t.grad is not None and t.grad.dtype == t.dtype, f"{name}: missing or wrong dtype"
        assert_close(name, t.grad.cpu(), r.grad, grad_tol)


def qkv(n, heads, seq, d, dtype, device, spread=1.5):
    """Scores of a few units (spread), so the softmax is neither uniform nor one-hot."""
    return [(spread * torch.randn(n, heads, seq, d, device=device)).to(dtype) for _ in range(3)]


# (N, heads, L, d): L = H·W of the U-Net's attention maps: 7×7 = 49, 8×8 = 64, 14×14 = 196,
# 16×16 = 256, 32×32 = 1024, and L = 17 (below one block). With the interpreter's 32 x 32 blocks,
# 49, 196 and 17 end in a partial block. Batch and heads are small: the interpreter's cost grows
# with the number of programs.
CASES = [
    pytest.param(1, 1, 49, 32, id="n1-h1-L49-d32"),
    pytest.param(2, 2, 64, 64, id="n2-h2-L64-d64"),
    pytest.param(1, 1, 196, 32, id="n1-h1-L196-d32"),
    pytest.param(1, 1, 17, 128, id="n1-h1-L17-d128"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,heads,seq,d", CASES)
def test_matches_float64_forward_and_backward(device, dtype, n, heads, seq, d):
    check_against_float64(*qkv(n, heads, seq, d, dtype, device), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_long_sequence_l256(device):
    """16×16 maps in one half dtype, forward and backward: 8 x 8 blocks of online-softmax rescaling."""
    check_against_float64(*qkv(1, 1, 256, 64, torch.float16, device), torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_long_sequence_l1024_forward(device):
    """32×32 maps (L = 1024), forward only: the interpreter runs 32 x 32 blocks per kernel here, and
    the backward kernels loop over the same blocks as at L = 256 (tested above), only more of them."""
    q, k, v = qkv(1, 1, 1024, 32, torch.float16, device)
    out = ta.attention(q, k, v)
    ref = attention_float64(*(t.to("cpu", torch.float64) for t in (q, k, v)))
    assert_close("out", out.cpu(), ref, REL_TOL[torch.float16][0])


@pytest.mark.parametrize("device", DEVICES)
def test_large_scores_do_not_overflow(device):
    """Scores of ~±100 would overflow a naive exp; the running max keeps every exponent ≤ 0."""
    check_against_float64(*qkv(1, 2, 49, 32, torch.float32, device, spread=4.0), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_contiguous_inputs(device, dtype):
    """q, k, v as views of one projection (N, L, 3, heads, d) permuted to (N, heads, L, d), as the
    U-Net makes them, and a v whose d axis is not unit-stride (the wrapper copies that one)."""
    n, heads, seq, d = 2, 2, 49, 32
    proj = (1.5 * torch.randn(n, seq, 3, heads, d, device=device)).to(dtype)
    q, k, v = proj.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, L, d), strided
    v = (1.5 * torch.randn(n, heads, d, seq, device=device)).to(dtype).transpose(-1, -2)
    assert not any(t.is_contiguous() for t in (q, k, v)) and v.stride(-1) != 1
    check_against_float64(q, k, v, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """torch.library.opcheck: schema, fake (meta) kernels, autograd registration, AOT dispatch."""
    q, k, v = qkv(1, 2, 20, 32, torch.float32, device)
    torch.library.opcheck(torch.ops.diffusion_kernels.flash_attention_fwd.default, [leaf(q), leaf(k), leaf(v)])
    o, lse2 = torch.ops.diffusion_kernels.flash_attention_fwd(q, k, v)
    torch.library.opcheck(torch.ops.diffusion_kernels.flash_attention_bwd.default,
                          [torch.randn_like(o), q, k, v, o, lse2])


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """The op traces under torch.compile(fullgraph=True) (a graph break would raise), forward and
    backward; aot_eager on the CPU for the reason given in test_group_norm's compile test."""
    import torch._dynamo

    torch._dynamo.reset()
    backend = "inductor" if device == "cuda" else "aot_eager"

    def block(x):  # x: (N, L, 3·heads·d) like a qkv projection
        n, seq, _ = x.shape
        q, k, v = x.reshape(n, seq, 3, 2, 32).permute(2, 0, 3, 1, 4).unbind(0)
        return ta.attention(q, k, v).transpose(1, 2).reshape(n, seq, 64) * 2.0

    x = torch.randn(1, 49, 192, device=device)
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    x_eager, x_compiled = leaf(x), leaf(x)
    y_eager, y_compiled = block(x_eager), compiled(x_compiled)
    dy = torch.randn_like(y_eager)
    y_eager.backward(dy)
    y_compiled.backward(dy)
    assert_close("out", y_compiled, y_eager, REL_TOL[torch.float32][0])
    assert_close("dx", x_compiled.grad, x_eager.grad, REL_TOL[torch.float32][1])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    q, k, v = qkv(1, 2, 16, 32, torch.float32, device)
    with pytest.raises(ValueError, match="same shape"):
        ta.attention(q, k[:, :, :8], v)
    with pytest.raises(ValueError, match="same dtype"):
        ta.attention(q, k.half(), v)
    with pytest.raises(TypeError, match="unsupported dtype torch.float64"):
        ta.attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="head dim d must be one of"):
        ta.attention(q[..., :24], k[..., :24], v[..., :24])
    with pytest.raises(ValueError, match="N x heads x L x d"):
        ta.attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="unsupported device meta"):
        ta.attention(q.to("meta"), k.to("meta"), v.to("meta"))


# --------------------------------------------------------------------------------------------------
# launch grid and pinned configurations


def test_launch_grid_stays_within_cuda_limits_at_any_batch():
    """Batch x heads x blocks is one axis-0 grid (limit 2^31 − 1); axis 1 (limit 65,535) is unused,
    so guided sampling of an 8,192 batch (16,384 rows for the U-Net) with 8 heads launches."""
    from kernels.triton_common import MAX_GRID

    for batch_heads, seq, block in ((2 * 8192 * 8, 1024, 32), (2 * 8192 * 8, 64, 128), (1, 17, 64),
                                    (65_536 * 16, 256, 64)):
        grid = ta.attention_grid(batch_heads, seq, block)
        assert len(grid) == 1 and grid[0] <= MAX_GRID[0]
        assert grid[0] == batch_heads * -(-seq // block)  # every (head, block) gets one program
    with pytest.raises(ValueError, match="launch-grid axis 0.*split the batch"):
        ta.attention_grid(2 ** 26, 1024, 16)  # 2^32 programs


def test_pinned_configs_are_compiled_ones(monkeypatch):
    """Every (dtype, head dim) pins one forward, dK/dV and dQ config from the lists compile_check
    builds; the choice is a pure function (no timing), so every process runs the same tiles."""
    from kernels import triton_common

    monkeypatch.setattr(triton_common, "INTERPRET_WITH_GPU_CONFIGS", True)
    for dtype in DTYPES:
        half = dtype != torch.float32
        lists = ((ta.ATTN_FWD_GPU_CONFIGS, ta.ATTN_DKDV_GPU_CONFIGS, ta.ATTN_DQ_GPU_CONFIGS) if half else
                 (ta.ATTN_FWD_FP32_CONFIGS, ta.ATTN_DKDV_FP32_CONFIGS, ta.ATTN_DQ_FP32_CONFIGS))
        for d in ta.SUPPORTED_HEAD_DIMS:
            chosen = ta.attention_configs(dtype, d)
            assert chosen == ta.attention_configs(dtype, d)
            for cfg, candidates in zip(chosen, lists):
                assert any(cfg is c for c in candidates)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,seq,d", [(torch.float16, 80, 32), (torch.bfloat16, 70, 128)],
                         ids=["fp16-L80-d32", "bf16-L70-d128"])
def test_gpu_block_sizes(device, dtype, seq, d, monkeypatch):
    """The GPU tiles (64 x 64 and 128 x 64 forward, 32 x 64 dK/dV, 64 x 32 dQ), run by the interpreter
    when forced: a partial last block at each of them, forward and backward."""
    from kernels import triton_common

    monkeypatch.setattr(triton_common, "INTERPRET_WITH_GPU_CONFIGS", True)
    forward = ta.attention_configs(dtype, d)[0]
    assert forward.kwargs["BLOCK_M"] >= 64 and seq % forward.kwargs["BLOCK_M"] != 0
    check_against_float64(*qkv(1, 2, seq, d, dtype, device), dtype)
