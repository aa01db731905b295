"""The two ceilings every percentage in the report is out of, measured in this run on this device.

Copy: bytes read + bytes written, over a buffer several times the last-level cache.
Matmul: 2·M·N·K FLOPs of a square product on random data (bf16 on CUDA, fp32 on CPU).
"""
from __future__ import annotations

import pytest
import torch

from benches.measure import matmul_flops, record, time_call

pytestmark = pytest.mark.priority(0)


def test_copy_bandwidth(benchmark, device, ceilings):
    numel = ceilings.copy_bytes // 2 // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(benchmark, lambda: dst.copy_(src), device, rounds=5, kernel=True)
    record(benchmark, family="ceiling", case="copy", impl="torch copy_",
           bytes_per_call=ceilings.copy_bytes, bytes_formula="2 · numel · 4 (read + write, fp32)")
    if seconds:
        benchmark.extra_info["gbps"] = ceilings.copy_bytes / seconds / 1e9
    benchmark.extra_info["ceiling_copy_gbps"] = ceilings.copy_gbps


def test_matmul_rate(benchmark, device, ceilings):
    n = ceilings.matmul_size
    dtype = getattr(torch, ceilings.matmul_dtype)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_call(benchmark, lambda: a @ b, device, rounds=5, kernel=True)
    record(benchmark, family="ceiling", case="matmul", impl=f"torch matmul {ceilings.matmul_dtype}",
           flops_per_call=matmul_flops(n), flops_formula="2 · n³")
    if seconds:
        benchmark.extra_info["tflops"] = matmul_flops(n) / seconds / 1e12
    benchmark.extra_info["ceiling_matmul_tflops"] = ceilings.matmul_tflops
