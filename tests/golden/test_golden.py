# SPDX-License-Identifier: Apache-2.0
"""Golden conformance: every case in the golden folder, reproduced through the converter.

The folder is ``tests/golden/cases`` or ``$DETRKIT_GOLDEN_DIR``, subfolders included. Generic
over case files: the model comes from the case's official ``args``, the weights from its own
folder's ``refgen.py`` under official key names, the inputs from that folder's inputs file.
Each test asserts that it compared something, so a case that records nothing fails
(docs/golden.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.golden.golden_case import GOLDEN_DIR, GoldenCase, case_id, list_cases

OUTPUT_TOL = dict(atol=1e-4, rtol=1e-4)
LOSS_TOL = dict(atol=0.0, rtol=1e-5)


@pytest.fixture(scope="module", params=list_cases(), ids=case_id)
def case(request) -> GoldenCase:
    path: Path = request.param
    loaded = GoldenCase.load(path)
    if loaded.source is None:
        pytest.skip(f"{case_id(path)}: {loaded.unsupported}")
    return loaded


def test_golden_dir_has_cases():
    chosen = "DETRKIT_GOLDEN_DIR" if os.environ.get("DETRKIT_GOLDEN_DIR") else "the default"
    where = f"{GOLDEN_DIR} ({chosen})"
    assert GOLDEN_DIR.is_dir(), f"golden folder {where} does not exist"
    assert list_cases(), f"no golden case (*.json besides inputs.json) in {where} or below"


def test_weights_match_checksums(case: GoldenCase):
    compared = 0
    for entry in case.spec["state_dict"]:
        if "checksum" in entry and entry["dtype"].startswith("float"):
            value = case.official_state[entry["key"]].double()
            got = torch.tensor([value.sum().item(), value.abs().sum().item()], dtype=torch.float64)
            want = torch.tensor(entry["checksum"], dtype=torch.float64)
            torch.testing.assert_close(
                got, want, rtol=1e-6, atol=1e-6, msg=lambda m, k=entry["key"]: f"{k}: {m}"
            )
            compared += 1
    assert compared > 0, "the case records no float checksum"


def test_conversion_is_complete(case: GoldenCase):
    assert case.conversion.clean, case.conversion.describe()
    assert case.conversion.state_dict, "nothing was converted"


def test_eval_outputs(case: GoldenCase):
    compared = 0
    for name, (ours, theirs) in case.eval_output_pairs().items():
        torch.testing.assert_close(ours, theirs, **OUTPUT_TOL, msg=lambda m, n=name: f"{n}: {m}")
        compared += 1
    assert compared > 0


def test_train_outputs(case: GoldenCase):
    compared = 0
    for name, (ours, theirs) in case.train_output_pairs().items():
        torch.testing.assert_close(ours, theirs, **OUTPUT_TOL, msg=lambda m, n=name: f"{n}: {m}")
        compared += 1
    assert compared > 0, "the case records no training output"


def test_postprocess(case: GoldenCase):
    pairs = case.postprocess_pairs()
    recorded = {name for name in case.tensors if name.startswith("eval.f32.post.")}
    assert recorded, "the case records no postprocessed detections"
    assert set(pairs) == recorded, f"recorded but not compared: {sorted(recorded - set(pairs))}"
    for name, (ours, theirs) in pairs.items():
        if ours.dtype == torch.int64:
            torch.testing.assert_close(ours, theirs, msg=lambda m, n=name: f"{n}: {m}")
        else:
            torch.testing.assert_close(
                ours, theirs, **OUTPUT_TOL, msg=lambda m, n=name: f"{n}: {m}"
            )


def test_train_losses(case: GoldenCase):
    terms, total = case.train_losses()
    recorded = case.spec["runs"]["f32"]["losses"]
    # Only logged metrics (class_error, cardinality_error...) may lack a detrkit term.
    logged_only = set(case.spec["runs"]["f32"].get("loss_keys_without_weight", ()))
    unmapped = set(recorded) - set(case.loss_names()) - logged_only
    assert not unmapped, f"weighted official losses without a detrkit term: {sorted(unmapped)}"
    compared = 0
    for official, detrkit_name in case.loss_names().items():
        got = terms[detrkit_name].detach()
        want = torch.tensor(recorded[official], dtype=torch.float32)
        torch.testing.assert_close(got, want, **LOSS_TOL, msg=lambda m, o=official: f"{o}: {m}")
        compared += 1
    assert compared > 0
    want_total = torch.tensor(case.spec["runs"]["f32"]["total_loss"], dtype=torch.float32)
    torch.testing.assert_close(total.detach(), want_total, **LOSS_TOL)


def test_matcher_calls(case: GoldenCase):
    calls = case.spec["runs"]["f32"]["matcher_calls"]
    checked = 0
    for call in calls:
        result = case.match(call)
        assert result is not None, f"matcher call on unmapped output {call['path']}"
        for image, (src, tgt, cost, identity) in enumerate(result):
            prefix = f"train.f32.match.{call['tensors'].split('.')[-1]}.{image}"
            torch.testing.assert_close(cost, case.tensors[f"{prefix}.cost"], **OUTPUT_TOL)
            assert torch.equal(src, case.tensors[f"{prefix}.src"]), f"{prefix}.src"
            recorded_tgt = case.tensors[f"{prefix}.tgt"]
            recorded_identity = identity[recorded_tgt] if len(recorded_tgt) else recorded_tgt
            assert torch.equal(tgt, recorded_identity), f"{prefix}.tgt"
            checked += 1
    assert checked > 0, json.dumps(calls)[:200]
