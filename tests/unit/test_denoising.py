# SPDX-License-Identifier: Apache-2.0
"""Contrastive denoising (DINO): noise recipe, slot layout, attention isolation, fixed targets,
normalisation, empty batches, composition with the other schemes."""

import pytest
import torch

from detrkit.config.build import build_criterion, build_model
from detrkit.config.load import load_config
from detrkit.errors import UserError
from detrkit.ops.boxes import box_cxcywh_to_xyxy
from detrkit.schemes.denoising import group_blocks, noised_copies, num_groups
from detrkit.schemes.randomness import RandomSource, ReplayedDraws
from detrkit.structures import Target
from tests.unit.test_schemes import TINY, _images

DENOISING = ["model.schemes.denoising.dn_number=6"]
TWO_STAGE = "deformable_detr_r50_two_stage"


def _targets():
    return [
        Target(
            torch.tensor([0, 2, 1]),
            torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4], [0.5, 0.4, 0.2, 0.3]]),
        ),
        Target(torch.tensor([1]), torch.tensor([[0.5, 0.5, 0.4, 0.4]])),
    ]


def _empty_targets():
    return [Target(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4)) for _ in range(2)]


def test_group_count_follows_the_most_crowded_image():
    assert num_groups(100, _targets()) == 33
    assert num_groups(2, _targets()) == 1
    assert num_groups(100, _empty_targets()) == 1
    assert num_groups(7, _targets(), dynamic=False) == 7


def test_positive_and_negative_noise_stay_in_their_bands():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3]]).repeat(50, 1)
    labels = torch.zeros(50, dtype=torch.int64)
    copies = noised_copies(
        labels,
        boxes,
        3,
        num_classes=7,
        label_noise_ratio=0.0,
        box_noise_scale=0.5,
        random=RandomSource(),
    )
    moved = (box_cxcywh_to_xyxy(copies.boxes) - box_cxcywh_to_xyxy(boxes.repeat(6, 1))).abs()
    half = boxes[:, 2:].repeat(6, 2) / 2
    ratio = (moved / (0.5 * half)).view(6, 50, 4)
    positives, negatives = ratio[0::2], ratio[1::2]
    assert positives.max() < 1 + 1e-5 and negatives.min() > 1 - 1e-5 and negatives.max() < 2
    assert torch.equal(copies.labels, labels.repeat(6))  # no label noise asked


def test_label_noise_replaces_about_half_the_ratio_and_replays_exactly():
    torch.manual_seed(0)
    labels = torch.arange(400) % 5
    boxes = torch.rand(400, 4) * 0.5 + 0.25
    noisy = noised_copies(
        labels,
        boxes,
        1,
        num_classes=5,
        label_noise_ratio=0.5,
        box_noise_scale=1.0,
        random=RandomSource(),
    )
    chosen = ((noisy.labels != labels.repeat(2)).float().mean()).item()
    assert 0.12 < chosen < 0.28  # 1/4 drawn, 4/5 of those land on another class

    class Recorder(RandomSource):
        def __init__(self):
            self.draws = []

        def rand_like(self, like):
            self.draws.append(super().rand_like(like))
            return self.draws[-1]

        def randint_like(self, like, low, high):
            self.draws.append(super().randint_like(like, low, high))
            return self.draws[-1]

    recorder = Recorder()
    first = noised_copies(
        labels,
        boxes,
        2,
        num_classes=5,
        label_noise_ratio=0.5,
        box_noise_scale=1.0,
        random=recorder,
    )
    replayed = ReplayedDraws(recorder.draws)
    again = noised_copies(
        labels,
        boxes,
        2,
        num_classes=5,
        label_noise_ratio=0.5,
        box_noise_scale=1.0,
        random=replayed,
    )
    assert len(recorder.draws) == 4 and replayed.remaining == 0
    assert torch.equal(first.labels, again.labels) and torch.equal(first.boxes, again.boxes)


def test_replay_out_of_step_is_an_error():
    with pytest.raises(RuntimeError, match="out of step"):
        ReplayedDraws([torch.zeros(3)]).rand_like(torch.zeros(4))


def test_group_blocks_isolate_groups():
    blocks = group_blocks(3, 2, torch.device("cpu"))
    assert blocks.shape == (6, 6)
    assert not blocks[0:2, 0:2].any() and blocks[0:2, 2:].all() and blocks[4:, :4].all()


def _model(overrides=(), base=TWO_STAGE):
    cfg = load_config(base, TINY + DENOISING + list(overrides)).model
    torch.manual_seed(0)
    return cfg, build_model(cfg, 3).train()


