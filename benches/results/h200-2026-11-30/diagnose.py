"""The first GPU run's diagnostics (README.md beside it): the philox op per seed against the eager reference,
the U-Net per sample on CUDA against the CPU, and the raw sampling-step op given malformed tensors.

    python benches/results/h200-2026-11-30/diagnose.py philox|model|reject      (from the repository root)
"""
import sys

import torch

sys.path.insert(0, ".")
part = sys.argv[1]
if part == "philox":
    from kernels.sampling_step import philox_op
    from kernels.sampling_step.philox_reference import philox_normal
    from shared.diffusion.noise import per_sample_noise
    print("op available cuda:", philox_op.available("cuda"), "cpu:", philox_op.available("cpu"), flush=True)
    seeds = torch.arange(1000)
    for shape in [(1, 28, 28), (3, 32, 32), (1, 7, 7)]:
        n = 1
        for d in shape: n *= d
        ref = philox_normal(seeds, 0, n, False).reshape(1000, *shape)
        gpu = philox_op.philox_normal(seeds.cuda(), torch.tensor(0, device="cuda"), list(shape)).cpu()
        cpu = philox_op.philox_normal(seeds, torch.tensor(0), list(shape)) if philox_op.available("cpu") else ref
        per = (gpu - ref).flatten(1).abs().amax(1)
        bad = (per > 1e-5).nonzero().flatten().tolist()
        print(shape, "cuda-vs-ref bad seeds:", len(bad), bad[:20], "max", per.max().item(),
              "cpu-op-vs-ref max", (cpu - ref).abs().max().item(), flush=True)
        if bad:
            s = bad[0]
            d = (gpu[s] - ref[s]).flatten()
            idx = (d.abs() > 1e-5).nonzero().flatten()
            print("  seed", s, "n bad elems", idx.numel(), "first", idx[:12].tolist(), "gpu std", gpu[s].std().item(),
                  "vals gpu", gpu[s].flatten()[idx[:6]].tolist(), "ref", ref[s].flatten()[idx[:6]].tolist(), flush=True)
        gs = torch.stack([per_sample_noise(seeds[i:i + 100].tolist(), shape, "cuda").cpu() for i in range(0, 1000, 100)]).reshape(1000, *shape)
        print("  per_sample_noise cuda vs ref max", (gs - ref).abs().max().item(), flush=True)
elif part == "model":
    from shared.model.unet import UNet
    torch.manual_seed(0)
    m = UNet.from_preset("mnist", num_classes=10).eval()
    for p in m.parameters():  # zero_module'd out conv: give it weights so the output depends on everything
        if p.abs().sum() == 0: p.data.normal_(0, 0.02)
    x = torch.randn(200, 1, 28, 28); t = torch.randint(0, 1000, (200,)); y = torch.randint(0, 11, (200,))
    with torch.no_grad():
        ref = m(x, t, y)
        m = m.cuda()
        for name, ctx in [("fp32", torch.autocast("cuda", enabled=False)), ("bf16", torch.autocast("cuda", dtype=torch.bfloat16))]:
            for fused in (False, True):
                m.set_fused_kernels(fused)
                with ctx:
                    out = m(x.cuda(), t.cuda(), y.cuda()).float().cpu()
                rel = (out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
                print(name, "fused" if fused else "eager", "per-sample rel err: median", rel.median().item(),
                      "max", rel.max().item(), "n>0.05", (rel > 0.05).sum().item(), flush=True)
elif part == "reject":
    import kernels  # noqa: F401  (registers the ops)
    from kernels.sampling_step import op as _op
    _op.load_extension()
    x = torch.randn(2, 1, 4, 4, device="cuda")
    op = torch.ops.diffusion_kernels.ddpm_step
    args = lambda x_t, eps, eps_uncond=None, noise=None, sigma=0.0: (x_t, eps, eps_uncond, noise, 1.0, 2.0, 1.0, 0.5, 0.5, sigma, False, False)
    cases = [("good", args(x, x)), ("eps shape", args(x, torch.randn(2, 1, 4, 3, device="cuda"))), ("eps dtype", args(x, x.half())),
             ("uncond shape", args(x, x, eps_uncond=x[:1])), ("double", args(x.double(), x.double())),
             ("no noise", args(x, x, sigma=0.1)), ("neg sigma", args(x, x, noise=x, sigma=-0.1))]
    for name, a in cases:
        print("case", name, flush=True)
        try:
            op(*a); torch.cuda.synchronize(); print("  ok", flush=True)
        except RuntimeError as e:
            print("  RuntimeError:", str(e).splitlines()[0][:150], flush=True)
