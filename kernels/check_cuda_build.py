"""Proves that the CUDA source of the sampling-step extension compiles and links, without a GPU.

    python kernels/check_cuda_build.py                      # sm_80, sm_86, sm_89, sm_90 (+ PTX 9.0)
    python kernels/check_cuda_build.py --archs 8.0,9.0 --build-dir /tmp/x

It builds the full extension (C++ and CUDA sources, the same flags as setup.py and the JIT path, from
kernels/build.py) into --build-dir with nvcc, links it against the toolkit's libcudart, imports it,
and then checks four things: the module says CUDA was compiled in, the dispatcher holds a CUDA
kernel for every op, the library embeds one cubin per asked arch plus PTX for the newest (read
from the fat-binary headers, and cross-checked with cuobjdump --list-elf where it exists), and each
CUDA kernel's input checks turn a malformed call into a RuntimeError naming the problem. That last
one calls the CUDA kernels through the dispatcher's CUDA key with CPU tensors: the checks run before
anything touches the GPU, so a machine without one runs them (and a well-formed call ends at the
kernel's own device check).
Exit status 0 when all hold; otherwise one `error: ...` line and exit 2.

CUDA_HOME: if unset, the toolkit folder holding lib64/libcudart.so is found beside nvcc (see
kernels/build.py); the nvcc on PATH may be a launcher outside the toolkit.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a plain checkout
    sys.path.insert(0, str(REPO))

from kernels import build  # noqa: E402  (after the path fix above)

OPS = tuple(f"{build.OP_NAMESPACE}::{op}" for op in ("ddpm_step", "ddim_step", "philox_normal"))


class CheckFailed(Exception):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--archs", default=",".join(build.DEFAULT_CUDA_ARCHS),
                        help="comma-separated compute capabilities to build cubins for")
    parser.add_argument("--build-dir", default=str(REPO / "build" / "cuda_check"),
                        help="where the objects and the library go (reused: ninja rebuilds only "
                             "what changed)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler command lines")
    return parser.parse_args(argv)


FATBIN_MAGIC = 0xBA55ED50  # start of each fat binary nvcc embeds in the .nv_fatbin section
FATBIN_KIND_PTX, FATBIN_KIND_CUBIN = 1, 2


def fatbin_entries(library: Path) -> set[str]:
    """The code embedded in `library`, as {'sm_80', …} for cubins and {'compute_90', …} for PTX.

    Reads the fat-binary headers directly (header: u32 magic, u16 version, u16 header size, u64 size;
    entry: u16 kind, u16, u32 header size, u64 payload size, …, u32 arch at byte 28), so no cuobjdump
    is needed; `cuobjdump_cubins` cross-checks it where that tool exists.
    """
    data = library.read_bytes()
    magic = struct.pack("<I", FATBIN_MAGIC)
    found, pos = set(), 0
    while (start := data.find(magic, pos)) >= 0:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, start)
        entry, end = start + header_size, start + header_size + fat_size
        while entry < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            (arch,) = struct.unpack_from("<I", data, entry + 28)
            if kind == FATBIN_KIND_CUBIN:
                found.add(f"sm_{arch}")
            elif kind == FATBIN_KIND_PTX:
                found.add(f"compute_{arch}")
            entry += entry_header + payload
        pos = max(end, start + len(magic))
    return found


def find_cuobjdump(cuda_home: str) -> str | None:
    """cuobjdump from the toolkit, PATH, or Triton's bundled copy (minimal toolkits lack it)."""
    candidates = [Path(cuda_home) / "bin" / "cuobjdump", shutil.which("cuobjdump")]
    try:
        import triton
        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c and Path(c).exists()), None)


def cuobjdump_cubins(library: Path, cuobjdump: str) -> set[str]:
    """The sm_XX of every cubin cuobjdump lists in `library`."""
    listing = subprocess.run([cuobjdump, "--list-elf", str(library)], capture_output=True, text=True,
                             check=False)
    if listing.returncode != 0:
        raise CheckFailed(f"cuobjdump failed on {library}: {listing.stderr.strip()}")
    return set(re.findall(r"\.(sm_\d+)\.cubin", listing.stdout))


def _step_args(x_t, eps, eps_uncond=None, noise=None, sigma=0.0, seeds=None, stream=None) -> tuple:
    """The arguments of ddpm_step/ddim_step (their schema in csrc/sampling_step.cpp), valid coefficients."""
    return (x_t, eps, eps_uncond, noise, 1.0, 2.0, 1.0, 0.5, 0.5, sigma, False, False, seeds, stream)


