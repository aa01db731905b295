"""Before the phases: CUDA_HOME for the extension's build, a CUDA check, and env.txt (what machine this was)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import torch

from gpu_phases.common import Settings

VERSIONS = ("import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, "
            "'| cuda', torch.version.cuda, '| triton', triton.__version__, '| gpu', "
            "torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)")
PROBE_TIMEOUT_S = 30


def find_cuda_home() -> None:
    """nvcc on PATH may be a launcher outside the toolkit: CUDA_HOME is the folder with lib64/libcudart.so."""
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or nvcc is None:
        return
    for cand in (Path(nvcc).parent / "../cuda", Path(nvcc).parent / "..", Path("/usr/local/cuda")):
        if (cand / "lib64/libcudart.so").exists() or (cand / "lib/libcudart.so").exists():
            os.environ["CUDA_HOME"] = str(cand.resolve())
            return


def cuda_available() -> bool:
    return torch.cuda.is_available()


def use_work_caches(s: Settings) -> None:
    """Inductor's and Triton's caches in the work folder: every run compiles from scratch, as a user's first."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(s.work / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(s.work / "triton")


def write_env(s: Settings) -> None:
    """env.txt: the UTC time, nvidia-smi's output, and the Python, torch, CUDA, Triton and GPU versions."""
    lines = [time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())]
    for cmd in (["nvidia-smi"], [s.python, "-c", VERSIONS]):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
            lines.append(done.stdout + done.stderr)
        except (OSError, subprocess.TimeoutExpired) as err:
            lines.append(f"{cmd[0]}: {err}")
    (s.out / "env.txt").write_text("\n".join(lines))
