# SPDX-License-Identifier: Apache-2.0
"""Co-DETR's Faster R-CNN auxiliary branch (anchors, max-IoU assigner, random sampler, RPN,
RoI head, checkpoint renames) against the official recordings of the Co-DETR golden cases
(``tests/golden/cases/codetr``), plus small hand-checkable cases that need no recording.

The recorded heads ran on Co-DETR's ``x_enc``: the encoder memory reshaped per level plus
``query_head.downsample`` (3x3/s2 conv + GroupNorm(32)) of the last level. Here the memory
comes from detrkit's Co-DINO model of the case (``CodetrCase``); the downsample level is built
in the test from the case's weights and checked against ``eval.f32.mid.x_enc.{last}``. The
samplers' draws are the recorded ``train.f32.rng.*`` whose call site is mmdet's random sampler,
in call order (RPN image 0, 1, then RoI image 0, 1). Co-Deformable-DETR has no detrkit model
yet, so only what depends on boxes and feature sizes alone is compared for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torchvision.ops import batched_nms

from detrkit.convert.codetr_aux import faster_rcnn_rules
from detrkit.convert.rules import convert_state_dict
from detrkit.matching.max_iou import MaxIoUAssigner, box_overlaps
from detrkit.matching.sampler import RandomSampler
from detrkit.models.dense.anchors import AnchorGenerator
from detrkit.models.dense.box_coder import DeltaXYWHCoder
from detrkit.models.dense.roi_head import RoIHead, Shared2FCBBoxHead
from detrkit.models.dense.rpn import ProposalSettings, RPNHead, mmcv_batched_nms
from detrkit.schemes.randomness import RandomSource, ReplayedDraws
from detrkit.structures import DenseLoss
from tests.golden.codetr_case import assert_boxes_equal_up_to_tied_proposals
from tests.golden.golden_case import GOLDEN_DIR

CASE_DIR = GOLDEN_DIR / "codetr"
CASES = ("co_dino_r18_5scale", "co_deformable_detr_r18")
FLOAT_TOL = dict(rtol=1e-5, atol=0.0)
LOSS_RTOL = 1e-4


@dataclass
class Recorded:
    name: str
    spec: dict
    tensors: dict[str, torch.Tensor]

    @property
    def model(self) -> dict:
        return self.spec["config"]["model"]

    @property
    def metas(self) -> list[dict]:
        return self.spec["img_metas"]

    def t(self, name: str) -> torch.Tensor:
        return self.tensors[f"train.f32.{name}"]

    def gt(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        count = len(self.metas)
        boxes = [self.tensors[f"input.gt_bboxes.{i}"] for i in range(count)]
        return boxes, [self.tensors[f"input.gt_labels.{i}"] for i in range(count)]

    def sampler_draws(self) -> list[torch.Tensor]:
        calls = self.spec["runs"]["f32"]["rng_calls"]
        chosen = [c for c in calls if "samplers/random_sampler.py" in c["site"]]
        assert all(c["fn"] == "randperm" for c in chosen)
        return [self.tensors[f"train.f32.{c['tensor']}"].long() for c in chosen]

    def level_sizes(self) -> list[tuple[int, int]]:
        """The RPN's feature sizes, from the recorded fingerprints of its logits."""
        prints = self.spec["runs"]["f32"]["rpn_out_fingerprints"]
        levels = len(self.model["rpn_head"]["anchor_generator"]["strides"])
        return [tuple(p["shape"][-2:]) for p in prints[:levels]]

    def image_sizes(self) -> torch.Tensor:
        assert all(m["pad_shape"] == m["img_shape"] for m in self.metas)
        return torch.tensor([m["pad_shape"][:2] for m in self.metas])

    def loss(self, name: str) -> float:
        return self.spec["runs"]["f32"]["losses"][name]


def _case_path(name: str) -> Path:
    return CASE_DIR / f"{name}.json"


def _load(name: str) -> Recorded:
    path = _case_path(name)
    if not path.exists() or not path.with_suffix(".safetensors").exists():
        pytest.skip(f"golden case {name} is absent from {CASE_DIR}")
    return Recorded(
        name, json.loads(path.read_text()), load_file(str(path.with_suffix(".safetensors")))
    )


