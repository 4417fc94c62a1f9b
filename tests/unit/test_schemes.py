# SPDX-License-Identifier: Apache-2.0
"""Training schemes: invisible at inference, add exactly their groups, isolated by the mask,
composable, and refused with a clear message where the model lacks what they need."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from detrkit.config.build import build_criterion, build_model
from detrkit.config.load import load_config
from detrkit.errors import UserError
from detrkit.matching.one_to_many import TopKQualityAssigner
from detrkit.schemes.hybrid import isolate
from detrkit.structures import ImageBatch, Target

TINY = [
    "model.hidden_dim=32",
    "model.num_heads=2",
    "model.num_queries=6",
    "model.encoder.num_layers=1",
    "model.decoder.num_layers=2",
    "model.backbone.name=resnet18",
    "model.num_feature_levels=2",
    "model.encoder.dropout=0.0",
    "model.decoder.dropout=0.0",
]
HYBRID = [
    "model.schemes.hybrid.num_queries=9",
    "model.schemes.hybrid.repeat_k=3",
    "model.schemes.hybrid.loss_weight=0.5",
]
BASES = ["deformable_detr_r50_refine", "deformable_detr_r50_tricks_12ep", "detr_r50"]
CROSS_FIRST = ["model.decoder.order=[cross_attn,self_attn,ffn]"]
MIXED_ROOT = ["model.schemes.mixed={}", *CROSS_FIRST]
MIXED_IMPL_A = [
    "model.schemes.mixed.predict_from=layer_output",
    "model.schemes.mixed.separate_class_heads=true",
    "model.schemes.mixed.aux_ffn=false",
]
# (base preset, overrides of the bare detector, scheme overrides)
SCHEMED = [
    ("deformable_detr_r50_refine", [], HYBRID),
    ("deformable_detr_r50_tricks_12ep", [], HYBRID),
    ("detr_r50", [], HYBRID),
    ("deformable_detr_r50_two_stage", CROSS_FIRST, ["model.schemes.mixed={}"]),
    ("deformable_detr_r50_tricks_12ep", [], MIXED_IMPL_A),
    ("detr_r50", CROSS_FIRST, ["model.schemes.mixed={}"]),
    ("detr_r50", [], MIXED_IMPL_A),
    ("deformable_detr_r50_tricks_12ep", CROSS_FIRST, ["model.schemes.mixed={}", *HYBRID]),
    ("deformable_detr_r50_refine", [], [*MIXED_IMPL_A, *HYBRID]),
]


def _images():
    torch.manual_seed(1)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 60:] = True
    return ImageBatch(torch.randn(2, 3, 64, 80), mask, torch.tensor([[64, 80], [64, 60]]))


def _targets():
    return [
        Target(torch.tensor([0, 2]), torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])),
        Target(torch.tensor([1]), torch.tensor([[0.5, 0.5, 0.4, 0.4]])),
    ]


@pytest.mark.parametrize(("base", "model_overrides", "scheme_overrides"), SCHEMED)
def test_eval_output_identical_to_bare_detector(base, model_overrides, scheme_overrides):
    bare = build_model(load_config(base, TINY + model_overrides).model, 3).eval()
    overrides = TINY + model_overrides + scheme_overrides
    schemed = build_model(load_config(base, overrides).model, 3).eval()
    state = bare.state_dict()
    own = schemed.state_dict()
    for key, value in state.items():  # copy, extending query tables with their extra rows
        own[key][: value.shape[0]] = value
    schemed.load_state_dict(own)
    images = _images()
    with torch.no_grad():
        ours, theirs = schemed(images), bare(images)
    assert [g.name for g in ours.groups] == [g.name for g in theirs.groups]
    for a, b in zip(ours.groups, theirs.groups):
        torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
        torch.testing.assert_close(a.boxes, b.boxes, atol=0, rtol=0)


@pytest.mark.parametrize("base", BASES)
def test_training_adds_exactly_the_one_to_many_group(base):
    model = build_model(load_config(base, TINY + HYBRID).model, 3).train()
    output = model(_images(), _targets())
    o2m = output.group("o2m")
    assert o2m.logits.shape[:3] == (2, 2, 9) and o2m.supervision.target_repeat == 3
    assert o2m.supervision.scale == 0.5 and not o2m.at_inference
    names = [g.name for g in output.groups]
    assert names.count("o2m") == 1 and output.for_inference().name == "main"
    losses = build_criterion(load_config(base, TINY + HYBRID).model, 3)(output, _targets())
    # As the original's loss dict: lambda is folded into the reported terms, the weights are the
    # one-to-one ones.
    assert losses.weights["o2m/l1/d1"] == losses.weights["main/l1/d1"]


def test_one_to_many_queries_do_not_change_main_outputs():
    """Perturbing the one-to-many slots leaves the main group bit-identical (block mask)."""
    cfg = load_config("deformable_detr_r50_refine", TINY + HYBRID).model
    model = build_model(cfg, 3).train()
    images = _images()
    with torch.no_grad():
        first = model(images, _targets()).group("main")
    with torch.no_grad():
        table = model.queries.query_embed.weight
        table[6:] += torch.randn_like(table[6:])
        second = model(images, _targets())
    torch.testing.assert_close(second.group("main").boxes, first.boxes, atol=0, rtol=0)
    torch.testing.assert_close(second.group("main").logits, first.logits, atol=0, rtol=0)


def test_isolate_blocks_across_groups_only():
    mask = isolate(None, 2, 5, 6, torch.device("cpu"))
    assert not mask[:2, :2].any() and not mask[2:5, 2:5].any() and not mask[5:, :2].any()
    assert mask[:2, 2:5].all() and mask[2:5, :2].all() and mask[2:5, 5:].all()
    combined = isolate(mask, 5, 6, 6, torch.device("cpu"))
    assert combined[5, :5].all() and combined[:2, 2:5].all()


def test_repeated_targets_normalise_the_one_to_many_group():
    cfg = load_config("deformable_detr_r50_refine", TINY + HYBRID).model
    criterion = build_criterion(cfg, 3)
    seen = []
    criterion.reduce_num_boxes = lambda n: (seen.append(n.item()), n)[1]
    output = build_model(cfg, 3).train()(_images(), _targets())
    cpu = torch.device("cpu")
    assert criterion.num_boxes(output.group("main"), _targets(), cpu).item() == 3.0
    assert criterion.num_boxes(output.group("o2m"), _targets(), cpu).item() == 9.0
    assert seen and set(seen) == {3.0}  # the reducer sees the real box count


def _trained(base: str, overrides: list[str]):
    cfg = load_config(base, TINY + overrides).model
    torch.manual_seed(0)
    model = build_model(cfg, 3).train()
    output = model(_images(), _targets())
    return cfg, model, output


@pytest.mark.parametrize(
    ("base", "overrides"),
    [
        ("deformable_detr_r50_two_stage", MIXED_ROOT),
        ("deformable_detr_r50_refine", MIXED_IMPL_A),
        ("detr_r50", MIXED_ROOT),
        ("detr_r50", MIXED_IMPL_A),
    ],
)
def test_mixed_supervision_predicts_the_primary_queries_again(base, overrides):
    cfg, model, output = _trained(base, overrides)
    main, o2m = output.group("main"), output.group("ms_o2m")
    assert o2m.logits.shape == main.logits.shape
    assert isinstance(o2m.supervision.assigner, TopKQualityAssigner)
    assert not o2m.at_inference and o2m.supervision.target_repeat == 1
    if cfg.schemes["mixed"].predict_from == "layer_output":  # impl (a): same states and boxes
        torch.testing.assert_close(o2m.boxes, main.boxes, atol=0, rtol=0)
    losses = build_criterion(cfg, 3)(output, _targets())
    assert torch.isfinite(losses.total)
    assert losses.weights["ms_o2m/cls/d0"] == cfg.schemes["mixed"].class_weight
    assert losses.weights["ms_o2m/l1/d1"] == cfg.schemes["mixed"].bbox_weight
    losses.total.backward()
    heads = model.schemes["mixed"].class_heads
    if heads is not None:  # the copied class heads are trained by the o2m losses
        assert heads[-1].weight.grad is not None and heads[-1].weight.grad.abs().sum() > 0


def test_separate_class_heads_start_as_copies_of_the_head():
    _, model, _ = _trained("deformable_detr_r50_refine", MIXED_IMPL_A)
    heads = model.schemes["mixed"].class_heads
    assert len(heads) == len(model.head.class_embed)
    for copy, original in zip(heads, model.head.class_embed):
        assert copy is not original
        torch.testing.assert_close(copy.bias, original.bias, atol=0, rtol=0)


def test_hybrid_and_mixed_compose():
    """Both schemes on one detector: each adds its group; the o2m slots stay isolated from the
    primary queries that mixed supervision reads; losses carry each group's weights."""
    overrides = MIXED_ROOT + HYBRID
    cfg, model, output = _trained("deformable_detr_r50_tricks_12ep", overrides)
    names = [g.name for g in output.groups]
    assert names.count("o2m") == 1 and names.count("ms_o2m") == 1 and names.count("main") == 1
    assert output.group("o2m").logits.shape[2] == 9
    assert output.group("ms_o2m").logits.shape[2] == 6
    losses = build_criterion(cfg, 3)(output, _targets())
    assert losses.weights["o2m/cls/d1"] == cfg.loss.class_weight
    assert losses.weights["ms_o2m/cls/d1"] == cfg.schemes["mixed"].class_weight
    assert "enc/cls/d0" in losses.terms
    with torch.no_grad():
        table = model.queries.query_embed.weight
        table[6:] += torch.randn_like(table[6:])  # perturb the o2m slots
        again = model(_images(), _targets())
    for name in ("main", "ms_o2m"):
        torch.testing.assert_close(again.group(name).logits, output.group(name).logits)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(again.group("o2m").logits, output.group("o2m").logits)


