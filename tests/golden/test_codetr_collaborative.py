# SPDX-License-Identifier: Apache-2.0
"""Golden conformance of Co-DINO's whole training step (``cases/codetr``): detrkit's DINO of
the case with the ``collaborative`` scheme beside denoising, every official weight loaded
strictly (``convert_codetr(..., with_collaborative=True)``), the whole RNG tape replayed.

The tape is split per consumer: the denoising draws (context "dn") go to the denoising
scheme, every other draw, in recorded order (RPN sampler per image, RoI sampler per image,
then ``get_aux_targets`` of aux head 0 and 1), to the collaborative scheme. Compared: every
one of the recorded losses by official name (``acc0`` is no loss), the total, and the
recorded ``train.f32.aux{h}.*`` tensors (candidates, selection, positive-query targets,
decoder inputs and outputs). Co-Deformable-DETR's training step:
``test_codetr_collaborative_deformable.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from detrkit.config.build import build_criterion, build_model
from detrkit.config.schema import ModelConfig
from detrkit.config.scheme_settings import SchemeSettings
from detrkit.convert.codetr import convert_codetr
from detrkit.convert.codetr_source import with_collaborative_scheme
from detrkit.schemes.collaborative import CollaborativeConfig
from detrkit.schemes.randomness import RandomSource, ReplayedDraws
from tests.golden.codetr_case import CodetrCase
from tests.golden.golden_case import GOLDEN_DIR, official_state_dict

CASE = GOLDEN_DIR / "codetr" / "co_dino_r18_5scale.json"
LOSS_RTOL = 1e-4
OUTPUT_TOL = dict(atol=1e-4, rtol=1e-4)
_TERMS = {"cls": "cls", "bbox": "l1", "iou": "giou"}


def collaborative_options(model: dict) -> CollaborativeConfig:
    """The scheme's options as ``convert --from codetr --keep-aux`` reads them from an official
    mmdet ``config.model`` (RoI head 0 + ATSS head 0, weights divided back by
    ``num_dec_layer x lambda_2``)."""
    return with_collaborative_scheme(ModelConfig(), model).schemes["collaborative"]


def official_to_detrkit(name: str, num_layers: int) -> str | None:
    """An official loss name (per-level lists flattened ``name.{l}``) -> detrkit's; None for
    ``acc0``."""
    if name == "acc0":
        return None
    prefix, _, rest = name.rpartition(".")
    dense = {
        "loss_rpn_cls": "aux0/rpn_cls",
        "loss_rpn_bbox": "aux0/rpn_bbox",
        "loss_cls1": "aux1/atss_cls",
        "loss_bbox1": "aux1/atss_bbox",
        "loss_centerness1": "aux1/atss_centerness",
    }
    if prefix in dense:
        return f"{dense[prefix]}/l{rest}"
    if name in ("loss_cls0", "loss_bbox0"):
        return {"loss_cls0": "aux0/roi_cls", "loss_bbox0": "aux0/roi_bbox"}[name]
    group = "main"
    if rest.startswith("enc_loss_"):
        group, rest = "enc", rest.removeprefix("enc_")
    elif rest.startswith("dn_loss_"):
        group, rest = "dn", rest.removeprefix("dn_")
    elif "_aux" in rest:
        rest, _, head = rest.partition("_aux")
        group = f"aux{head}"
    term = _TERMS[rest.removeprefix("loss_")]
    layer = int(prefix[1:]) if prefix else (0 if group == "enc" else num_layers - 1)
    return f"{group}/{term}/d{layer}"


class Step:
    """One training forward of the case with the tape replayed, and what it saw."""

    def __init__(self) -> None:
        if not CASE.exists() or not CASE.with_suffix(".safetensors").exists():
            pytest.skip(f"golden case {CASE.name} is absent")
        case = CodetrCase.load(CASE)
        mmdet = case.spec["config"]["model"]
        schemes = dict(case.config.schemes)
        schemes["collaborative"] = collaborative_options(mmdet)
        self.config = replace(case.config, schemes=SchemeSettings(schemes))
        state = official_state_dict(case.spec, CASE.parent)
        self.conversion = convert_codetr(state, mmdet, with_collaborative=True)
        torch.manual_seed(0)
        model = build_model(self.config)
        model.load_state_dict(self.conversion.state_dict, strict=True)
        self.case, self.model = case, model
        self.selections, self.decoder_inputs = [], []
        self.output = self._run()

    def _draws(self, dn: bool) -> list[torch.Tensor]:
        calls = self.case.spec["runs"]["f32"]["rng_calls"]
        chosen = [c for c in calls if (c["context"] == "dn") == dn]
        return [self.case.tensors[f"train.f32.{c['tensor']}"] for c in chosen]

    def _run(self):
        model = self.model
        dn, collab = model.schemes["denoising"], model.schemes["collaborative"]
        dn.random, collab.random = (
            ReplayedDraws(self._draws(True)),
            ReplayedDraws(self._draws(False)),
        )
        try:
            with recording(model, self.selections, self.decoder_inputs):
                output = model(self.case.batch(), self.case.targets())
            self.remaining = (dn.random.remaining, collab.random.remaining)
        finally:
            dn.random, collab.random = RandomSource(), RandomSource()
        return output


@contextmanager
def recording(model, selections: list, decoder_inputs: list) -> Iterator[None]:
    """Train mode for the block, recording every positive-query selection of the
    collaborative scheme as (candidates, chosen) and every decoder pass's input queries."""
    collab = model.schemes["collaborative"]
    select = collab.select

    def recording_select(found, sizes):
        chosen = select(found, sizes)
        selections.append((found, chosen))
        return chosen

    collab.select = recording_select
    hook = model.decoder.register_forward_hook(
        lambda module, args, out: decoder_inputs.append(args[0])
    )
    try:
        model.train()
        yield
    finally:
        hook.remove()
        del collab.select
        model.eval()


