# SPDX-License-Identifier: Apache-2.0
"""Golden conformance of every Co-DETR case (``cases/codetr``, mmdetection layout) at
inference, whatever its query head: detrkit's model built from the case's mmdet
``config.model``, the case's weights through the Co-DETR converter, the case's inputs; the
collaborative auxiliary heads are left out (they only train).

Compared here: the weights' checksums, what the converter drops, every query-head output of
the float32 eval, the two-stage selection (exactly), the post-processing (indices and labels
exactly), the float64 eval, and that every recorded eval tensor is compared. What only one
head has is checked in ``test_codetr_dino.py`` (Co-DINO: denoising and its training step) and
``test_codetr_deformable.py`` (Co-Deformable-DETR).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.golden.codetr_case import CodetrCase, assert_pairs, codetr_cases
from tests.golden.golden_case import GOLDEN_DIR, list_cases, official_state_dict

OUTPUT_TOL = dict(atol=1e-4, rtol=1e-4)
# The float64 eval agrees with float32 to ~1e-6; ours to the f64 record to well under this.
F64_TOL = dict(atol=1e-5, rtol=1e-5)
# Recorded tensors of the auxiliary (collaborative) heads, not part of the query head.
AUXILIARY_ONLY = ("eval.f32.mid.x_enc.",)
# What the converter may drop: the auxiliary heads, their query projections and positions.
AUXILIARY_KEYS = ("rpn_head.", "roi_head.", "bbox_head.", "query_head.downsample.")
AUXILIARY_PARTS = (".aux_pos_trans", ".pos_feats_trans.", ".pos_feats_norm.", ".head_pos_embed.")


@pytest.fixture(scope="module", params=codetr_cases())
def case(request) -> CodetrCase:
    path: Path = request.param
    return CodetrCase.load(path)


def test_golden_dir_has_codetr_cases():
    assert any(p.parent.name == "codetr" for p in list_cases()), f"none in {GOLDEN_DIR}/codetr"


def test_weights_match_checksums(case: CodetrCase):
    state = official_state_dict(case.spec, case.path.parent)
    compared = 0
    for entry in case.spec["state_dict"]:
        if "checksum" in entry and entry["dtype"].startswith("float"):
            value = state[entry["key"]].double()
            got = torch.tensor([value.sum().item(), value.abs().sum().item()], dtype=torch.float64)
            want = torch.tensor(entry["checksum"], dtype=torch.float64)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            compared += 1
    assert compared > 0


def test_conversion_drops_only_the_auxiliary_heads(case: CodetrCase):
    conversion = case.conversion
    assert conversion.clean, conversion.describe()
    for key in conversion.dropped:
        assert (
            key.startswith(AUXILIARY_KEYS)
            or any(part in key for part in AUXILIARY_PARTS)
            or key.endswith("num_batches_tracked")
        ), f"dropped a key the model needs: {key}"
    assert not set(case.model.state_dict()) ^ set(conversion.state_dict)


def test_eval_outputs(case: CodetrCase):
    assert assert_pairs(case.output_pairs("f32"), OUTPUT_TOL) == 4


def test_two_stage_selection_is_exact(case: CodetrCase):
    for precision in ("f32", "f64"):
        name = f"eval.{precision}.mid.topk_proposals"
        assert torch.equal(case.run(precision).top, case.tensors[name]), name


def test_postprocess(case: CodetrCase):
    pairs = case.post_pairs("f32")
    recorded = {n for n in case.tensors if n.startswith(("eval.f32.post.", "eval.f32.result."))}
    assert recorded and set(pairs) == recorded, sorted(recorded ^ set(pairs))
    assert_pairs(pairs, OUTPUT_TOL)


def test_float64_eval(case: CodetrCase):
    pairs = case.output_pairs("f64") | case.mid_pairs("f64") | case.post_pairs("f64")
    recorded = {n for n in case.tensors if n.startswith("eval.f64.")}
    assert set(pairs) == recorded, sorted(recorded ^ set(pairs))
    assert_pairs(pairs, F64_TOL)


def test_every_recorded_eval_tensor_is_compared(case: CodetrCase):
    compared = set(case.output_pairs("f32")) | set(case.mid_pairs("f32"))
    compared |= set(case.post_pairs("f32")) | set(case.output_pairs("f64"))
    compared |= set(case.mid_pairs("f64")) | set(case.post_pairs("f64"))
    recorded = {name for name in case.tensors if name.startswith("eval.")}
    left = {name for name in recorded - compared if not name.startswith(AUXILIARY_ONLY)}
    assert not left, sorted(left)
