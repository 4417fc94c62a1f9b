# SPDX-License-Identifier: Apache-2.0
"""The scheme compositions (H-DINO, DINO + mixed supervision, Deformable DETR + denoising) train
for a few steps, and at inference only the inference queries come out."""

from __future__ import annotations

import pytest
import torch

from detrkit.config.build import build_criterion, build_model
from detrkit.config.load import load_config
from tests.unit.test_presets import TINY, _batch

COMPOSITIONS = {
    "hdino_4scale_r50_12ep": {"main", "enc", "dn", "o2m"},
    "dino_mixed_r50": {"main", "enc", "dn", "ms_o2m"},
    "deformable_detr_denoising_r50": {"main", "enc", "dn"},
}


@pytest.mark.parametrize("preset", sorted(COMPOSITIONS))
def test_composition_trains_and_infers_with_the_inference_queries_only(preset):
    overrides = list(TINY) + ["model.encoder.dropout=0.0", "model.decoder.dropout=0.0"]
    if "hybrid" in load_config(preset).model.schemes:
        overrides.append("model.schemes.hybrid.num_queries=18")
    cfg = load_config(preset, overrides).model
    torch.manual_seed(0)
    model, criterion = build_model(cfg, 3), build_criterion(cfg, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, targets = _batch()
    totals = []
    for _ in range(3):
        output = model.train()(images, targets)
        assert {g.name for g in output.groups} == COMPOSITIONS[preset]
        losses = criterion(output, targets)
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
        totals.append(losses.total.item())
    assert all(torch.isfinite(torch.tensor(totals))) and totals[-1] != totals[0]
    with torch.no_grad():
        inference = model.eval()(images)
    assert {g.name for g in inference.groups} <= {"main", "enc"}
    main = inference.for_inference()
    assert main.name == "main" and main.logits.shape[2] == cfg.num_queries