@pytest.fixture(scope="module")
def step() -> Step:
    return Step()


def test_conversion_keeps_every_key(step: Step):
    """Only the backbone's BatchNorm step counters are dropped (frozen BN keeps none)."""
    conversion = step.conversion
    assert conversion.clean, conversion.describe()
    assert all(k.endswith("num_batches_tracked") for k in conversion.dropped), conversion.dropped


def test_the_whole_tape_is_used(step: Step):
    assert step.remaining == (0, 0)


def test_candidates_and_selection_match_recording(step: Step):
    tensors = step.case.tensors
    assert len(step.selections) == 2
    for head, (found, chosen) in enumerate(step.selections):
        prefix = f"train.f32.aux{head}"
        for image in range(len(found.coords)):
            assert torch.equal(chosen.selected[image], tensors[f"{prefix}.selected.{image}"])
            cand = f"{prefix}.cand.{image}"
            assert torch.equal(found.labels[image], tensors[f"{cand}.labels"])
            for name in ("coords", "targets"):
                ours = getattr(found, name)[image].detach()
                torch.testing.assert_close(ours, tensors[f"{cand}.{name}"], rtol=1e-5, atol=1e-3)
        assert torch.equal(chosen.labels, tensors[f"{prefix}.labels"])
        torch.testing.assert_close(
            chosen.coords.detach(), tensors[f"{prefix}.coords"], **OUTPUT_TOL
        )
        torch.testing.assert_close(chosen.targets, tensors[f"{prefix}.targets"], **OUTPUT_TOL)
        positive = torch.zeros_like(chosen.labels, dtype=torch.bool)
        for image, count in enumerate(chosen.num_positive):
            positive[image, :count] = True
        bbox_weights = tensors[f"{prefix}.bbox_weights"]
        assert torch.equal(bbox_weights, positive[..., None].float().expand_as(bbox_weights))


def test_positive_query_passes_match_recording(step: Step):
    tensors = step.case.tensors
    passes = step.decoder_inputs[1:]
    assert [p.groups[0].name for p in passes] == ["aux0", "aux1"]
    for head, queries in enumerate(passes):
        prefix = f"train.f32.aux{head}"
        torch.testing.assert_close(
            queries.content.detach(), tensors[f"{prefix}.dec_in.query"], **OUTPUT_TOL
        )
        torch.testing.assert_close(
            queries.reference.detach(), tensors[f"{prefix}.dec_in.reference_points"], **OUTPUT_TOL
        )
        group = step.output.group(f"aux{head}")
        assert not group.at_inference
        torch.testing.assert_close(
            group.logits.detach(), tensors[f"{prefix}.out.cls_scores"], **OUTPUT_TOL
        )
        torch.testing.assert_close(
            group.boxes.detach(), tensors[f"{prefix}.out.bbox_preds"], **OUTPUT_TOL
        )


