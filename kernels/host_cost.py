"""Host cost of one fused-op call: what the CPU spends per call when the GPU's work is left out.

At the U-Net's sizes the GPU time of group_norm_film_silu and attention is a few microseconds and flat
across sizes, so what a call costs is the host's: the op's Python, its argument checks, its output
allocations, the autograd bookkeeping and the launch. This module measures that with the launch
stubbed out:

    python -m kernels.host_cost            # a table (without a GPU: CPU tensors, TRITON_INTERPRET=1)
    python -m kernels.host_cost --json

What the stub removes: only each kernel's `run`, the launch itself (Triton's argument binding, its
compiled-kernel lookup and the driver call). It is replaced on the op module's kernel objects, for the
duration of `stub_launches` and nowhere else. What stays and is counted: everything the op does up
to the launch, and `kernel[grid](...)` itself (Triton's launch proxy, up to its call of `run`).
Outputs are then the op's freshly allocated buffers, never computed.

Three implementations are timed in one run, on the same inputs:
- fused: the ops' eager path (a plain torch.autograd.Function, or the forward launch alone without
  autograd), launches stubbed;
- custom op: the torch.library ops that torch.compile traces, called eagerly through the dispatcher
  (custom_op + register_autograd), launches stubbed;
- eager: the PyTorch reference (kernels.reference) on the same device, its kernels launched as usual
  (on a GPU they run asynchronously, so its figure is host time too; on the CPU they compute on the
  host, so its figure includes the arithmetic).
A figure is the median host time of one call over CALLS calls, and the smallest such median over
REPEATS repeats spread over the run (the repeat least disturbed by other work on the machine).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from kernels import reference

# The measured inputs: a GroupNorm of the MNIST preset's 7×7 level (8 x 64 x 7 x 7, 32 groups, FiLM)
# and the attention of that level (2 x 1 head x L = 49 x d = 32).
GN_SHAPE = (8, 64, 7, 7)
GN_GROUPS = 32
ATTN_SHAPE = (2, 1, 49, 32)
CALLS = 1000
REPEATS = 10
# (case, what runs): fwd without autograd, fwd recording autograd, fwd + backward.
CASES = ("gn fwd", "gn fwd (grad)", "gn fwd+bwd", "attention fwd", "attention fwd (grad)",
         "attention fwd+bwd")
IMPLS = ("fused", "custom op", "eager")
REPO_ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def stub_launches(*modules):
    """Within the block, every Triton kernel object in `modules`' namespaces launches nothing: its
    `run` (the launch) is a no-op; `kernel[grid](...)` and all the op's own work still run."""
    from triton.runtime.jit import KernelInterface

    kernels = {id(k): k for m in modules for k in vars(m).values() if isinstance(k, KernelInterface)}
    for k in kernels.values():
        if "run" in vars(k):
            raise RuntimeError(f"{k} already has its launch replaced")
        k.run = _no_launch
    try:
        yield
    finally:
        for k in kernels.values():
            del k.run


def _no_launch(*args, **kwargs) -> None:
    return None