def test_dn_group_layout_mask_and_fixed_targets():
    cfg, model = _model()
    captured = {}
    original = model.decoder.forward

    def spy(queries, memory, head=None):
        captured["queries"] = queries
        return original(queries, memory, head)

    model.decoder.forward = spy
    output = model(_images(), _targets())
    dn = output.group("dn")
    groups, most = 2, 3  # dn_number 6 // 3 boxes
    assert dn.logits.shape[2] == 2 * groups * most and not dn.at_inference
    queries = captured["queries"]
    span = next(g for g in queries.groups if g.name == "dn")
    assert (span.start, span.stop) == (cfg.num_queries, cfg.num_queries + 12)
    mask = queries.self_attn_mask
    main, dn_slots = slice(0, span.start), slice(span.start, span.stop)
    assert mask[main, dn_slots].all()  # matching queries never see denoising queries
    assert not mask[dn_slots, main].any()  # denoising queries see the matching queries
    inner = mask[dn_slots, dn_slots]
    assert not inner[:6, :6].any() and inner[:6, 6:].all()
    fixed = dn.supervision.fixed
    assert fixed.normaliser_multiplier == groups
    image0_queries, image0_boxes = fixed.pairs[0]
    assert image0_queries.tolist() == [0, 1, 2, 6, 7, 8]
    assert image0_boxes.tolist() == [0, 1, 2, 0, 1, 2]
    assert fixed.pairs[1][0].tolist() == [0, 6]
    # unfilled slot of image 1 keeps zero content: reference (0.5, 0.5, 0.5, 0.5)
    reference = queries.reference[1, span.start + 1]
    torch.testing.assert_close(reference, torch.full((4,), 0.5))


def test_denoising_does_not_change_the_matching_queries():
    _, model = _model()
    images, targets = _images(), _targets()
    torch.manual_seed(3)
    with_dn = model(images, targets)
    schemes = model.schemes
    model.schemes = torch.nn.ModuleDict()
    without = model(images, targets)
    model.schemes = schemes
    for name in ("main", "enc"):
        torch.testing.assert_close(with_dn.group(name).logits, without.group(name).logits)
        torch.testing.assert_close(with_dn.group(name).boxes, without.group(name).boxes)


def test_dn_losses_are_normalised_by_boxes_times_groups_and_train_the_label_table():
    cfg, model = _model()
    criterion = build_criterion(cfg, 3)
    seen = []
    criterion.reduce_num_boxes = lambda n: (seen.append(n.item()), n)[1]
    output = model(_images(), _targets())
    cpu = torch.device("cpu")
    assert criterion.num_boxes(output.group("dn"), _targets(), cpu).item() == 4.0 * 2
    losses = criterion(output, _targets())
    assert {"dn/cls/d1", "dn/l1/d1", "dn/giou/d0"} <= set(losses.terms)
    assert losses.weights["dn/l1/d1"] == losses.weights["main/l1/d1"]
    losses.total.backward()
    table = model.schemes["denoising"].label_embedding.weight
    assert table.grad is not None and table.grad.abs().sum() > 0
    assert table.shape[0] == 3 + 1  # dn_labelbook_size + 1


def test_a_batch_without_boxes_trains_with_the_same_terms():
    cfg, model = _model()
    criterion = build_criterion(cfg, 3)
    full = criterion(model(_images(), _targets()), _targets())
    empty = criterion(model(_images(), _empty_targets()), _empty_targets())
    assert set(full.terms) == set(empty.terms)
    assert all(torch.isfinite(v) for v in empty.terms.values())
    empty.total.backward()
    table = model.schemes["denoising"].label_embedding.weight
    assert table.grad is not None  # in the graph: no DDP hang on a rank without boxes


def test_eval_outputs_only_the_inference_queries():
    _, model = _model()
    output = model.eval()(_images())
    assert [g.name for g in output.groups if g.at_inference] == ["main"]
    assert all(g.name != "dn" for g in output.groups)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.schemes.hybrid.num_queries=9", "model.schemes.hybrid.repeat_k=2"],
        ["model.schemes.mixed={}", "model.decoder.order=[cross_attn,self_attn,ffn]"],
    ],
    ids=["hybrid", "mixed"],
)
def test_denoising_composes(overrides):
    cfg, model = _model(overrides)
    output = model(_images(), _targets())
    names = {g.name for g in output.groups}
    assert "dn" in names and ({"o2m"} <= names or {"ms_o2m"} <= names)
    losses = build_criterion(cfg, 3)(output, _targets())
    losses.total.backward()
    assert torch.isfinite(losses.total)


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("deformable_detr_r50", "4-d reference"),
        ("detr_r50", "4-d reference"),
    ],
)
def test_denoising_needs_reference_boxes(base, message):
    with pytest.raises(UserError, match=message):
        build_model(load_config(base, TINY + DENOISING).model, 3)


def test_non_default_loss_weights_carry_over_to_the_dn_terms_as_the_official_dict():
    """DINO's weight dict gives every ``*_dn`` key the matching term's coefficient, so with
    non-default coefficients each dn term is weighted exactly as the main term of its layer."""
    weights = ["model.loss.class_weight=3.0", "model.loss.bbox_weight=7.0"]
    weights.append("model.loss.giou_weight=0.5")
    cfg, model = _model(weights)
    losses = build_criterion(cfg, 3)(model(_images(), _targets()), _targets())
    dn_terms = [name for name in losses.terms if name.startswith("dn/")]
    assert len(dn_terms) == 3 * 2  # cls, l1, giou on both decoder layers
    expected = {"cls": 3.0, "l1": 7.0, "giou": 0.5}
    for name in dn_terms:
        term = name.split("/")[1]
        assert losses.weights[name] == losses.weights[f"main/{term}/{name.split('/')[2]}"]
        assert losses.weights[name] == expected[term]
