# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: tiny model configs, a synthetic COCO dataset, seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from detrkit.config.schema import BackboneConfig, ModelConfig, TransformerConfig
from detrkit.data.synth import write_synthetic_coco

TINY_CLASSES = 5
# --set overrides that shrink any preset to a test-size model (D=32, 2 heads, 10 queries).
TINY_MODEL_OVERRIDES = [
    "model.hidden_dim=32",
    "model.num_heads=2",
    "model.num_queries=10",
    "model.encoder.num_layers=1",
    "model.decoder.num_layers=2",
]
# A tiny run on the 64-pixel synthetic images: the model above, 4 images per batch.
TINY_RUN_OVERRIDES = [
    *TINY_MODEL_OVERRIDES,
    "data.train_scales=[64]",
    "data.val_size=64",
    "data.max_size=96",
    "data.batch_size=4",
    "data.eval_batch_size=4",
]


def tiny_model_config(**changes) -> ModelConfig:
    """D=32, 2 heads, 1 encoder / 2 decoder layers, 12 queries, ResNet-18 (design.md, testing)."""
    layers = dict(ffn_dim=64, dropout=0.0)
    base = dict(
        num_classes=TINY_CLASSES,
        hidden_dim=32,
        num_heads=2,
        num_queries=12,
        backbone=BackboneConfig(name="resnet18"),
        encoder=TransformerConfig(num_layers=1, **layers),
        decoder=TransformerConfig(num_layers=2, **layers),
    )
    base.update(changes)
    return ModelConfig(**base)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return tiny_model_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    """A small synthetic COCO folder (train 16, val 8 images), written once per session."""
    root = tmp_path_factory.mktemp("synthetic_coco")
    return write_synthetic_coco(root, num_train=16, num_val=8, seed=0)
