"""Every option of a training run in one place: `TrainConfig`, its flags, checks and resume rules;
loop.train(cfg) runs the job a TrainConfig describes.

Each field carries its command-line metadata (help text, parser, choices, flag group), so
stage3_train/train.py builds its flags from the dataclass (`build_parser`) and --help, the library
defaults and options.json never disagree. Floats are range-checked at parse time: finite, and
positive where a zero or negative value would be meaningless.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

import torch

from shared.diffusion.prediction import PREDICTIONS, check_prediction
from shared.diffusion.schedule import SCHEDULE_KINDS
from shared.errors import UserError
from shared import flags
from shared.model.ema import DEFAULT_EMA_DECAY, DEFAULT_EMA_WARMUP
from shared.model.precision import TRAIN_PRECISIONS, check_precision
from shared.model.unet import PRESETS
from shared.data.datasets import DATASET_NAMES, JUDGE_HELDOUT

DEFAULT_MAX_STEPS = 6000        # with batch 128: ~12.8 epochs of 60k MNIST, recognisable digits with EMA
# Seeds are offset per rank, per held-out draw and per grid image; this bound keeps every offset seed
# inside torch's 64-bit generator seed.
MAX_SEED = 2**62
# Without CUDA, the default command trains this recipe instead of the GPU defaults (every flag the user
# gives wins; giving --preset turns the recipe off). The one place its values live; what it reaches and
# what else was tried: stage3_train/README.md, "The default run on a CPU".
# Datasets whose images keep their meaning when mirrored (photographs; not digits or letters): trained
# with --random-flip unless --no-random-flip is given, as DDPM trained CIFAR-10 (Ho et al. 2020, App. B).
FLIP_BY_DEFAULT = ("cifar10",)
CPU_RECIPE = {"preset": "cpu", "batch_size": 32, "lr": 2e-3, "cosine": True, "min_snr_gamma": 2.0,
              "prediction": "v", "max_steps": 4000, "minutes": 10.0, "precision": "auto"}


positive_float = flags.positive_float  # finite: the cli's float parsers refuse NaN, inf and 1e309
nonneg_float = flags.nonneg_float
seed_int = flags.int_in(0, MAX_SEED)


def option(default, help: str, group: str, parse=None, choices=None, exclusive: str | None = None,
           switch: bool = False):
    """A TrainConfig field with its flag: --name-with-dashes, typed by `parse`; bools are switches, and so
    is a `switch` field whose default None means "the dataset decides" (--name and --no-name)."""
    return field(default=default, metadata={"help": help, "group": group, "parse": parse, "choices": choices,
                                            "exclusive": exclusive, "switch": switch})


DATA, LENGTH, OPTIM, RECORDS, SPEED = ("data and model", "length and batch", "optimisation", "records", "speed")


@dataclass
class TrainConfig:
    """Every option of a training run; stage3_train/train.py exposes each as a flag of the same name."""
    dataset: str = option("mnist", "dataset; 'folder' reads --data-dir: a folder of images (unconditional) or one sub-folder per class", DATA,
                          choices=DATASET_NAMES)
    data_dir: str | None = option(None, "where the data lives: MNIST-format IDX files (offline), an image folder "
                                  "(--dataset folder), or a torchvision root; default ./data", DATA)
    preset: str = option("mnist", "U-Net size (tiny for tests and CPUs)", DATA, choices=tuple(PRESETS))
    schedule: str = option("linear", "noise schedule β_t", DATA, choices=SCHEDULE_KINDS)
    timesteps: int = option(1000, "T, diffusion steps", DATA, parse=flags.int_in(1, 100_000))
    class_cond: bool = option(True, "condition on labels (label dropout to the null class prepares "
                              "classifier-free guidance); --no-class-cond trains an unconditional model", DATA)
    p_uncond: float = option(0.1, "probability that a label is replaced by the null class (class-cond runs)",
                             DATA, parse=flags.float_in(0.0, 1.0))
    heldout_size: int = option(256, "images held out for the denoising loss with fixed t and ε (0: no "
                               "evaluation)", DATA, parse=flags.nonneg_int)
    judge_heldout: int = option(JUDGE_HELDOUT, "the evaluator's held-out images (the last N of a labelled "
                                "in-memory dataset larger than N) are left out of training; 0 trains on all",
                                DATA, parse=flags.nonneg_int)
    image_size: int | None = option(None, "resize (and centre-crop) folder images to this side; default: the "
                                    "dataset's own size (folder: the preset's)", DATA, parse=flags.int_in(8, 1024))
    channels: int | None = option(None, "1 (grey) or 3 (RGB) for folder images; default: the preset's",
                                  DATA, parse=flags.int_in(1, 3), choices=(1, 3))
    random_flip: bool | None = option(None, "flip each training image left-right with probability 1/2; default: "
                                      f"on for {', '.join(FLIP_BY_DEFAULT)}, off otherwise (--no-random-flip)",
                                      DATA, switch=True)
    epochs: int | None = option(None, "train this many epochs", LENGTH, parse=flags.positive_int, exclusive="length")
    max_steps: int | None = option(None, f"train this many steps (default {DEFAULT_MAX_STEPS} when --epochs is "
                                   "not given)", LENGTH, parse=flags.positive_int, exclusive="length")
    minutes: float | None = option(None, "stop after this many minutes of training (checked at each log row); "
                                   "the checkpoints, a grid and the log are written as at the last step, and "
                                   "--resume continues", LENGTH, parse=flags.positive_float)
    batch_size: int = option(128, "images per step per process", LENGTH, parse=flags.positive_int)
    grad_accum: int = option(1, "micro-batches of --batch-size per optimizer step (the gradient of a K-times "
                             "larger batch)", LENGTH, parse=flags.int_in(1, 1024))
    num_workers: int = option(0, "DataLoader workers for folder datasets (in-memory datasets are gathered "
                              "on the device)", LENGTH, parse=flags.nonneg_int)
    seed: int = option(0, "seed of weights, data order and noise", LENGTH, parse=seed_int)
    lr: float = option(2e-4, "AdamW learning rate", OPTIM, parse=positive_float)
    weight_decay: float = option(0.0, "AdamW weight decay", OPTIM, parse=nonneg_float)
    warmup_steps: int = option(100, "linear LR warm-up", OPTIM, parse=flags.nonneg_int)
    cosine: bool = option(False, "cosine-decay the LR to 0 after the warm-up", OPTIM)
    grad_clip: float = option(1.0, "max gradient norm (0: off)", OPTIM, parse=nonneg_float)
    ema_decay: float = option(DEFAULT_EMA_DECAY, "EMA decay", OPTIM, parse=flags.float_in(0.0, 1.0))
    ema_warmup: int = option(DEFAULT_EMA_WARMUP, "EMA decay warm-up: decay_n = min(decay, (1+n)/(warmup+n)); "
                             "0: off", OPTIM, parse=flags.nonneg_int)
    precision: str = option("auto", "autocast dtype; auto = bf16 where the device computes it natively (a "
                            "CUDA GPU, a CPU with AVX-512 BF16/AMX), else fp32; fp16 uses a GradScaler", OPTIM,
                            choices=TRAIN_PRECISIONS)
    min_snr_gamma: float = option(0.0, "min-SNR-γ loss weights w_t = min(1, γ/SNR_t) (Hang et al. 2023); "
                                  "0: plain L_simple", OPTIM, parse=nonneg_float)
    prediction: str = option("eps", "what the network predicts: eps (ε, DDPM), v (α_t·ε − σ_t·x0, Salimans & Ho "
                             "2022) or x0; stored in the checkpoint, honoured by every sampler and the export",
                             OPTIM, choices=PREDICTIONS)
    max_consecutive_skips: int = option(20, "stop after this many consecutive steps with a non-finite loss or "
                                        "gradient (checked at log rows)", OPTIM, parse=flags.positive_int)
    out: str = option("runs", "parent of the auto-numbered run directories", RECORDS)
    log_every: int = option(10, "steps per log.csv row", RECORDS, parse=flags.positive_int)
    eval_every: int = option(500, "steps per held-out evaluation", RECORDS, parse=flags.positive_int)
    sample_every: int = option(1000, "steps per sample grid", RECORDS, parse=flags.positive_int)
    sample_steps: int = option(50, "DDIM steps of the sample grids (EMA weights)", RECORDS, parse=flags.positive_int)
    ckpt_every: int = option(1000, "steps per last.pt/ema.pt", RECORDS, parse=flags.positive_int)
    keep_snapshots: int = option(0, "also keep the last K EMA weights as ema-<step>.pt, one per checkpoint "
                                 "(0: only ema.pt)", RECORDS, parse=flags.nonneg_int)
    tensorboard: bool = option(False, "also write log.csv's scalars and the sample grids to TensorBoard "
                               "(<run>/tensorboard; needs the tensorboard package)", RECORDS)
    early_stop_patience: int = option(0, "stop after this many evaluations without a better held-out loss "
                                      "(0: never)", RECORDS, parse=flags.nonneg_int)
    resume: str | None = option(None, "continue a run: its directory or a last.pt/best.pt", RECORDS)
    device: str = option("auto", "auto, cpu, cuda or cuda:N", SPEED)
    fused_kernels: bool = option(False, "use the fused Triton kernels (fails if unavailable)", SPEED)
    compile: bool = option(False, "torch.compile the model", SPEED)
    channels_last: bool = option(False, "channels-last memory format", SPEED)
    cuda_graphs: bool | None = option(None, "replay each training step as one CUDA graph; default: on for one "
                                      "CUDA GPU training in fp32 or bf16 without --compile", SPEED, switch=True)

    def __post_init__(self):
        if self.random_flip is None:  # not given: the dataset's default (FLIP_BY_DEFAULT)
            self.random_flip = self.dataset in FLIP_BY_DEFAULT


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(description: str, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The training flags, one per TrainConfig field, grouped as in --help; plus --dry-run.

    suppress_defaults: leave every flag that is not given out of the parsed namespace (given_options).
    """
    p = flags.make_parser(description)
    defaults = asdict(TrainConfig())  # a switch's default as the default dataset resolves it (parse_config)
    groups: dict[str, argparse._ArgumentGroup] = {}
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(TrainConfig):
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        if meta["exclusive"]:
            group = exclusive.get(meta["exclusive"]) or exclusive.setdefault(
                meta["exclusive"], group.add_mutually_exclusive_group())
        kwargs = {"help": meta["help"], "default": argparse.SUPPRESS if suppress_defaults else defaults[f.name]}
        if isinstance(f.default, bool) or meta["switch"]:
            kwargs["action"] = argparse.BooleanOptionalAction if f.default or meta["switch"] else "store_true"
        else:
            kwargs.update(type=meta["parse"], choices=meta["choices"])
        group.add_argument(_flag(f.name), **kwargs)
    p.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS if suppress_defaults else False,
                   help="print the resolved options and exit")
    return p


