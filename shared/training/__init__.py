"""Training with L_simple: configuration, loss, resumable state, the loop, data, distributed."""
