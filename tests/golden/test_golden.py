# SPDX-License-Identifier: Apache-2.0
"""Golden conformance: every case in $DETRKIT_GOLDEN_DIR, reproduced through the converter.

Generic over case files: the model comes from the case's official ``args``, the weights from the
golden folder's ``refgen.py`` under official key names, the inputs from ``inputs.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.golden.golden_case import GOLDEN_DIR, GoldenCase, list_cases

OUTPUT_TOL = dict(atol=1e-4, rtol=1e-4)
LOSS_TOL = dict(atol=0.0, rtol=1e-5)


@pytest.fixture(scope="module", params=list_cases(), ids=lambda p: p.stem)
def case(request) -> GoldenCase:
    path: Path = request.param
    loaded = GoldenCase.load(path)
    if loaded.source is None:
        unsupported_repo = f"repo '{loaded.spec['repo']}' is not supported by detrkit yet"
        reason = loaded.unsupported or unsupported_repo
        pytest.skip(f"{path.name}: {reason}")
    return loaded


def test_golden_dir_has_cases():
    assert GOLDEN_DIR.is_dir(), f"golden folder {GOLDEN_DIR} missing (set DETRKIT_GOLDEN_DIR)"
    assert list_cases(), f"no golden cases in {GOLDEN_DIR}"


def test_weights_match_checksums(case: GoldenCase):
    for entry in case.spec["state_dict"]:
        if "checksum" in entry and entry["dtype"].startswith("float"):
            value = case.official_state[entry["key"]].double()
            got = torch.tensor([value.sum().item(), value.abs().sum().item()], dtype=torch.float64)
            want = torch.tensor(entry["checksum"], dtype=torch.float64)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_conversion_is_complete(case: GoldenCase):
    assert case.conversion.clean, case.conversion.describe()


def test_eval_outputs(case: GoldenCase):
    compared = 0
    for name, (ours, theirs) in case.eval_output_pairs().items():
        torch.testing.assert_close(ours, theirs, **OUTPUT_TOL, msg=lambda m, n=name: f"{n}: {m}")
        compared += 1
    assert compared > 0


def test_train_outputs(case: GoldenCase):
    for name, (ours, theirs) in case.train_output_pairs().items():
        torch.testing.assert_close(ours, theirs, **OUTPUT_TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_postprocess(case: GoldenCase):
    pairs = case.postprocess_pairs()
    assert pairs
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
        if result is None:
            continue
        for image, (src, tgt, cost, identity) in enumerate(result):
            prefix = f"train.f32.match.{call['tensors'].split('.')[-1]}.{image}"
            torch.testing.assert_close(cost, case.tensors[f"{prefix}.cost"], **OUTPUT_TOL)
            assert torch.equal(src, case.tensors[f"{prefix}.src"]), f"{prefix}.src"
            recorded_tgt = case.tensors[f"{prefix}.tgt"]
            recorded_identity = identity[recorded_tgt] if len(recorded_tgt) else recorded_tgt
            assert torch.equal(tgt, recorded_identity), f"{prefix}.tgt"
            checked += 1
    assert checked > 0, json.dumps(calls)[:200]