def parse_config(argv: Sequence[str] | None, description: str) -> tuple[TrainConfig, set[str], bool]:
    """(config, names of the options given on the command line, dry_run) from argv."""
    args = vars(build_parser(description).parse_args(argv))
    given = set(vars(build_parser(description, suppress_defaults=True).parse_args(argv))) - {"dry_run"}
    dry_run = args.pop("dry_run")
    for f in fields(TrainConfig):
        if f.metadata["switch"] and f.name not in given:
            args[f.name] = None  # not given: the dataset decides (TrainConfig.__post_init__)
    return TrainConfig(**args), given, dry_run


# --------------------------------------------------------------------------------------------------
# Checks and resolution

def check_config(cfg: TrainConfig) -> None:
    """Range checks for library callers and for options read back from a checkpoint (the CLI's typed
    flags already enforce these); a bad value is one UserError line."""
    positive = ("timesteps", "batch_size", "grad_accum", "log_every", "sample_every", "sample_steps", "ckpt_every",
                "eval_every", "max_consecutive_skips")
    for name in positive:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    for name in ("epochs", "max_steps"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    for name in ("heldout_size", "judge_heldout", "num_workers", "warmup_steps", "ema_warmup", "early_stop_patience",
                 "keep_snapshots"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 0:
            raise UserError(f"{name} must be an integer >= 0, got {value!r}")
    if not isinstance(cfg.seed, int) or not 0 <= cfg.seed <= MAX_SEED:
        raise UserError(f"seed must be an integer in [0, {MAX_SEED}], got {cfg.seed!r}")
    if cfg.epochs is not None and cfg.max_steps is not None:
        raise UserError("give --epochs or --max-steps, not both")
    if cfg.minutes is not None and not (isinstance(cfg.minutes, (int, float)) and 0 < cfg.minutes < math.inf):
        raise UserError(f"minutes must be a finite number > 0, got {cfg.minutes!r}")
    for name, lo, hi in (("p_uncond", 0.0, 1.0), ("ema_decay", 0.0, 1.0)):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise UserError(f"{name} must lie in [{lo}, {hi}], got {value!r}")
    for name, lo_open in (("lr", True), ("grad_clip", False), ("weight_decay", False), ("min_snr_gamma", False)):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (lo_open and value == 0):
            raise UserError(f"{name} must be a finite number {'>' if lo_open else '>='} 0, got {value!r}")
    check_precision(cfg.precision, TRAIN_PRECISIONS)
    check_prediction(cfg.prediction)
    if cfg.early_stop_patience > 0 and cfg.heldout_size == 0:
        raise UserError("--early-stop-patience needs a held-out set (--heldout-size > 0)")
    if cfg.channels not in (None, 1, 3):
        raise UserError(f"channels must be 1 or 3, got {cfg.channels!r}")
    if cfg.image_size is not None and (not isinstance(cfg.image_size, int) or not 8 <= cfg.image_size <= 1024):
        raise UserError(f"image_size must be an integer in [8, 1024], got {cfg.image_size!r}")
    if cfg.sample_steps > cfg.timesteps:
        raise UserError(f"--sample-steps {cfg.sample_steps} exceeds --timesteps {cfg.timesteps}")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX), where bf16 autocast pays off."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' → bf16 where the device computes it natively, else fp32; fp16 needs CUDA."""
    check_precision(precision, TRAIN_PRECISIONS)
    if precision == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
        return "bf16" if native else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU (CPU autocast has no fp16 loss scaling); "
                        "use bf16 or fp32 on the CPU")
    return precision