@pytest.fixture(scope="module", params=CASES)
def case(request) -> Recorded:
    return _load(request.param)


def _assigner(cfg: dict) -> MaxIoUAssigner:
    assert cfg["type"] == "MaxIoUAssigner"
    return MaxIoUAssigner(
        cfg["pos_iou_thr"],
        cfg["neg_iou_thr"],
        cfg.get("min_pos_iou", 0.0),
        gt_max_assign_all=cfg.get("gt_max_assign_all", True),
        ignore_iof_thr=cfg.get("ignore_iof_thr", -1),
        match_low_quality=cfg.get("match_low_quality", True),
    )


def _sampler(cfg: dict) -> RandomSampler:
    assert cfg["type"] == "RandomSampler"
    return RandomSampler(
        cfg["num"], cfg["pos_fraction"], cfg["neg_pos_ub"], cfg["add_gt_as_proposals"]
    )


def _coder(cfg: dict) -> DeltaXYWHCoder:
    assert cfg["type"] == "DeltaXYWHBBoxCoder"
    return DeltaXYWHCoder(cfg["target_means"], cfg["target_stds"])


def _weight(case: Recorded, key: str, loss_cfg: dict) -> float:
    # The official config already carries num_dec_layer * lambda_2 in every aux weight.
    assert case.spec["loss_weights"][key] == loss_cfg["loss_weight"]
    return loss_cfg["loss_weight"]


def _rpn(case: Recorded) -> RPNHead:
    head, train = case.model["rpn_head"], case.model["train_cfg"][1]
    anchors = head["anchor_generator"]
    assert anchors["type"] == "AnchorGenerator"
    generator = AnchorGenerator(
        strides=tuple(anchors["strides"]),
        ratios=tuple(anchors["ratios"]),
        octave_base_scale=anchors["octave_base_scale"],
        scales_per_octave=anchors["scales_per_octave"],
    )
    proposal = train["rpn_proposal"]
    assert proposal["nms"]["type"] == "nms" and train["rpn"]["allowed_border"] == -1
    return RPNHead(
        head["in_channels"],
        head["feat_channels"],
        generator,
        _coder(head["bbox_coder"]),
        _assigner(train["rpn"]["assigner"]),
        _sampler(train["rpn"]["sampler"]),
        ProposalSettings(
            proposal["nms_pre"],
            proposal["max_per_img"],
            proposal["nms"]["iou_threshold"],
            proposal["min_bbox_size"],
        ),
        cls_weight=_weight(case, "rpn_head.loss_cls", head["loss_cls"]),
        bbox_weight=_weight(case, "rpn_head.loss_bbox", head["loss_bbox"]),
    )


def _roi(case: Recorded) -> RoIHead:
    roi = case.model["roi_head"][0]
    extractor, head = roi["bbox_roi_extractor"], roi["bbox_head"]
    train = case.model["train_cfg"][1]["rcnn"]
    assert head["type"] == "Shared2FCBBoxHead" and head["reg_decoded_bbox"]
    assert extractor["roi_layer"] == {"type": "RoIAlign", "output_size": 7, "sampling_ratio": 0}
    bbox_head = Shared2FCBBoxHead(
        head["in_channels"],
        head["roi_feat_size"],
        head["fc_out_channels"],
        head["num_classes"],
        class_agnostic=head["reg_class_agnostic"],
    )
    return RoIHead(
        bbox_head,
        tuple(extractor["featmap_strides"]),
        extractor["finest_scale"],
        _coder(head["bbox_coder"]),
        _assigner(train["assigner"]),
        _sampler(train["sampler"]),
        cls_weight=_weight(case, "roi_head.0.bbox_head.loss_cls", head["loss_cls"]),
        bbox_weight=_weight(case, "roi_head.0.bbox_head.loss_bbox", head["loss_bbox"]),
        roi_size=head["roi_feat_size"],
    )


def _dense_value(loss: DenseLoss) -> torch.Tensor:
    """What the criterion reports for a dense loss (one rank), times its weight."""
    value = loss.compute(*(t.float() for t in loss.inputs))
    return loss.weight * value / torch.as_tensor(loss.count, dtype=torch.float32).clamp(min=1)


