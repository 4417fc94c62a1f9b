# SPDX-License-Identifier: Apache-2.0
"""One optimiser step under each precision, and what happens on a non-finite loss."""

from __future__ import annotations

import pytest
import torch

from detrkit.config.build import build_criterion, build_model
from detrkit.config.load import load_config
from detrkit.engine.precision import Precision
from detrkit.engine.step import StepResult, train_step
from detrkit.structures import ImageBatch, Target
from tests.conftest import TINY_MODEL_OVERRIDES

TINY = TINY_MODEL_OVERRIDES


def _batch():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 64, 80, generator=generator)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 64:] = True
    targets = [
        Target(torch.tensor([0, 2]), torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])),
        Target(torch.tensor([1]), torch.tensor([[0.5, 0.5, 0.4, 0.4]]), image_id=7),
    ]
    return ImageBatch(pixels, mask, torch.tensor([[64, 80], [64, 64]])), targets


def _setup(preset="deformable_detr_tiny", *extra):
    cfg = load_config(preset, [*TINY, *extra]).model
    torch.manual_seed(0)
    model = build_model(cfg, 3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, build_criterion(cfg, 3), optimizer


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_reduced_precision_keeps_boxes_and_losses_in_float32(name):
    model, criterion, optimizer = _setup()
    images, targets = _batch()
    precision = Precision(name, "cpu")
    with precision.autocast():
        output = model(images, targets)
    for group in output.groups:
        assert group.boxes.dtype == torch.float32, group.name  # refinement runs in fp32
    assert criterion(output, targets).total.dtype == torch.float32
    before = [p.detach().clone() for p in model.parameters()]
    assert (precision.scaler is not None) == (name == "fp16")
    # fp16 starts at a scale of 2^16, whose gradients overflow: the scaler lowers it and the
    # step is skipped, which is routine and must not count as divergence.
    for _ in range(30):
        result = train_step(model, criterion, [(images, targets)], optimizer, precision, 0.1)
        assert result.finite and result.loss > 0
        if result.updated:
            break
    assert result.updated
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_reduced_precision_is_close_to_float32():
    """bf16 perturbs, but does not break, a one-stage model (a two-stage model may pick other
    proposals, since its top-k ranking is discrete)."""
    model, _, _ = _setup("deformable_detr_r50_refine", "model.backbone.name=resnet18")
    images, _ = _batch()
    model.eval()
    with torch.no_grad():
        exact = model(images).for_inference().boxes
        with Precision("bf16", "cpu").autocast():
            approximate = model(images).for_inference().boxes
    torch.testing.assert_close(approximate, exact, atol=0.05, rtol=0)


class _PoisonedCriterion(torch.nn.Module):
    """The real criterion with a NaN added to the total."""

    def __init__(self, criterion):
        super().__init__()
        self.criterion = criterion

    def forward(self, output, targets):
        losses = self.criterion(output, targets)
        losses.total = losses.total + float("nan")
        return losses


@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_non_finite_loss_skips_the_update(name):
    model, criterion, optimizer = _setup()
    images, targets = _batch()
    before = [p.detach().clone() for p in model.parameters()]
    precision = Precision(name, "cpu")
    result = train_step(
        model, _PoisonedCriterion(criterion), [(images, targets)], optimizer, precision, 0.1
    )
    assert not result.finite
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters())


def test_other_ranks_veto_the_update():
    model, criterion, optimizer = _setup()
    images, targets = _batch()
    before = [p.detach().clone() for p in model.parameters()]
    result = train_step(
        model,
        criterion,
        [(images, targets)],
        optimizer,
        Precision(),
        0.1,
        all_finite=lambda _: False,
    )
    assert not result.finite
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_training_stops_after_consecutive_non_finite_steps(
    synthetic_coco, tmp_path, monkeypatch, caplog
):
    """A run whose steps are all non-finite stops after ``train.max_nonfinite_steps`` with one
    clear message naming the images of the last bad batch."""
    from detrkit.cli.__main__ import main
    from detrkit.engine import trainer

    monkeypatch.setattr(
        trainer, "train_step", lambda *a, **k: StepResult(float("nan"), {}, float("nan"), False)
    )
    argv = [
        "train", "--config", "detr_tiny", "--data", str(synthetic_coco),
        "--output-dir", str(tmp_path / "run"), "--device", "cpu",
        "--set", *TINY, "data.train_scales=[64]", "data.max_size=96",
        "train.max_nonfinite_steps=3",
    ]  # fmt: skip
    with caplog.at_level("WARNING"):
        assert main(argv) == 2
    skipped = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert len(skipped) == 3 and "images [" in skipped[0]
