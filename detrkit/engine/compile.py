# SPDX-License-Identifier: Apache-2.0
"""``train.compile``: regional ``torch.compile`` of the repeated blocks (opt-in).

Compiling the whole detector would trace Python-side matching inputs, query-group bookkeeping
and data-dependent top-k selection, recompiling for every image size. The backbone and each
encoder/decoder layer are static, repeated tensor programs: compiling them region by region
reuses one compiled graph per layer type and keeps compile time short.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)


def compile_regions(model: nn.Module) -> list[str]:
    """Compile ``model.backbone`` and every encoder and decoder layer in place; returns their
    names. Image sizes vary between batches, so shapes are compiled as dynamic."""
    regions = [("backbone", model.backbone)]
    for stack in ("encoder", "decoder"):
        layers = getattr(getattr(model, stack), "layers", [])
        regions += [(f"{stack}.layers.{i}", layer) for i, layer in enumerate(layers)]
    for _, module in regions:
        module.compile(dynamic=True)
    logger.info("torch.compile: %d regions (backbone, encoder and decoder layers)", len(regions))
    return [name for name, _ in regions]
