# SPDX-License-Identifier: Apache-2.0
"""Datasets and loaders of an experiment, from its ``DataConfig``."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from detrkit.config.schema import DataConfig
from detrkit.data.coco import CocoDetection, UnknownCategoriesError, resolve_split
from detrkit.data.labels import LabelMap
from detrkit.data.lint import check_command, startup_check
from detrkit.data.samplers import build_eval_loader, build_train_loader
from detrkit.data.transforms import build_eval_transforms, build_train_transforms
from detrkit.errors import UserError


def open_split(
    cfg: DataConfig,
    split: str,
    train: bool,
    label_map: LabelMap | None = None,
    known_categories_only: bool = False,
):
    """The dataset of ``split`` under ``cfg.root`` with the train or eval transforms.

    With ``known_categories_only`` (``label_map`` from a checkpoint), every category of the
    annotation file must be one of ``label_map``'s classes; the file may have fewer.

    Runs the fast dataset check (``detrkit.data.lint.startup_check``): missing image files raise
    ``UserError``; boxes outside their image and empty images are logged as one warning.
    """
    if not cfg.root:
        raise UserError("no dataset given: pass --data DIR (a COCO-format folder, see README)")
    images_dir, annotations = resolve_split(Path(cfg.root), split)
    transforms = build_train_transforms(cfg) if train else build_eval_transforms(cfg)
    try:
        dataset = CocoDetection(
            images_dir,
            annotations,
            transforms,
            label_map=label_map,
            known_categories_only=known_categories_only,
        )
    except UnknownCategoriesError:
        raise  # not a data problem the linter lists
    except UserError as error:
        # The loader stops at the first broken entry; the linter lists all of them.
        raise UserError(f"{error}\nTo list every problem: {check_command(cfg.root)}") from None
    startup_check(dataset, cfg.root)
    return dataset


def train_loader(
    dataset: Dataset, cfg: DataConfig, seed: int, *, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Shuffled, resumable, drop-last loader (see ``resumable_sampler``)."""
    if len(dataset) < cfg.batch_size * world_size:
        raise UserError(
            f"the training split has {len(dataset)} images, fewer than one batch "
            f"({cfg.batch_size} x {world_size} processes); lower data.batch_size"
        )
    return build_train_loader(
        dataset,
        cfg.batch_size,
        cfg.num_workers,
        seed,
        num_replicas=world_size,
        rank=rank,
        aspect_ratios=dataset.aspect_ratios() if cfg.group_by_aspect_ratio else None,
    )


def eval_loader(
    dataset: Dataset, cfg: DataConfig, *, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Sequential loader; each rank evaluates a disjoint strided shard (batches of one image
    size unless ``data.eval_group_by_size`` is off)."""
    return build_eval_loader(
        dataset,
        cfg.eval_batch_size,
        cfg.num_workers,
        num_replicas=world_size,
        rank=rank,
        sizes=dataset.image_sizes() if cfg.eval_group_by_size else None,
    )
