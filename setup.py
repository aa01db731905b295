"""Install the project's two packages: `shared` (the core) and `kernels` (fused GPU kernels).

    pip install -e .            # the core; kernels build on first use
    pip install -e ".[test]"    # plus what the tests and benchmarks import
"""
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
    "test": ["pytest", "pytest-benchmark", "httpx", "fastapi", "uvicorn"],
    "serve": ["fastapi", "uvicorn"],
}

setup(
    name="ddpm-from-scratch",
    version="0.1.0",
    description="Denoising diffusion from scratch in five stages, with fused, verified GPU kernels.",
    python_requires=">=3.10",
    packages=find_packages(include=["shared", "shared.*", "kernels", "kernels.*"]),
    package_data={"kernels": ["csrc/*.cpp", "csrc/*.h", "csrc/cuda/*.cu", "csrc/cuda/*.cuh"]},
    install_requires=install_requires,
    extras_require=extras_require,
)
