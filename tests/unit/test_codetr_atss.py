# SPDX-License-Identifier: Apache-2.0
"""Co-DETR's ATSS auxiliary head: the assigner, the targets and the losses against the
official recordings of the Co-DETR golden cases (``tests/golden/cases/codetr``), plus small
hand-checkable cases that need no recording.

The recorded head ran on Co-DETR's ``x_enc``: the encoder memory reshaped per level plus
``query_head.downsample`` (3x3/s2 conv + GroupNorm(32)) of the last level. Here the memory
comes from detrkit's Co-DINO model of the case (``CodetrCase``), the downsample level is built
in the test from the case's weights and checked against ``eval.f32.mid.x_enc.{last}``.
Co-Deformable-DETR has no detrkit model yet, so only its assignment and targets are compared
(they depend on the boxes and the feature sizes only).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from detrkit.convert.codetr_atss import atss_rules
from detrkit.convert.rules import convert_state_dict
from detrkit.losses.criterion import SetCriterion
from detrkit.matching.atss import NEG_INF_IOU, ATSSAssigner
from detrkit.models.dense.atss import ATSSHead, ATSSLossConfig, memory_maps
from tests.golden.golden_case import GOLDEN_DIR

CASE_DIR = GOLDEN_DIR / "codetr"
CASES = ("co_dino_r18_5scale", "co_deformable_detr_r18")
FLOAT_TOL = dict(rtol=1e-5, atol=0.0)
LOSS_RTOL = 1e-4


@dataclass
class Recorded:
    """What one case recorded about its ATSS head."""

    spec: dict
    tensors: dict[str, torch.Tensor]
    strides: list[int]
    feature_sizes: list[tuple[int, int]]
    image_sizes: torch.Tensor
    gt_boxes: list[torch.Tensor]
    gt_labels: list[torch.Tensor]

    @classmethod
    def load(cls, path: Path) -> Recorded:
        spec = json.loads(path.read_text())
        tensors = load_file(str(path.with_suffix(".safetensors")))
        config = spec["config"]["model"]["bbox_head"][0]
        strides = config["anchor_generator"]["strides"]
        # The head's outputs, cls scores first: one per level, [B, C, h, w].
        prints = spec["runs"]["f32"]["atss_out_fingerprints"][: len(strides)]
        images = range(len(spec["img_metas"]))
        return cls(
            spec,
            tensors,
            strides,
            [tuple(p["shape"][-2:]) for p in prints],
            torch.tensor([meta["pad_shape"][:2] for meta in spec["img_metas"]]),
            [tensors[f"input.gt_bboxes.{i}"] for i in images],
            [tensors[f"input.gt_labels.{i}"] for i in images],
        )

    def head(self) -> ATSSHead:
        config = self.spec["config"]["model"]["bbox_head"][0]
        weights = self.spec["loss_weights"]
        assert config["train_cfg"]["assigner"] == {"type": "ATSSAssigner", "topk": 9}
        return ATSSHead(
            config["num_classes"],
            config["in_channels"],
            self.strides,
            feat_channels=config["feat_channels"],
            stacked_convs=config["stacked_convs"],
            octave_base_scale=config["anchor_generator"]["octave_base_scale"],
            target_means=config["bbox_coder"]["target_means"],
            target_stds=config["bbox_coder"]["target_stds"],
            losses=ATSSLossConfig(
                cls_weight=weights["bbox_head.0.loss_cls"],
                bbox_weight=weights["bbox_head.0.loss_bbox"],
                centerness_weight=weights["bbox_head.0.loss_centerness"],
                focal_alpha=config["loss_cls"]["alpha"],
                focal_gamma=config["loss_cls"]["gamma"],
            ),
        )


def _case_path(name: str) -> Path:
    path = CASE_DIR / f"{name}.json"
    if not path.exists() or not path.with_suffix(".safetensors").exists():
        pytest.skip(f"Co-DETR case {name} is not in {CASE_DIR}")
    return path


@pytest.fixture(scope="module", params=CASES)
def recorded(request) -> Recorded:
    return Recorded.load(_case_path(request.param))


@dataclass
class HeadRun:
    """The Co-DINO case's head run on detrkit's encoder memory."""

    recorded: Recorded
    levels: list[torch.Tensor]
    head: ATSSHead
    state: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def head_run() -> HeadRun:
    from tests.golden.codetr_case import CodetrCase
    from tests.golden.golden_case import official_state_dict

    path = _case_path("co_dino_r18_5scale")
    case = CodetrCase.load(path)
    seen = {}
    hook = case.model.encoder.register_forward_hook(lambda m, a, out: seen.setdefault("m", out))
    try:
        with torch.no_grad():
            case.model(case.batch())
    finally:
        hook.remove()
    memory = seen["m"]
    state = official_state_dict(case.spec, path.parent)
    prefix = "query_head.downsample."
    downsample = nn.Sequential(nn.Conv2d(256, 256, 3, stride=2, padding=1), nn.GroupNorm(32, 256))
    downsample.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if prefix in k})
    levels = memory_maps(memory.tokens, memory.spatial_shapes)
    with torch.no_grad():
        levels.append(downsample(levels[-1]))
    recorded = Recorded.load(path)
    head = recorded.head()
    converted = convert_state_dict(state, atss_rules(0, target=""))
    head.load_state_dict(converted.state_dict, strict=True)
    return HeadRun(recorded, levels, head, state)


def test_assignments_match_recording(recorded: Recorded):
    targets = recorded.head().get_targets(
        recorded.feature_sizes, recorded.image_sizes, recorded.gt_boxes, recorded.gt_labels
    )
    for image, assignment in enumerate(targets.assignments):
        prefix = f"train.f32.atss.assign.{image}"
        gt_inds = recorded.tensors[f"{prefix}.gt_inds"]
        assert torch.equal(assignment.gt_inds.to(gt_inds.dtype), gt_inds)
        # "pos_gt_inds" are mmdet's positive anchor indices (its sampler's pos_inds).
        assert torch.equal(assignment.positive, recorded.tensors[f"{prefix}.pos_gt_inds"])
        torch.testing.assert_close(
            assignment.max_overlaps, recorded.tensors[f"{prefix}.max_overlaps"], **FLOAT_TOL
        )


def test_targets_match_recorded_candidates(recorded: Recorded):
    """Anchors (0 outside the image), labels (80 = background) and assigned boxes of every
    anchor: Co-DETR's ``pos_coords`` of the ATSS head (``aux1.cand``)."""
    targets = recorded.head().get_targets(
        recorded.feature_sizes, recorded.image_sizes, recorded.gt_boxes, recorded.gt_labels
    )
    for image, ours in enumerate(zip(*targets.positive_coords())):
        for name, value in zip(("coords", "labels", "targets"), ours):
            assert torch.equal(value, recorded.tensors[f"train.f32.aux1.cand.{image}.{name}"])
    valid = targets.valid.sum(1).tolist()
    assert valid == [len(recorded.tensors[f"train.f32.atss.assign.{i}.gt_inds"]) for i in (0, 1)]
    assert torch.equal(targets.label_weights, targets.valid.float())


