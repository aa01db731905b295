"""pytest configuration for `pytest benches` (the plain `pytest` run collects tests/ only).

- Collects benches/bench_*.py, so benchmark files never look like tests to the main suite.
- Session fixtures: the benchmark device and its measured ceilings (copy GB/s, matmul TFLOP/s).
- Runs benchmarks in priority order (marker `priority(n)`, smaller first; default 50), so that under the
  GPU script's time budget the figures the bars need are measured before the optional ones.
- Adds versions, ceilings and the reasons of skipped benchmarks to the --benchmark-json output, where
  benches/report.py reads them.
"""
from __future__ import annotations

import datetime
import platform

import pytest
import torch

from benches.measure import Ceilings, bench_device, budget_skip_reason, measure_ceilings

DEFAULT_PRIORITY = 50
# Every benchmark needs at least this many seconds before $BENCH_DEADLINE (warm-up, Triton autotuning);
# the expensive ones ask for more themselves.
MIN_BENCH_S = 8

_SKIPPED: list[dict] = []
_CEILINGS: dict[str, Ceilings] = {}


def pytest_collect_file(file_path, parent):
    # Paths named on the command line are collected by pytest's own python plugin already.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "priority(n): run order under a time budget, smaller first")


def pytest_collection_modifyitems(session, config, items):
    def priority(item) -> int:
        marker = item.get_closest_marker("priority")
        return marker.args[0] if marker else DEFAULT_PRIORITY

    items.sort(key=priority)  # stable: file and definition order within one priority


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


@pytest.fixture(autouse=True)
def _time_budget():
    reason = budget_skip_reason(MIN_BENCH_S)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def ceilings(device) -> Ceilings:
    if str(device) not in _CEILINGS:
        _CEILINGS[str(device)] = measure_ceilings(device)
    return _CEILINGS[str(device)]


def _versions() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_multiprocessors=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    # fp32 figures depend on these: TF32 tensor cores for convs / matmuls or not.
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["ddpm_bench"] = {**_versions(), "ceilings": {k: c.as_dict() for k, c in _CEILINGS.items()}}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["ddpm_bench_skipped"] = list(_SKIPPED)
