"""Run records: an auto-numbered directory per run, its options as JSON, a CSV log and a loss plot.

    runs/00003-mnist-tiny-fp32/
        options.json    every resolved option, plus library versions and the device
        log.csv         one row per --log-every steps
        loss.png        redrawn as training goes
        samples-*.png   sample grids;  last.pt / best.pt / ema.pt  checkpoints

Numbering follows NVlabs/edm: the next id is one more than the largest `NNNNN-` prefix already in the
output directory, so runs sort by start order and an existing directory is never reused.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path

import torch

from shared.errors import UserError

RUN_ID_DIGITS = 5
LOG_COLUMNS = ("step", "epoch", "loss", "heldout_loss", "lr", "images_per_s", "grad_norm", "skipped")
_RUN_ID = re.compile(r"^(\d+)-")
# mkdir races with a second run started at the same moment; retry with the next id this often.
MAX_MKDIR_ATTEMPTS = 100


def check_writable_dir(out: str | os.PathLike) -> Path:
    """Creates `out` if needed and checks that files can be written in it; UserError otherwise."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"--out {str(out)!r} is not a directory") from None
    except OSError as err:
        raise UserError(f"--out {str(out)!r} cannot be created ({err.strerror})") from None
    if not out.is_dir():
        raise UserError(f"--out {str(out)!r} is not a directory")
    probe = out / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"--out {str(out)!r} is not writable ({err.strerror})") from None
    return out


def check_not_run_dir(out: str | os.PathLike) -> None:
    """UserError when `out` is itself a run directory (a new run would nest inside it)."""
    out = Path(out)
    if out.is_dir() and _RUN_ID.match(out.name) and (out / "options.json").is_file():
        raise UserError(f"--out {str(out)!r} is a run directory; give the folder that holds runs "
                        f"(--out {str(out.parent)!r}), or --resume {str(out)!r} to continue it")


def make_run_dir(out: str | os.PathLike, name: str) -> Path:
    """Creates and returns out/<NNNNN>-<name>, numbered one past the largest existing id."""
    out = check_writable_dir(out)
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    taken = [int(m.group(1)) for entry in os.listdir(out) if (m := _RUN_ID.match(entry))]
    run_id = max(taken, default=-1) + 1
    for _ in range(MAX_MKDIR_ATTEMPTS):
        run_dir = out / f"{run_id:0{RUN_ID_DIGITS}d}-{safe_name}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            run_id += 1
        except OSError as err:
            raise UserError(f"cannot create run directory {str(run_dir)!r} ({err.strerror})") from None
    raise UserError(f"cannot find a free run id in {str(out)!r}")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Library versions and the device, recorded beside the options so a run can be reproduced."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
           "device": str(device), "platform": platform.platform()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["cpu_threads"] = torch.get_num_threads()
    return env


def write_options(run_dir: Path, options: dict, device: torch.device, extra: dict | None = None) -> Path:
    """options.json: {"options": {...}, "environment": {...}, **extra}."""
    record = {"options": options, "environment": environment(device), **(extra or {})}
    path = run_dir / "options.json"
    temp = path.with_name(path.name + ".tmp")  # then a rename: a rewrite mid-run is never half-written
    try:
        temp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
        os.replace(temp, path)
    except OSError as err:
        raise UserError(f"cannot write {str(path)!r} ({err.strerror or err})") from None
    return path


class CsvLog:
    """log.csv with LOG_COLUMNS; each row is flushed at once so a killed run keeps its log."""

    def __init__(self, path: Path, prior_rows: list[dict] | None = None):
        self.path = path
        self._file = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=LOG_COLUMNS)
        self._writer.writeheader()
        for row in prior_rows or []:
            self._writer.writerow({k: row.get(k, "") for k in LOG_COLUMNS})
        self._file.flush()

    def write(self, row: dict) -> None:
        try:
            self._writer.writerow({k: _fmt(row.get(k)) for k in LOG_COLUMNS})
            self._file.flush()
        except OSError as err:
            raise UserError(f"cannot write {str(self.path)!r} ({err.strerror or err})") from None

    def close(self) -> None:
        self._file.close()


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # full precision: resumed and uninterrupted runs compare exactly
    return str(value)


def read_log(path: str | os.PathLike) -> list[dict]:
    """The rows of a log.csv as dicts of strings ([] if the file is missing)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
