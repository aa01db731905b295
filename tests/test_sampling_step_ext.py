"""The fused sampling update (kernels.ddpm_step / kernels.ddim_step, C++/CUDA op) against references.

The fused op takes the per-step scalars of shared.diffusion.coefficients, as its eager twins
shared.diffusion.steps.ddpm_update / ddim_update do. References: the eager steps of shared.diffusion.steps
(the repo's ground truth, run in float64 on the same inputs for the low-precision dtypes), and closed forms (DDIM η = 0 with the true noise recovers x0;
the DDPM posterior mean equals Algorithm 2's 1/√α_t·(x_t − β_t/√(1−ᾱ_t)·ε); guidance with w = 0 / 1).
Every test runs on CPU and, when a GPU is present, on CUDA.

Non-contiguous inputs: the op refuses them (TORCH_CHECK), the Python wrappers copy them contiguous;
both layers are tested. Sizes stay tiny except one case past the CPU grain size (2 threads).
"""
from __future__ import annotations

import sys

import pytest
import torch

import kernels
from kernels.sampling_step import op as sampling_step
from shared import NoiseSchedule
from shared.diffusion.coefficients import ddim_coefficients, ddpm_coefficients
from shared.diffusion.steps import ddim_step as eager_ddim_step
from shared.diffusion.steps import ddpm_step as eager_ddpm_step

