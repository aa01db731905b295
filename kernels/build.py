"""How the fused sampling-step extension is built: one place for sources, flags and CUDA arches.

Used by setup.py (ahead of time), by kernels/sampling_step/op.py (just in time, when the compiled
module is absent) and by kernels/check_cuda_build.py (the CI proof that the CUDA source compiles and
links). It imports no torch at module level, so setup.py can read it where torch is not importable.
It also names the one torch.library namespace of every op, Triton and C++ (OP_NAMESPACE).

The CUDA toolkit: torch.utils.cpp_extension guesses CUDA_HOME from `nvcc` on PATH as `dirname(nvcc)/..`.
Where nvcc is a launcher script outside the toolkit (e.g. /usr/local/bin/nvcc), that guess has no
lib64/libcudart.so and the link fails with "cannot find -lcudart". `find_cuda_home` looks for the
folder that really holds the runtime library, and `use_cuda_home` hands it to cpp_extension.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

#: The torch.library namespace of every custom op of this package: torch.ops.diffusion_kernels.<op>.
#: The C++ sources receive it as the macro KERNELS_OP_NAMESPACE (compile_args), so it is written once.
OP_NAMESPACE = "diffusion_kernels"

#: The extension's import name; setup.py builds it into the sampling_step package.
EXTENSION_NAME = "kernels.sampling_step._C"
#: Name of the JIT-built module (torch.utils.cpp_extension.load wants a bare identifier).
JIT_NAME = "kernels_sampling_step_C"

KERNELS_DIR = Path(__file__).resolve().parent
#: The op's folder: the built module lands here, the sources are under csrc/.
EXTENSION_DIR = KERNELS_DIR / "sampling_step"
CPU_SOURCES = ("sampling_step/csrc/sampling_step.cpp", "sampling_step/csrc/philox_normal.cpp")
CUDA_SOURCES = ("sampling_step/csrc/cuda/sampling_step.cu", "sampling_step/csrc/cuda/philox_normal.cu")
HEADERS = ("sampling_step/csrc/sampling_step.h", "sampling_step/csrc/philox.h",
           "sampling_step/csrc/philox_normal.h")

#: GPU generations built by default when no GPU is present to ask: A100 (8.0), RTX 30xx/A10 (8.6),
#: RTX 40xx/L4 (8.9), H100/H200 (9.0); PTX of the last one lets newer GPUs JIT-compile it.
DEFAULT_CUDA_ARCHS = ("8.0", "8.6", "8.9", "9.0")

#: setup.py reads this: "auto" (CUDA when a toolkit is found, else CPU), "cpu", "cuda" or "off".
BUILD_MODE_ENV = "KERNELS_EXT"
BUILD_MODES = ("auto", "cpu", "cuda", "off")

CXX_FLAGS = [
    "-O3",
    # Each operation rounds separately, as the eager step's tensor ops do: no a*b+c contraction into
    # FMA in the AVX2/AVX-512 clones of the CPU loop (the CUDA side's --fmad=false, below).
    "-ffp-contract=off",
    # sqrt without the errno branch, so the noise kernel's lane loop becomes one vsqrtpd (results unchanged).
    "-fno-math-errno",
    # at::parallel_for is header-inline over OpenMP: without -fopenmp it silently runs one thread.
    "-fopenmp",
]
# Linked by soname libgomp.so.1: torch ships and loads its own copy first, so one OpenMP runtime runs.
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = [
    "-O3",
    # IEEE division and no a*b+c contraction into FMA: each eager op rounds separately, and the op
    # matches it to the last bit that way (fp32 results within 1e-6 of eager). Free: the op is
    # memory-bound.
    "--prec-div=true",
    "--fmad=false",
    "-lineinfo",
]


def sources(with_cuda: bool, absolute: bool = True) -> list[str]:
    """Source files of the extension, absolute or relative to the repository root (for setup.py)."""
    names = list(CPU_SOURCES) + (list(CUDA_SOURCES) if with_cuda else [])
    if absolute:
        return [str(KERNELS_DIR / name) for name in names]
    return [f"kernels/{name}" for name in names]


def _has_cudart(folder: Path) -> bool:
    return any((folder / lib / "libcudart.so").exists() for lib in ("lib64", "lib"))


def prebuilt_is_stale() -> bool:
    """True when setup.py's in-place module exists but a source or header changed after it was built
    (an edit without a rebuild); the JIT path then builds from the current sources instead."""
    built = sorted(EXTENSION_DIR.glob("_C*.so"))
    if not built:
        return False
    newest_source = max((KERNELS_DIR / name).stat().st_mtime
                        for name in CPU_SOURCES + CUDA_SOURCES + HEADERS)
    return min(path.stat().st_mtime for path in built) < newest_source


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder holding lib64/libcudart.so (or lib/), or None when there is none.

    Tries CUDA_HOME / CUDA_PATH, then the folders beside nvcc on PATH (`<bin>/../cuda`, the layout of
    a launcher next to the toolkit, and `<bin>/..`, the usual one), then /usr/local/cuda.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        bin_dir = Path(nvcc).parent
        candidates += [str(bin_dir.parent / "cuda"), str(bin_dir.parent)]
    candidates.append("/usr/local/cuda")
    for candidate in candidates:
        if candidate and _has_cudart(Path(candidate)) and (Path(candidate) / "bin" / "nvcc").exists():
            return str(Path(candidate).resolve())
    return None


def use_cuda_home(cuda_home: str) -> None:
    """Makes torch.utils.cpp_extension use `cuda_home`, whether or not it was imported already."""
    os.environ["CUDA_HOME"] = cuda_home
    module = sys.modules.get("torch.utils.cpp_extension")
    if module is not None:
        # cpp_extension reads CUDA_HOME once, at import; its builders read this module attribute.
        module.CUDA_HOME = cuda_home


_ARCH = re.compile(r"\d+\.\d+[af]?")   # 9.0, and 9.0a / 10.0f: the arch-specific feature sets


def parse_arch_list(text: str) -> list[str]:
    """'8.0;8.6 9.0a+PTX' -> ['8.0', '8.6', '9.0a'] (the PTX choice is ours: see cuda_arch_flags)."""
    archs = []
    for item in text.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip().removesuffix("+PTX")
        if item:
            if not _ARCH.fullmatch(item):
                raise ValueError(f"bad CUDA arch {item!r} in {text!r}; expected e.g. '8.0;8.6;9.0' or '9.0a'")
            archs.append(item)
    return archs


def cuda_archs(device_capabilities: list[tuple[int, int]] | None = None) -> list[str]:
    """TORCH_CUDA_ARCH_LIST when set, else the GPUs present, else DEFAULT_CUDA_ARCHS."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return parse_arch_list(env)
    if device_capabilities:
        return sorted({f"{major}.{minor}" for major, minor in device_capabilities})
    return list(DEFAULT_CUDA_ARCHS)


