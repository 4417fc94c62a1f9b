# SPDX-License-Identifier: Apache-2.0
"""COCO-format data: dataset, DETR augmentations, batching, samplers, synthetic data."""

from detrkit.data.coco import CocoDetection, resolve_split
from detrkit.data.collate import collate
from detrkit.data.labels import LabelMap
from detrkit.data.samplers import (
    ResumableRandomSampler,
    ShardedSequentialSampler,
    build_eval_loader,
    build_train_loader,
)
from detrkit.data.synth import write_synthetic_coco
from detrkit.data.transforms import (
    DetectionSample,
    build_eval_transforms,
    build_train_transforms,
    denormalize,
)

__all__ = [
    "CocoDetection",
    "DetectionSample",
    "LabelMap",
    "ResumableRandomSampler",
    "ShardedSequentialSampler",
    "build_eval_loader",
    "build_eval_transforms",
    "build_train_loader",
    "build_train_transforms",
    "collate",
    "denormalize",
    "resolve_split",
    "write_synthetic_coco",
]