def median_host_us(call: Callable[[], object], calls: int = CALLS) -> float:
    """The median host time of one call over `calls` calls, in µs; the garbage collector is paused
    while timing, as timeit does."""
    samples = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(calls):
            start = time.perf_counter_ns()
            call()
            samples.append(time.perf_counter_ns() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(samples) / 1e3


def _inputs(case: str, device: torch.device) -> list[torch.Tensor]:
    """Fresh random inputs of a case: (x, γ, β, scale, shift) or (q, k, v)."""
    if case.startswith("gn"):
        n, c, _, _ = GN_SHAPE
        shapes = [GN_SHAPE, (c,), (c,), (n, c), (n, c)]
    else:
        shapes = [ATTN_SHAPE] * 3
    grad = not case.endswith(" fwd")
    return [torch.randn(s).to(device).requires_grad_(grad) for s in shapes]


def _forward_fn(case: str, impl: str) -> Callable:
    """The implementation's forward as fn(*inputs) -> output."""
    from kernels.flash_attention import op as attention_op
    from kernels.group_norm import op as gn_op

    if case.startswith("gn"):
        if impl == "custom op":
            return lambda x, w, b, s, t: gn_op._gn_fwd_op(x, GN_GROUPS, w, b, s, t, 1e-5, True)[0]
        fn = gn_op.group_norm_film_silu if impl == "fused" else reference.group_norm_film_silu
        return lambda x, w, b, s, t: fn(x, GN_GROUPS, w, b, s, t, 1e-5, True)
    if impl == "custom op":
        return lambda q, k, v: attention_op._attn_fwd_op(q, k, v)[0]
    return attention_op.attention if impl == "fused" else reference.attention


def case_call(case: str, impl: str, device: torch.device) -> Callable[[], object]:
    """One call of `case` by `impl` as a no-argument callable."""
    inputs = _inputs(case, device)
    forward = _forward_fn(case, impl)
    if case.endswith("fwd+bwd"):
        grad_out = torch.randn_like(forward(*inputs))
        return lambda: torch.autograd.grad(forward(*inputs), inputs, grad_out)
    return lambda: forward(*inputs)


def measure(device: torch.device, calls: int = CALLS, repeats: int = REPEATS, impls=IMPLS) -> dict:
    """{case: {impl: µs per call}} for every case and each of `impls`, launches stubbed; the
    no-autograd forwards run under torch.no_grad(). Each repeat times every (case, impl) in turn, so
    the repeats of one figure are spread over the whole measurement, not bunched in one moment of it."""
    from kernels.flash_attention import op as attention_op
    from kernels.group_norm import op as gn_op

    medians = {(case, impl): [] for case in CASES for impl in impls}
    with stub_launches(gn_op, attention_op):
        timed = {key: case_call(*key, device) for key in medians}
        for repeat in range(repeats + 1):  # the first pass warms up and is not kept
            for (case, impl), call in timed.items():
                with torch.no_grad() if case.endswith(" fwd") else contextlib.nullcontext():
                    median = median_host_us(call, calls if repeat else max(calls // 10, 1))
                if repeat:
                    medians[case, impl].append(median)
    return {case: {impl: min(medians[case, impl]) for impl in impls} for case in CASES}


def measure_in_subprocess(calls: int = CALLS, repeats: int = REPEATS, impls=IMPLS, timeout_s: float = 600) -> dict:
    """`measure` in a fresh Python (`python -m kernels.host_cost --json`), without NaN-poisoned buffers
    (a test setting) and, without a GPU, through the interpreter: the production configuration,
    whatever the calling process set."""
    env = {k: v for k, v in os.environ.items() if k != "KERNELS_POISON_OUTPUTS"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-m", "kernels.host_cost", "--json", "--calls", str(calls),
                          "--repeats", str(repeats), "--impls", *impls], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"python -m kernels.host_cost failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


def _table(results: dict, device: torch.device, impls) -> str:
    lines = [f"host µs per call, launches stubbed, on {device} ({torch.get_num_threads()} threads); "
             f"GN {'×'.join(map(str, GN_SHAPE))} G={GN_GROUPS} with FiLM, attention {'×'.join(map(str, ATTN_SHAPE))}",
             f"{'case':<22}" + "".join(f"{impl:>12}" for impl in impls)]
    for case, row in results.items():
        lines.append(f"{case:<22}" + "".join(f"{row[impl]:>12.1f}" for impl in impls))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print {case: {impl: µs}} as JSON")
    parser.add_argument("--calls", type=int, default=CALLS, help="calls per repeat (≥ 1)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="repeats; the smallest median is kept (≥ 1)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="implementations to time")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.repeats < 1:
        parser.error("--calls and --repeats must be at least 1")
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the op modules import Triton
    device = torch.device("cuda" if cuda else "cpu")
    results = measure(device, args.calls, args.repeats, args.impls)
    print(json.dumps(results) if args.json else _table(results, device, args.impls))


if __name__ == "__main__":
    main()