GPU_REASON = "needs a CUDA GPU (the CUDA kernel is compiled but cannot run here)"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason=GPU_REASON))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# |fused − float64 eager| ≤ atol + rtol·|ref|: the fused op computes in fp32 from the stored inputs
# and rounds once, so rtol is about one unit of storage rounding; fp32 must equal eager to 1e-6.
TOLERANCES = {
    torch.float32: dict(atol=1e-6, rtol=1e-6),
    torch.float16: dict(atol=1e-4, rtol=2 ** -10),
    torch.bfloat16: dict(atol=1e-4, rtol=2 ** -7),
}
# numel 105 and 68,478: neither a multiple of any vector width (4 fp32, 8 fp16/bf16 lanes); the
# second is past the CPU grain size (32,768), so at::parallel_for splits it.
FP32_ULP = 2 ** -23
SHAPES = [(3, 1, 5, 7), (2, 3, 101, 113)]
T = 1000
OPS = ("ddpm", "ddim0", "ddim1")


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule("linear", T)


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Builds/loads the op once; a missing toolchain is a failure here, not a skip."""
    return sampling_step.load_extension()


def make_inputs(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    names = ("x_t", "eps", "eps_uncond", "noise")
    return {name: torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for name in names}


def fused_ddpm(schedule, x_t, eps, t, noise=None, variance="fixed_small", **kw):
    """kernels.ddpm_step on the scalars at t: the fused counterpart of the eager ddpm_step."""
    return kernels.ddpm_step(x_t, eps, ddpm_coefficients(schedule, t, variance), noise, **kw)


def fused_ddim(schedule, x_t, eps, t, t_prev, eta=0.0, noise=None, **kw):
    """kernels.ddim_step on the scalars of t → t_prev: the fused counterpart of the eager ddim_step."""
    return kernels.ddim_step(x_t, eps, ddim_coefficients(schedule, t, t_prev, eta), noise, **kw)


def run_fused(kind, schedule, t, inp, clip, guided, w=2.5, return_x0=True):
    extra = dict(eps_uncond=inp["eps_uncond"], guidance_scale=w) if guided else {}
    if kind == "ddpm":
        return fused_ddpm(schedule, inp["x_t"], inp["eps"], t, noise=inp["noise"],
                          clip_x0=clip, return_x0=return_x0, **extra)
    eta = 0.0 if kind == "ddim0" else 1.0
    return fused_ddim(schedule, inp["x_t"], inp["eps"], t, t - 37, eta=eta,
                      noise=inp["noise"], clip_x0=clip, return_x0=return_x0, **extra)


def run_eager(kind, schedule, t, inp, clip, guided, w=2.5, dtype=None):
    """The eager step on inputs cast to `dtype` (float64 for the reference); guidance combined first."""
    cast = {k: v.to(dtype) if dtype is not None else v for k, v in inp.items()}
    eps = cast["eps"]
    if guided:
        eps = cast["eps_uncond"] + w * (cast["eps"] - cast["eps_uncond"])
    if kind == "ddpm":
        return eager_ddpm_step(schedule, cast["x_t"], eps, t, noise=cast["noise"], clip_x0=clip)
    eta = 0.0 if kind == "ddim0" else 1.0
    return eager_ddim_step(schedule, cast["x_t"], eps, t, t - 37, eta=eta, noise=cast["noise"], clip_x0=clip)


# --------------------------------------------------------------------------------------------------
# against the eager steps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("t", [40, 999])
def test_matches_eager(schedule, device, dtype, kind, clip, guided, t):
    inp = make_inputs(SHAPES[0], dtype, device, seed=t)
    x_prev, x0_pred = run_fused(kind, schedule, t, inp, clip, guided)
    assert x_prev.dtype == dtype and x_prev.shape == inp["x_t"].shape and x_prev.device == inp["x_t"].device
    ref_prev, ref_x0 = run_eager(kind, schedule, t, inp, clip, guided, dtype=torch.float64)
    tol = dict(TOLERANCES[dtype])
    # Against float64 the fp32 products in x̂0 = √(1/ᾱ_t)·x_t − …·ε̃ each carry half an fp32 ulp,
    # magnified by √(1/ᾱ_t) (≈ 157 at t = 999) and by |ε̃| (guidance): allow a few such ulps.
    tol["atol"] = max(tol["atol"], FP32_ULP * 16 * float(schedule.sqrt_recip_alphas_cumprod[t]))
    torch.testing.assert_close(x_prev.double(), ref_prev, **tol)
    torch.testing.assert_close(x0_pred.double(), ref_x0, **tol)
    if dtype == torch.float32:
        # The eager step in fp32 itself: the fused op is within 1e-6 of it.
        eager_prev, eager_x0 = run_eager(kind, schedule, t, inp, clip, guided)
        torch.testing.assert_close(x_prev, eager_prev, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(x0_pred, eager_x0, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", OPS)
def test_large_odd_size_and_return_x0_off(schedule, device, dtype, kind):
    inp = make_inputs(SHAPES[1], dtype, device, seed=1)
    x_prev, x0_pred = run_fused(kind, schedule, 500, inp, clip=True, guided=True, return_x0=False)
    assert isinstance(x_prev, torch.Tensor) and x0_pred is None
    ref_prev, _ = run_eager(kind, schedule, 500, inp, clip=True, guided=True, dtype=torch.float64)
    torch.testing.assert_close(x_prev.double(), ref_prev, **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("t", [0, 1, 500])
def test_ddpm_variance_and_last_step(schedule, device, variance, t):
    inp = make_inputs(SHAPES[0], torch.float32, device)
    fused, _ = fused_ddpm(schedule, inp["x_t"], inp["eps"], t, noise=inp["noise"], variance=variance)
    eager = eager_ddpm_step(schedule, inp["x_t"], inp["eps"], t, noise=inp["noise"], variance=variance).x_prev
    torch.testing.assert_close(fused, eager, atol=1e-6, rtol=1e-6)
    if t == 0:  # no noise on the last step, so noise may be omitted
        no_noise, _ = fused_ddpm(schedule, inp["x_t"], inp["eps"], 0, variance=variance)
        torch.testing.assert_close(no_noise, fused, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_ddim_final_step_and_cosine_schedule(device):
    cosine = NoiseSchedule("cosine", 50)
    inp = make_inputs(SHAPES[0], torch.float32, device)
    for t, t_prev in ((49, 30), (7, -1)):
        fused = fused_ddim(cosine, inp["x_t"], inp["eps"], t, t_prev, eta=0.5, noise=inp["noise"], clip_x0=True)
        eager = eager_ddim_step(cosine, inp["x_t"], inp["eps"], t, t_prev, eta=0.5, noise=inp["noise"],
                                clip_x0=True)
        torch.testing.assert_close(fused, tuple(eager), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# closed forms


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t", [10, 999])
def test_ddim_eta0_with_true_noise_recovers_x0(schedule, device, t):
    gen = torch.Generator().manual_seed(3)
    x0 = (torch.rand(SHAPES[0], generator=gen, dtype=torch.float64) * 2 - 1)
    noise = torch.randn(SHAPES[0], generator=gen, dtype=torch.float64)
    x_t = schedule.sqrt_alphas_cumprod[t] * x0 + schedule.sqrt_one_minus_alphas_cumprod[t] * noise
    f32 = dict(device=device, dtype=torch.float32)
    x_prev, x0_pred = fused_ddim(schedule, x_t.to(**f32), noise.to(**f32), t, -1)
    # fp32 inputs: x̂0 carries √(1/ᾱ_t) times their rounding (≈ 157× at t = 999).
    atol = 1e-6 * float(schedule.sqrt_recip_alphas_cumprod[t]) * 4
    torch.testing.assert_close(x_prev.double().cpu(), x0, atol=atol, rtol=0)
    torch.testing.assert_close(x0_pred, x_prev, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_ddpm_mean_equals_algorithm2(schedule, device):
    t = 300
    inp = make_inputs(SHAPES[0], torch.float32, device)
    zeros = torch.zeros_like(inp["x_t"])
    fused = fused_ddpm(schedule, inp["x_t"], inp["eps"], t, noise=zeros)[0].double()
    x_t, eps = inp["x_t"].double(), inp["eps"].double()
    beta, alpha = schedule.betas[t], schedule.alphas[t]
    mean = (x_t - beta / schedule.sqrt_one_minus_alphas_cumprod[t] * eps) / alpha.sqrt()
    torch.testing.assert_close(fused, mean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_guidance_scale_zero_and_one(schedule, device):
    inp = make_inputs(SHAPES[0], torch.float32, device)
    args = (schedule, inp["x_t"])
    for w, plain_eps in ((0.0, inp["eps_uncond"]), (1.0, inp["eps"])):
        guided = fused_ddim(*args, inp["eps"], 600, 400, eps_uncond=inp["eps_uncond"], guidance_scale=w)
        plain = fused_ddim(*args, plain_eps, 600, 400)
        torch.testing.assert_close(guided, plain, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# layouts and errors


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(schedule, device):
    inp = make_inputs((2, 3, 8, 10), torch.float32, device)
    strided = {k: v.transpose(2, 3) for k, v in inp.items()}  # (2, 3, 10, 8), not contiguous
    assert not strided["x_t"].is_contiguous()
    fused = run_fused("ddim1", schedule, 700, strided, clip=True, guided=True)
    dense = run_fused("ddim1", schedule, 700, {k: v.contiguous() for k, v in strided.items()},
                      clip=True, guided=True)
    for got, want in zip(fused, dense):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    # The op itself refuses them with a clear message.
    with pytest.raises(RuntimeError, match="x_t must be contiguous"):
        torch.ops.diffusion_kernels.ddim_step(strided["x_t"], inp["eps"].transpose(2, 3).contiguous(), None,
                                          None, 1.0, 2.0, 1.0, 0.5, 0.5, 0.0, False, False)
    with pytest.raises(RuntimeError, match="eps must be contiguous"):
        torch.ops.diffusion_kernels.ddpm_step(inp["x_t"], inp["eps"].transpose(2, 3).contiguous().transpose(2, 3),
                                          None, None, 1.0, 2.0, 1.0, 0.5, 0.5, 0.0, False, False)


def _op_args(x_t, eps, eps_uncond=None, noise=None, sigma=0.0):
    return (x_t, eps, eps_uncond, noise, 1.0, 2.0, 1.0, 0.5, 0.5, sigma, False, False)


@pytest.mark.parametrize("device", DEVICES)
def test_op_rejects_bad_tensors(device):
    x = torch.randn(2, 1, 4, 4, device=device)
    op = torch.ops.diffusion_kernels.ddpm_step
    with pytest.raises(RuntimeError, match=r"eps has shape \[2, 1, 4, 3\] but x_t has shape"):
        op(*_op_args(x, torch.randn(2, 1, 4, 3, device=device)))
    with pytest.raises(RuntimeError, match="eps has dtype Half but x_t has dtype Float"):
        op(*_op_args(x, x.half()))
    with pytest.raises(RuntimeError, match="eps_uncond has shape"):
        op(*_op_args(x, x, eps_uncond=x[:1]))
    with pytest.raises(RuntimeError, match="supported are float32, float16 and bfloat16"):
        op(*_op_args(x.double(), x.double()))
    with pytest.raises(RuntimeError, match="noise is required when sigma > 0"):
        op(*_op_args(x, x, sigma=0.1))
    with pytest.raises(RuntimeError, match="sigma must be >= 0"):
        op(*_op_args(x, x, noise=x, sigma=-0.1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", ["ddpm_step", "ddim_step"])
def test_op_takes_zero_dim_tensors(device, op_name):
    """A 0-d x_t is one element: the op's formula on it, against float64 (no batch dimension needed)."""
    x, eps, noise = (torch.tensor(v, device=device) for v in (0.75, -0.5, 1.25))
    coefs = (2.0, 1.5, 0.25, 0.5, 0.125)   # x0 = 2·x − 1.5·ε; out = 0.25·x0 + 0.5·(x or ε) + 0.125·z
    x_prev, x0 = getattr(torch.ops.diffusion_kernels, op_name)(x, eps, None, noise, 1.0, *coefs, False, True)
    x0_want = 2.0 * 0.75 - 1.5 * -0.5
    rest = 0.75 if op_name == "ddpm_step" else -0.5
    assert x_prev.shape == x0.shape == ()
    assert x0.item() == pytest.approx(x0_want, abs=1e-6)
    assert x_prev.item() == pytest.approx(0.25 * x0_want + 0.5 * rest + 0.125 * 1.25, abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=GPU_REASON)
