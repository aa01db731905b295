"""Compile every Triton kernel, in every launch configuration it can use, for real GPU targets.

Triton's CPU interpreter accepts kernels that the GPU compiler rejects (tl.dot smaller than 16, block
shapes that are not powers of two, global variables that are not constexpr, too much shared memory),
so CI also compiles each kernel with `triton.compile` for sm_80, sm_86, sm_89 and sm_90; this works on a
machine without a GPU. For each compiled kernel it prints the figures ptxas and the PTX give: registers,
spill bytes, shared memory, and the count of vectorised global loads/stores (ld.global.v4/v2).

    python -m kernels.compile_check               # the full matrix (see kernels/README.md)
    python -m kernels.compile_check --quick       # the CI subset: every code path, fewer shapes
    python -m kernels.compile_check --targets 90 --jobs 2

Exit status 1 if any kernel fails to compile or needs more shared memory than its target has. Must run
with TRITON_INTERPRET unset (the interpreter replaces the compiler); a fresh Triton cache is used so
ptxas really runs.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import multiprocessing
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field

# Shared memory a single program (CTA) may use per target, bytes (CUDA programming guide, per arch).
SMEM_LIMIT_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TARGETS = tuple(SMEM_LIMIT_BYTES)
# sm_90 (wgmma) and sm_80 (mma.sync) are the two code-generation families; sm_86 and sm_89 compile
# sm_80's code with less shared memory, so the quick set gives them the resource-heaviest variants.
CODEGEN_TARGETS = (80, 90)
WARP_SIZE = 32
DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Variant:
    """One kernel in one launch configuration, ready for triton.compile."""
    kernel: str
    label: str
    signature: dict
    constexprs: dict
    aligned: tuple  # argument names the JIT would mark divisible by 16 (pointers, strides, sizes)
    num_warps: int
    num_stages: int = 1
    extra: dict = field(default_factory=dict)


def _kernel_fns():
    from kernels.flash_attention import kernel as attn
    from kernels.group_norm import kernel as gn
    return {
        "gn_forward_kernel": gn.gn_forward_kernel,
        "gn_backward_kernel": gn.gn_backward_kernel,
        "gn_param_grad_kernel": gn.gn_param_grad_kernel,
        "attn_forward_kernel": attn.attn_forward_kernel,
        "attn_backward_preprocess_kernel": attn.attn_backward_preprocess_kernel,
        "attn_backward_dkdv_kernel": attn.attn_backward_dkdv_kernel,
        "attn_backward_dq_kernel": attn.attn_backward_dq_kernel,
    }


def _resolve(kernel: str):
    """A kernel of this package by name, or any @triton.jit function as "module:name"."""
    if ":" in kernel:
        module, name = kernel.split(":")
        return getattr(importlib.import_module(module), name)
    return _kernel_fns()[kernel]


def _signature(fn, pointer_types: dict, floats: tuple, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = "*" + pointer_types[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _gn_variant(fn, kernel, dtype, has_film, silu, cfg, shape: tuple) -> Variant:
    """shape: (BLOCK_C, HW_POW2, whether H·W is a multiple of 16), one entry of GN_SHAPES_ALL."""
    block_c, hw_pow2, hw_aligned = shape
    cons = dict(HAS_FILM=has_film, SILU=silu, BLOCK_C=block_c, HW_POW2=hw_pow2, TILE=cfg.kwargs["TILE"])
    ptrs = {n: dtype for n in ("X", "Y", "DY", "DX", "SCALE", "SHIFT", "DSCALE", "DSHIFT")}
    ptrs.update({n: "fp32" for n in ("W", "B", "MEAN", "RSTD", "DW_PART", "DB_PART")})
    aligned = tuple(ptrs) + (("HW",) if hw_aligned else ())
    label = (f"{dtype} film={int(has_film)} silu={int(silu)} TILE={cfg.kwargs['TILE']} warps={cfg.num_warps} "
             f"BLOCK_C={block_c} HW_POW2={hw_pow2} HW%16={'0' if hw_aligned else '?'}")
    return Variant(kernel, label, _signature(fn, ptrs, ("eps", "inv_group_size"), cons), cons, aligned,
                   cfg.num_warps, cfg.num_stages)


# (BLOCK_C, HW_POW2, H·W divisible by 16): channels per group 1..16 as in the U-Net presets (skip
# concatenations give 6 and 12 channels per group), spatial 4×4 … 32×32 and 7×7 … 28×28.
GN_SHAPES_ALL = ([(bc, hw, hw >= 16) for bc in (1, 2, 4, 8, 16) for hw in (16, 64, 256, 1024)]
                 + [(2, 64, False), (4, 256, False), (4, 1024, False), (16, 64, False), (64, 1024, True)])
# The CI subset: the benchmark shape's tile (4 channels per group, 32×32) and a small unaligned one.
GN_SHAPE_MAIN = (4, 1024, True)
GN_SHAPE_SMALL = (16, 64, False)


def group_norm_variants(quick: bool, arch: int) -> list[Variant]:
    """GN forward/backward: dtype x HAS_FILM x SILU x GPU config x tile shape; dγ/dβ reduction.

    quick: every (dtype, HAS_FILM, SILU) combination in the largest config, every config in the
    combination with the most code (bf16, FiLM, SiLU), and the small unaligned tile; on sm_86/sm_89,
    whose code generation is sm_80's, only the bf16 FiLM+SiLU variants.
    """
    from kernels.group_norm.op import GN_GPU_CONFIGS, PARAM_GRAD_BLOCK
    fns = _kernel_fns()
    variants = []
    largest = GN_GPU_CONFIGS[-1]
    for kernel in ("gn_forward_kernel", "gn_backward_kernel"):
        fn = fns[kernel]
        for dtype, has_film, silu in itertools.product(DTYPES, (False, True), (False, True)):
            richest = dtype == "bf16" and has_film and silu
            if not quick:  # every config at the main tile; every tile shape for the richest combination
                for cfg, shape in itertools.product(GN_GPU_CONFIGS, GN_SHAPES_ALL if richest else [GN_SHAPE_MAIN]):
                    variants.append(_gn_variant(fn, kernel, dtype, has_film, silu, cfg, shape))
                continue
            if richest:
                for cfg in GN_GPU_CONFIGS:
                    variants.append(_gn_variant(fn, kernel, dtype, has_film, silu, cfg, GN_SHAPE_MAIN))
                variants.append(_gn_variant(fn, kernel, dtype, has_film, silu, GN_GPU_CONFIGS[0], GN_SHAPE_SMALL))
            elif arch in CODEGEN_TARGETS:
                variants.append(_gn_variant(fn, kernel, dtype, has_film, silu, largest, GN_SHAPE_MAIN))
    fn = fns["gn_param_grad_kernel"]
    for dtype in DTYPES if (not quick or arch in CODEGEN_TARGETS) else ("bf16",):
        cons = dict(BLOCK=PARAM_GRAD_BLOCK)
        ptrs = dict(DW_PART="fp32", DB_PART="fp32", DW=dtype, DB=dtype)
        variants.append(Variant("gn_param_grad_kernel", f"{dtype} BLOCK={PARAM_GRAD_BLOCK}",
                                _signature(fn, ptrs, (), cons), cons, tuple(ptrs) + ("C",), 4))
    return variants


def attention_variants(quick: bool, arch: int) -> list[Variant]:
    """Attention: dtype x head dim x every GPU config of the forward, dK/dV and dQ kernels.

    quick: every config of each dtype's list at the largest head dim (the resource worst case); the
    smaller head dims in the first config; on sm_86/sm_89 only the half-precision largest head dim.
    """
    from kernels.flash_attention import op as ta
    fns = _kernel_fns()
    variants = []
    lists = {False: [("attn_forward_kernel", ta.ATTN_FWD_GPU_CONFIGS),
                     ("attn_backward_dkdv_kernel", ta.ATTN_DKDV_GPU_CONFIGS),
                     ("attn_backward_dq_kernel", ta.ATTN_DQ_GPU_CONFIGS)],
             True: [("attn_forward_kernel", ta.ATTN_FWD_FP32_CONFIGS),
                    ("attn_backward_dkdv_kernel", ta.ATTN_DKDV_FP32_CONFIGS),
                    ("attn_backward_dq_kernel", ta.ATTN_DQ_FP32_CONFIGS)]}
    strides = tuple(f"stride_{t}{a}" for t in "qkv" for a in "zhl")
    largest_d = max(ta.SUPPORTED_HEAD_DIMS)
    for dtype, head_dim in itertools.product(DTYPES, ta.SUPPORTED_HEAD_DIMS):
        is_fp32 = dtype == "fp32"
        # sm_86/sm_89 share sm_80's code; what can differ is whether a config fits their 99 KB of
        # shared memory, and the half-precision configs at the largest head dim are the largest.
        if quick and arch not in CODEGEN_TARGETS and (head_dim != largest_d or is_fp32):
            continue
        for kernel, configs in lists[is_fp32]:
            fn = fns[kernel]
            # fp16 and bf16 share code (only the element type differs): the quick set tunes over
            # fp16's full list and compiles bf16 in its first config.
            if quick and (head_dim != largest_d or dtype == "bf16"):
                configs = configs[:1]
            for cfg in configs:
                cons = dict(HEAD_DIM=head_dim, BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_N=cfg.kwargs["BLOCK_N"],
                            UPCAST=False, PRECISION="ieee" if is_fp32 else "tf32")
                ptrs = {n: dtype for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
                ptrs.update(LSE2="fp32", DELTA="fp32")
                label = (f"{dtype} d={head_dim} BLOCK_M={cons['BLOCK_M']} BLOCK_N={cons['BLOCK_N']} "
                         f"warps={cfg.num_warps} stages={cfg.num_stages}")
                variants.append(Variant(kernel, label, _signature(fn, ptrs, ("sm_scale",), cons), cons,
                                        tuple(ptrs) + strides, cfg.num_warps, cfg.num_stages))
        fn = fns["attn_backward_preprocess_kernel"]
        cons = dict(HEAD_DIM=head_dim, BLOCK_M=ta.PREPROCESS_BLOCK_M)
        ptrs = dict(O=dtype, DO=dtype, DELTA="fp32")
        variants.append(Variant("attn_backward_preprocess_kernel", f"{dtype} d={head_dim}",
                                _signature(fn, ptrs, (), cons), cons, tuple(ptrs), 4))
    return variants


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_VECTOR_OPS = {"ld.v4": r"ld\.global(?:\.\w+)*\.v4", "ld.v2": r"ld\.global(?:\.\w+)*\.v2",
               "st.v4": r"st\.global(?:\.\w+)*\.v4", "st.v2": r"st\.global(?:\.\w+)*\.v2"}


def compile_one(job: tuple) -> dict:
    """Compiles one (arch, variant) job; returns its figures or the error. Runs in a worker."""
    arch, v = job
    start = time.time()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    fn = _resolve(v.kernel)
    target = GPUTarget("cuda", arch, WARP_SIZE)
    backend = make_backend(target)
    attrs = {(fn.arg_names.index(n),): backend.parse_attr("D") for n in v.aligned if n in fn.arg_names}
    log = io.StringIO()
    result = dict(kernel=v.kernel, label=v.label, arch=arch)
    try:
        triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v output goes to stdout: capture it
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, v.signature, v.constexprs, attrs), target=target,
                                      options=dict(num_warps=v.num_warps, num_stages=v.num_stages))
    except Exception as err:  # any compiler error fails the check; keep the first lines of the message
        result["error"] = f"{type(err).__name__}: " + " | ".join(str(err).strip().splitlines()[-6:])
        return result
    text = log.getvalue()
    regs, spill = _PTXAS_REGS.search(text), _PTXAS_SPILL.search(text)
    ptx = compiled.asm["ptx"]
    result.update(
        registers=int(regs.group(1)) if regs else None,
        spill_bytes=(int(spill.group(1)) + int(spill.group(2))) if spill else None,
        shared=compiled.metadata.shared,
        vector={k: len(re.findall(p, ptx)) for k, p in _VECTOR_OPS.items()},
        mma="wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "-",
        seconds=time.time() - start,
    )
    if compiled.metadata.shared > SMEM_LIMIT_BYTES[arch]:
        result["error"] = f"needs {compiled.metadata.shared} B shared memory, sm_{arch} has {SMEM_LIMIT_BYTES[arch]}"
    return result


def _format(r: dict) -> str:
    if "error" in r and "registers" not in r:
        return f"FAIL sm_{r['arch']} {r['kernel']} [{r['label']}]: {r['error']}"
    vec = " ".join(f"{k}={n}" for k, n in r["vector"].items())
    status = "FAIL" if "error" in r else "ok  "
    line = (f"{status} sm_{r['arch']} {r['kernel']:<32} regs={r['registers']:>3} spill={r['spill_bytes']:>4}B "
            f"smem={r['shared']:>6}B {vec} mma={r['mma']:<8} {r['seconds']:4.1f}s [{r['label']}]")
    return line + (f": {r['error']}" if "error" in r else "")


def run(jobs: list, processes: int, echo: bool = False) -> list[dict]:
    """Compiles (arch, variant) jobs in `processes` forked workers; returns their results."""
    results = []
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        for r in pool.imap(compile_one, jobs):
            results.append(r)
            if echo:
                print(_format(r), flush=True)
    return results


def summary_table(results: list[dict]) -> str:
    """A markdown table per (kernel, target): ranges over the compiled variants (for kernels/README.md)."""
    rows = ["| kernel | target | variants | registers | spill bytes (max) | shared memory, B | "
            "ld.global.v4 / v2 | st.global.v4 / v2 | MMA |", "|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in results:
        if "registers" in r:
            groups.setdefault((r["kernel"], r["arch"]), []).append(r)

    def span(values):
        lo, hi = min(values), max(values)
        return f"{lo}" if lo == hi else f"{lo}–{hi}"

    for (kernel, arch), rs in sorted(groups.items()):
        vec = lambda k: span([r["vector"][k] for r in rs])  # noqa: E731
        rows.append(f"| {kernel} | sm_{arch} | {len(rs)} | {span([r['registers'] for r in rs])} | "
                    f"{max(r['spill_bytes'] for r in rs)} | {span([r['shared'] for r in rs])} | "
                    f"{vec('ld.v4')} / {vec('ld.v2')} | {vec('st.v4')} / {vec('st.v2')} | "
                    f"{'/'.join(sorted({r['mma'] for r in rs}))} |")
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI subset: every code path, fewer shapes")
    parser.add_argument("--targets", type=int, nargs="+", default=list(TARGETS), choices=TARGETS,
                        help="compute capabilities to compile for")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help="parallel compiler processes")
    parser.add_argument("--kernels", nargs="+", default=None, help="only these kernel names")
    parser.add_argument("--markdown", action="store_true", help="end with a per-kernel summary table")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be ≥ 1, got {args.jobs}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET: the interpreter replaces the GPU compiler", file=sys.stderr)
        return 2
    # A fresh cache, so every kernel really goes through ptxas (and its -v figures are printed).
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-compile-check-")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns unless this is explicit
    if args.kernels and set(args.kernels) - set(_kernel_fns()):
        print(f"error: unknown kernel(s) {sorted(set(args.kernels) - set(_kernel_fns()))}; "
              f"known: {sorted(_kernel_fns())}", file=sys.stderr)
        return 2
    jobs = []
    for arch in args.targets:
        variants = group_norm_variants(args.quick, arch) + attention_variants(args.quick, arch)
        variants = [v for v in variants if not args.kernels or v.kernel in args.kernels]
        jobs += [(arch, v) for v in variants]
    start = time.time()
    print(f"compiling {len(jobs)} kernel variants for sm_{', sm_'.join(map(str, args.targets))} "
          f"({'quick' if args.quick else 'full'} set, {args.jobs} processes)", flush=True)
    results = run(jobs, args.jobs, echo=True)
    failures = sum("error" in r for r in results)
    if args.markdown:
        print(summary_table(results))
    print(f"{len(jobs) - failures}/{len(jobs)} compiled in {time.time() - start:.0f} s; "
          f"{failures} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