def _rpn_targets(case: Recorded, rpn: RPNHead, random: RandomSource):
    sizes = case.level_sizes()
    anchors = torch.cat(rpn.anchors.grid(sizes))
    boxes, _ = case.gt()
    targets = []
    for image, size in enumerate(case.image_sizes().tolist()):
        valid = torch.cat(rpn.anchors.valid_flags(sizes, tuple(size)))
        targets.append(rpn.anchor_targets(anchors, valid, boxes[image], random))
    return targets


def _assert_close_rel(ours: float, theirs: float, rtol: float, name: str) -> float:
    error = abs(ours - theirs) / max(abs(theirs), 1e-12) if theirs != 0 else abs(ours)
    assert error <= rtol, f"{name}: {ours} vs recorded {theirs} (relative {error:.2e})"
    return error


# --------------------------------------------------------------------------- recorded, no model


def test_rpn_anchor_assignment_matches_recording(case: Recorded):
    """Anchors (levels, location-major, ratio-major / scale-minor, valid inside pad_shape) +
    the RPN's MaxIoU assigner reproduce the recorded assignment exactly."""
    rpn = _rpn(case)
    for image, target in enumerate(_rpn_targets(case, rpn, ReplayedDraws(case.sampler_draws()))):
        gt_inds = case.t(f"rpn.assign.{image}.gt_inds")
        overlaps = case.t(f"rpn.assign.{image}.max_overlaps")
        assert torch.equal(target.assignment.gt_inds, gt_inds.long())
        torch.testing.assert_close(target.assignment.max_overlaps, overlaps, rtol=0, atol=1e-6)


def test_rpn_sampling_matches_recording(case: Recorded):
    rpn = _rpn(case)
    draws = ReplayedDraws(case.sampler_draws())
    for image, target in enumerate(_rpn_targets(case, rpn, draws)):
        for name in ("pos_inds", "neg_inds", "pos_assigned_gt_inds"):
            recorded = case.t(f"rpn.sample.{image}.{name}")
            assert torch.equal(getattr(target.sampling, name), recorded), name
        assert target.label_weights.sum() == target.sampling.pos_inds.numel() + (
            target.sampling.neg_inds.numel()
        )
    # Only the RoI sampler's draws are left.
    assert draws.remaining == 2


def test_roi_assignment_sampling_targets_match_recording(case: Recorded):
    """On the recorded proposals, after the RPN's draws: the RoI assignment, the sampling
    (GT prepended) and the box-head targets exactly."""
    draws = ReplayedDraws(case.sampler_draws())
    _rpn_targets(case, _rpn(case), draws)
    roi = _roi(case)
    proposals = [case.t(f"rpn.proposals.{i}") for i in range(len(case.metas))]
    assignments, samplings = roi.sample(proposals, *case.gt(), draws)
    assert draws.remaining == 0
    for image, (assignment, sampling) in enumerate(zip(assignments, samplings)):
        prefix = f"rcnn.assign.{image}"
        assert torch.equal(assignment.gt_inds, case.t(f"{prefix}.gt_inds").long())
        assert torch.equal(assignment.labels, case.t(f"{prefix}.labels"))
        torch.testing.assert_close(
            assignment.max_overlaps, case.t(f"{prefix}.max_overlaps"), rtol=0, atol=1e-6
        )
        prefix = f"rcnn.sample.{image}"
        for name in ("pos_inds", "neg_inds", "pos_assigned_gt_inds", "pos_is_gt"):
            assert torch.equal(getattr(sampling, name), case.t(f"{prefix}.{name}")), name
        assert torch.equal(sampling.boxes, case.t(f"{prefix}.bboxes"))
    targets = roi.targets(samplings)
    assert torch.equal(targets.labels, case.t("rcnn.targets.labels"))
    assert torch.equal(targets.label_weights, case.t("rcnn.targets.label_weights"))
    assert torch.equal(targets.boxes, case.t("rcnn.targets.bbox_targets"))
    assert torch.equal(targets.box_weights, case.t("rcnn.targets.bbox_weights"))