def assert_every_loss_and_the_total_match(step, expected_terms: int) -> None:
    """Every recorded loss by official name (``acc0`` is no loss) equals detrkit's weighted
    term within ``LOSS_RTOL``, detrkit has no other term, and the totals agree."""
    criterion = build_criterion(step.config)
    losses = criterion(step.output, step.case.targets())
    run = step.case.spec["runs"]["f32"]
    layers = step.config.decoder.num_layers
    compared = set()
    for official, value in run["losses"].items():
        name = official_to_detrkit(official, layers)
        if name is None:
            continue
        got = (losses.terms[name].detach() * losses.weights[name]).item()
        error = abs(got - value) / abs(value) if value != 0 else abs(got)
        assert error <= LOSS_RTOL, f"{official} ({name}): {got} vs {value} ({error:.2e})"
        compared.add(name)
    assert len(compared) == len(run["losses"]) - 1 == expected_terms
    assert compared == set(losses.terms), set(losses.terms) ^ compared
    total = losses.total.item()
    assert abs(total - run["total_loss"]) <= LOSS_RTOL * abs(run["total_loss"])
    assert run["log_vars"]["loss"] == run["total_loss"]


def test_every_loss_and_the_total_match_recording(step: Step):
    assert_every_loss_and_the_total_match(step, 71)


def assert_every_matcher_call_matches(step) -> None:
    """Every recorded ``HungarianAssigner.assign`` call (``train.f32.match.NN``): the cost
    handed to scipy, the matched pairs and the per-query ``gt_inds`` (0 unmatched, k -> GT
    k-1). Queries whose cost rows are identical (padded two-stage tokens) are
    interchangeable, so a differing pick among them is accepted when its cost row is equal."""
    criterion = build_criterion(step.config)
    targets = step.case.targets()
    matches = criterion.match(step.output, targets)
    layers = step.config.decoder.num_layers
    calls = step.case.spec["runs"]["f32"]["matcher_calls"]
    for call in calls:
        label, image = call["label"], call["image"]
        where = ("enc", 0) if label == "enc" else ("main", int(label.removeprefix("dec")))
        assert where[1] < layers, label
        group = step.output.group(where[0])
        assigner = criterion.assigner_of(group)
        group_targets = criterion.group_targets(group, targets)
        layer = group.logits[where[1]].detach()
        boxes = criterion.match_boxes(group)[where[1]].detach()
        costs = assigner.image_costs(assigner.costs(layer, boxes, group_targets), group_targets)
        prefix = f"train.f32.{call['tensors']}"
        want_cost = step.case.tensors[f"{prefix}.cost"]
        torch.testing.assert_close(costs[image], want_cost, **OUTPUT_TOL, msg=prefix)
        src, tgt = matches[where][image]
        want_src, want_tgt = step.case.tensors[f"{prefix}.src"], step.case.tensors[f"{prefix}.tgt"]
        gt_inds = torch.zeros(call["num_queries"], dtype=torch.int64)
        gt_inds[src] = tgt.to(torch.int64) + 1
        recorded = step.case.tensors[f"{prefix}.gt_inds"].to(torch.int64)
        for query in torch.nonzero(gt_inds != recorded).flatten().tolist():
            twin = (
                int(torch.nonzero(recorded == gt_inds[query]).flatten()[0])
                if gt_inds[query]
                else int(torch.nonzero(gt_inds == recorded[query]).flatten()[0])
            )
            assert torch.equal(want_cost[query], want_cost[twin]), f"{prefix}: query {query}"
        ours = sorted(zip(tgt.tolist(), want_cost[src, tgt].tolist()))
        theirs = sorted(zip(want_tgt.tolist(), want_cost[want_src, want_tgt].tolist()))
        assert [t for t, _ in ours] == [t for t, _ in theirs], prefix
        torch.testing.assert_close(
            torch.tensor([c for _, c in ours]), torch.tensor([c for _, c in theirs]), msg=prefix
        )
    assert len(calls) == 2 * (layers + 1)


def test_every_matcher_call_matches_recording(step: Step):
    assert_every_matcher_call_matches(step)
