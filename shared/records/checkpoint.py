"""Checkpoint files: atomic writes, safe reads, and the loader the samplers use.

Two kinds of file, both plain dicts of tensors and JSON-like values, so `torch.load(weights_only=True)`
reads them without unpickling any code:

  kind            format string                    written as            holds
  full training   "ddpm-from-scratch/train/1"      last.pt, best.pt      model, EMA, optimizer, scaler,
                                                                         LR scheduler, counters, RNG
                                                                         states, options (exact resume)
  EMA only        "ddpm-from-scratch/ema/1"        ema.pt                model_config, state_dict (EMA
                                                                         weights), schedule, meta

meta["prediction"] says what the network predicts ("eps", "v" or "x0"; shared.diffusion.prediction); a
file written before the option has none and is read as "eps". The loader attaches it to the network.

Every problem a user can cause (a missing, truncated or corrupt file, a pickle that would run code, a
checkpoint for another architecture or preset) is raised as `shared.UserError` with a message naming
the file and the mismatch.
"""
from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from shared.diffusion.prediction import set_prediction
from shared.diffusion.schedule import NoiseSchedule
from shared.errors import UserError
from shared.model.unet import UNet, UNetConfig

TRAIN_FORMAT = "ddpm-from-scratch/train/1"
EMA_FORMAT = "ddpm-from-scratch/ema/1"
KNOWN_FORMATS = (TRAIN_FORMAT, EMA_FORMAT)
LAST_NAME, BEST_NAME, EMA_NAME = "last.pt", "best.pt", "ema.pt"
# The prefix AveragedModel puts before the wrapped module's parameter names.
AVERAGED_PREFIX = "module."
# atomic_save's temporary file: .<name>.tmp-<pid> beside the target.
TEMP_PREFIX, TEMP_MARK = ".", ".tmp-"
# How many mismatching parameter names an error message lists before "…".
MAX_NAMES_IN_MESSAGE = 4


# --------------------------------------------------------------------------------------------------
# Writing

def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save(obj) to `path` so that a reader never sees a half-written file.

    Writes a temporary file in the same directory, flushes and fsyncs it, then renames it over `path`
    (rename is atomic on POSIX within one file system) and fsyncs the directory so the rename itself
    survives a power cut. A crash at any point leaves either the old file or the new one.
    """
    path = Path(path)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a quota, a vanished directory: the old file stays as it was
        raise UserError(f"cannot write {str(path)!r} ({err.strerror or err}); the previous file is kept") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files of atomic_save calls whose process died mid-write; returns them.

    A temporary file names its writer's PID; one whose process still runs is left alone.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(f"{TEMP_PREFIX}*{TEMP_MARK}*"):
        pid = tmp.name.rsplit(TEMP_MARK, 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass  # it went away, or is not ours to remove: nothing to clean
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def ema_file(model_config: dict, ema_state_dict: dict, schedule: dict, meta: dict) -> dict:
    """The dict stored in ema.pt: enough to rebuild the EMA network and its schedule, nothing more."""
    return {"format": EMA_FORMAT, "model_config": dict(model_config),
            "state_dict": {k: v.detach().cpu() for k, v in ema_state_dict.items()},
            "schedule": dict(schedule), "meta": dict(meta)}


# --------------------------------------------------------------------------------------------------
# Reading

def resolve_checkpoint(path: str | os.PathLike, prefer: tuple[str, ...] = (EMA_NAME, LAST_NAME)) -> Path:
    """A checkpoint file from `path`: the file itself, or in a run directory the first of `prefer`."""
    path = Path(path)
    if path.is_dir():
        for name in prefer:
            if (path / name).is_file():
                return path / name
        raise UserError(f"no checkpoint in directory {str(path)!r} (looked for {', '.join(prefer)})")
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} is not a regular file")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Reads a checkpoint file with weights_only=True and checks that it is one of ours.

    Returns the stored dict. Raises UserError for a missing, empty, truncated or corrupt file, for a
    pickle that would need to run code (refused by the weights-only unpickler), and for a file that
    is not a ddpm-from-scratch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {str(path)!r} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning would precede our error
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        # The weights-only unpickler names a refused import as "... GLOBAL module.name ..."; any
        # other failure (an unknown opcode, garbage bytes) means the file is damaged.
        if "GLOBAL" in text:
            raise UserError(f"refusing checkpoint {str(path)!r}: it holds pickled Python objects that "
                            "would run code when loaded (weights_only=True allows only tensors and "
                            "plain values)") from None
        raise UserError(f"checkpoint {str(path)!r} is corrupt, truncated or not a torch checkpoint "
                        "(unpickling failed)") from None
    except Exception as err:  # malformed pickle streams also raise IndexError, KeyError, struct.error…
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise UserError(f"checkpoint {str(path)!r} is corrupt or truncated ({reason})") from None
    if not isinstance(obj, dict) or obj.get("format") not in KNOWN_FORMATS:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{str(path)!r} is not a ddpm-from-scratch checkpoint (format {found!r}; "
                        f"expected one of {', '.join(KNOWN_FORMATS)})")
    for key in ("model_config", "schedule", "meta"):
        if not isinstance(obj.get(key), dict):
            raise UserError(f"checkpoint {str(path)!r} lacks its {key!r} record; it is damaged")
    return obj


def describe_config_mismatch(found: dict, expected: dict) -> str:
    """'preset: 'tiny' vs 'mnist'; base_channels: 32 vs 64' for the keys where two configs differ."""
    keys = sorted(set(found) | set(expected))
    parts = [f"{k}: checkpoint {found.get(k, '<absent>')!r} vs this run {expected.get(k, '<absent>')!r}"
             for k in keys if found.get(k, "<absent>") != expected.get(k, "<absent>")]
    return "; ".join(parts)


# Every UNetConfig field at its default, tuples as lists (as stored model configs hold them).
_CONFIG_DEFAULTS = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default for f in fields(UNetConfig)}


def with_defaults(model_config: dict) -> dict:
    """A stored model config with every UNetConfig field it lacks at its default: a checkpoint written
    before a field existed was built the way the field's default builds it."""
    return _CONFIG_DEFAULTS | dict(model_config)