def test_faster_rcnn_rules_cover_the_official_keys(case: Recorded):
    from tests.golden.golden_case import official_state_dict

    state = official_state_dict(case.spec, CASE_DIR)
    aux = {k: v for k, v in state.items() if k.startswith(("rpn_head.", "roi_head."))}
    result = convert_state_dict(aux, faster_rcnn_rules())
    assert result.clean and not result.dropped, result.describe()
    modules = nn.ModuleDict({"rpn": _rpn(case), "roi": _roi(case)})
    holder = nn.Module()
    holder.schemes = nn.ModuleDict({"collaborative": modules})
    holder.load_state_dict(result.state_dict, strict=True)
    only_rpn = convert_state_dict(
        {k: v for k, v in aux.items() if k.startswith("rpn_head.")},
        faster_rcnn_rules(rpn_target=""),
    )
    assert set(only_rpn.state_dict) == set(modules["rpn"].state_dict())


# --------------------------------------------------------------------------- Co-DINO, with maps


@dataclass
class Maps:
    case: Recorded
    maps: list[torch.Tensor]
    rpn: RPNHead
    roi: RoIHead


@pytest.fixture(scope="module", params=CASES)
def dino(request) -> Maps:
    """The case's x_enc from detrkit's model of it (Co-DINO or Co-Deformable-DETR), and both
    heads with its weights."""
    recorded = _load(request.param)
    from tests.golden.codetr_case import CodetrCase
    from tests.golden.golden_case import official_state_dict

    model_case = CodetrCase.load(_case_path(recorded.name))
    seen = {}
    hook = model_case.model.encoder.register_forward_hook(
        lambda module, args, output: seen.__setitem__("memory", output)
    )
    try:
        with torch.no_grad():
            model_case.model(model_case.batch())
    finally:
        hook.remove()
    memory = seen["memory"]
    batch, _, channels = memory.tokens.shape
    maps = [
        memory.tokens[:, start : start + h * w].transpose(1, 2).reshape(batch, channels, h, w)
        for (h, w), start in zip(memory.spatial_shapes.tolist(), memory.level_start.tolist())
    ]
    state = official_state_dict(recorded.spec, CASE_DIR)
    downsample = nn.Sequential(nn.Conv2d(channels, channels, 3, 2, 1), nn.GroupNorm(32, channels))
    prefix = "query_head.downsample."
    downsample.load_state_dict(
        {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True
    )
    with torch.no_grad():
        maps.append(downsample(maps[-1]))
    rpn, roi = _rpn(recorded), _roi(recorded)
    rules = faster_rcnn_rules(rpn_target="", roi_target="")
    for module, source in ((rpn, "rpn_head."), (roi, "roi_head.")):
        converted = convert_state_dict(
            {k: v for k, v in state.items() if k.startswith(source)}, rules
        )
        module.load_state_dict(converted.state_dict, strict=True)
    return Maps(recorded, maps, rpn, roi)


def test_downsampled_level_matches_recording(dino: Maps):
    last = len(dino.maps) - 1
    recorded = dino.case.tensors[f"eval.f32.mid.x_enc.{last}"]
    torch.testing.assert_close(dino.maps[-1], recorded, rtol=1e-5, atol=1e-5)
    assert [tuple(m.shape[-2:]) for m in dino.maps] == dino.case.level_sizes()


def _rpn_step(dino: Maps):
    with torch.no_grad():
        return dino.rpn.train_step(
            dino.maps,
            dino.case.image_sizes(),
            dino.case.gt()[0],
            ReplayedDraws(dino.case.sampler_draws()),
        )


def test_rpn_outputs_and_losses_match_recording(dino: Maps):
    out = _rpn_step(dino)
    prints = dino.case.spec["runs"]["f32"]["rpn_out_fingerprints"]
    for ours, recorded in zip(out.cls_scores + out.deltas, prints):
        assert list(ours.shape) == recorded["shape"]
        samples = ours.flatten()[recorded["sample_flat_index"]]
        torch.testing.assert_close(samples, torch.tensor(recorded["sample"]), rtol=1e-5, atol=1e-5)
    for loss in out.losses:
        _, kind, level = loss.name.split("/")
        name = f"loss_rpn_{kind}.{level}"
        _assert_close_rel(_dense_value(loss).item(), dino.case.loss(name), LOSS_RTOL, name)
    assert len(out.losses) == 2 * len(dino.maps)


def test_rpn_proposals_match_recording(dino: Maps):
    """Same proposals in the same order, except that two whose scores tie within float rounding
    may be swapped; coordinates within 1e-5 of the image's extent (the maps differ from the
    official ones by ~1e-6, so near-zero corners differ relatively more)."""
    out = _rpn_step(dino)
    for image, proposals in enumerate(out.proposals):
        recorded = dino.case.t(f"rpn.proposals.{image}")
        assert proposals.shape == recorded.shape
        extent = float(max(dino.case.metas[image]["img_shape"][:2]))
        swapped = assert_boxes_equal_up_to_tied_proposals(
            proposals[:, :4], recorded[:, :4], recorded, atol=1e-5 * extent
        )
        assert swapped.sum() % 2 == 0 and swapped.sum() <= 4, swapped.nonzero().flatten()
        torch.testing.assert_close(proposals[:, 4], recorded[:, 4], **FLOAT_TOL)


def test_roi_head_outputs_and_losses_match_recording(dino: Maps):
    draws = ReplayedDraws(dino.case.sampler_draws())
    _rpn_targets(dino.case, dino.rpn, draws)
    proposals = [dino.case.t(f"rpn.proposals.{i}") for i in range(len(dino.case.metas))]
    with torch.no_grad():
        out = dino.roi.train_step(dino.maps, proposals, *dino.case.gt(), draws)
        features = dino.roi.pool(dino.maps, out.rois)
    prints = dino.case.spec["runs"]["f32"]["rcnn_fingerprints"]
    for name, ours in (
        ("cls_score", out.cls_score),
        ("bbox_pred", out.bbox_pred),
        ("bbox_feats", features),
    ):
        recorded = prints[name]
        assert list(ours.shape) == recorded["shape"], name
        samples = ours.flatten()[recorded["sample_flat_index"]]
        torch.testing.assert_close(samples, torch.tensor(recorded["sample"]), rtol=1e-5, atol=1e-5)
        assert abs(ours.double().sum().item() - recorded["sum"]) <= 1e-6 * recorded["abs_sum"]
    for loss, name in zip(out.losses, ("loss_cls0", "loss_bbox0")):
        _assert_close_rel(_dense_value(loss).item(), dino.case.loss(name), LOSS_RTOL, name)
    assert out.accuracy.item() == pytest.approx(dino.case.loss("acc0"), abs=1e-4)


# --------------------------------------------------------------------------- hand-checkable


def _boxes(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_anchor_order_is_location_major_ratio_major():
    generator = AnchorGenerator(strides=(8,), ratios=(0.5, 1.0), scales=(1.0, 2.0))
    (grid,) = generator.grid([(2, 3)])
    assert grid.shape == (2 * 3 * 4, 4)
    base = generator.base_anchors(0)
    # ratio 0.5 (h/w): wide boxes first, scale 1 then 2.
    widths, heights = base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]
    torch.testing.assert_close(heights / widths, torch.tensor([0.5, 0.5, 1.0, 1.0]))
    assert widths[1] == 2 * widths[0]
    # location (y=0, x=1) follows (0, 0); (1, 0) comes after the first row.
    torch.testing.assert_close(grid[4:8], base + torch.tensor([8.0, 0.0, 8.0, 0.0]))
    torch.testing.assert_close(grid[12:16], base + torch.tensor([0.0, 8.0, 0.0, 8.0]))
    (flags,) = generator.valid_flags([(2, 3)], (9, 10))
    # ceil(9/8) = 2 rows, ceil(10/8) = 2 columns valid.
    assert flags.view(2, 3, 4)[:, :2].all() and not flags.view(2, 3, 4)[:, 2].any()


def test_max_iou_low_quality_matching_and_ties():
    gts = _boxes([0, 0, 10, 10])
    boxes = _boxes([0, 0, 10, 10.5], [0, 0, 5, 10], [0, 0, 5, 10], [20, 20, 30, 30])
    plain = MaxIoUAssigner(0.97, 0.3, match_low_quality=False).assign(boxes, gts)
    assert plain.gt_inds.tolist() == [-1, -1, -1, 0]
    low = MaxIoUAssigner(0.97, 0.3, min_pos_iou=0.3).assign(boxes, gts, torch.tensor([7]))
    assert low.gt_inds.tolist() == [1, -1, -1, 0] and low.labels.tolist() == [7, -1, -1, -1]
    # A GT whose best IoU (0.5) ties between two boxes takes both with gt_max_assign_all.
    tied = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3).assign(boxes[1:], gts)
    assert tied.gt_inds.tolist() == [1, 1, 0]
    one = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, gt_max_assign_all=False).assign(boxes[1:], gts)
    assert one.gt_inds.tolist() == [1, -1, 0]
    # Negative range (low, high), no GT, ignore regions.
    ranged = MaxIoUAssigner(0.7, (0.1, 0.3), match_low_quality=False).assign(boxes, gts)
    assert ranged.gt_inds.tolist() == [1, -1, -1, -1]
    empty = MaxIoUAssigner(0.7, 0.3).assign(boxes, gts[:0], torch.zeros(0, dtype=torch.long))
    assert empty.gt_inds.tolist() == [0] * 4 and empty.labels.tolist() == [-1] * 4
    ignored = MaxIoUAssigner(0.7, 0.3, ignore_iof_thr=0.5).assign(
        boxes, gts, gt_ignore=_boxes([19, 19, 31, 31])
    )
    assert ignored.gt_inds.tolist()[3] == -1