def test_downsample_level_matches_x_enc(head_run: HeadRun):
    last = len(head_run.levels) - 1
    theirs = head_run.recorded.tensors[f"eval.f32.mid.x_enc.{last}"]
    # Relative to the map's scale: the memory itself agrees to ~1e-6 of its magnitude.
    atol = 1e-5 * theirs.abs().max().item()
    torch.testing.assert_close(head_run.levels[-1], theirs, rtol=1e-5, atol=atol)


def test_head_outputs_match_fingerprints(head_run: HeadRun):
    with torch.no_grad():
        out = head_run.head(head_run.levels)
    prints = head_run.recorded.spec["runs"]["f32"]["atss_out_fingerprints"]
    for ours, mark in zip(out.cls_logits + out.deltas + out.centerness, prints, strict=True):
        assert list(ours.shape) == mark["shape"]
        flat = ours.double().flatten()
        assert abs(flat.sum().item() - mark["sum"]) <= 1e-5 * mark["abs_sum"]
        assert abs(flat.abs().sum().item() - mark["abs_sum"]) <= 1e-5 * mark["abs_sum"]
        sample = flat[torch.tensor(mark["sample_flat_index"])]
        expected = torch.tensor(mark["sample"], dtype=torch.float64)
        scale = flat.abs().max().item()
        torch.testing.assert_close(sample, expected, rtol=1e-5, atol=1e-5 * scale)