def check_same_model(ckpt: dict, model_config: dict, preset: str | None, path: str | os.PathLike) -> None:
    """Raises UserError naming the differences when a checkpoint was made for another network."""
    found_preset = ckpt["meta"].get("preset")
    if preset is not None and found_preset is not None and found_preset != preset:
        raise UserError(f"checkpoint {str(path)!r} is for preset {found_preset!r}, but this run uses "
                        f"preset {preset!r}")
    found = with_defaults(ckpt["model_config"])
    if found != with_defaults(model_config):
        raise UserError(f"checkpoint {str(path)!r} is for another architecture: "
                        f"{describe_config_mismatch(found, model_config)}")


def load_state_strict(module: torch.nn.Module, state_dict: dict, path: str | os.PathLike) -> None:
    """module.load_state_dict(strict=True), with names and shapes of any mismatch as a UserError."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
                   if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape", wrong_shape)):
        if names:
            more = " …" if len(names) > MAX_NAMES_IN_MESSAGE else ""
            problems.append(f"{label}: {', '.join(names[:MAX_NAMES_IN_MESSAGE])}{more}")
    if problems:
        raise UserError(f"checkpoint {str(path)!r} does not fit this architecture ({'; '.join(problems)})")
    module.load_state_dict(state_dict, strict=True)


def strip_averaged_prefix(state_dict: dict) -> dict:
    """AveragedModel state ('module.x', 'n_averaged') -> the wrapped network's own state ('x')."""
    return {k[len(AVERAGED_PREFIX):]: v for k, v in state_dict.items() if k.startswith(AVERAGED_PREFIX)}


def build_model(model_config: dict, path: str | os.PathLike) -> torch.nn.Module:
    """UNet(UNetConfig(**model_config)), with a foreign config reported as a UserError."""
    try:
        return UNet(UNetConfig(**model_config))
    except (TypeError, ValueError, UserError) as err:
        raise UserError(f"checkpoint {str(path)!r} holds a model config this code cannot build: {err}") from None


def load_for_sampling(path: str | os.PathLike, device: str | torch.device = "cpu",
                      which: str = "ema") -> tuple[torch.nn.Module, Any, dict]:
    """Loads a network for sampling: returns (model in eval mode on `device`, NoiseSchedule, meta).

    path: a run directory (its ema.pt, else last.pt) or a checkpoint file (ema.pt, last.pt, best.pt).
    which: "ema" for the EMA weights (what samples should use), "model" for the raw trained weights,
    which only full training checkpoints hold.
    meta: {"dataset", "num_classes", "image_shape": [C, H, W], "schedule": {"kind", "num_timesteps"},
    "prediction", "options", ...} as recorded at training time ("prediction" "eps" when absent); the
    model carries its prediction type (shared.diffusion.prediction.prediction_of).
    """
    if which not in ("ema", "model"):
        raise UserError(f"which must be 'ema' or 'model', got {which!r}")
    file = resolve_checkpoint(path, prefer=(EMA_NAME, LAST_NAME) if which == "ema" else (LAST_NAME,))
    ckpt = load_checkpoint(file)
    if ckpt["format"] == EMA_FORMAT:
        if which == "model":
            raise UserError(f"{str(file)!r} holds only EMA weights; use which='ema' or a last.pt/best.pt")
        state = ckpt["state_dict"]
    else:
        state = strip_averaged_prefix(ckpt["ema"]) if which == "ema" else ckpt["model"]
    model = build_model(ckpt["model_config"], file)
    load_state_strict(model, state, file)
    model.to(device).eval().requires_grad_(False)
    sched = ckpt["schedule"]
    try:
        schedule = NoiseSchedule(sched["kind"], int(sched["num_timesteps"]))
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"checkpoint {str(file)!r} has a damaged schedule record ({err})") from None
    meta = dict(ckpt["meta"])
    meta.setdefault("schedule", dict(sched))
    meta.setdefault("num_classes", int(ckpt["model_config"].get("num_classes", 0)))
    meta["prediction"] = meta.get("prediction", "eps")  # files from before --prediction predict ε
    try:
        set_prediction(model, meta["prediction"])
    except UserError as err:
        raise UserError(f"checkpoint {str(file)!r} has a damaged prediction record ({err})") from None
    meta["checkpoint"] = str(file)
    return model, schedule, meta
