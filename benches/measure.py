"""How every benchmark here is timed, what it is compared with, and what it records.

Timing (METHOD.md of the device machines):
- CUDA, one kernel call: `triton.testing.do_bench`, median of many calls after warm-up, with the L2
  cache flushed between calls so that small inputs are not timed out of the cache.
- CUDA, a longer region (a train step, a sampler run): CUDA events around each call, median of the
  timed rounds after warm-up rounds; each round synchronises on its end event.
- CPU: pytest-benchmark's own timer (time.perf_counter), median of the rounds after warm-up rounds.
On CUDA pytest-benchmark still times the same calls with its host clock (each call synchronised), so the
JSON keeps its usual statistics; the figure the report uses is `extra_info["time_ms"]`, and
`extra_info["timer"]` says which clock produced it.

Ceilings, measured in the same run on the same device (never taken from a datasheet):
- copy bandwidth: a large device-to-device copy, counting bytes read plus bytes written;
- matmul rate: a large matrix product on random data (bf16 on CUDA, fp32 on CPU), 2·M·N·K FLOPs.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# do_bench budgets, in milliseconds of timed work (that is how do_bench counts them).
KERNEL_WARMUP_MS = 25
KERNEL_REP_MS = 100
# Host-timed rounds that give each CUDA kernel benchmark its pytest-benchmark statistics.
KERNEL_HOST_ROUNDS = 5

# Ceiling sizes: large enough to run far past launch overhead and, on the GPU, to be several times
# the 60 MB L2 of an H200 (so the copy measures HBM, not the cache).
GPU_COPY_BYTES = 1 << 30          # 1 GiB source, 1 GiB destination
GPU_MATMUL_SIZE = 8192            # 8192³ bf16 product: 1.1 TFLOP per call
CPU_COPY_BYTES = 1 << 27          # 128 MiB: well past a server CPU's last-level cache
CPU_MATMUL_SIZE = 1024            # 1024³ fp32 product: 2.1 GFLOP per call
CPU_CEILING_ROUNDS = 5


def on_cuda() -> bool:
    return torch.cuda.is_available()


def bench_device() -> torch.device:
    return torch.device("cuda" if on_cuda() else "cpu")


def module_missing(relpath: str) -> str | None:
    """A skip reason when `relpath` (a file of this repository, e.g. kernels/flash_attention/op.py) is absent."""
    return None if (REPO_ROOT / relpath).is_file() else f"{relpath} not present"


# --------------------------------------------------------------------------------------------------
# ceilings


@dataclass(frozen=True)
class Ceilings:
    """What achieved figures are a percentage of; measured once per session on the benchmark device."""
    device: str
    copy_gbps: float         # device-to-device (or RAM-to-RAM) copy, (bytes read + bytes written) / s
    copy_bytes: int          # bytes read + written per timed copy
    matmul_tflops: float     # dense matrix product on random data, 2·M·N·K / s
    matmul_dtype: str
    matmul_size: int         # M = N = K

    def as_dict(self) -> dict:
        return asdict(self)


def matmul_flops(n: int) -> int:
    """FLOPs of an n×n by n×n matmul: n² outputs, each n multiplies and n adds."""
    return 2 * n ** 3


def _median_seconds_cpu(fn: Callable[[], object], rounds: int) -> float:
    fn()  # warm-up: first-touch page faults, thread-pool start
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_ceilings(device: torch.device) -> Ceilings:
    if device.type == "cuda":
        from triton.testing import do_bench
        numel = GPU_COPY_BYTES // 4
        src = torch.randn(numel, device=device)
        dst = torch.empty_like(src)
        copy_ms = do_bench(lambda: dst.copy_(src), warmup=KERNEL_WARMUP_MS, rep=KERNEL_REP_MS,
                           return_mode="median")
        copy_bytes = 2 * src.nbytes  # read src + write dst
        del src, dst
        n = GPU_MATMUL_SIZE
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        mm_ms = do_bench(lambda: a @ b, warmup=KERNEL_WARMUP_MS, rep=KERNEL_REP_MS, return_mode="median")
        del a, b
        torch.cuda.empty_cache()
        return Ceilings(torch.cuda.get_device_name(device), copy_bytes / (copy_ms * 1e-3) / 1e9, copy_bytes,
                        matmul_flops(n) / (mm_ms * 1e-3) / 1e12, "bfloat16", n)
    numel = CPU_COPY_BYTES // 4
    src = torch.randn(numel)
    dst = torch.empty_like(src)
    copy_s = _median_seconds_cpu(lambda: dst.copy_(src), CPU_CEILING_ROUNDS)
    n = CPU_MATMUL_SIZE
    a, b = torch.randn(n, n), torch.randn(n, n)
    mm_s = _median_seconds_cpu(lambda: a @ b, CPU_CEILING_ROUNDS)
    return Ceilings(f"cpu ({torch.get_num_threads()} threads)", 2 * src.nbytes / copy_s / 1e9, 2 * src.nbytes,
                    matmul_flops(n) / mm_s / 1e12, "float32", n)


# --------------------------------------------------------------------------------------------------
# timing


def time_call(benchmark, fn: Callable[[], object], device: torch.device, *, rounds: int,
              warmup_rounds: int = 1, kernel: bool = False) -> float | None:
    """Times `fn` as the benchmark's one measured call; returns the median seconds of one call.

    kernel=True on CUDA: the median comes from do_bench (L2 flushed between calls). Otherwise on CUDA
    each round is bracketed by CUDA events. Returns None under --benchmark-disable (fn ran once).
    Records `time_ms`, `timer` and `rounds` in benchmark.extra_info.
    """
    if benchmark.disabled:
        benchmark.pedantic(fn, rounds=1)
        return None
    if device.type == "cuda":
        if kernel:
            from triton.testing import do_bench
            ms = do_bench(fn, warmup=KERNEL_WARMUP_MS, rep=KERNEL_REP_MS, return_mode="median")

            def synced():
                fn()
                torch.cuda.synchronize(device)

            benchmark.pedantic(synced, rounds=KERNEL_HOST_ROUNDS, warmup_rounds=1)
            timer = "cuda events: triton.testing.do_bench median, L2 flushed between calls"
        else:
            samples: list[float] = []

            def evented():
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))

            benchmark.pedantic(evented, rounds=rounds, warmup_rounds=warmup_rounds)
            ms = statistics.median(samples[warmup_rounds:])
            timer = f"cuda events: median of {rounds} rounds after {warmup_rounds} warm-up"
    else:
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup_rounds)
        ms = benchmark.stats.stats.median * 1e3
        timer = f"perf_counter: median of {rounds} rounds after {warmup_rounds} warm-up"
    benchmark.extra_info.update(time_ms=ms, timer=timer)
    return ms * 1e-3


def record(benchmark, *, family: str, case: str, impl: str, **info) -> None:
    """Labels a benchmark for the report: `family` picks its table, `case` its row, `impl` its column."""
    benchmark.extra_info.update(family=family, case=case, impl=impl, device=str(bench_device()), **info)


def record_bandwidth(benchmark, seconds: float | None, bytes_per_call: int, formula: str,
                     ceilings: Ceilings) -> None:
    benchmark.extra_info.update(bytes_per_call=bytes_per_call, bytes_formula=formula,
                                ceiling_copy_gbps=ceilings.copy_gbps)
    if seconds:
        gbps = bytes_per_call / seconds / 1e9
        benchmark.extra_info.update(gbps=gbps, pct_of_ceiling=100 * gbps / ceilings.copy_gbps,
                                    ceiling="copy GB/s")


def record_flops(benchmark, seconds: float | None, flops_per_call: int, formula: str, ceilings: Ceilings) -> None:
    benchmark.extra_info.update(flops_per_call=flops_per_call, flops_formula=formula,
                                ceiling_matmul_tflops=ceilings.matmul_tflops)
    if seconds:
        tflops = flops_per_call / seconds / 1e12
        benchmark.extra_info.update(tflops=tflops, pct_of_ceiling=100 * tflops / ceilings.matmul_tflops,
                                    ceiling=f"{ceilings.matmul_dtype} matmul TFLOP/s")


# --------------------------------------------------------------------------------------------------
# the run's time budget (the GPU script must finish in 10 minutes)

#: Absolute deadline (Unix seconds) after which expensive benchmarks skip; set by scripts/gpu_bench.py.
DEADLINE_ENV = "BENCH_DEADLINE"


def budget_skip_reason(estimate_s: float) -> str | None:
    """A skip reason when fewer than `estimate_s` seconds remain before $BENCH_DEADLINE, else None."""
    deadline = os.environ.get(DEADLINE_ENV)
    if not deadline:
        return None
    left = float(deadline) - time.time()
    if left < estimate_s:
        return (f"time budget spent: {max(left, 0):.0f} s left before {DEADLINE_ENV}, this needs about "
                f"{estimate_s:.0f} s")
    return None


def randomise_zero_init(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Refills parameters initialised to exactly zero (DDPM's zero_module layers) with small noise.

    A fresh U-Net predicts ε̂ = 0 exactly; timing on zeros can flatter a kernel (METHOD.md), and the
    samplers would then step on a constant. Trained weights are not zero, so neither are these.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model
