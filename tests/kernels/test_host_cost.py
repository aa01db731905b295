"""The host-side budget of the fused ops (kernels/host_cost.py): what one call costs the CPU with the
Triton launch stubbed out, and that the stub removes the launch and nothing else.

The budgets are on a host-side path, not speed claims (those are ratios, in benches/bench_kernels.py).
They are measured in a fresh process without the tests' NaN-poisoned buffers (the production
configuration), as the smallest of 10 medians of 1,000 calls spread over the run: the median of one
call's time is not moved by another process's time slices, and the smallest median is the repeat least
disturbed by the machine's other work.
"""
from __future__ import annotations

import pytest
import torch

from kernels import host_cost, reference
from tests.kernels.tolerances import REL_TOL, assert_close

gn = pytest.importorskip("kernels.group_norm.op", reason="Triton is not installed")
ta = pytest.importorskip("kernels.flash_attention.op", reason="Triton is not installed")

# µs per call on the CPU. The no-autograd forward meets the 10 µs goal (measured 7.6 for GN, 7.1 for
# attention on a 2-core CPU). Recording autograd costs a torch.autograd.Function (measured 13.3 and
# 10.7) and a backward adds the autograd engine and the backward's buffers (measured 68 and 59); those
# budgets are about twice the measured figures.
NO_GRAD_FORWARD_US = 10.0
GRAD_FORWARD_US = 30.0
FORWARD_BACKWARD_US = 150.0
BUDGETS = {"fwd": NO_GRAD_FORWARD_US, "fwd (grad)": GRAD_FORWARD_US, "fwd+bwd": FORWARD_BACKWARD_US}


@pytest.fixture(scope="module")
def fused_host_us() -> dict:
    return host_cost.measure_in_subprocess(impls=("fused",))


@pytest.mark.parametrize("op", ["gn", "attention"])
@pytest.mark.parametrize("what", list(BUDGETS))
def test_host_cost_within_budget(fused_host_us, op, what):
    us = fused_host_us[f"{op} {what}"]["fused"]
    assert us <= BUDGETS[what], f"{op} {what}: {us:.1f} µs of host time per call, budget {BUDGETS[what]} µs"


def test_stub_removes_only_the_launch():
    """Stubbed, the ops return their allocated buffers (NaN-poisoned here, tests/kernels/conftest.py),
    forward and backward; outside the block they compute again and match the reference."""
    cpu = torch.device("cpu")
    x, weight, bias, scale, shift = host_cost._inputs("gn fwd+bwd", cpu)
    q, k, v = host_cost._inputs("attention fwd+bwd", cpu)
    with host_cost.stub_launches(gn, ta):
        y = gn.group_norm_film_silu(x, host_cost.GN_GROUPS, weight, bias, scale, shift)
        o = ta.attention(q, k, v)
        assert y.shape == x.shape and torch.isnan(y).all()
        assert o.shape == q.shape and torch.isnan(o).all()
        assert torch.isnan(torch.autograd.grad(y, x, torch.ones_like(y))[0]).all()
        assert torch.isnan(torch.autograd.grad(o, q, torch.ones_like(o))[0]).all()
    assert not any("run" in vars(kernel) for kernel in (gn.gn_forward_kernel, ta.attn_forward_kernel))
    y = gn.group_norm_film_silu(x, host_cost.GN_GROUPS, weight, bias, scale, shift)
    y_ref = reference.group_norm_film_silu(x, host_cost.GN_GROUPS, weight, bias, scale, shift)
    assert_close("y", y.detach(), y_ref.detach(), REL_TOL[torch.float32][0])
    assert_close("o", ta.attention(q, k, v).detach(), reference.attention(q, k, v).detach(),
                 REL_TOL[torch.float32][0])
