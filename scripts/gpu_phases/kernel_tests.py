"""Phase kernel-tests: the CUDA variants of the kernel tests, and tests/test_cuda_parity.py.

Measures: whether every CUDA test passes (the fused sampling step and its in-kernel noise, the Philox
noise op, the Triton kernels against float64, the noise op and the U-Net on CUDA against the CPU, the
training step's CUDA graph against the same step uncaptured, first and on its own). Writes: also
results["cuda_graph_tests"] (ok, detail), which the train phase reads.
Writes: pytest's output to gpu_bench.log; the phase fails naming the run that failed.

Under --dry-run (no GPU) the CUDA tests skip with their reason, which still exercises this phase.
"""
from __future__ import annotations

from gpu_phases.common import PhaseFailed, Recorder, Settings, failure, left

#: The test that calls the raw op with malformed tensors: on CUDA it has crashed the process (SIGSEGV)
#: instead of raising, so it runs last and alone, its CPU case first (the same build's CPU kernel).
BAD_TENSORS_TEST = "tests/test_sampling_step_ext.py::test_op_rejects_bad_tensors"

#: The C++/CUDA op's files first: they run in seconds; the Triton ones compile a kernel per shape.
CUDA_TEST_FILES = ["tests/test_sampling_step_ext.py", "tests/test_noise_op.py", "tests/test_sampling_step_noise.py",
                   "tests/test_cuda_parity.py", "tests/kernels", "--ignore=tests/kernels/test_compile_targets.py"]
#: The training step's CUDA graph against the same step uncaptured: run first, on its own, because the
#: train phases use graphs only when it passes (results["cuda_graph_tests"]).
GRAPH_TESTS = "tests/test_graphed_step.py"
ALONE_MARGIN_S = 10   # of the share, kept for the bad-tensors test
PYTEST_NOTHING_COLLECTED = 5


def run(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    """The CUDA tests (their ids carry "cuda") without the bad-tensors one, then that one in a process of its own."""
    pytest = [s.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    graphs = rec.run(pytest + ["-k", "cuda", GRAPH_TESTS], left(deadline) - ALONE_MARGIN_S)
    results["cuda_graph_tests"] = {"ok": graphs == 0, "detail": failure(graphs, "graphed-step tests")}
    cmd = pytest + ["-k", "cuda", "--deselect", BAD_TENSORS_TEST + "[cuda]", *CUDA_TEST_FILES]
    rc = rec.run(cmd, left(deadline) - ALONE_MARGIN_S)
    if rc == PYTEST_NOTHING_COLLECTED:
        raise PhaseFailed("no CUDA kernel test was collected")
    alone = rec.run(pytest + ["-v", BAD_TENSORS_TEST], left(deadline))  # -v: which device crashed
    problems = [p for p in (failure(graphs, "graphed-step tests"), failure(rc, "kernel tests"),
                            failure(alone, "bad-tensors test")) if p]
    if problems:
        raise PhaseFailed("; ".join(problems))
