"""Install the project's two packages: `shared` (the core) and `kernels` (fused GPU kernels).

    pip install -e .            # the core; kernels build on first use
    pip install -e ".[test]"    # plus what the tests and benchmarks import
    pip install --no-build-isolation -e .   # also builds the C++/CUDA sampling-step extension now
"""
import importlib.util
import os
import sys

from setuptools import find_packages, setup

install_requires = [
    "torch>=2.4",
    "torchvision",
    "numpy",
    "ninja",
    "pybind11",
    "tqdm",
    "matplotlib",
    "pillow",
    "torchmetrics",
]
if sys.platform.startswith("linux"):
    install_requires.append("triton")

extras_require = {
    "test": ["pytest", "pytest-benchmark", "httpx", "fastapi", "uvicorn", "scipy", "diffusers", "safetensors",
             "selenium", "torch-fidelity", "tensorboard"],
    "serve": ["fastapi", "uvicorn"],
}


def kernel_extension_args() -> dict:
    """ext_modules/cmdclass for the fused sampling-step op (kernels/sampling_step/csrc), from kernels/build.py.

    CUDAExtension when a CUDA toolkit is found (CUDA_HOME, or beside nvcc on PATH), CppExtension
    otherwise; KERNELS_EXT=cpu|cuda|off overrides. Where torch is not importable at build time (pip's
    build isolation) nothing is built here and kernels/sampling_step/op.py builds it on first use;
    `pip install --no-build-isolation -e .` builds it ahead of time.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "build.py")
    spec = importlib.util.spec_from_file_location("_kernels_build", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)  # by path: importing the kernels package would need torch
    ext_modules = build.setup_extensions()
    if not ext_modules:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"ext_modules": ext_modules,
            "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    name="ddpm-from-scratch",
    version="0.1.0",
    description="Denoising diffusion from scratch in five stages, with fused, verified GPU kernels.",
    python_requires=">=3.10",
    packages=find_packages(include=["shared", "shared.*", "kernels", "kernels.*"]),
    package_data={"shared.interface": ["static/*.html", "static/*.css", "static/*.js"],
                  "kernels": ["sampling_step/csrc/*.cpp", "sampling_step/csrc/*.h",
                              "sampling_step/csrc/cuda/*.cu", "sampling_step/csrc/cuda/*.cuh"]},
    install_requires=install_requires,
    extras_require=extras_require,
    **kernel_extension_args(),
)