def cuda_arch_flags(archs: list[str]) -> list[str]:
    """-gencode flags: a cubin per arch and PTX for the newest. Giving them explicitly also stops
    cpp_extension from adding its own arch list. '9.0a' gives sm_90a (Hopper's arch-specific features)."""
    numbers = [arch.replace(".", "") for arch in archs]
    flags = [f"-gencode=arch=compute_{n},code=sm_{n}" for n in numbers]
    newest = max(numbers, key=lambda n: (int(n.rstrip("af")), n))
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def compile_args(with_cuda: bool, archs: list[str] | None = None) -> dict[str, list[str]]:
    """extra_compile_args for a CppExtension/CUDAExtension."""
    namespace = [f"-DKERNELS_OP_NAMESPACE={OP_NAMESPACE}"]
    cxx = list(CXX_FLAGS) + namespace + (["-DSAMPLING_STEP_WITH_CUDA"] if with_cuda else [])
    args = {"cxx": cxx}
    if with_cuda:
        args["nvcc"] = list(NVCC_FLAGS) + namespace + cuda_arch_flags(archs or cuda_archs())
    return args


def build_mode() -> str:
    mode = os.environ.get(BUILD_MODE_ENV, "auto").strip().lower()
    if mode not in BUILD_MODES:
        raise ValueError(f"{BUILD_MODE_ENV}={mode!r}; expected one of {', '.join(BUILD_MODES)}")
    return mode


def missing_tools(with_cuda: bool) -> list[str]:
    """What a build needs and this machine lacks, each as a short phrase for an error message."""
    missing = []
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        missing.append(f"a C++ compiler ({compiler!r} not on PATH; install g++ or set CXX)")
    if shutil.which("ninja") is None:  # cpp_extension runs `ninja` from PATH
        missing.append("ninja on PATH (pip install ninja into the active environment)")
    if with_cuda and find_cuda_home() is None:
        missing.append("the CUDA toolkit (nvcc and lib64/libcudart.so; set CUDA_HOME to its folder)")
    return missing