def test_box_overlaps_agree_with_torchvision_and_clamp_empty_boxes():
    from torchvision.ops import box_iou

    a = torch.rand(30, 2) * 50
    a = torch.cat((a, a + torch.rand(30, 2) * 20 + 0.1), 1)
    b = torch.cat((a[:10] + 3, a[:10] + 10), 1)[:, [0, 1, 6, 7]]
    assert torch.equal(box_overlaps(a, b), box_iou(a, b))
    point = _boxes([1, 1, 1, 1])
    assert box_overlaps(point, point).item() == 0.0
    iof = box_overlaps(_boxes([0, 0, 10, 10]), _boxes([0, 0, 5, 10]), mode="iof")
    assert iof.item() == pytest.approx(0.5)


class _Recording(RandomSource):
    def __init__(self):
        self.calls = []

    def randperm(self, n, device):
        self.calls.append(n)
        return torch.arange(n - 1, -1, -1)


def test_sampler_draw_order_and_bounds():
    gt_inds = torch.tensor([1, 0, 0, 2, -1, 0, 1, 0])
    from detrkit.matching.max_iou import MaxIoUAssignment

    assignment = MaxIoUAssignment(
        2, gt_inds, torch.zeros(8), torch.tensor([3, -1, -1, 4, -1, -1, 3, -1])
    )
    boxes, gts = torch.rand(8, 4), torch.rand(2, 4)
    random = _Recording()
    # 3 positives, 4 wanted: no positive draw; 4 negatives for 1 place: one draw of randperm(4).
    result = RandomSampler(4, 1.0, add_gt_as_proposals=False).sample(
        assignment, boxes, gts, random=random
    )
    assert random.calls == [4]
    assert result.pos_inds.tolist() == [0, 3, 6] and result.neg_inds.tolist() == [7]
    random.calls.clear()
    # Nothing to draw when every candidate fits.
    RandomSampler(16, 0.5, add_gt_as_proposals=False).sample(assignment, boxes, gts, random=random)
    assert random.calls == []
    # 2 wanted positives of 3 -> draw; negatives bounded by neg_pos_ub * #pos = 2 of 4 -> draw.
    result = RandomSampler(8, 0.25, neg_pos_ub=1, add_gt_as_proposals=False).sample(
        assignment, boxes, gts, random=random
    )
    assert random.calls == [3, 4]
    assert result.pos_inds.tolist() == [3, 6] and result.neg_inds.tolist() == [5, 7]
    assert result.pos_assigned_gt_inds.tolist() == [1, 0]
    assert torch.equal(result.pos_gt_boxes, gts[[1, 0]])
    # GT added: candidates gain the GT boxes first, as positives of themselves.
    added = RandomSampler(8, 1.0).sample(
        assignment, boxes, gts, torch.tensor([3, 4]), random=random
    )
    assert added.pos_inds.tolist() == [0, 1, 2, 5, 8] and added.pos_is_gt.tolist() == [
        1,
        1,
        0,
        0,
        0,
    ]
    assert added.pos_gt_labels.tolist() == [3, 4, 3, 4, 3]