def resolve_cuda_graphs(cfg: TrainConfig, precision: str, device: torch.device, world_size: int) -> bool:
    """Whether the training step replays as a CUDA graph (shared/training/graphed.py): --cuda-graphs or
    --no-cuda-graphs as given, else wherever it applies. precision: the resolved one."""
    reasons = {"it needs a CUDA GPU": device.type != "cuda",
               "fp16's loss scaler is not captured; use bf16 or fp32": precision == "fp16",
               "--compile replaces the eager step it captures": cfg.compile,
               "it runs one process; DistributedDataParallel's all-reduce is not captured": world_size > 1}
    blocked = [reason for reason, applies in reasons.items() if applies]
    if cfg.cuda_graphs is None:
        return not blocked
    if cfg.cuda_graphs and blocked:
        raise UserError(f"--cuda-graphs cannot be used here: {blocked[0]} (or give --no-cuda-graphs)")
    return cfg.cuda_graphs


def apply_cpu_recipe(cfg: TrainConfig, given: set[str], device: torch.device) -> tuple[TrainConfig, str | None]:
    """Without CUDA and without --preset, the CPU_RECIPE values for every option not given.

    Returns (config, the one line that says so, or None when the recipe does not apply)."""
    if device.type == "cuda" or cfg.resume is not None or "preset" in given:
        return cfg, None
    length_given = bool({"max_steps", "epochs", "minutes"} & given)  # a length asked for replaces the recipe's
    taken = {k: v for k, v in CPU_RECIPE.items()
             if k not in given and not (k in ("max_steps", "minutes") and length_given)}
    if not taken:
        return cfg, None
    cfg = TrainConfig(**{**asdict(cfg), **taken})
    length = f"{cfg.max_steps} steps" if cfg.max_steps is not None else f"{cfg.epochs} epochs"
    if cfg.minutes is not None:
        length += f" within {cfg.minutes:g} minutes"
    return cfg, (f"note: no CUDA GPU, so the CPU recipe: preset {cfg.preset}, batch {cfg.batch_size}, "
                 f"lr {cfg.lr:g}, {cfg.prediction}-prediction, {length}, precision {resolve_precision(cfg.precision, device)} "
                 f"(for the full model: --preset mnist)")


