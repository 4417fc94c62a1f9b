# SPDX-License-Identifier: Apache-2.0
"""Gradient checkpointing (``model.{backbone,encoder,decoder}.checkpointing``) changes memory, not
maths: the same loss and gradients, with each checkpointed module run twice per training step."""

from __future__ import annotations

import pytest
import torch

from detrkit.config.build import build_criterion, build_model
from detrkit.config.load import load_config
from detrkit.errors import UserError
from detrkit.models.backbones.resnet import ResNetBackbone
from detrkit.structures import ImageBatch, Target

TINY = [
    "model.hidden_dim=32",
    "model.num_heads=2",
    "model.num_queries=12",
    "model.encoder.num_layers=2",
    "model.encoder.ffn_dim=64",
    "model.encoder.dropout=0.1",  # dropout must replay identically when recomputed
    "model.decoder.num_layers=2",
    "model.decoder.ffn_dim=64",
    "model.decoder.dropout=0.1",
    "model.backbone.name=resnet18",
    "model.backbone.norm=frozen_bn",
    "model.backbone.frozen_stages=0",
]
CHECKPOINTING = [f"model.{part}.checkpointing=true" for part in ("backbone", "encoder", "decoder")]
# DETR (global attention), Deformable DETR two-stage with H-DETR's hybrid group (a block
# self-attention mask) and MS-DETR (decoder taps returned from inside the layers).
PRESETS = {
    "detr_r50": [],
    "hdetr_r50_tricks_12ep": ["model.schemes.hybrid.num_queries=18"],
    "msdetr_r50": [],
}


def _batch() -> tuple[ImageBatch, list[Target]]:
    pixels = torch.randn(2, 3, 72, 88)
    mask = torch.zeros(2, 72, 88, dtype=torch.bool)
    mask[1, :, 60:] = True
    targets = [
        Target(torch.tensor([0, 2]), torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])),
        Target(torch.tensor([1]), torch.tensor([[0.5, 0.4, 0.3, 0.3]])),
    ]
    return ImageBatch(pixels, mask, torch.tensor([[72, 88], [72, 60]])), targets


def _step(preset: str, overrides: list[str]) -> tuple[torch.Tensor, dict, dict]:
    """Loss, gradients and forward-call counts of one training step from a fixed seed."""
    cfg = load_config(preset, TINY + PRESETS[preset] + overrides).model
    torch.manual_seed(0)
    model, criterion = build_model(cfg, 3), build_criterion(cfg, 3)
    counted = {
        "backbone": model.backbone.layer2,
        "encoder": model.encoder.layers[0],
        "decoder": model.decoder.layers[1],
    }
    calls = dict.fromkeys(counted, 0)
    for name, module in counted.items():
        # A pre-hook: the recomputation stops as soon as it has what backward needs.
        module.register_forward_pre_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    images, targets = _batch()
    torch.manual_seed(1)
    loss = criterion(model.train()(images, targets), targets).total
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, calls


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_checkpointing_keeps_loss_and_gradients(preset):
    loss, grads, calls = _step(preset, [])
    loss_ckpt, grads_ckpt, calls_ckpt = _step(preset, CHECKPOINTING)
    torch.testing.assert_close(loss_ckpt, loss, atol=0, rtol=0)
    assert grads_ckpt.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert calls == {"backbone": 1, "encoder": 1, "decoder": 1}
    # Recomputed in the backward pass: each checkpointed module ran a second time.
    assert calls_ckpt == {"backbone": 2, "encoder": 2, "decoder": 2}


def test_checkpointing_is_off_in_eval_and_without_grad():
    cfg = load_config("deformable_detr_r50_two_stage", TINY + CHECKPOINTING).model
    model = build_model(cfg, 3).eval()
    calls = []
    model.encoder.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    images, _ = _batch()
    output = model(images)
    output.for_inference().logits.sum().backward()  # eval mode: plain forward, one call
    assert len(calls) == 1
    with torch.no_grad():
        model.train()(images, _batch()[1])
    assert len(calls) == 2


def test_resnet_checkpointing_refuses_trainable_batchnorm():
    with pytest.raises(UserError, match="frozen_bn"):
        ResNetBackbone("resnet18", norm="bn", checkpointing=True)
