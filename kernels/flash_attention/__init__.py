"""Flash attention, softmax(q kᵀ/√d) v without the L x L score matrix in memory.

    kernel.py      the Triton forward and backward kernels, with their math
    op.py          the torch.library ops (forward, backward, autograd, fake kernels), the launch grids
                   and `attention`, the fused entry point (imports Triton)
    reference.py   the eager PyTorch version and the argument checks both share

Importing this package imports neither Triton nor the kernels (`kernels.attention` loads op.py), so the
head dimensions the kernels support can be asked for cheaply.
"""
#: Head dimensions d the kernels are compiled for (a power of two ≥ 16, as tl.dot needs).
SUPPORTED_HEAD_DIMS = (32, 64, 128)
