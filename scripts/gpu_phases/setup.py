"""Phase setup: install the project and build the C++/CUDA sampling-step extension, then load it.

Measures nothing; it fails when the install or the load fails, and every later phase needs the extension.
Writes: the commands' output to gpu_bench.log. Under --dry-run it skips pip and only loads the
extension (kernels.load builds it on first use).
"""
from __future__ import annotations

import os

from gpu_phases.common import Recorder, Settings, check, left

BUILD_JOBS = "16"   # MAX_JOBS for the extension's build: the lent GPU machine's CPU cores
INSTALL_MARGIN_S = 15   # of the share, left after pip for the load check


def run(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    """pip install -e . (GPU only; TORCH_CUDA_ARCH_LIST as the machine sets it, 9.0 otherwise), then
    import kernels and load the ddim_step op."""
    if not s.dry_run:
        env = {"TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"), "MAX_JOBS": BUILD_JOBS}
        check(rec.run([s.python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
                      left(deadline) - INSTALL_MARGIN_S, env=env), "pip install")
    probe = "import kernels; kernels.load('ddim_step'); print('sampling-step extension loads')"
    check(rec.run([s.python, "-c", probe], left(deadline)), "extension load")