def setup_extensions() -> list:
    """ext_modules for setup.py: [] when torch is not importable at build time (pip's build
    isolation) or KERNELS_EXT=off; the JIT path in kernels/sampling_step/op.py then builds on first use.
    `pip install --no-build-isolation -e .` builds it ahead of time."""
    mode = build_mode()
    if mode == "off":
        return []
    try:
        import torch  # noqa: F401
    except ImportError:
        print("kernels: torch is not importable at build time; the sampling-step extension will be "
              "built on first use (or install with --no-build-isolation to build it now)", file=sys.stderr)
        return []
    cuda_home = find_cuda_home() if mode in ("auto", "cuda") else None
    if mode == "cuda" and cuda_home is None:
        raise RuntimeError(f"{BUILD_MODE_ENV}=cuda but no CUDA toolkit with lib64/libcudart.so was "
                           "found; set CUDA_HOME")
    if cuda_home is not None:
        use_cuda_home(cuda_home)
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda = cuda_home is not None
    factory = CUDAExtension if with_cuda else CppExtension
    return [factory(
        name=EXTENSION_NAME,
        sources=sources(with_cuda, absolute=False),
        extra_compile_args=compile_args(with_cuda),
        extra_link_args=list(LINK_FLAGS),
        depends=[f"kernels/{h}" for h in HEADERS],
    )]


def load(with_cuda: bool, archs: list[str] | None = None, build_directory: str | None = None,
         verbose: bool = False):
    """torch.utils.cpp_extension.load with this extension's sources and flags; returns the module.
    Compiler and import errors propagate (RuntimeError, OSError, ImportError)."""
    from torch.utils import cpp_extension

    args = compile_args(with_cuda, archs)
    return cpp_extension.load(
        name=JIT_NAME,
        sources=sources(with_cuda),
        extra_cflags=args["cxx"],
        extra_cuda_cflags=args.get("nvcc"),
        extra_ldflags=list(LINK_FLAGS),
        extra_include_paths=[str(EXTENSION_DIR / "csrc")],
        build_directory=build_directory,
        with_cuda=with_cuda,
        verbose=verbose,
    )


class BuildFailed(RuntimeError):
    """The JIT build could not run or did not succeed; the message says what is missing."""


def jit_build_directory() -> Path:
    """The JIT build's folder: one per Python and torch version under torch's extensions root
    (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), created if absent.

    torch's own default folder is named by Python and CUDA version only, so two environments with
    different torch versions would share it: one would import a module built against the other's
    headers, and torch before 2.14 waits forever on the lock file that newer versions leave behind.
    """
    import torch
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    folder = Path(root) / f"{JIT_NAME}-py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def lock_notice(build_directory: Path) -> str | None:
    """A line for the user when this torch would wait on the build folder's lock file, else None.

    torch before 2.14 (FileBaton) waits while the file `lock` exists, and a build that was killed
    leaves it behind; newer torch holds an OS lock the kernel releases, so a left file is harmless."""
    from torch.utils import cpp_extension

    lock = build_directory / "lock"
    if getattr(cpp_extension, "FileBaton", None) is None or not lock.exists():
        return None
    return (f"kernels: waiting for another build of the sampling-step extension to finish (lock file "
            f"{lock}); if none is running, an earlier build was interrupted: delete that file")


def jit_load(verbose: bool = False):
    """Builds (once, into jit_build_directory()) and imports the extension. CUDA sources join when a
    GPU and a toolkit are present; without the toolkit the module is CPU-only and CUDA inputs get a
    clear error from the wrapper."""
    import torch

    cuda_home = find_cuda_home() if torch.cuda.is_available() and torch.version.cuda else None
    with_cuda = cuda_home is not None
    missing = missing_tools(with_cuda=False)
    if missing:
        raise BuildFailed("cannot build the sampling-step extension: missing " + "; ".join(missing))
    archs = None
    if with_cuda:
        use_cuda_home(cuda_home)
        archs = cuda_archs([torch.cuda.get_device_capability(i)
                            for i in range(torch.cuda.device_count())])
    try:
        build_directory = jit_build_directory()
        notice = lock_notice(build_directory)
        if notice:
            print(notice, file=sys.stderr, flush=True)
        return load(with_cuda, archs, build_directory=str(build_directory), verbose=verbose)
    except (RuntimeError, OSError, ImportError) as err:
        raise BuildFailed(f"building the sampling-step extension failed: {err}") from err
