"""The fused DDPM / DDIM sampler update, one pass over memory per step, and the per-sample noise it draws.

    csrc/             the C++ op (schemas, checks, the CPU loop) and csrc/cuda/ (the CUDA kernel)
    op.py             loading the compiled op, its fake kernel, and `ddpm_step` / `ddim_step`, the
                      fused entry points: the twins of shared.diffusion.steps.ddpm_update / ddim_update,
                      on the scalars of shared.diffusion.coefficients (the formulas' one home)
    philox_op.py      per-sample noise, torch.ops.diffusion_kernels.philox_normal (csrc/philox.h,
                      philox_normal.cpp, cuda/philox_normal.cu); the fused step draws the same noise
                      in-kernel from an InKernelNoise (seeds and stream)
    philox_reference.py  the eager PyTorch generator (Philox4x32-10 + Box-Muller), its ground truth

Importing this package loads nothing compiled; `kernels.ddpm_step` / `kernels.ddim_step` load op.py.
"""
