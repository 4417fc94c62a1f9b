# SPDX-License-Identifier: Apache-2.0
"""Golden conformance of Co-Deformable-DETR's whole training step (``cases/codetr``):
detrkit's two-stage Deformable DETR of the case with the ``collaborative`` scheme
(``positive_query="deformable"``), every official weight loaded strictly
(``convert_codetr(..., with_collaborative=True)``), the whole RNG tape replayed by the scheme
(RPN sampler per image, RoI sampler per image, then ``get_aux_targets`` of aux head 0 and 1;
the case has no denoising).

Compared: every recorded loss by official name (``acc0`` is no loss), the total, and the
recorded ``train.f32.aux{h}.*`` tensors: candidates, selection, positive-query targets, the
candidates' features, the decoder inputs (content, constant positions with the per-head
scalar, references) and the positive-query outputs.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from detrkit.config.build import build_model
from detrkit.config.scheme_settings import SchemeSettings
from detrkit.convert.codetr import convert_codetr
from detrkit.schemes.randomness import RandomSource, ReplayedDraws
from tests.golden.codetr_case import CodetrCase, assert_boxes_equal_up_to_tied_proposals
from tests.golden.golden_case import GOLDEN_DIR, official_state_dict
from tests.golden.test_codetr_collaborative import (
    assert_every_loss_and_the_total_match,
    assert_every_matcher_call_matches,
    collaborative_options,
    recording,
)

CASE = GOLDEN_DIR / "codetr" / "co_deformable_detr_r18.json"
OUTPUT_TOL = dict(atol=1e-4, rtol=1e-4)


class Step:
    """One training forward of the case with the tape replayed, and what it saw."""

    def __init__(self) -> None:
        if not CASE.exists() or not CASE.with_suffix(".safetensors").exists():
            pytest.skip(f"golden case {CASE.name} is absent")
        case = CodetrCase.load(CASE)
        mmdet = case.spec["config"]["model"]
        schemes = dict(case.config.schemes)
        options = replace(collaborative_options(mmdet), positive_query="deformable")
        schemes["collaborative"] = options
        self.config = replace(case.config, schemes=SchemeSettings(schemes))
        state = official_state_dict(case.spec, CASE.parent)
        self.conversion = convert_codetr(state, mmdet, with_collaborative=True)
        torch.manual_seed(0)
        model = build_model(self.config)
        model.load_state_dict(self.conversion.state_dict, strict=True)
        self.case, self.model = case, model
        self.selections, self.decoder_inputs = [], []
        self.output = self._run()

    def _draws(self) -> list[torch.Tensor]:
        calls = self.case.spec["runs"]["f32"]["rng_calls"]
        assert all(c["context"] != "dn" for c in calls)
        return [self.case.tensors[f"train.f32.{c['tensor']}"] for c in calls]

    def _run(self):
        model = self.model
        collab = model.schemes["collaborative"]
        collab.random = ReplayedDraws(self._draws())
        try:
            with recording(model, self.selections, self.decoder_inputs):
                output = model(self.case.batch(), self.case.targets())
            self.remaining = collab.random.remaining
        finally:
            collab.random = RandomSource()
        return output


@pytest.fixture(scope="module")
def step() -> Step:
    return Step()


def test_conversion_keeps_every_key(step: Step):
    """Only the backbone's BatchNorm step counters are dropped (frozen BN keeps none)."""
    conversion = step.conversion
    assert conversion.clean, conversion.describe()
    assert all(k.endswith("num_batches_tracked") for k in conversion.dropped), conversion.dropped
    head_pos = step.model.schemes["collaborative"].head_pos_embed.weight
    assert head_pos.shape == (2, 1)


def test_the_whole_tape_is_used(step: Step):
    assert step.remaining == 0


def candidates_equal(step: Step, head: int, image: int, found) -> torch.Tensor:
    """Head ``head``'s candidates of ``image`` equal the recorded ones; for the RoI head (0),
    a background RoI may be the other of two RPN proposals whose scores tie within float
    rounding (the sampler's recorded draws then index the other one). Returns the [N] mask of
    such rows."""
    cand = f"train.f32.aux{head}.cand.{image}"
    tensors = step.case.tensors
    ours = found.coords[image].detach()
    if head == 0:
        proposals = tensors[f"train.f32.rpn.proposals.{image}"]
        swapped = assert_boxes_equal_up_to_tied_proposals(
            ours, tensors[f"{cand}.coords"], proposals, atol=1e-3
        )
    else:
        torch.testing.assert_close(ours, tensors[f"{cand}.coords"], rtol=1e-5, atol=1e-3)
        swapped = torch.zeros(len(ours), dtype=torch.bool)
    background = found.labels[image] == found.labels[image].max()
    assert bool(background[swapped].all()), "only background candidates may differ"
    assert int(swapped.sum()) <= 2
    kept = ~swapped
    torch.testing.assert_close(
        found.targets[image][kept], tensors[f"{cand}.targets"][kept], rtol=1e-5, atol=1e-3
    )
    return swapped


def test_candidates_selection_and_features_match_recording(step: Step):
    tensors = step.case.tensors
    assert len(step.selections) == 2
    for head, (found, chosen) in enumerate(step.selections):
        prefix = f"train.f32.aux{head}"
        for image in range(len(found.coords)):
            assert torch.equal(chosen.selected[image], tensors[f"{prefix}.selected.{image}"])
            cand = f"{prefix}.cand.{image}"
            assert torch.equal(found.labels[image], tensors[f"{cand}.labels"])
            swapped = candidates_equal(step, head, image, found)
            # A swapped candidate is a background RoI; the query built from it differs too.
            unchanged = ~swapped[chosen.selected[image]]
            for name in ("coords", "targets", "features"):
                ours = getattr(chosen, name)[image].detach()[unchanged]
                recorded = tensors[f"{prefix}.{'feats' if name == 'features' else name}"][image]
                torch.testing.assert_close(ours, recorded[unchanged], **OUTPUT_TOL)
        assert torch.equal(chosen.labels, tensors[f"{prefix}.labels"])
        positive = torch.zeros_like(chosen.labels, dtype=torch.bool)
        for image, count in enumerate(chosen.num_positive):
            positive[image, :count] = True
        bbox_weights = tensors[f"{prefix}.bbox_weights"]
        assert torch.equal(bbox_weights, positive[..., None].float().expand_as(bbox_weights))
        assert torch.equal(tensors[f"{prefix}.label_weights"], torch.ones_like(positive).float())


def test_positive_query_passes_match_recording(step: Step):
    tensors = step.case.tensors
    passes = step.decoder_inputs[1:]
    assert [p.groups[0].name for p in passes] == ["aux0", "aux1"]
    for head, queries in enumerate(passes):
        prefix = f"train.f32.aux{head}"
        ours = {
            "dec_in.query": queries.content,
            "dec_in.query_pos": queries.pos,
            "dec_in.reference_points": queries.reference,
        }
        group = step.output.group(f"aux{head}")
        assert not group.at_inference
        ours |= {"out.cls_scores": group.logits, "out.bbox_preds": group.boxes}
        for name, value in ours.items():
            torch.testing.assert_close(
                value.detach(),
                tensors[f"{prefix}.{name}"],
                **OUTPUT_TOL,
                msg=lambda m, n=f"{prefix}.{name}": f"{n}: {m}",
            )


def test_every_loss_and_the_total_match_recording(step: Step):
    assert_every_loss_and_the_total_match(step, 48)


def test_every_matcher_call_matches_recording(step: Step):
    assert_every_matcher_call_matches(step)