def test_losses_match_recording(head_run: HeadRun):
    recorded = head_run.recorded
    out = head_run.head(head_run.levels)
    targets = head_run.head.get_targets(
        out.feature_sizes, recorded.image_sizes, recorded.gt_boxes, recorded.gt_labels
    )
    losses = head_run.head.losses(out, targets)
    criterion = SetCriterion(assigners={}, terms={}, term_weights={})
    expected = recorded.spec["runs"]["f32"]["losses"]
    official = {
        k for k in expected if k.startswith(("loss_cls1.", "loss_bbox1.", "loss_centerness1."))
    }
    assert {d.name for d in losses} == official
    for dense in losses:
        value = (criterion.dense_value(dense, []) * dense.weight).item()
        theirs = expected[dense.name]
        assert math.isclose(value, theirs, rel_tol=LOSS_RTOL), f"{dense.name}: {value} vs {theirs}"
        if theirs == 0.0:  # mmdet's 0 * sum(predictions): -0.0 for a negative sum
            assert math.copysign(1, value) == math.copysign(1, theirs), dense.name
    total = sum(criterion.dense_value(d, []) * d.weight for d in losses)
    total.backward()
    assert all(p.grad is not None for p in head_run.head.parameters())


def test_rules_cover_every_head_key(head_run: HeadRun):
    head_keys = {k for k in head_run.state if k.startswith("bbox_head.0.")}
    result = convert_state_dict({k: head_run.state[k] for k in head_keys}, atss_rules(0))
    assert result.clean, result.describe()
    assert set(result.state_dict) == {
        f"schemes.collaborative.atss.{k}" for k in head_run.head.state_dict()
    }
    assert head_run.state["bbox_head.0.scales.0.scale"].dim() == 0


# Hand-checkable cases (no recording needed).


def test_assigner_without_boxes():
    anchors = torch.tensor([[0.0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20]])
    result = ATSSAssigner(9).assign(anchors, [2, 1], torch.zeros(0, 4), torch.zeros(0).long())
    assert result.gt_inds.tolist() == [0] * 3
    assert result.max_overlaps.tolist() == [0.0] * 3
    assert result.positive.numel() == 0


def test_assigner_centre_check_and_best_iou():
    anchors = torch.tensor([[0.0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20]])
    boxes = torch.tensor([[0.0, 0, 10, 12], [0.0, 0, 10, 11], [30.0, 30, 40, 40]])
    result = ATSSAssigner(3).assign(anchors, [3], boxes, torch.tensor([7, 8, 9]))
    # Anchor 0 passes both boxes' thresholds (IoU 0.83 and 0.91): the higher IoU (box 1)
    # wins. Box 2's candidates all reach its threshold (0 = mean + std of zeros) but none has
    # its centre inside it.
    assert result.gt_inds.tolist() == [2, 0, 0]
    assert result.labels.tolist() == [8, -1, -1]
    assert result.max_overlaps[0].item() == pytest.approx(100 / 110)
    assert result.max_overlaps[1:].tolist() == [-NEG_INF_IOU] * 2
    assert result.positive.tolist() == [0] and result.positive_boxes.tolist() == [1]


def test_losses_on_random_maps_backpropagate():
    """Image 0 has positives on level 0 only, image 1 has no boxes: every term is finite,
    the empty level's box and centreness terms are zero, every parameter gets a gradient."""
    torch.manual_seed(0)
    head = ATSSHead(3, 8, (8, 16), feat_channels=8, stacked_convs=2, num_groups=4)
    out = head([torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)])
    boxes = [torch.tensor([[4.0, 6, 60, 58]]), torch.zeros(0, 4)]
    labels = [torch.tensor([1]), torch.zeros(0, dtype=torch.int64)]
    sizes = torch.tensor([[64, 64], [40, 56]])
    targets = head.get_targets(out.feature_sizes, sizes, boxes, labels)
    # One square anchor of side 8 strides per location, centred on the location's corner.
    assert targets.anchors[[0, 9, 64]].tolist() == [
        [-32, -32, 32, 32],
        [8 - 32, 8 - 32, 8 + 32, 8 + 32],
        [-64, -64, 64, 64],
    ]
    assert targets.valid.sum(1).tolist() == [80, 5 * 7 + 3 * 4]
    assert targets.positive[0, :64].sum().item() == 3 and not targets.positive[:, 64:].any()
    assert targets.num_positives.item() == 3 + 1  # an image without positives counts 1
    assert (targets.labels[targets.positive] == 1).all()
    assert (targets.labels[~targets.positive] == 3).all()
    losses = head.losses(out, targets)
    names = [d.name for d in losses]
    assert names[:3] == ["loss_cls1.0", "loss_bbox1.0", "loss_centerness1.0"]
    criterion = SetCriterion(assigners={}, terms={}, term_weights={})
    values = {d.name: criterion.dense_value(d, []) * d.weight for d in losses}
    assert values["loss_bbox1.1"].item() == 0 and values["loss_centerness1.1"].item() == 0
    assert values["loss_bbox1.0"].item() > 0 and values["loss_centerness1.0"].item() > 0
    total = sum(values.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for p in head.parameters())
