"""The eager PyTorch references of the Triton ops, in one namespace: what the U-Net runs when fused
kernels are off, and the ground truth the fused ops are tested against.

Each is defined beside its kernel (kernels/group_norm/reference.py, kernels/flash_attention/reference.py)
and has exactly the signature of its fused counterpart (`kernels.group_norm_film_silu`,
`kernels.attention`). The sampling step's reference is the diffusion math itself:
`shared.diffusion.steps.ddpm_update` / `ddim_update`, from the scalars of `shared.diffusion.coefficients`.
"""
from __future__ import annotations

from kernels.flash_attention.reference import attention, check_attention_args
from kernels.group_norm.reference import check_group_norm_args, group_norm_film_silu

__all__ = ["group_norm_film_silu", "check_group_norm_args", "attention", "check_attention_args"]