def test_mixed_needs_cross_attention_first():
    with pytest.raises(UserError, match=r"model\.decoder\.order=\[cross_attn,self_attn,ffn\]"):
        build_model(load_config("deformable_detr_r50_refine", ["model.schemes.mixed={}"]).model, 3)


def test_nms_needs_sigmoid_heads():
    with pytest.raises(UserError, match="nms_iou_threshold"):
        build_model(load_config("detr_r50", TINY + ["model.nms_iou_threshold=0.7"]).model, 3)


def test_hybrid_lambda_is_folded_into_the_reported_terms_as_the_original_does():
    """H-DETR's loss dict holds ``lambda_one2many`` x each one-to-many term, weighted by the
    one-to-one weights; with lambda != 1 both the reported terms and the total must match."""
    base = ["model.schemes.hybrid.num_queries=9", "model.schemes.hybrid.repeat_k=3"]
    plain = load_config("deformable_detr_r50_refine", TINY + base).model
    scaled = load_config(
        "deformable_detr_r50_refine", TINY + base + ["model.schemes.hybrid.loss_weight=0.25"]
    ).model
    model = build_model(plain, 3).train()
    output = model(_images(), _targets())
    one, quarter = build_criterion(plain, 3), build_criterion(scaled, 3)
    # the same predictions, supervised with lambda 0.25
    scaled_groups = [
        replace(g, supervision=replace(g.supervision, scale=0.25)) if g.name == "o2m" else g
        for g in output.groups
    ]
    terms_one = one(output, _targets())
    terms_quarter = quarter(replace(output, groups=scaled_groups), _targets())
    for name, value in terms_one.terms.items():
        expected = value * 0.25 if name.startswith("o2m/") else value
        torch.testing.assert_close(terms_quarter.terms[name], expected)
        assert terms_quarter.weights[name] == terms_one.weights[name]
    official_total = sum(terms_quarter.weights[k] * v for k, v in terms_quarter.terms.items())
    torch.testing.assert_close(terms_quarter.total, official_total)
    built = build_model(scaled, 3).schemes["hybrid"]
    assert built.supervision.scale == 0.25 and built.supervision.target_repeat == 3


