"""GroupNorm + FiLM + SiLU, y = act(GN(x; γ, β)·(1 + scale) + shift).

    kernel.py      the Triton forward, backward and dγ/dβ kernels, with their math
    op.py          the torch.library ops (forward, backward, autograd, fake kernels) and
                   `group_norm_film_silu`, the fused entry point (imports Triton)
    reference.py   the eager PyTorch version and the argument checks both share

Importing this package imports neither Triton nor the kernels; `kernels.group_norm_film_silu` loads op.py.
"""
