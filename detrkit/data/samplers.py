# SPDX-License-Identifier: Apache-2.0
"""Samplers and DataLoader builders: seeded, resumable mid-epoch, rank-aware.

The training order of epoch ``e`` is ``torch.randperm(n)`` drawn from a generator seeded with
``seed + e``; it depends on nothing else, so a resumed run replays it exactly. With several
processes every rank draws the same permutation (padded by wrapping to a multiple of the number
of replicas, as ``DistributedSampler`` does) and takes the strided slice ``rank::num_replicas``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from detrkit.data.collate import collate
from detrkit.data.grouping import AspectRatioBatchSampler, SameSizeBatchSampler
from detrkit.data.seeding import check_replicas, sample_seed


class ResumableRandomSampler(Sampler[int]):
    """Seeded random order per epoch that can start part-way through an epoch.

    State is ``{"epoch", "position"}``: ``position`` counts this rank's samples of the current
    epoch that have been consumed (and are skipped when iterating again).

    Args:
        dataset_len: number of samples in the dataset.
        seed: base seed; epoch e uses ``seed + e``.
        num_replicas: number of processes sharing the epoch.
        rank: this process's index in ``[0, num_replicas)``.
    """

    def __init__(
        self, dataset_len: int, seed: int, *, num_replicas: int = 1, rank: int = 0
    ) -> None:
        check_replicas(num_replicas, rank)
        if dataset_len < 1:
            raise ValueError(f"cannot sample from an empty dataset (length {dataset_len})")
        self.dataset_len = dataset_len
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.position = 0
        self._handed_out = 0

    @property
    def num_samples(self) -> int:
        """Samples per rank in a full epoch (the permutation is padded to divide evenly)."""
        return math.ceil(self.dataset_len / self.num_replicas)

    def epoch_indices(self, epoch: int | None = None) -> list[int]:
        """This rank's full order for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.dataset_len, generator=generator).tolist()
        total = self.num_samples * self.num_replicas
        while len(order) < total:  # wrap around so every rank gets the same count
            order += order[: total - len(order)]
        return order[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start = self.position
        self._handed_out = start
        for index in self.epoch_indices()[start:]:
            self._handed_out += 1
            yield index
        # A finished pass starts from the beginning again unless ``skip``/``set_epoch`` intervene.
        self.position = 0

    def __len__(self) -> int:
        return self.num_samples - self.position

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` and start it from the beginning."""
        self.epoch = epoch
        self.position = 0
        self._handed_out = 0

    def skip(self, num_samples: int) -> None:
        """Make the next iteration start after this rank's first ``num_samples`` of the epoch."""
        if not 0 <= num_samples <= self.num_samples:
            raise ValueError(f"cannot skip {num_samples} of {self.num_samples} samples")
        self.position = num_samples
        self._handed_out = num_samples

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """``{"epoch", "position"}`` to save in a checkpoint.

        Args:
            consumed: samples of this rank consumed so far in the epoch (e.g. steps x batch
                size). By default the number of indices handed out, which equals it only with
                ``num_workers=0``; worker processes prefetch indices ahead of the training loop.
        """
        position = self._handed_out if consumed is None else consumed
        return {"epoch": self.epoch, "position": int(position)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore ``state_dict()``: the next iteration yields the rest of that epoch."""
        self.set_epoch(int(state["epoch"]))
        self.skip(int(state["position"]))


class ShardedSequentialSampler(Sampler[int]):
    """Dataset order, rank r taking indices r, r + R, r + 2R, ... (no padding, no duplicates)."""

    def __init__(self, dataset_len: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        check_replicas(num_replicas, rank)
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_len, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.num_replicas))


class SeededSampler(Sampler[tuple[int, int]]):
    """Yield (dataset index, augmentation seed) pairs from a ``ResumableRandomSampler``.

    The seed depends only on (seed, epoch, index), so an image gets the same augmentation
    whichever worker loads it and wherever an epoch was resumed: that makes resume exact.
    """

    def __init__(self, sampler: ResumableRandomSampler, seed: int) -> None:
        self.sampler, self.seed = sampler, seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        for index in self.sampler:
            yield index, sample_seed(self.seed, epoch, index)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def num_samples(self) -> int:
        return self.sampler.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def skip(self, num_samples: int) -> None:
        self.sampler.skip(num_samples)

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        return self.sampler.state_dict(consumed)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


class SeededDataset(Dataset):
    """Run the wrapped dataset under torch/Python RNGs seeded per sample, restoring them after."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    *,
    drop_last: bool = True,
    num_replicas: int = 1,
    rank: int = 0,
    aspect_ratios: Sequence[float] | None = None,
) -> DataLoader:
    """Training DataLoader yielding ``(ImageBatch, list[Target])``.

    Shuffled by a resumable sampler (``resumable_sampler(loader)``): call its ``set_epoch``
    every epoch and ``skip`` to resume inside one. Augmentations are seeded per sample
    (``SeededSampler``), so identical runs, resumed runs and runs with other ``num_workers``
    draw identical augmentations. With ``aspect_ratios`` (width / height per image), batches hold
    only landscape or only portrait images (``AspectRatioBatchSampler``; always drop-last).
    """
    common = dict(
        num_workers=num_workers,
        collate_fn=collate,
        # A private generator keeps loader start-up from consuming the global torch RNG.
        generator=torch.Generator().manual_seed(seed),
    )
    if aspect_ratios is not None:
        batches = AspectRatioBatchSampler(
            aspect_ratios, batch_size, seed, num_replicas=num_replicas, rank=rank
        )
        return DataLoader(SeededDataset(dataset), batch_sampler=batches, **common)
    sampler = ResumableRandomSampler(len(dataset), seed, num_replicas=num_replicas, rank=rank)
    return DataLoader(
        SeededDataset(dataset),
        batch_size=batch_size,
        sampler=SeededSampler(sampler, seed),
        drop_last=drop_last,
        **common,
    )


def resumable_sampler(loader: DataLoader):
    """The sampler of a training loader that has ``set_epoch``, ``skip`` and ``num_samples``."""
    batches = loader.batch_sampler
    return batches if hasattr(batches, "set_epoch") else loader.sampler


def build_eval_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    *,
    num_replicas: int = 1,
    rank: int = 0,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> DataLoader:
    """Evaluation DataLoader in dataset order (each rank a strided shard), keeping the last
    partial batch. With ``sizes`` ((h, w) per image), batches hold images of one size only, so
    nothing is padded (``SameSizeBatchSampler``)."""
    common = dict(
        num_workers=num_workers, collate_fn=collate, generator=torch.Generator().manual_seed(0)
    )
    if sizes is not None:
        batches = SameSizeBatchSampler(sizes, batch_size, num_replicas=num_replicas, rank=rank)
        return DataLoader(dataset, batch_sampler=batches, **common)
    sampler = ShardedSequentialSampler(len(dataset), num_replicas=num_replicas, rank=rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, **common)
