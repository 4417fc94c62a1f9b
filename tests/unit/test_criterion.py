# SPDX-License-Identifier: Apache-2.0
import torch

from detrkit.config.build import build_criterion
from detrkit.structures import DetectorOutput, PredictionGroup, Supervision, Target
from tests.conftest import tiny_model_config


def _targets():
    return [
        Target(torch.tensor([1, 3]), torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])),
        Target(torch.tensor([0]), torch.tensor([[0.5, 0.5, 0.4, 0.4]])),
    ]


def _perfect_group(targets, num_layers=2, queries=6, num_logits=6):
    logits = torch.full((num_layers, len(targets), queries, num_logits), -5.0)
    boxes = torch.full((num_layers, len(targets), queries, 4), 0.5)
    boxes[..., 2:] = 0.1
    for image, target in enumerate(targets):
        for slot, (label, box) in enumerate(zip(target.labels, target.boxes)):
            logits[:, image, slot, label] = 5.0
            boxes[:, image, slot] = box
    return PredictionGroup("main", logits, boxes, at_inference=True)


def test_perfect_predictions_give_zero_box_losses():
    criterion = build_criterion(tiny_model_config())
    targets = _targets()
    losses = criterion(DetectorOutput([_perfect_group(targets)]), targets)
    for name, value in losses.terms.items():
        if "/l1/" in name or "/giou/" in name:
            torch.testing.assert_close(value, torch.tensor(0.0), atol=1e-6, rtol=0)


def test_loss_names_and_weights_per_group_and_layer():
    cfg = tiny_model_config()
    criterion = build_criterion(cfg)
    targets = _targets()
    main = _perfect_group(targets)
    halved = {"cls": 1.0, "l1": 2.5, "giou": 1.0}
    extra = PredictionGroup(
        "o2m", main.logits.clone(), main.boxes.clone(), supervision=Supervision(term_weights=halved)
    )
    losses = criterion(DetectorOutput([main, extra]), targets)
    expected = {
        f"{g}/{t}/d{l}" for g in ("main", "o2m") for t in ("cls", "l1", "giou") for l in (0, 1)
    }
    assert set(losses.terms) == expected
    assert losses.weights["main/l1/d1"] == cfg.loss.bbox_weight
    assert losses.weights["o2m/giou/d0"] == 1.0 and losses.weights["o2m/l1/d0"] == 2.5
    total = sum(losses.weights[k] * v for k, v in losses.terms.items())
    torch.testing.assert_close(losses.total, total)


def test_aux_loss_off_supervises_last_layer_only():
    from detrkit.config.schema import LossConfig

    criterion = build_criterion(tiny_model_config(loss=LossConfig(aux_loss=False)))
    targets = _targets()
    losses = criterion(DetectorOutput([_perfect_group(targets, num_layers=3)]), targets)
    assert {n.split("/")[-1] for n in losses.terms} == {"d2"}


def test_reduce_num_boxes_is_injected_and_used():
    seen = []

    def reduce(count):
        seen.append(count.item())
        return count * 2

    targets = _targets()
    group = _perfect_group(targets)
    group.boxes[:, 0, 0] += 0.05  # a non-zero L1 to see the normalisation
    plain = build_criterion(tiny_model_config())(DetectorOutput([group]), targets)
    halved = build_criterion(tiny_model_config(), reduce_num_boxes=reduce)(
        DetectorOutput([group]), targets
    )
    assert seen and seen[0] == 3.0
    torch.testing.assert_close(halved.terms["main/l1/d1"], plain.terms["main/l1/d1"] / 2)


def test_empty_targets_give_finite_losses():
    criterion = build_criterion(tiny_model_config())
    targets = [Target(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))] * 2
    group = _perfect_group(_targets())
    losses = criterion(DetectorOutput([group]), targets)
    assert all(torch.isfinite(v) for v in losses.terms.values())
    torch.testing.assert_close(losses.terms["main/l1/d1"], torch.tensor(0.0))


