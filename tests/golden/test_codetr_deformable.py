# SPDX-License-Identifier: Apache-2.0
"""Golden conformance of the Co-Deformable-DETR cases (``cases/codetr``, mmdetection layout)
at inference: detrkit's two-stage Deformable DETR (box refinement, mixed selection,
look-forward-twice) built from each case's mmdet ``config.model``, the case's weights through
the Co-DETR converter, the case's inputs; the collaborative auxiliary heads are left out (they
only train).

Compared here, beyond what ``test_codetr_eval.py`` checks for every Co-DETR case: the model's
parts, the decoder's inputs, states and references, the neck and encoder maps, the content
queries, and the one-to-one losses of the eval outputs (the class-agnostic encoder proposals
and every decoder layer, sigmoid focal + L1 + GIoU): the recorded training outputs are bitwise
those of the eval.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detrkit.config.build import build_criterion
from detrkit.structures import DetectorOutput
from tests.golden.codetr_case import CodetrCase, assert_pairs, codetr_cases, official_loss_name

OUTPUT_TOL = dict(atol=1e-4, rtol=1e-4)
LOSS_TOL = dict(atol=0.0, rtol=1e-5)


@pytest.fixture(scope="module", params=codetr_cases(dino=False))
def case(request) -> CodetrCase:
    path: Path = request.param
    return CodetrCase.load(path)


def test_the_model_is_two_stage_deformable_detr(case: CodetrCase):
    config = case.config
    assert config.queries.kind == "two_stage" and config.queries.mixed_selection
    assert config.box_refine == "look_forward_twice"
    assert config.decoder.query_pos == "constant" and not config.decoder.output_norm
    assert config.loss.class_loss == "sigmoid_focal" and config.soft_nms is None
    assert not case.model.schemes


def test_eval_intermediates(case: CodetrCase):
    # topk, hs, init / inter references, the decoder's positions and references, memory,
    # and every neck level.
    levels = case.config.num_feature_levels
    assert assert_pairs(case.mid_pairs("f32"), OUTPUT_TOL) == 7 + levels


def test_content_queries_are_the_learned_table(case: CodetrCase):
    queries = case.run("f32").queries
    table = case.model.queries.query_embed.weight[: case.config.num_queries]
    assert torch.equal(queries.content, table.expand_as(queries.content))


def test_one_to_one_losses_of_the_eval_outputs(case: CodetrCase):
    assert all(case.spec["runs"]["f32"]["train_outputs_bitwise_equal_to_eval"].values())
    criterion = build_criterion(case.config)
    output = case.run("f32").output
    losses = criterion(DetectorOutput([output.group("main"), output.group("enc")]), case.targets())
    recorded = case.spec["runs"]["f32"]["losses"]
    compared = 0
    for official, value in recorded.items():
        name = official_loss_name(official, case.config.decoder.num_layers)
        if name is None:  # the auxiliary heads' losses
            continue
        # mmdet reports weighted values; detrkit's terms are unweighted.
        got = losses.terms[name].detach() * losses.weights[name]
        want = torch.tensor(value, dtype=torch.float32)
        torch.testing.assert_close(got, want, **LOSS_TOL, msg=lambda m, o=official: f"{o}: {m}")
        compared += 1
    assert compared == 3 * (case.config.decoder.num_layers + 1)
