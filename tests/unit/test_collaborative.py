# SPDX-License-Identifier: Apache-2.0
"""Co-DETR's collaborative scheme on a tiny DINO: it builds, trains a step (every dense and
positive-query term, gradients into every part), leaves eval alone, works without boxes; the
positive-query selection draws in the official order; the config checks name the keys."""

import pytest
import torch

from detrkit.config.build import build_criterion, build_model
from detrkit.config.load import load_config
from detrkit.errors import UserError
from detrkit.models.dense.positive_queries import Candidates
from detrkit.schemes.randomness import RandomSource
from detrkit.structures import ImageBatch, Target

STRIDES = "[8,16,32,64]"
COLLABORATIVE = [
    f"model.schemes.collaborative.rpn_roi.strides={STRIDES}",
    f"model.schemes.collaborative.rpn_roi.roi_strides={STRIDES}",
    "model.schemes.collaborative.rpn_roi.fc_channels=32",
    "model.schemes.collaborative.rpn_roi.nms_pre=200",
    "model.schemes.collaborative.rpn_roi.max_proposals=50",
    f"model.schemes.collaborative.atss.strides={STRIDES}",
    "model.encoder.num_layers=1",
    "model.num_queries=8",
]


def _model(overrides=()):
    cfg = load_config("dino_tiny", COLLABORATIVE + list(overrides)).model
    torch.manual_seed(0)
    return cfg, build_model(cfg, 3).train()


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


def _empty_targets():
    return [Target(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4)) for _ in range(2)]


def test_trains_a_step_with_every_term_and_gradient():
    cfg, model = _model()
    output = model(_images(), _targets())
    for name in ("aux0", "aux1"):
        group = output.group(name)
        assert not group.at_inference and group.logits.shape[:2] == (2, 2)
        assert group.logits.shape[2] >= 9  # at least nine positive queries per image
    losses = build_criterion(cfg, 3)(output, _targets())
    expected = {"aux0/rpn_cls/l3", "aux0/rpn_bbox/l0", "aux0/roi_cls", "aux0/roi_bbox"}
    expected |= {"aux1/atss_cls/l0", "aux1/atss_bbox/l3", "aux1/atss_centerness/l1"}
    expected |= {"aux0/cls/d1", "aux0/l1/d0", "aux1/giou/d1", "dn/cls/d1", "main/cls/d1"}
    assert expected <= set(losses.terms)
    # Dense weights carry lambda_2 x the decoder's layers (2 x 2); RoI GIoU 10 x that.
    assert losses.weights["aux0/roi_bbox"] == pytest.approx(40.0)
    assert losses.weights["aux1/atss_bbox/l0"] == pytest.approx(8.0)
    assert all(torch.isfinite(v) for v in losses.terms.values())
    losses.total.backward()
    scheme = model.schemes["collaborative"]
    for part in (scheme.rpn.rpn_conv, scheme.roi.bbox_head.fc_cls, scheme.atss.atss_cls):
        assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0
    for part in (scheme.aux_pos_trans[0], scheme.aux_pos_trans[1], scheme.pyramid.downsample[0]):
        assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0


def test_positive_queries_are_supervised_by_their_heads_assignment():
    _, model = _model()
    output = model(_images(), _targets())
    for name in ("aux0", "aux1"):
        fixed = output.group(name).supervision.fixed
        for (queries, targets), explicit in zip(fixed.pairs, fixed.targets):
            assert torch.equal(queries, targets) and len(explicit) == len(queries)
            assert explicit.labels.lt(3).all()
            assert ((explicit.boxes >= 0) & (explicit.boxes <= 1)).all()


def test_eval_outputs_only_the_inference_queries():
    _, model = _model()
    with torch.no_grad():
        output = model.eval()(_images())
    assert [g.name for g in output.groups if g.at_inference] == ["main"]
    assert not any(g.name.startswith("aux") for g in output.groups)
    assert output.dense_losses == []