def test_op_rejects_mixed_devices_cuda():
    x = torch.randn(2, 1, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="eps is on cpu but x_t is on cuda"):
        torch.ops.diffusion_kernels.ddpm_step(*_op_args(x, x.cpu()))
    with pytest.raises(RuntimeError, match="noise is on cpu but x_t is on cuda"):
        torch.ops.diffusion_kernels.ddim_step(*_op_args(x, x, noise=x.cpu(), sigma=0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_wrappers_reject_bad_arguments(schedule, device):
    x = torch.randn(2, 1, 4, 4, device=device)
    with pytest.raises(ValueError, match="noise is required"):
        fused_ddpm(schedule, x, x, 5)
    with pytest.raises(ValueError, match="noise is required"):
        fused_ddim(schedule, x, x, 5, 2, eta=1.0)
    with pytest.raises(ValueError, match="one set of coefficients for the whole batch"):
        fused_ddim(schedule, x, x, torch.tensor([5, 6]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="takes 5 coefficients, got 4"):
        kernels.ddim_step(x, x, (1.0, 1.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="must be finite"):
        kernels.ddpm_step(x, x, (1.0, float("nan"), 1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="must be finite"):
        kernels.ddpm_step(x, x, (1.0, 1.0, 1.0, 0.0, 0.0), eps_uncond=x, guidance_scale=float("inf"))


# --------------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile


def _opcheck_cases(device):
    x, eps, eps_u, z = make_inputs((2, 3, 5, 7), torch.float32, device).values()
    yield torch.ops.diffusion_kernels.ddpm_step.default, (x, eps, None, z, 1.0, 3.0, 2.5, 0.2, 0.7, 0.1, False, False)
    yield torch.ops.diffusion_kernels.ddpm_step.default, (x, eps, eps_u, None, 3.0, 3.0, 2.5, 0.2, 0.7, 0.0, True, True)
    yield torch.ops.diffusion_kernels.ddim_step.default, (x.half(), eps.half(), eps_u.half(), z.half(), 2.0,
                                                      3.0, 2.5, 0.4, 0.6, 0.3, True, True)
    yield torch.ops.diffusion_kernels.ddim_step.default, (x.bfloat16(), eps.bfloat16(), None, None, 1.0,
                                                      3.0, 2.5, 0.4, 0.6, 0.0, False, False)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(schedule, device):
    """The fake kernel lets dynamo trace the op without a graph break (fullgraph=True)."""
    coefs = ddim_coefficients(schedule, 600, 500, 1.0)

    def two_steps(x, eps, eps_u, z):
        x1, x0 = torch.ops.diffusion_kernels.ddim_step(x, eps, eps_u, z, 3.0, *coefs, True, True)
        x2, _ = torch.ops.diffusion_kernels.ddim_step(x1 * 0.5, eps, None, z, 1.0, *coefs, False, False)
        return x2 + x0

    inp = make_inputs((2, 1, 6, 5), torch.float32, device)
    args = (inp["x_t"], inp["eps"], inp["eps_uncond"], inp["noise"])
    torch._dynamo.reset()
    compiled = torch.compile(two_steps, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), two_steps(*args), atol=0, rtol=0)


def test_failed_build_names_what_is_missing(monkeypatch, tmp_path):
    """Without a usable prebuilt module and without a compiler, loading raises FusedKernelsUnavailable
    (reported as one line, like a UserError) naming the compiler, instead of falling back to the eager
    step."""
    from kernels import build

    monkeypatch.setattr(build, "EXTENSION_NAME", "kernels._no_such_prebuilt_module")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no ninja either
    assert any("C++ compiler" in item for item in build.missing_tools(with_cuda=False))
    with pytest.raises(kernels.FusedKernelsUnavailable, match=r"C\+\+ compiler.*ninja on PATH"):
        sampling_step.load_extension.__wrapped__()
    from shared.errors import USER_ERRORS

    assert kernels.FusedKernelsUnavailable in USER_ERRORS


def test_jit_build_directory_is_per_torch_version(monkeypatch, tmp_path):
    """Two torch versions never share a JIT build (a module built against other headers, or an old
    torch's wait on a newer one's lock file); TORCH_EXTENSIONS_DIR still chooses the root."""
    from kernels import build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = build.jit_build_directory()
    monkeypatch.setattr(torch, "__version__", "1.99.0+other")
    other = build.jit_build_directory()
    assert here.parent == other.parent == tmp_path and here.is_dir() and other.is_dir()
    assert here != other and other.name.endswith("-torch1.99.0+other")
    assert f"py{sys.version_info.major}{sys.version_info.minor}" in here.name


def test_lock_notice_only_where_torch_would_wait(monkeypatch, tmp_path):
    """A left lock file is named (and how to clear it) only for a torch whose FileBaton waits on it."""
    from torch.utils import cpp_extension

    from kernels import build

    assert build.lock_notice(tmp_path) is None   # no lock file
    (tmp_path / "lock").touch()
    monkeypatch.setattr(cpp_extension, "FileBaton", object, raising=False)
    notice = build.lock_notice(tmp_path)
    assert notice is not None and str(tmp_path / "lock") in notice and "delete that file" in notice
    monkeypatch.delattr(cpp_extension, "FileBaton")
    assert build.lock_notice(tmp_path) is None   # the OS-lock torch: a left file blocks nothing


@pytest.mark.parametrize("text, archs, flags", [
    ("8.0;8.6 9.0+PTX", ["8.0", "8.6", "9.0"],
     ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_86,code=sm_86",
      "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]),
    # the H200 image sets TORCH_CUDA_ARCH_LIST=9.0a: Hopper's arch-specific target (wgmma, TMA)
    ("9.0a", ["9.0a"], ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_90a,code=compute_90a"]),
    ("8.0,10.0f", ["8.0", "10.0f"],
     ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_100f,code=sm_100f",
      "-gencode=arch=compute_100f,code=compute_100f"]),
])
def test_cuda_arch_list(text, archs, flags):
    """TORCH_CUDA_ARCH_LIST as torch spells it, arch-specific suffixes included, gives one cubin per arch
    and PTX for the newest."""
    from kernels import build

    assert build.parse_arch_list(text) == archs
    assert build.cuda_arch_flags(archs) == flags


@pytest.mark.parametrize("text", ["sm_90", "9", "9.0b", "nine"])
def test_cuda_arch_list_rejects_bad_items(text):
    from kernels import build

    with pytest.raises(ValueError, match="bad CUDA arch"):
        build.parse_arch_list(text)
