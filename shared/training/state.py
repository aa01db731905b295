"""What a training checkpoint holds beyond the weights: counters, every RNG state, resumable data order.

Exact resume needs every source of randomness to continue where it stopped:

    source                         used for                           saved as
    train-noise torch.Generator    t, ε and the p_uncond label drop   rng["train_noise"]
    global torch RNG (CPU, CUDA)   dropout inside the U-Net           rng["torch_cpu"], rng["torch_cuda"]
    numpy, python `random`         nothing of ours; saved for users    rng["numpy"], rng["python"]
    data order                     a permutation seeded by seed+epoch  progress: epoch, batch_in_epoch
    DataLoader's own generator     worker seeds (num_workers > 0)      rng["loader"]

The data order needs no state of its own: `ResumableSampler` draws epoch e's permutation from a
generator seeded with seed + e (as DistributedSampler does) and skips the batches already trained on.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DistributedSampler

INF = float("inf")


@dataclass
class Progress:
    """Counters that a checkpoint carries; all plain numbers so weights_only loading accepts them."""
    step: int = 0                 # optimizer steps taken (skipped ones included)
    epoch: int = 0                # current epoch
    batch_in_epoch: int = 0       # batches of `epoch` already consumed
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


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way into an epoch.

    Epoch e's order is randperm(N) from a generator seeded with seed + e, split across ranks; with
    `start_batch(b, batch_size)` the first b·batch_size indices of this rank are skipped, so a resumed
    run sees exactly the batches an uninterrupted run would have seen next.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.start_index = 0

    def start_batch(self, batch_in_epoch: int, batch_size: int) -> None:
        self.start_index = batch_in_epoch * batch_size

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start_index:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_index)


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
