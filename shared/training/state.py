"""The training state a checkpoint holds, with state_dict / load_state_dict for exact resume.

`TrainState` gathers the network, its EMA, the optimizer, the LR schedule, the GradScaler, the
counters (`Progress`) and the random streams; its state_dict is the training checkpoint's content
(keys model, ema, optimizer, lr_scheduler, scaler, progress, rng), the same keys every earlier
checkpoint has, so those load and resume. loop.Trainer builds it (the same initial weights on every
rank), steps it through loop.GradientStep and hands it to the recorder to write.

Exact resume needs every source of randomness to continue where it stopped:

    source                         used for                           saved as
    train-noise torch.Generator    t, ε and the p_uncond label drop   rng["train_noise"]
    global torch RNG (CPU, CUDA)   dropout inside the U-Net           rng["torch_cpu"], rng["torch_cuda"]
    numpy, python `random`         nothing of ours; saved for users    rng["numpy"], rng["python"]
    data order                     a permutation seeded by seed+epoch  progress: epoch, batch_in_epoch
    --random-flip                  a flip mask drawn per epoch from a  progress: epoch, batch_in_epoch
                                   stream seeded by seed + offset + epoch (batches.FLIP_SEED_OFFSET)
    DataLoader's own generator     worker seeds (num_workers > 0)      rng["loader"]

The data order needs no state of its own: epoch e's permutation comes from a generator seeded with
seed + e (shared.training.batches) and a resumed run skips the batches already trained on.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

INF = float("inf")


@dataclass
class Progress:
    """Counters that a checkpoint carries; all plain numbers so weights_only loading accepts them."""
    step: int = 0                 # optimizer steps taken (skipped ones included)
    epoch: int = 0                # current epoch
    batch_in_epoch: int = 0       # micro-batches of `epoch` already consumed (grad_accum per step)
    skipped_total: int = 0        # steps skipped for a non-finite loss or gradient
    consecutive_skips: int = 0
    best_heldout: float = INF     # best held-out loss so far (EMA weights)
    evals_since_best: int = 0     # evaluations without improvement, for early stopping
    images_seen: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Progress":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_state(d: dict) -> None:
    np.random.set_state((d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"],
                         d["cached_gaussian"]))


def capture_rng(train_noise: torch.Generator, loader_gen: torch.Generator) -> dict:
    """Every RNG state of this process, as tensors and plain values."""
    version, internal, gauss_next = random.getstate()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _numpy_state(),
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "train_noise": train_noise.get_state(),
        "loader": loader_gen.get_state(),
    }


def restore_rng(state: dict, train_noise: torch.Generator, loader_gen: torch.Generator) -> None:
    """Inverse of capture_rng. CUDA states are restored only for the devices that exist now."""
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("torch_cuda") or []
    if cuda_states and torch.cuda.is_available():
        for index, s in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, index)
    _set_numpy_state(state["numpy"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    train_noise.set_state(state["train_noise"])
    loader_gen.set_state(state["loader"])


class TrainState:
    """Everything that changes as training goes, with a state_dict for checkpoints.

    The counters that decide nothing in the hot loop but are logged (skipped steps, the current run of
    consecutive skips, the window sums) live on the device as `skipped_total` and `consecutive_skips`
    tensors and are folded into `progress` when read (`sync_progress`, at log rows and checkpoints).
    """

    def __init__(self, model, ema, optimizer, lr_scheduler, scaler, train_noise: torch.Generator,
                 loader_gen: torch.Generator, device: torch.device):
        self.model, self.ema, self.optimizer = model, ema, optimizer
        self.lr_scheduler, self.scaler = lr_scheduler, scaler
        self.train_noise, self.loader_gen = train_noise, loader_gen
        self.progress = Progress()
        self.skipped_total = torch.zeros((), dtype=torch.long, device=device)
        self.consecutive_skips = torch.zeros((), dtype=torch.long, device=device)

    def count_step(self, skipped: torch.Tensor) -> None:
        """Device-side bookkeeping of one step; skipped: 0-dim bool tensor."""
        self.skipped_total += skipped.long()
        # in place: a CUDA graph replays this on the same tensor
        self.consecutive_skips.copy_(torch.where(skipped, self.consecutive_skips + 1,
                                                 torch.zeros_like(self.consecutive_skips)))

    def sync_progress(self) -> Progress:
        """Reads the device counters into progress (one host sync); returns it."""
        self.progress.skipped_total = int(self.skipped_total)
        self.progress.consecutive_skips = int(self.consecutive_skips)
        return self.progress

    def is_finite(self) -> bool:
        """Whether the weights, the EMA and the optimizer state are all finite (one host sync)."""
        tensors = [*self.model.parameters(), *self.ema.parameters()]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
        flags = [torch.isfinite(t).all() for t in tensors]
        return bool(torch.stack(flags).all()) if flags else True

    def state_dict(self, rng: list[dict]) -> dict:
        """rng: capture_rng() of every rank (this rank's alone when single-process)."""
        self.sync_progress()
        optimizer = self.optimizer.state_dict()
        # a graphed step's lr is a device tensor; files hold the float, so any run can load them
        optimizer["param_groups"] = [{**g, "lr": float(g["lr"])} for g in optimizer["param_groups"]]
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": optimizer, "lr_scheduler": self.lr_scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "progress": self.progress.to_dict(), "rng": rng}

    def load_state_dict(self, ckpt: dict, rank: int, world_size: int) -> bool:
        """Restores everything; returns False when the checkpoint's random streams were written by another
        number of processes (then they restart from the seed and the run is not bit-exact)."""
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        # the implementation flags are this run's choice, not the file's (an older file says fused=None,
        # and only fused AdamW can mask a skipped step on the device)
        flags = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group, own in zip(self.optimizer.param_groups, flags):
            group.update(own)
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.progress = Progress.from_dict(ckpt["progress"])
        self.skipped_total.fill_(self.progress.skipped_total)
        self.consecutive_skips.fill_(self.progress.consecutive_skips)
        rng_states = ckpt["rng"]
        if len(rng_states) != world_size:
            return False
        restore_rng(rng_states[rank], self.train_noise, self.loader_gen)
        return True
