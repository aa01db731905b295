"""One training step of the whole U-Net with fused kernels against the same step in eager PyTorch.

The same weights, the same batch (x0, t, ε): the L_simple loss, the gradient of every parameter and
the parameters after one AdamW step must agree within the dtype tolerance. The tiny preset has both
fusable spots: GroupNorm(+FiLM)+SiLU in every ResBlock and the output head, and attention (L = 196,
d = 32) at 14×14.
"""
from __future__ import annotations

import copy

import pytest
import torch

from tests.kernels.tolerances import DEVICES, REL_TOL, rel_err

kernels = pytest.importorskip("kernels")
shared = pytest.importorskip("shared")
from shared.diffusion.forward import q_sample  # noqa: E402
from shared.model import blocks  # noqa: E402
from shared.model.blocks import GroupNormAct, SelfAttention  # noqa: E402
from shared.diffusion.schedule import NoiseSchedule  # noqa: E402
from shared.model.unet import UNet  # noqa: E402

# A whole network sums many roundings, and a parameter whose gradient nearly cancels (e.g. a bias
# feeding a GroupNorm) shows a larger relative error; this is the fp32 bound for each parameter.
PER_PARAMETER_TOL_FP32 = 1e-4
BATCH = 1  # per-sample indexing (FiLM rows, GN groups) is covered by the unit tests at N = 2, 3


def randomized_tiny(device: torch.device) -> UNet:
    """The tiny preset with every weight noisy: DDPM's zero-initialised layers would otherwise hide
    the attention and second-conv paths from the gradients at initialisation."""
    torch.manual_seed(0)
    model = UNet.from_preset("tiny").to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def training_step(model: UNet, x0, t, noise, schedule):
    """L_simple = mean ‖ε − ε_θ(x_t, t)‖² (Ho et al. 2020, Eq. 14), backward, one AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x_t = q_sample(schedule, x0, t, noise)
    loss = (model(x_t, t) - noise).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    opt.step()
    return loss.detach(), grads, {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture
def no_tf32():
    """On Ampere and later, cuDNN convolutions default to TF32, which would round the tiny differences
    between fused and eager activations to 10-bit mantissas; compare in true fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(params=["sdpa", "triton"])
def attention_choice(request, monkeypatch):
    """The fused model's attention as chosen by size (SDPA at every size, as measured), or the Triton
    kernel forced at the tiny preset's L = 196, d = 32, so the whole-network test covers both."""
    if request.param == "triton":
        monkeypatch.setattr(blocks, "TRITON_ATTENTION_FASTER", frozenset({(196, 32)}))
    return request.param


@pytest.mark.parametrize("device", DEVICES)
def test_one_training_step_fused_matches_eager(device, no_tf32, attention_choice):
    eager = randomized_tiny(torch.device(device))
    fused = copy.deepcopy(eager).set_fused_kernels(True)
    spots = [m for m in fused.modules() if isinstance(m, (GroupNormAct, SelfAttention))]
    assert spots and all(m.fused for m in spots)

    schedule = NoiseSchedule("linear", 1000)
    x0 = torch.rand(BATCH, 1, 28, 28, device=device) * 2 - 1
    t = torch.randint(0, 1000, (BATCH,), device=device)
    noise = torch.randn_like(x0)
    loss_e, grads_e, params_e = training_step(eager, x0, t, noise, schedule)
    loss_f, grads_f, params_f = training_step(fused, x0, t, noise, schedule)

    out_tol, grad_tol = REL_TOL[torch.float32]
    assert torch.isfinite(loss_f) and abs(loss_f.item() - loss_e.item()) <= out_tol * abs(loss_e.item())
    flat_e = torch.cat([g.flatten() for g in grads_e.values()])
    flat_f = torch.cat([grads_f[name].flatten() for name in grads_e])
    assert rel_err(flat_f, flat_e) < grad_tol, "all gradients together"
    for name, g in grads_e.items():
        assert torch.isfinite(grads_f[name]).all(), f"{name}: non-finite gradient"
        assert rel_err(grads_f[name], g) < PER_PARAMETER_TOL_FP32, f"{name}: gradient differs"
    for name, p in params_e.items():
        assert rel_err(params_f[name], p) < out_tol, f"{name}: parameter after the AdamW step differs"


def test_fused_attention_runs_the_faster_implementation(monkeypatch):
    """With fused kernels a SelfAttention calls SDPA unless its (L, d) is listed as a size where the Triton
    kernel is faster; without them, the eager reference."""
    calls = []
    monkeypatch.setattr(blocks.F, "scaled_dot_product_attention", lambda q, k, v: calls.append("sdpa") or q)
    monkeypatch.setattr(kernels, "attention", lambda q, k, v: calls.append("triton") or q, raising=False)
    monkeypatch.setattr(blocks.reference, "attention", lambda q, k, v: calls.append("eager") or q)
    layer = SelfAttention(64, num_heads=2, num_groups=8)
    x = torch.randn(2, 64, 7, 7)
    layer(x)
    layer.fused = True
    layer(x)
    monkeypatch.setattr(blocks, "TRITON_ATTENTION_FASTER", frozenset({(49, 32)}))
    layer(x)
    layer(torch.randn(2, 64, 4, 4))  # L = 16: not listed
    assert calls == ["eager", "sdpa", "triton", "sdpa"]
