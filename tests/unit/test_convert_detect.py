# SPDX-License-Identifier: Apache-2.0
"""Which family an official checkpoint is, and the class count read from its head."""

import json

import pytest
import torch

from detrkit.cli.__main__ import main
from detrkit.convert.detect import detect_signature
from detrkit.convert.sources import SOURCES, source_for_repo
from detrkit.data.collate import pad_images
from detrkit.inference import load_model
from tests.golden.golden_case import list_cases
from tests.unit.test_coco2017_labels import official_pth


def _official_specs() -> list:
    found = []
    for path in list_cases():
        spec = json.loads(path.read_text())
        if "state_dict" in spec and "args" in spec and source_for_repo(spec.get("repo", "")):
            found.append(pytest.param(spec, id=path.stem))
    return found or [pytest.param(None, marks=pytest.mark.skip(reason="no golden cases"))]


@pytest.mark.parametrize("spec", _official_specs())
def test_every_golden_layout_is_recognised_as_its_own_family(spec):
    keys = tuple(entry["key"] for entry in spec["state_dict"])
    found = detect_signature(keys, spec["args"])
    own = source_for_repo(spec["repo"]).name
    assert found is not None and own in found.compatible
    # Each family's signature rules out the families that cannot read it.
    assert found.compatible != frozenset(SOURCES)


@pytest.mark.parametrize(
    "case,given,expected",
    [
        ("detr_r18", "deformable_detr", "detr"),
        ("deformable_detr_r18_ms", "detr", "deformable_detr"),
        ("hdetr_r18_ms_refine", "deformable_detr", "hdetr"),
        ("msdetr_r18_ms_refine_twostage", "hdetr", "msdetr"),
        ("smca_r18_type1", "detr", "smca"),
    ],
)
def test_wrong_family_is_one_line_naming_the_right_one(tmp_path, capsys, case, given, expected):
    official = official_pth(tmp_path, case)
    out = tmp_path / "out.safetensors"
    assert main(["convert", "--from", given, str(official), "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("detrkit convert: error: ") and f"looks like a '{expected}'" in last
    assert last.endswith(f"convert it with --from {expected}") and not out.exists()


def test_deformable_checkpoint_with_a_20_class_head_converts_and_loads(tmp_path):
    """Deformable DETR's ``build()`` gives non-COCO datasets 20 classes."""
    official = official_pth(tmp_path, "deformable_detr_r18_ms", dataset_file="voc")
    data = torch.load(official, weights_only=False)
    for key in [k for k in data["model"] if k.startswith("class_embed.")]:
        data["model"][key] = data["model"][key][:20].clone()
    torch.save(data, official)
    out = tmp_path / "voc.safetensors"
    assert main(["convert", "--from", "deformable_detr", str(official), "--out", str(out)]) == 0
    loaded = load_model(out)
    assert loaded.config.model.num_classes == 20 and loaded.label_map.unused_ids == ()
    assert loaded.label_map.names == tuple(str(i) for i in range(20))
    with torch.no_grad():
        logits = loaded.model(pad_images([torch.rand(3, 64, 64)])).for_inference().logits
    assert logits.shape[-1] == 20
