"""Test-wide set-up. Runs before any test module is imported.

Without a GPU, Triton kernels run through Triton's CPU interpreter, which must be chosen before
Triton is first imported, so it is chosen here, at the very top.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

