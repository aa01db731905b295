"""The noise-prediction network ε_θ: the U-Net, its blocks, the EMA of its weights, the autocast
precisions, a per-block summary and a diagram drawn from the module tree."""