def test_a_batch_without_boxes_trains_with_the_same_terms():
    cfg, model = _model()
    criterion = build_criterion(cfg, 3)
    full = criterion(model(_images(), _targets()), _targets())
    empty = criterion(model(_images(), _empty_targets()), _empty_targets())
    assert set(full.terms) == set(empty.terms)
    assert all(torch.isfinite(v) for v in empty.terms.values())
    empty.total.backward()
    scheme = model.schemes["collaborative"]
    assert scheme.aux_pos_trans[0].weight.grad is not None


class _Recording(RandomSource):
    def __init__(self):
        self.calls = []

    def randperm(self, n, device):
        self.calls.append(n)
        return torch.arange(n - 1, -1, -1, device=device)


def test_selection_subsets_positives_and_pads_with_negatives_in_order():
    _, model = _model(["model.schemes.collaborative.max_pos_coords=10"])
    scheme = model.schemes["collaborative"]
    scheme.random = random = _Recording()
    background = 3
    labels = [torch.tensor([0] * 12 + [background] * 4), torch.tensor([1, background] * 8)]
    coords = [torch.tensor([[0.0, 0.0, 8.0, 8.0]]).repeat(16, 1) + i for i in range(2)]
    found = Candidates(coords, labels, [c + 1 for c in coords])
    chosen = scheme.select(found, torch.tensor([[32, 32], [32, 32]]))
    # n = max(9, min(10, 12)) = 10: image 0 draws a subset of its 12 positives, image 1 pads
    # its 8 positives with 2 of its 8 negatives.
    assert random.calls == [12, 8]
    assert chosen.selected[0].tolist() == list(range(11, 1, -1))
    assert chosen.selected[1].tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 15, 13]
    assert chosen.num_positive == [10, 8]
    assert chosen.labels[1].tolist() == [1] * 8 + [background] * 2
    torch.testing.assert_close(chosen.coords[0, 0], torch.tensor([0.125, 0.125, 0.25, 0.25]))


def test_at_least_nine_queries_even_without_positives():
    _, model = _model()
    scheme = model.schemes["collaborative"]
    scheme.random = random = _Recording()
    labels = [torch.full((20,), 3), torch.full((20,), 3)]
    coords = [torch.rand(20, 4) * 10 + torch.tensor([0, 0, 10, 10])] * 2
    chosen = scheme.select(Candidates(coords, labels, coords), torch.tensor([[32, 32]] * 2))
    assert random.calls == [20, 20] and chosen.num_positive == [0, 0]
    assert chosen.coords.shape == (2, 9, 4)


def test_too_few_negatives_are_repeated():
    _, model = _model()
    scheme = model.schemes["collaborative"]
    scheme.random = _Recording()
    labels = [torch.tensor([0, 3, 3]), torch.tensor([3] * 12)]
    coords = [torch.tensor([[0.0, 0.0, 8.0, 8.0]]).repeat(len(lab), 1) for lab in labels]
    chosen = scheme.select(Candidates(coords, labels, coords), torch.tensor([[32, 32]] * 2))
    assert chosen.selected[0].tolist() == [0] + [2, 1] * 4
    assert chosen.labels[0, 1:].eq(3).all() and chosen.num_positive == [1, 0]


def test_without_positive_queries_only_the_dense_losses_are_added():
    cfg, model = _model(["model.schemes.collaborative.with_pos_coord=false"])
    output = model(_images(), _targets())
    assert not any(g.name.startswith("aux") for g in output.groups)
    losses = build_criterion(cfg, 3)(output, _targets())
    assert "aux1/atss_cls/l0" in losses.terms and "aux0/cls/d0" not in losses.terms


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.schemes.collaborative.rpn_roi=null", "model.schemes.collaborative.atss=null"],
            "no auxiliary head",
        ),
        (["model.schemes.collaborative.atss.strides=[8,16,32]"], "atss.strides"),
        (["model.schemes.collaborative.max_pos_coords=0"], "max_pos_coords"),
    ],
)
def test_config_checks_name_the_keys(overrides, message):
    with pytest.raises(UserError, match=message):
        cfg = load_config("dino_tiny", COLLABORATIVE + overrides).model
        build_model(cfg, 3)


