"""The noise-prediction network ε_θ: the U-Net, its blocks, the EMA of its weights, the autocast
precisions, a per-block summary, a diagram drawn from the module tree, and the export to diffusers."""
