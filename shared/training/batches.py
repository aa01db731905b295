"""Training batches in a resumable order: gathered on the device for in-memory data, a DataLoader otherwise.

The order of epoch e is DistributedSampler's: randperm(N) from a generator seeded with seed + e,
truncated to a multiple of the world size, rank r taking every world_size-th index from r. A resumed
run starts at batch b of epoch e and sees exactly the batches an uninterrupted run would have seen.

In-memory datasets (the uint8 tensors of MNIST-family and CIFAR-10, a few hundred MB at most) live on the
device whole; a batch is one index_select by a slice of the epoch's permutation, so the hot loop has no
per-sample Python and no host-to-device copy (the permutation is copied once per epoch). Image folders
keep a DataLoader with the same order.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from shared.training.data import TensorImageDataset


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way into an epoch.

    With `start_batch(b, batch_size)` the first b·batch_size indices of this rank are skipped.
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


class Batches:
    """(x0 [B x C x H x W] float32 in [-1, 1] on the device, y [B] long on the device) per step."""

    def __init__(self, train_set, batch_size: int, world_size: int, rank: int, seed: int, device: torch.device,
                 num_workers: int = 0, channels_last: bool = False, random_flip: bool = False):
        self.sampler = ResumableSampler(train_set, world_size, rank, seed)
        self.batch_size, self.device, self.channels_last = batch_size, device, channels_last
        self.steps_per_epoch = self.sampler.num_samples // batch_size
        self.loader_gen = torch.Generator()  # the DataLoader's own draws (worker seeds) stay off the global RNG
        base, indices = _in_memory_base(train_set)
        self.on_device = base is not None
        if self.on_device:
            index = torch.as_tensor(indices, dtype=torch.long)
            self.images = base.images.index_select(0, index).to(device)   # uint8, the training part only
            self.labels = base.labels.index_select(0, index).to(device)
        else:
            self.loader = DataLoader(train_set, batch_size=batch_size, sampler=self.sampler, drop_last=True,
                                     num_workers=num_workers, pin_memory=device.type == "cuda",
                                     generator=self.loader_gen)

    def epoch(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch` from batch `start_batch` on."""
        self.sampler.set_epoch(epoch)
        self.sampler.start_batch(start_batch, self.batch_size)
        if not self.on_device:
            for x0, y in self.loader:
                yield self._format(x0.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)
            return
        order = torch.tensor(list(self.sampler), dtype=torch.long).to(self.device)  # once per epoch
        for b in range(len(order) // self.batch_size):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            # the same [-1, 1] formula as TensorImageDataset.__getitem__, so values are bit-identical
            x0 = self.images.index_select(0, index).float() / 127.5 - 1.0
            yield self._format(x0), self.labels.index_select(0, index)

    def _format(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.contiguous(memory_format=torch.channels_last) if self.channels_last else x0


def _in_memory_base(dataset) -> tuple[TensorImageDataset | None, list[int] | None]:
    """(the TensorImageDataset under `dataset`, the indices into it) when it is one, through Subsets."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    if type(dataset) is TensorImageDataset:  # a subclass may serve items its own way
        return dataset, indices
    return None, None
