"""The noise-prediction network ε_θ: the U-Net, its blocks, the EMA of its weights, a summary."""
