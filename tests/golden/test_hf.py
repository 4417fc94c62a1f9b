# SPDX-License-Identifier: Apache-2.0
"""Golden conformance of every Hugging Face transformers case (``cases/hf``) through detrkit's
transformers importer and exporter.

Each case's weights are regenerated with its folder's ``refgen.py`` under transformers' key names
and written, with the case's ``config``, as a ``save_pretrained``-style folder (tied head copies
left out, as transformers saves them); ``detrkit convert --from transformers``'s function turns
it into a detrkit checkpoint, which runs the case's inputs (``../inputs.safetensors``). Compared:
the weights' checksums, that every tensor of the file is used, the eval and training outputs,
the post-processed detections, the loss terms and total, the export -> import round trip
(bit-exact) and, with transformers installed, the exported folder run by transformers itself.
Each test asserts that it compared something (docs/golden.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from detrkit.config.build import build_criterion, build_postprocess
from detrkit.convert.official_names import official_loss, official_output
from detrkit.convert.transformers import (
    TransformersConversion,
    convert_transformers_checkpoint,
)
from detrkit.export.transformers import export_transformers
from detrkit.inference import LoadedModel, load_model
from detrkit.structures import DetectorOutput, ImageBatch, Target
from tests.golden.golden_case import (
    GOLDEN_DIR,
    case_format,
    case_id,
    inputs_batch,
    list_cases,
    official_state_dict,
)

# Outputs: largest difference relative to the largest recorded magnitude (the recording's own
# cross-check against the official model is below 1e-6 on this measure).
OUTPUT_RTOL = 1e-5
LOSS_TOL = dict(atol=0.0, rtol=1e-5)
# Logged metrics of transformers' loss dict that carry no weight in the total.
LOGGED_ONLY = "cardinality_error"


def hf_cases() -> list[Path]:
    return [p for p in list_cases() if case_format(json.loads(p.read_text())).name == "hf"]


def assert_relative(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> float:
    """max |ours - theirs| <= OUTPUT_RTOL * max |theirs|; returns the relative difference."""
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    scale = theirs.abs().max().clamp_min(1e-12)
    relative = float((ours.double() - theirs.double()).abs().max() / scale)
    assert relative <= OUTPUT_RTOL, f"{name}: max difference {relative:.3g} of max |recorded|"
    return relative


@dataclass
class HfCase:
    """One transformers case converted by detrkit's importer.

    Attributes:
        path: the case json.
        spec: its contents.
        tensors: the recorded tensors.
        inputs: the folder's (or the parent folder's) inputs.
        hf_state: the regenerated weights under transformers' names (aliases resolved).
        folder: the written transformers folder.
        loaded: the converted detrkit checkpoint, loaded.
        conversion: the importer's report.
    """

    path: Path
    spec: dict
    tensors: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    hf_state: dict[str, torch.Tensor]
    folder: Path
    loaded: LoadedModel
    conversion: TransformersConversion

    @classmethod
    def load(cls, path: Path, work: Path) -> HfCase:
        spec = json.loads(path.read_text())
        state = official_state_dict(spec, path.parent)
        aliases = {entry["key"] for entry in spec["state_dict"] if "alias_of" in entry}
        folder = work / "transformers"
        folder.mkdir()
        # Tied copies are absent from a save_pretrained file; the importer re-ties them.
        written = {k: v.contiguous() for k, v in state.items() if k not in aliases}
        save_file(written, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(spec["config"]))
        conversion = convert_transformers_checkpoint(folder, work / "converted.safetensors")
        loaded = load_model(work / "converted.safetensors")
        return cls(
            path,
            spec,
            load_file(str(path.with_suffix(".safetensors"))),
            load_file(str(_inputs_path(path))),
            state,
            folder,
            loaded,
            conversion,
        )

    @property
    def num_layers(self) -> int:
        return self.loaded.config.model.decoder.num_layers

    def batch(self) -> ImageBatch:
        return inputs_batch(self.inputs)

    def targets(self) -> list[Target]:
        count = len([k for k in self.inputs if k.startswith("image.")])
        return [
            Target(self.inputs[f"target.{i}.labels"], self.inputs[f"target.{i}.boxes"], image_id=i)
            for i in range(count)
        ]

    def eval_output(self) -> DetectorOutput:
        self.loaded.model.eval()
        with torch.no_grad():
            return self.loaded.model(self.batch())

    def output_pairs(self, output: DetectorOutput) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every recorded ``eval.f32.out.*`` tensor with ours (transformers' output names are
        the official ones: ``pred_logits``, ``aux_outputs.{l}.pred_boxes``...)."""
        pairs = {}
        for name, recorded in self.tensors.items():
            if name.startswith("eval.f32.out."):
                ref = official_output(name[len("eval.f32.out.") :], self.num_layers)
                assert ref is not None, f"unmapped output {name}"
                ours = getattr(output.group(ref.group), ref.field)[ref.layer].detach()
                pairs[name] = (ours, recorded)
        return pairs


def _inputs_path(path: Path) -> Path:
    """The case folder's inputs, else the parent folder's (``cases/hf`` uses ``../inputs``)."""
    for folder in (path.parent, path.parent.parent):
        if (folder / "inputs.safetensors").is_file():
            return folder / "inputs.safetensors"
    raise FileNotFoundError(f"no inputs.safetensors beside {path} or in its parent folder")


