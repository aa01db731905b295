"""The fused DDPM / DDIM sampler update: one pass over memory per step.

    csrc/             the C++ op (schemas, checks, the CPU loop) and csrc/cuda/ (the CUDA kernel)
    op.py             loading the compiled op, its fake kernel, and `ddpm_step` / `ddim_step`, the
                      fused entry points
    coefficients.py   the per-step scalars in float64 from the schedule, and the timestep checks:
                      the one definition both the fused op and the eager steps use
    reference.py      the eager PyTorch update from those coefficients (the ground truth)

Importing this package loads nothing compiled; `kernels.ddpm_step` / `kernels.ddim_step` load op.py.
"""