# Co-Deformable-DETR's positive queries on a tiny two-stage Deformable DETR (3 levels).
DEFORMABLE = [
    "model.schemes.collaborative.positive_query=deformable",
    "model.schemes.collaborative.rpn_roi.strides=[8,16,32,64]",
    "model.schemes.collaborative.rpn_roi.roi_strides=[8,16,32]",
    "model.schemes.collaborative.rpn_roi.fc_channels=32",
    "model.schemes.collaborative.rpn_roi.nms_pre=200",
    "model.schemes.collaborative.rpn_roi.max_proposals=50",
    "model.schemes.collaborative.atss.strides=[8,16,32,64]",
    "model.encoder.num_layers=1",
    "model.num_queries=8",
]


def test_deformable_positive_queries_train_with_constant_positions():
    cfg = load_config("deformable_detr_tiny", DEFORMABLE).model
    torch.manual_seed(0)
    model = build_model(cfg, 3).train()
    scheme = model.schemes["collaborative"]
    assert scheme.head_pos_embed.weight.shape == (2, 1)
    assert scheme.aux_pos_trans[0].weight.shape == (2 * 64, 2 * 64)
    seen = []
    hook = model.decoder.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        output = model(_images(), _targets())
    finally:
        hook.remove()
    assert len(seen) == 3
    for head, queries in enumerate(seen[1:]):
        assert queries.groups[0].name == f"aux{head}" and queries.pos is not None
        assert queries.pos.shape == queries.content.shape
    losses = build_criterion(cfg, 3)(output, _targets())
    assert "aux1/cls/d1" in losses.terms and "aux0/roi_bbox" in losses.terms
    losses.total.backward()
    for name in ("pos_feats_trans", "head_pos_embed", "aux_pos_trans"):
        grads = [p.grad for p in getattr(scheme, name).parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name


@pytest.mark.parametrize(
    "config, overrides, message",
    [
        ("dino_tiny", ["model.schemes.collaborative.positive_query=deformable"], "query_pos"),
        ("dino_tiny", ["model.schemes.collaborative.positive_query=detr"], "positive_query"),
    ],
)
def test_positive_query_style_is_checked(config, overrides, message):
    with pytest.raises(UserError, match=message):
        build_model(load_config(config, COLLABORATIVE + overrides).model, 3)


def test_non_default_lambdas_scale_the_weights_as_the_official_configs():
    """lambda_2 multiplies every dense weight (with the layer count), lambda_1 the positive-query
    terms; neither changes a term's value, so the official loss dict is w x term either way."""
    cfg, model = _model()
    default = build_criterion(cfg, 3)(model(_images(), _targets()), _targets())
    prefix = "model.schemes.collaborative"
    cfg2, model2 = _model([f"{prefix}.lambda_1=0.5", f"{prefix}.lambda_2=3.0"])
    scaled = build_criterion(cfg2, 3)(model2(_images(), _targets()), _targets())
    assert set(scaled.terms) == set(default.terms)
    assert {"aux0/roi_bbox", "aux1/atss_cls/l0", "aux0/cls/d1", "aux1/giou/d0"} <= set(scaled.terms)
    for name, weight in default.weights.items():
        if name.startswith(("aux0/rpn", "aux0/roi", "aux1/atss")):
            assert scaled.weights[name] == pytest.approx(weight * 3.0 / 2.0), name
        elif name.startswith(("aux0/", "aux1/")):  # positive-query terms
            factor = scaled.weights[name] * scaled.terms[name] / (weight * default.terms[name])
            assert factor.item() == pytest.approx(0.5, rel=1e-5), name
        else:
            assert scaled.weights[name] == weight, name