def test_delta_coder_round_trip_and_clamps():
    coder = DeltaXYWHCoder((0.0, 0.0, 0.0, 0.0), (0.1, 0.1, 0.2, 0.2))
    anchors = _boxes([0, 0, 10, 20], [5, 5, 9, 7])
    gts = _boxes([1, 2, 12, 18], [4, 4, 10, 10])
    torch.testing.assert_close(coder.decode(anchors, coder.encode(anchors, gts)), gts)
    huge = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    decoded = coder.decode(anchors[:1], huge, max_shape=(15, 12))
    assert decoded[0, 2] == 12 and decoded[0, 3] == 15 and decoded[0, 0] == 0
    # Class-specific deltas decode against the same box.
    two = coder.decode(anchors[:1], torch.zeros(1, 8))
    torch.testing.assert_close(two, anchors[:1].repeat(1, 2))


def test_batched_nms_keeps_levels_apart_and_split_path_agrees():
    boxes = _boxes([0, 0, 10, 10], [0, 0, 10, 10.5], [0, 0, 10, 10], [50, 50, 60, 60])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    levels = torch.tensor([0, 0, 1, 1])
    assert mmcv_batched_nms(boxes, scores, levels, 0.7).tolist() == [0, 2, 3]
    generator = torch.Generator().manual_seed(0)
    many = torch.rand(12000, 2, generator=generator) * 500
    many = torch.cat((many, many + 5 + torch.rand(12000, 2, generator=generator) * 40), 1)
    many_scores = torch.rand(12000, generator=generator)
    many_levels = torch.randint(0, 3, (12000,), generator=generator)
    # >= 10000 boxes: one NMS per level, survivors sorted; the same set as torchvision's.
    split = mmcv_batched_nms(many, many_scores, many_levels, 0.7)
    assert torch.all(many_scores[split][:-1] >= many_scores[split][1:])
    reference = batched_nms(many, many_scores, many_levels, 0.7)
    assert split.numel() < 12000 and set(split.tolist()) == set(reference.tolist())
    joint = mmcv_batched_nms(many[:9999], many_scores[:9999], many_levels[:9999], 0.7)
    reference = batched_nms(many[:9999], many_scores[:9999], many_levels[:9999], 0.7)
    # Same boxes in the same score order; tied scores follow the unstable sort mmcv uses.
    assert set(joint.tolist()) == set(reference.tolist())
    assert torch.equal(many_scores[joint], many_scores[reference])


