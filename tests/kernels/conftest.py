"""Kernel-test set-up. Runs before any kernel test module is imported.

Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be chosen before Triton is
first imported (tests/conftest.py does the same for the whole suite; this keeps `pytest tests/kernels`
right on its own). Every buffer the ops allocate starts as NaN (POISON_ENV), so an element a kernel
never writes turns a result NaN and fails its test.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["KERNELS_POISON_OUTPUTS"] = "1"  # = kernels.triton_common.POISON_ENV (not imported: Triton)