def test_focal_loss_matches_manual_computation():
    from detrkit.config.schema import LossConfig

    criterion = build_criterion(tiny_model_config(loss=LossConfig(class_loss="sigmoid_focal")))
    targets = _targets()
    group = _perfect_group(targets, num_logits=5)
    group.logits = torch.randn_like(group.logits)
    losses = criterion(DetectorOutput([group]), targets)
    logits = group.logits[1]
    one_hot = torch.zeros_like(logits)
    for image, target in enumerate(targets):
        for slot, label in enumerate(target.labels):
            one_hot[image, slot, label] = 1  # perfect boxes make the match slot i -> target i
    prob = logits.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, one_hot, reduction="none")
    p_t = prob * one_hot + (1 - prob) * (1 - one_hot)
    alpha_t = 0.25 * one_hot + 0.75 * (1 - one_hot)
    manual = (alpha_t * ce * (1 - p_t) ** 2).sum() / 3
    torch.testing.assert_close(losses.terms["main/cls/d1"], manual)


def test_merged_one_to_one_pairs_join_the_one_to_many_pairs():
    """``merge_one_to_one`` (MS-DETR's ``--use_indices_merge``): each layer's one-to-many pairs
    gain that layer's Hungarian pairs, once, written last."""
    from dataclasses import replace

    from detrkit.matching.one_to_many import TopKQualityAssigner
    from detrkit.structures import Supervision

    base = tiny_model_config()
    cfg = replace(base, loss=replace(base.loss, class_loss="sigmoid_focal"))
    # o2m: exactly the rescued queries, no random subsampling
    assigner = TopKQualityAssigner(threshold=2.0, positive_fraction=1.0)
    targets = _targets()
    main = _perfect_group(targets, num_logits=5)
    # the same predictions in reverse query order: the o2m pairs differ from the main ones
    flipped = (main.logits.flip(2), main.boxes.flip(2))
    merging = Supervision(assigner, merge_with="main")
    o2m = PredictionGroup("ms_o2m", *flipped, supervision=merging)
    merged = build_criterion(cfg).match(DetectorOutput([main, o2m]), targets)
    alone = PredictionGroup("ms_o2m", *flipped, supervision=Supervision(assigner))
    plain = build_criterion(cfg).match(DetectorOutput([main, alone]), targets)
    for layer in (0, 1):
        for image in range(2):
            pairs = list(zip(*[t.tolist() for t in merged[("ms_o2m", layer)][image]]))
            hungarian = list(zip(*[t.tolist() for t in merged[("main", layer)][image]]))
            own = list(zip(*[t.tolist() for t in plain[("ms_o2m", layer)][image]]))
            assert own and not set(own) & set(hungarian)
            assert pairs[-len(hungarian) :] == hungarian  # written last
            assert set(pairs) == set(own) | set(hungarian) and len(pairs) == len(set(pairs))


def test_unknown_assigner_or_merge_group_is_an_error():
    import pytest

    criterion = build_criterion(tiny_model_config())
    targets = _targets()
    main = _perfect_group(targets)
    odd = PredictionGroup("odd", main.logits, main.boxes, supervision=Supervision("nope"))
    with pytest.raises(KeyError, match="assigner 'nope'"):
        criterion(DetectorOutput([main, odd]), targets)
    merging = PredictionGroup(
        "odd", main.logits, main.boxes, supervision=Supervision(merge_with="missing")
    )
    with pytest.raises(KeyError, match="unknown group 'missing'"):
        criterion(DetectorOutput([main, merging]), targets)


def test_dense_losses_run_in_float32_outside_autocast_and_are_normalised():
    from detrkit.structures import DenseLoss

    seen = {}

    def compute(x):
        seen["dtype"], seen["autocast"] = x.dtype, torch.is_autocast_enabled("cpu")
        return (x @ x.T).sum()

    criterion = build_criterion(tiny_model_config(), reduce_num_boxes=lambda n: n * 2)
    targets = _targets()
    features = torch.randn(4, 8).to(torch.bfloat16)
    dense = [
        DenseLoss("head/a", compute, (features,), weight=0.25),
        DenseLoss("head/b", lambda x: x.sum(), (features,), count=torch.tensor(5.0)),
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = criterion(DetectorOutput([_perfect_group(targets)], dense), targets)
    assert seen == {"dtype": torch.float32, "autocast": False}
    x = features.float()
    torch.testing.assert_close(losses.terms["head/a"], (x @ x.T).sum() / 6)  # 3 boxes x 2
    torch.testing.assert_close(losses.terms["head/b"], x.sum() / 10)  # its own count x 2
    assert losses.weights["head/a"] == 0.25 and losses.weights["head/b"] == 1.0