def test_mixed_weights_weigh_the_terms_without_changing_them_as_the_original_does():
    """MS-DETR's loss dict holds the unweighted one-to-many terms and its weight dict the
    ``--o2m_*_loss_coef`` values: non-default coefficients change only the weights."""
    weights = [
        "model.schemes.mixed.class_weight=3.5",
        "model.schemes.mixed.bbox_weight=1.5",
        "model.schemes.mixed.giou_weight=0.5",
    ]
    base = "deformable_detr_r50_two_stage"
    default = load_config(base, TINY + MIXED_ROOT).model
    custom = load_config(base, TINY + MIXED_ROOT + weights).model
    reference, weighted_model = build_model(default, 3).train(), build_model(custom, 3).train()
    weighted_model.load_state_dict(reference.state_dict())
    runs = []
    for cfg, model in ((default, reference), (custom, weighted_model)):
        torch.manual_seed(5)  # the quality assigner subsamples positives at random
        runs.append(build_criterion(cfg, 3)(model(_images(), _targets()), _targets()))
    plain, weighted = runs
    for name, value in plain.terms.items():
        torch.testing.assert_close(weighted.terms[name], value)
    assert weighted.weights["ms_o2m/cls/d1"] == 3.5 and weighted.weights["ms_o2m/l1/d0"] == 1.5
    assert weighted.weights["ms_o2m/giou/d1"] == 0.5
    assert weighted.weights["main/cls/d1"] == plain.weights["main/cls/d1"]
    total = sum(weighted.weights[k] * v for k, v in weighted.terms.items())
    torch.testing.assert_close(weighted.total, total)
