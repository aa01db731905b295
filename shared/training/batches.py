"""The data order of training: batches x0 ~ q(x0) in an order a resumed run can continue exactly.

The order of epoch e is DistributedSampler's: randperm(N) from a generator seeded with seed + e,
truncated to a multiple of the world size, rank r taking every world_size-th index from r. A resumed
run starts at batch b of epoch e and sees exactly the batches an uninterrupted run would have seen.

In-memory datasets (the uint8 tensors of MNIST-family, CIFAR-10 and image folders of up to
shared.data.datasets.IN_MEMORY_MAX_BYTES) live on the device whole; a batch is one index_select by a
slice of the epoch's permutation, so the hot loop has no per-sample Python and no host-to-device copy
(the permutation is copied once per epoch). Image folders too large for memory keep a DataLoader with
the same order.

Random flips (--random-flip): image i of the epoch's order is mirrored left-right where u_i < 1/2, with
u = rand(total epoch length) drawn on the device, once per epoch, from a generator seeded with
seed + FLIP_SEED_OFFSET + e (rank r taking every world_size-th u from r, like its indices). Like the
order, the flips need no state of their own: a resumed run redraws epoch e's and uses them from batch b
on, so it flips exactly the images an uninterrupted run flips, and no step waits on the host.

Batches come in the default (contiguous) memory format; the trainer, which converts the model to
--channels-last, converts its inputs with it.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from shared.data.datasets import DataError, TensorImageDataset, from_uint8, worker_error_line

# The flip stream's seeds start above every seed a run can be given (shared.training.config.MAX_SEED = 2**62)
# so they never coincide with the order's seed + e or the noise streams' seed + small offsets.
FLIP_SEED_OFFSET = 2**62


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
                 num_workers: int = 0, random_flip: bool = False):
        self.sampler = ResumableSampler(train_set, world_size, rank, seed)
        self.batch_size, self.device = batch_size, device
        self.seed, self.random_flip = seed, random_flip
        self.steps_per_epoch = self.sampler.num_samples // batch_size
        self.loader_gen = torch.Generator()  # the DataLoader's own draws (worker seeds) stay off the global RNG
        self.flip_gen = torch.Generator(device)  # reseeded every epoch (flip_mask)
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
        flips = self.flip_mask(epoch) if self.random_flip else None
        batches = self._gathered() if self.on_device else self._loaded()
        for b, (x0, y) in enumerate(batches, start=start_batch):
            if flips is not None:
                x0 = flip_where(x0, flips[self._rows(b)])
            yield x0, y

    def _rows(self, b: int) -> slice:
        """Where batch b lies in an epoch's order of this rank's images."""
        return slice(b * self.batch_size, (b + 1) * self.batch_size)

    def flip_mask(self, epoch: int) -> torch.Tensor:
        """[num_samples] bool on the device: which of this rank's images of `epoch` (in order) are flipped."""
        self.flip_gen.manual_seed(self.seed + FLIP_SEED_OFFSET + epoch)
        u = torch.rand(self.sampler.total_size, device=self.device, generator=self.flip_gen)
        return u[self.sampler.rank::self.sampler.num_replicas] < 0.5

    def _gathered(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.long).to(self.device)  # once per epoch
        for b in range(len(order) // self.batch_size):
            index = order[self._rows(b)]
            # from_uint8, as TensorImageDataset.__getitem__ does, so values are bit-identical
            yield from_uint8(self.images.index_select(0, index)), self.labels.index_select(0, index)

    def _loaded(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for x0, y in self.loader:
                yield x0.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        except DataError as err:  # an unreadable file found by a worker: its one line, not the worker's traceback
            raise DataError(worker_error_line(err)) from None


def flip_where(x0: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """x0 [B x C x H x W] with image i mirrored left-right (along W) where flip[i] (bool [B], same device)."""
    return torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)


def _in_memory_base(dataset) -> tuple[TensorImageDataset | None, list[int] | None]:
    """(the TensorImageDataset under `dataset`, the indices into it) when it is one, through Subsets."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    if type(dataset) is TensorImageDataset:  # a subclass may serve items its own way
        return dataset, indices
    return None, None