@pytest.fixture(scope="module", params=hf_cases(), ids=case_id)
def case(request, tmp_path_factory) -> HfCase:
    return HfCase.load(request.param, tmp_path_factory.mktemp("hf"))


def test_golden_dir_has_hf_cases():
    assert hf_cases(), f"no transformers case in {GOLDEN_DIR} or below"


def test_weights_match_checksums(case: HfCase):
    compared = 0
    for entry in case.spec["state_dict"]:
        if "checksum" in entry and entry["dtype"].startswith("float"):
            value = case.hf_state[entry["key"]].double()
            got = torch.tensor([value.sum().item(), value.abs().sum().item()], dtype=torch.float64)
            want = torch.tensor(entry["checksum"], dtype=torch.float64)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            compared += 1
    assert compared > 0


def test_conversion_uses_every_tensor(case: HfCase):
    written = set(load_file(str(case.folder / "model.safetensors")))
    assert case.conversion.used == written, sorted(written ^ case.conversion.used)[:10]
    assert set(case.conversion.state_dict) == set(case.loaded.model.state_dict())


def test_eval_outputs(case: HfCase):
    pairs = case.output_pairs(case.eval_output())
    for name, (ours, theirs) in pairs.items():
        assert_relative(ours, theirs, name)
    assert "eval.f32.out.pred_logits" in pairs and "eval.f32.out.pred_boxes" in pairs


def test_train_outputs(case: HfCase):
    """Training mode changes nothing here (dropout 0, frozen BatchNorm): the recorded
    train-mode auxiliary outputs are the eval ones."""
    case.loaded.model.train()
    output = case.loaded.model(case.batch(), case.targets())
    case.loaded.model.eval()
    pairs = case.output_pairs(output)
    for name, (ours, theirs) in pairs.items():
        assert_relative(ours, theirs, f"train {name}")
    assert pairs


def test_postprocess(case: HfCase):
    inference = case.eval_output().for_inference()
    model_config = case.loaded.config.model
    detections = build_postprocess(model_config)(inference, case.inputs["orig_sizes"])
    compared = set()
    for image, found in enumerate(detections):
        prefix = f"eval.f32.post.{image}"
        ours = {"scores": found.scores, "labels": found.labels, "boxes": found.boxes_xyxy}
        for key, value in ours.items():
            recorded = case.tensors[f"{prefix}.{key}"]
            if key == "labels":
                assert torch.equal(value, recorded), f"{prefix}.labels"
            else:
                assert_relative(value, recorded, f"{prefix}.{key}")
            compared.add(f"{prefix}.{key}")
    recorded = {name for name in case.tensors if name.startswith("eval.f32.post.")}
    assert compared == recorded and recorded, sorted(recorded ^ compared)


def test_train_losses(case: HfCase):
    model = case.loaded.model.train()
    output = model(case.batch(), case.targets())
    losses = build_criterion(case.loaded.config.model)(output, case.targets())
    model.eval()
    compared = 0
    for name, value in case.spec["losses"].items():
        if name.startswith(LOGGED_ONLY):
            continue
        term = official_loss(name, case.num_layers)
        assert term is not None and term in losses.terms, f"{name} has no detrkit term"
        want = torch.tensor(value, dtype=torch.float32)
        torch.testing.assert_close(losses.terms[term].detach(), want, **LOSS_TOL, msg=name)
        compared += 1
    assert compared > 0
    total = torch.tensor(case.spec["total_loss"], dtype=torch.float32)
    torch.testing.assert_close(losses.total.detach(), total, **LOSS_TOL)


def test_export_round_trip_is_bit_exact(case: HfCase, tmp_path):
    pytest.importorskip("transformers", reason="exporting needs transformers")
    export_transformers(case.loaded, tmp_path / "exported")
    convert_transformers_checkpoint(tmp_path / "exported", tmp_path / "back.safetensors")
    back = load_model(tmp_path / "back.safetensors")
    ours, theirs = case.loaded.model.state_dict(), back.model.state_dict()
    assert set(ours) == set(theirs)
    changed = [key for key in ours if not torch.equal(ours[key], theirs[key])]
    assert not changed, changed[:10]
    assert back.label_map == case.loaded.label_map
    assert back.config == case.loaded.config


def test_export_runs_in_transformers(case: HfCase, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    report = export_transformers(case.loaded, tmp_path / "exported")
    model_class = getattr(transformers, report.architecture)
    model, info = model_class.from_pretrained(tmp_path / "exported", output_loading_info=True)
    assert not any(info.values()), info
    batch = case.batch()
    with torch.no_grad():
        theirs = model.eval()(pixel_values=batch.pixels, pixel_mask=(~batch.padding_mask).long())
    main = case.eval_output().group("main")
    assert_relative(theirs.logits, main.logits[-1], "transformers logits vs detrkit")
    assert_relative(theirs.pred_boxes, main.boxes[-1], "transformers boxes vs detrkit")
    assert_relative(theirs.logits, case.tensors["eval.f32.out.pred_logits"], "vs recorded")
