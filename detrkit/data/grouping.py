# SPDX-License-Identifier: Apache-2.0
"""Batch samplers that group images by shape.

Training (``data.group_by_aspect_ratio``): batches hold only landscape or only portrait images,
so less of each batch is padding. Batches are formed from the epoch's global permutation and
dealt to ranks in turn, so every rank runs the same number of steps and a resumed epoch replays
the same batches.

Evaluation (``data.eval_group_by_size``): batches hold images of one exact size, so nothing is
padded and a prediction cannot depend on which other images share its batch (CNN features near
an image's border change when the batch is padded beyond it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from detrkit.data.seeding import check_replicas, sample_seed


def group_batches(
    order: Sequence[int], keys: Sequence, batch_size: int, *, mix_leftovers: bool
) -> list[list[int]]:
    """Fill one bucket per key in ``order``; a full bucket becomes a batch. The partly filled
    buckets left at the end become batches of their own, or, with ``mix_leftovers``, are
    batched together in ``order`` (so that fewer images are dropped)."""
    buckets: dict = defaultdict(list)
    batches = []
    for index in order:
        bucket = buckets[keys[index]]
        bucket.append(index)
        if len(bucket) == batch_size:
            batches.append(bucket.copy())
            bucket.clear()
    rest = [bucket for bucket in buckets.values() if bucket]
    if not mix_leftovers:
        return batches + rest
    position = {index: i for i, index in enumerate(order)}
    mixed = sorted((index for bucket in rest for index in bucket), key=position.__getitem__)
    return batches + [mixed[i : i + batch_size] for i in range(0, len(mixed), batch_size)]


class AspectRatioBatchSampler(Sampler[list[tuple[int, int]]]):
    """Seeded, resumable training batches of same-orientation images, per rank.

    Yields lists of (dataset index, augmentation seed), like ``SeededSampler`` does per index.
    Epoch ``e`` permutes the dataset with ``seed + e``, groups it into full batches of landscape
    (w >= h) or portrait images, keeps a multiple of ``num_replicas`` batches and gives rank r
    batches r, r + R, ...

    Args:
        aspect_ratios: [I] width / height per image.
        batch_size: images per batch and rank.
        seed: base seed.
        num_replicas, rank: the process group.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[float],
        batch_size: int,
        seed: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        check_replicas(num_replicas, rank)
        self.landscape = [float(r) >= 1.0 for r in aspect_ratios]
        self.batch_size, self.seed = batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.position = 0, 0

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's full (drop-last) batches of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.landscape), generator=generator).tolist()
        batches = group_batches(order, self.landscape, self.batch_size, mix_leftovers=True)
        full = [batch for batch in batches if len(batch) == self.batch_size]
        usable = len(full) - len(full) % self.num_replicas
        return full[self.rank : usable : self.num_replicas]

    @property
    def num_samples(self) -> int:
        """Samples per rank in a full epoch."""
        return len(self.epoch_batches()) * self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        start = self.position // self.batch_size
        for batch in self.epoch_batches()[start:]:
            # The same per-sample seed as ``SeededSampler``: augmentations ignore grouping.
            yield [(index, sample_seed(self.seed, self.epoch, index)) for index in batch]
        self.position = 0

    def __len__(self) -> int:
        return len(self.epoch_batches()) - self.position // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def skip(self, num_samples: int) -> None:
        """Start the next iteration after this rank's first ``num_samples`` (whole batches)."""
        if num_samples % self.batch_size or not 0 <= num_samples <= self.num_samples:
            raise ValueError(f"cannot skip {num_samples} of {self.num_samples} samples")
        self.position = num_samples


class SameSizeBatchSampler(Sampler[list[int]]):
    """Evaluation batches of images with one (h, w), each rank a strided shard of the dataset.

    Within a shard, images keep dataset order inside each size; batches of a size are emitted
    when full, the rest at the end.

    Args:
        sizes: [I] (h, w) of every image as the annotation file gives it.
        batch_size: most images per batch.
        num_replicas, rank: the process group.
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        check_replicas(num_replicas, rank)
        shard = range(rank, len(sizes), num_replicas)
        keys = [tuple(int(v) for v in size) for size in sizes]
        self.batches = group_batches(shard, keys, batch_size, mix_leftovers=False)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