def test_heads_train_step_runs_and_backpropagates():
    torch.manual_seed(0)
    generator = AnchorGenerator(strides=(8, 16))
    rpn = RPNHead(
        16,
        16,
        generator,
        DeltaXYWHCoder(),
        MaxIoUAssigner(0.7, 0.3, 0.3),
        RandomSampler(32, 0.5, add_gt_as_proposals=False),
        ProposalSettings(50, 20, 0.7, 0),
    )
    roi = RoIHead(
        Shared2FCBBoxHead(16, 7, 32, num_classes=3),
        (8, 16),
        56,
        DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2)),
        MaxIoUAssigner(0.5, 0.5, 0.5, match_low_quality=False),
        RandomSampler(16, 0.25),
    )
    maps = [
        torch.randn(2, 16, 8, 8, requires_grad=True),
        torch.randn(2, 16, 4, 4, requires_grad=True),
    ]
    gts = [_boxes([4, 4, 40, 30]), _boxes([10, 12, 50, 60], [0, 0, 20, 20])]
    labels = [torch.tensor([1]), torch.tensor([0, 2])]
    sizes = torch.tensor([[64, 64], [60, 50]])
    rpn_out = rpn.train_step(maps, sizes, gts)
    assert all(p.shape[1] == 5 and p.shape[0] <= 20 for p in rpn_out.proposals)
    assert all(
        (p[:, 2] <= s[1]).all() and (p[:, 3] <= s[0]).all()
        for p, s in zip(rpn_out.proposals, sizes)
    )
    roi_out = roi.train_step(maps, rpn_out.proposals, gts, labels)
    total = sum(_dense_value(loss) for loss in rpn_out.losses + roi_out.losses)
    assert torch.isfinite(total)
    total.backward()
    assert all(m.grad is not None for m in maps)
    assert rpn.rpn_conv.weight.grad is not None and roi.bbox_head.fc_reg.weight.grad is not None
