# SPDX-License-Identifier: Apache-2.0
"""Dataloaders whose augmentations depend only on (seed, epoch, image), never on workers.

Each training sample is augmented under RNGs seeded from (seed, epoch, dataset index). Resuming
mid-epoch, changing ``num_workers`` or the number of processes therefore draws the same
augmentation for the same image, which is what makes resume exact.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from detrkit.config.schema import DataConfig
from detrkit.data.coco import CocoDetection, resolve_split
from detrkit.data.collate import collate
from detrkit.data.labels import LabelMap
from detrkit.data.samplers import ResumableRandomSampler, ShardedSequentialSampler
from detrkit.data.transforms import build_eval_transforms, build_train_transforms
from detrkit.errors import UserError

# Large odd multipliers spread (seed, epoch, index) over the 63-bit seed space.
_EPOCH_MIX, _INDEX_MIX = 1_000_003, 7_919


class SeededSampler(Sampler[tuple[int, int]]):
    """Yield (dataset index, augmentation seed) pairs from a ``ResumableRandomSampler``."""

    def __init__(self, sampler: ResumableRandomSampler, seed: int) -> None:
        self.sampler, self.seed = sampler, seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        for index in self.sampler:
            yield index, (self.seed + epoch * _EPOCH_MIX + index * _INDEX_MIX) % (2**63)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededDataset(Dataset):
    """Run the wrapped dataset's transforms under RNGs seeded per sample, restoring them after."""

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


def open_split(cfg: DataConfig, split: str, train: bool, label_map: LabelMap | None = None):
    """The dataset of ``split`` under ``cfg.root`` with the train or eval transforms."""
    if not cfg.root:
        raise UserError("no dataset given: pass --data DIR (a COCO-format folder, see README)")
    images_dir, annotations = resolve_split(Path(cfg.root), split)
    transforms = build_train_transforms(cfg) if train else build_eval_transforms(cfg)
    return CocoDetection(images_dir, annotations, transforms, label_map=label_map)


def train_loader(
    dataset: Dataset, cfg: DataConfig, seed: int, *, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Shuffled, resumable, drop-last loader (``loader.sampler.sampler`` is resumable)."""
    if len(dataset) < cfg.batch_size * world_size:
        raise UserError(
            f"the training split has {len(dataset)} images, fewer than one batch "
            f"({cfg.batch_size} x {world_size} processes); lower data.batch_size"
        )
    sampler = ResumableRandomSampler(len(dataset), seed, num_replicas=world_size, rank=rank)
    return DataLoader(
        SeededDataset(dataset),
        batch_size=cfg.batch_size,
        sampler=SeededSampler(sampler, seed),
        num_workers=cfg.num_workers,
        collate_fn=collate,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def eval_loader(
    dataset: Dataset, cfg: DataConfig, *, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Sequential loader; each rank evaluates a disjoint strided shard."""
    sampler = ShardedSequentialSampler(len(dataset), num_replicas=world_size, rank=rank)
    return DataLoader(
        dataset,
        batch_size=cfg.eval_batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        drop_last=False,
        generator=torch.Generator().manual_seed(0),
    )
