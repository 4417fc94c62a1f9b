# SPDX-License-Identifier: Apache-2.0
"""Golden conformance of the Co-DINO cases (``cases/codetr``) through detrkit's DINO, beyond
what ``test_codetr_eval.py`` checks for every Co-DETR case: the decoder states and references,
the neck and encoder maps, and the one-to-one losses (encoder proposals and every decoder layer,
quality focal + L1 + GIoU) of the eval outputs (the matching queries never see the denoising
ones, so their training outputs equal the eval ones to ~3e-6); then the training step with the
recorded denoising draws replayed: the denoising queries, attention mask and decoder inputs,
the training outputs (denoising queries first, as recorded) and every query-head loss (encoder,
decoder layers, denoising). The auxiliary heads are in ``test_codetr_collaborative.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detrkit.config.build import build_criterion
from detrkit.losses.quality_focal import QualityFocalTerm
from detrkit.structures import DetectorOutput
from tests.golden.codetr_case import CodetrCase, assert_pairs, codetr_cases, official_loss_name

OUTPUT_TOL = dict(atol=1e-4, rtol=1e-4)
LOSS_TOL = dict(atol=0.0, rtol=1e-5)


@pytest.fixture(scope="module", params=codetr_cases(dino=True))
def case(request) -> CodetrCase:
    path: Path = request.param
    return CodetrCase.load(path)


def test_eval_intermediates(case: CodetrCase):
    assert assert_pairs(case.mid_pairs("f32"), OUTPUT_TOL) >= 6


def test_one_to_one_losses_of_the_eval_outputs(case: CodetrCase):
    criterion = build_criterion(case.config)
    if not isinstance(criterion.terms["cls"], QualityFocalTerm):
        # Until build_criterion builds model.loss.class_loss=quality_focal itself.
        criterion.terms["cls"] = QualityFocalTerm(case.config.loss.quality_beta)
    output = case.run("f32").output
    groups = [output.group("main"), output.group("enc")]
    losses = criterion(DetectorOutput(groups), case.targets())
    recorded = case.spec["runs"]["f32"]["losses"]
    compared = 0
    for official, value in recorded.items():
        name = official_loss_name(official, case.config.decoder.num_layers)
        if name is None or name.startswith("dn/"):  # the eval pass decodes no denoising
            continue
        # mmdet reports weighted values; detrkit's terms are unweighted.
        got = losses.terms[name].detach() * losses.weights[name]
        want = torch.tensor(value, dtype=torch.float32)
        torch.testing.assert_close(got, want, **LOSS_TOL, msg=lambda m, o=official: f"{o}: {m}")
        compared += 1
    assert compared == 3 * (case.config.decoder.num_layers + 1)


# ---------------------------------------------------------------- training step (denoising)

DN_CONTEXT = "dn"


def _dn_draws(case: CodetrCase) -> list[torch.Tensor]:
    """The recorded draws of the denoising generator, in call order."""
    calls = [c for c in case.spec["runs"]["f32"]["rng_calls"] if c["context"] == DN_CONTEXT]
    return [case.tensors[f"train.f32.{call['tensor']}"] for call in calls]


@pytest.fixture(scope="module")
def training(case: CodetrCase):
    """One training forward of the case with the recorded denoising draws replayed, the
    decoder's input captured."""
    from detrkit.schemes.randomness import RandomSource, ReplayedDraws

    model = case.model
    scheme = model.schemes["denoising"]
    replay = ReplayedDraws(_dn_draws(case))
    scheme.random = replay
    captured = {}

    def capture(module, args, output):
        captured.setdefault("queries", args[0])

    hook = model.decoder.register_forward_hook(capture)
    try:
        model.train()
        output = model(case.batch(), case.targets())
    finally:
        hook.remove()
        model.eval()
        scheme.random = RandomSource()
    assert replay.remaining == 0, "the step drew fewer numbers than the reference"
    return output, captured["queries"]


def _dn_span(queries):
    return next(g for g in queries.groups if g.name == "dn")


def test_denoising_queries_from_the_replayed_draws(case: CodetrCase, training):
    output, queries = training
    span = _dn_span(queries)
    pad = case.spec["runs"]["f32"]["dn_meta"]["pad_size"]
    assert span.stop - span.start == pad
    recorded_mask = case.tensors["train.f32.dn.attn_mask"].bool()
    # ours keeps the matching queries first and appends the denoising ones: reorder to compare
    order = torch.cat((torch.arange(span.start, span.stop), torch.arange(0, span.start)))
    ours_mask = queries.self_attn_mask[order][:, order]
    assert torch.equal(ours_mask, recorded_mask)
    references = queries.reference[:, span.start : span.stop]
    recorded = torch.sigmoid(case.tensors["train.f32.dn.bbox_query"])
    torch.testing.assert_close(references, recorded, **OUTPUT_TOL)
    content = queries.content[:, span.start : span.stop]
    torch.testing.assert_close(content, case.tensors["train.f32.dn.label_query"], **OUTPUT_TOL)
    main_in = case.tensors["train.f32.dec_in.main.reference_points"]
    torch.testing.assert_close(queries.reference[:, order], main_in, **OUTPUT_TOL)


def test_training_outputs_dn_first_as_recorded(case: CodetrCase, training):
    output, _ = training
    dn, main = output.group("dn"), output.group("main")
    compared = 0
    for name, ours in (("cls_scores", "logits"), ("bbox_preds", "boxes")):
        key = f"train.f32.out.{name}"
        if key not in case.tensors:
            continue
        recorded = case.tensors[key]
        together = torch.cat((getattr(dn, ours), getattr(main, ours)), 2).detach()
        torch.testing.assert_close(together, recorded, **OUTPUT_TOL)
        compared += 1
    assert compared == 2


def test_training_losses_with_the_replayed_draws(case: CodetrCase, training):
    output, _ = training
    criterion = build_criterion(case.config)
    losses = criterion(output, case.targets())
    recorded = case.spec["runs"]["f32"]["losses"]
    compared = {"main": 0, "enc": 0, "dn": 0}
    for official, value in recorded.items():
        name = official_loss_name(official, case.config.decoder.num_layers)
        if name is None:
            continue
        got = losses.terms[name].detach() * losses.weights[name]
        want = torch.tensor(value, dtype=torch.float32)
        torch.testing.assert_close(
            got, want, atol=0.0, rtol=1e-4, msg=lambda m, o=official: f"{o}: {m}"
        )
        compared[name.split("/")[0]] += 1
    layers = case.config.decoder.num_layers
    assert compared == {"main": 3 * layers, "enc": 3, "dn": 3 * layers}