# --------------------------------------------------------------------------------------------------
# Resume

# Options a resumed run must share with its checkpoint (they define the model, the data or its order).
# (precision may change: a run started on one machine can continue on another.)
FIXED_ON_RESUME = ("dataset", "preset", "schedule", "timesteps", "seed", "batch_size", "class_cond",
                   "heldout_size", "judge_heldout", "image_size", "channels", "random_flip", "grad_accum",
                   "prediction")
# Options never taken from a checkpoint.
NOT_INHERITED = ("resume", "device")
# What a checkpoint that predates an option trained with (its data must stay what it was).
ABSENT_IN_OLD_CHECKPOINTS = {"judge_heldout": 0, "image_size": None, "channels": None, "random_flip": False,
                             "grad_accum": 1, "prediction": "eps"}


def merge_resume_options(cfg: TrainConfig, saved: dict, path: str,
                         given: set[str] | None = None) -> TrainConfig:
    """Options for a resumed run: those not given come from the checkpoint; one given on the command
    line must agree with it if it is in FIXED_ON_RESUME (the error names the mismatch).

    given: the option names the user set explicitly; None treats every non-default value as given.
    """
    defaults, merged = asdict(TrainConfig()), asdict(cfg)
    saved = {**ABSENT_IN_OLD_CHECKPOINTS, **saved}
    if saved.get("cuda_graphs") is None and saved.get("cuda_graphs_used") is not None:
        # how the run drew t and ε is what it resolved, not "auto": a resumed run keeps drawing that way
        saved["cuda_graphs"] = saved["cuda_graphs_used"]
    for key, saved_value in saved.items():
        if key not in merged or key in NOT_INHERITED:
            continue
        is_given = key in given if given is not None else merged[key] != defaults[key]
        if not is_given:
            merged[key] = saved_value
        elif key in FIXED_ON_RESUME and merged[key] != saved_value:
            raise UserError(f"{_flag(key)} {merged[key]} does not match the checkpoint "
                            f"{path!r}, which was trained with {saved_value}")
    merged_cfg = TrainConfig(**merged)
    try:
        check_config(merged_cfg)
    except UserError as err:
        raise UserError(f"checkpoint {path!r} holds a bad option: {err}") from None
    return merged_cfg


def resolved_length(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Total optimizer steps of the run."""
    if cfg.epochs is not None:
        return cfg.epochs * steps_per_epoch
    return cfg.max_steps or DEFAULT_MAX_STEPS