def malformed_calls(torch) -> list[tuple[str, tuple, str]]:
    """(op, arguments, what the error must say) for each check of the CUDA entry points."""
    x = torch.randn(2, 1, 4, 4)
    seeds, stream = torch.arange(2), torch.tensor(0)
    calls = []
    for op in ("ddpm_step", "ddim_step"):
        calls += [
            (op, _step_args(x, torch.randn(2, 1, 4, 3)), "eps has shape [2, 1, 4, 3] but x_t has shape [2, 1, 4, 4]"),
            (op, _step_args(x, x.half()), "eps has dtype Half but x_t has dtype Float"),
            (op, _step_args(x, x.transpose(2, 3)), "eps must be contiguous"),
            (op, _step_args(x, x, eps_uncond=x[:1]), "eps_uncond has shape [1, 1, 4, 4]"),
            (op, _step_args(x.double(), x.double()), "supported are float32, float16 and bfloat16"),
            (op, _step_args(x, x, sigma=0.1), "noise is required when sigma > 0"),
            (op, _step_args(x, x, noise=x, sigma=-0.1), "sigma must be >= 0"),
            (op, _step_args(x, x, sigma=0.1, seeds=torch.arange(3), stream=stream), "one seed per sample"),
            (op, _step_args(x, x, sigma=0.1, seeds=seeds), "noise_seeds and noise_stream go together"),
            (op, _step_args(x, x, noise=x, sigma=0.1), "the CUDA kernel got a tensor on cpu"),
        ]
    calls += [
        ("philox_normal", (seeds.view(2, 1), stream, [4]), "seeds must be a 1-d tensor [N], got shape [2, 1]"),
        ("philox_normal", (seeds.int(), stream, [4]), "seeds must be int64, got Int"),
        ("philox_normal", (seeds, torch.arange(2), [4]), "stream must be a tensor of one element"),
        ("philox_normal", (seeds, stream, [4]), "the CUDA kernel got seeds on cpu"),
    ]
    return calls


def check_input_errors(torch) -> int:
    """Every malformed call of malformed_calls() raises a RuntimeError that says what it must say."""
    cuda_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    calls = malformed_calls(torch)
    for op, call_args, expected in calls:
        overload = getattr(getattr(torch.ops, build.OP_NAMESPACE), op).default
        try:
            overload.redispatch(cuda_key, *call_args)
        except RuntimeError as err:
            if expected not in str(err):
                raise CheckFailed(f"the CUDA kernel of {op} raised {str(err).splitlines()[0]!r}; "
                                  f"expected it to say {expected!r}") from None
        else:
            raise CheckFailed(f"the CUDA kernel of {op} accepted a call that should fail with {expected!r}")
    return len(calls)


def check(args: argparse.Namespace) -> str:
    try:
        archs = build.parse_arch_list(args.archs)
    except ValueError as err:
        raise CheckFailed(str(err)) from None
    cuda_home = build.find_cuda_home()
    if cuda_home is None:
        raise CheckFailed("no CUDA toolkit found (nvcc and lib64/libcudart.so); set CUDA_HOME")
    missing = build.missing_tools(with_cuda=True)
    if missing:
        raise CheckFailed("missing " + "; ".join(missing))
    build.use_cuda_home(cuda_home)
    import torch

    build_dir = Path(args.build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        module = build.load(with_cuda=True, archs=archs, build_directory=str(build_dir),
                            verbose=args.verbose)
    except (RuntimeError, OSError, ImportError) as err:
        raise CheckFailed(f"the CUDA build failed: {err}") from err
    seconds = time.perf_counter() - start

    if not module.with_cuda:
        raise CheckFailed("the module was built without SAMPLING_STEP_WITH_CUDA")
    for op in OPS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"):
            raise CheckFailed(f"{op} has no CUDA kernel registered")
    library = Path(module.__file__)
    found = fatbin_entries(library)
    numbers = [arch.replace(".", "") for arch in archs]
    wanted = {f"sm_{n}" for n in numbers} | {f"compute_{max(numbers, key=int)}"}
    if not wanted <= found:
        raise CheckFailed(f"{sorted(wanted - found)} missing from {library} (found {sorted(found)})")
    cuobjdump = find_cuobjdump(cuda_home)
    cross_check = "no cuobjdump to cross-check"
    if cuobjdump is not None:
        listed = cuobjdump_cubins(library, cuobjdump)
        if listed != {entry for entry in found if entry.startswith("sm_")}:
            raise CheckFailed(f"cuobjdump lists cubins {sorted(listed)}, the fatbin headers {sorted(found)}")
        cross_check = f"cuobjdump agrees ({cuobjdump})"
    rejected = check_input_errors(torch)
    return (f"ok: {library} built and linked in {seconds:.0f} s with CUDA_HOME={cuda_home}; "
            f"embedded {sorted(found)}; {cross_check}; CUDA kernels registered for {', '.join(OPS)}; "
            f"their input checks rejected {rejected} malformed calls")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    try:
        print(check(args))
    except CheckFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
