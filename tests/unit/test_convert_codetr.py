# SPDX-License-Identifier: Apache-2.0
"""``detrkit convert --from codetr``: an mmdet-2 Co-DETR checkpoint (the golden Co-DINO case's
weights, wrapped as mmdet saves them) -> a detrkit checkpoint that ``load_model`` reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detrkit.cli.__main__ import main
from detrkit.convert.codetr_source import codetr_label_map, parse_config_text
from detrkit.data.collate import pad_images
from detrkit.inference import load_model
from tests.golden.golden_case import GOLDEN_DIR, official_state_dict

CASE = GOLDEN_DIR / "codetr" / "co_dino_r18_5scale.json"


def _py(value) -> str:
    """mmcv ``pretty_text``-style Python: ``dict(key=value)`` for identifier-keyed dicts."""
    if isinstance(value, dict):
        if all(isinstance(k, str) and k.isidentifier() for k in value):
            return "dict(" + ", ".join(f"{k}={_py(v)}" for k, v in value.items()) + ")"
        return "{" + ", ".join(f"{k!r}: {_py(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        items = ", ".join(_py(v) for v in value)
        return f"[{items}]" if isinstance(value, list) else f"({items},)"
    return repr(value)


@pytest.fixture(scope="module")
def case() -> tuple[dict, dict]:
    if not CASE.exists() or not CASE.with_suffix(".safetensors").exists():
        pytest.skip(f"golden case {CASE.name} is absent")
    spec = json.loads(CASE.read_text())
    return spec["config"]["model"], official_state_dict(spec, CASE.parent)


def _save(tmp_path: Path, case, config_text: str | None = None) -> Path:
    model, state = case
    text = config_text or (
        "num_dec_layer = 3\nlambda_2 = 2.0\n"
        f"model = {_py(model)}\n"
        "optimizer = dict(type='AdamW', lr=2 * 1e-4, weight_decay=-(-0.0001))\n"
    )
    path = tmp_path / "co_dino.pth"
    meta = {"config": text, "CLASSES": ("person",) * 80, "epoch": 12, "mmdet_version": "2.25.3"}
    torch.save({"state_dict": state, "meta": meta}, path)
    return path


def _convert(tmp_path: Path, path: Path, *extra: str, source: str = "codetr"):
    out = tmp_path / "converted.safetensors"
    return main(["convert", "--from", source, str(path), "--out", str(out), *extra]), out


def _run(loaded) -> None:
    images = pad_images([torch.rand(3, 64, 80), torch.rand(3, 56, 64)])
    with torch.no_grad():
        output = loaded.model(images).for_inference()
    assert torch.isfinite(output.logits).all() and torch.isfinite(output.boxes).all()


def test_codetr_checkpoint_converts_without_aux_heads(tmp_path, case):
    code, out = _convert(tmp_path, _save(tmp_path, case))
    assert code == 0
    loaded = load_model(out)
    assert loaded.label_map.to_category(0) == 1
    assert loaded.label_map.to_category(79) == 90
    assert loaded.label_map.name_of(90) == "toothbrush"
    assert "collaborative" not in loaded.config.model.schemes
    assert "denoising" in loaded.config.model.schemes
    assert not any(k.startswith("schemes.collaborative.") for k in loaded.model.state_dict())
    _run(loaded)


def test_keep_aux_keeps_the_collaborative_heads(tmp_path, case):
    code, out = _convert(tmp_path, _save(tmp_path, case), "--keep-aux")
    assert code == 0
    loaded = load_model(out)
    options = loaded.config.model.schemes["collaborative"]
    assert options.lambda_2 == 2.0 and options.rpn_roi.roi_bbox_weight == 10.0
    keys = [k for k in loaded.model.state_dict() if k.startswith("schemes.collaborative.")]
    assert any(".rpn." in k for k in keys) and any(".atss." in k for k in keys)
    assert loaded.label_map.to_category(79) == 90
    _run(loaded)


def test_config_text_that_is_not_plain_data_needs_config(tmp_path, case, capsys):
    model, _ = case
    text = f"import os\nmodel = {_py(model)}\n"
    path = _save(tmp_path, case, text)
    code, _ = _convert(tmp_path, path)
    assert code == 2
    assert "--config" in capsys.readouterr().err
    config = tmp_path / "model.json"
    config.write_text(json.dumps({"model": model}))
    code, out = _convert(tmp_path, path, "--config", str(config))
    assert code == 0
    assert load_model(out).label_map.to_category(0) == 1


def test_codetr_file_under_another_source_names_codetr(tmp_path, case, capsys):
    path = _save(tmp_path, case)
    for source in ("dino", "deformable_detr"):
        code, _ = _convert(tmp_path, path, source=source)
        assert code == 2
        assert "--from codetr" in capsys.readouterr().err


def test_keep_aux_is_codetr_only(tmp_path, case, capsys):
    code, _ = _convert(tmp_path, _save(tmp_path, case), "--keep-aux", source="dino")
    assert code == 2
    assert "codetr" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text",
    [
        "model = __import__('os').system('true')",
        "model = dict(**x)",
        "_base_ = ['a.py']\nmodel = dict(type='CoDETR')",
        "model = open('/etc/passwd')",
        "model = dict(a=[1, 2]) + 1",
        "def f(): pass",
    ],
)
def test_config_text_parser_refuses_code(text):
    assert parse_config_text(text) is None


def test_config_text_parser_reads_data():
    text = "n = 6\nmodel = dict(a=n * 2.0, b=[1, -2, (3,)], c={'k': None}, d=True)"
    parsed = parse_config_text(text)
    assert parsed["model"] == dict(a=12.0, b=[1, -2, (3,)], c={"k": None}, d=True)


def test_non_coco_heads_get_plain_labels():
    names = codetr_label_map(3, ("a", "b", "c"))
    assert names.category_ids == (0, 1, 2) and names.names == ("a", "b", "c")
    assert codetr_label_map(5).num_classes == 5


def _full_size(model: dict) -> dict:
    """The golden case's config at the official co_dino_5scale_r50_1x_coco.py size: R50, 900
    queries, 6 + 6 layers, 100 denoising queries, dense weights x (6 layers x lambda_2 = 2)."""
    model = json.loads(json.dumps(model))
    model["backbone"]["depth"] = 50
    model["neck"]["in_channels"] = [256, 512, 1024, 2048]
    head = model["query_head"]
    head["num_query"] = 900
    head["transformer"]["encoder"]["num_layers"] = 6
    head["transformer"]["decoder"]["num_layers"] = 6
    head["dn_cfg"]["group_cfg"]["num_dn_queries"] = 100
    scale = 6 * 2.0
    rpn, bbox, atss = model["rpn_head"], model["roi_head"][0]["bbox_head"], model["bbox_head"][0]
    for loss, weight in (
        (rpn["loss_cls"], 1.0), (rpn["loss_bbox"], 1.0), (bbox["loss_cls"], 1.0),
        (bbox["loss_bbox"], 10.0), (atss["loss_cls"], 1.0), (atss["loss_bbox"], 2.0),
        (atss["loss_centerness"], 1.0),
    ):  # fmt: skip
        loss["loss_weight"] = weight * scale
    return model


def test_r50_preset_equals_the_converted_official_config(case):
    from dataclasses import replace

    from detrkit.config.load import load_config
    from detrkit.convert.codetr_config import codetr_model_config
    from detrkit.convert.codetr_source import with_collaborative_scheme

    official = _full_size(case[0])
    derived = with_collaborative_scheme(codetr_model_config(official), official)
    preset = load_config("co_dino_5scale_r50_12ep").model
    assert replace(derived, num_classes=preset.num_classes) == preset


DEFORMABLE_CASE = GOLDEN_DIR / "codetr" / "co_deformable_detr_r18.json"


@pytest.fixture(scope="module")
def deformable_case() -> tuple[dict, dict]:
    if not DEFORMABLE_CASE.exists() or not DEFORMABLE_CASE.with_suffix(".safetensors").exists():
        pytest.skip(f"golden case {DEFORMABLE_CASE.name} is absent")
    spec = json.loads(DEFORMABLE_CASE.read_text())
    return spec["config"]["model"], official_state_dict(spec, DEFORMABLE_CASE.parent)


def test_co_deformable_converts_with_and_without_aux(tmp_path, deformable_case):
    path = _save(tmp_path, deformable_case, f"model = {_py(deformable_case[0])}\n")
    code, out = _convert(tmp_path, path)
    assert code == 0
    assert load_model(out).label_map.to_category(79) == 90
    code, out = _convert(tmp_path, path, "--keep-aux")
    assert code == 0
    loaded = load_model(out)
    assert loaded.config.model.schemes["collaborative"].positive_query == "deformable"
    _run(loaded)


def test_co_deformable_preset_equals_the_converted_official_config(deformable_case):
    """co_deformable_detr_r50_1x_coco.py: R50 C3-C5, 300 queries, 6 + 6 layers, dense weights
    x (6 layers x lambda_2 = 2) where the case has 2 layers."""
    from dataclasses import replace

    from detrkit.config.load import load_config
    from detrkit.convert.codetr_config import codetr_model_config
    from detrkit.convert.codetr_source import with_collaborative_scheme

    official = json.loads(json.dumps(deformable_case[0]))
    official["backbone"]["depth"] = 50
    official["neck"]["in_channels"] = [512, 1024, 2048]
    head = official["query_head"]
    head["num_query"] = 300
    head["transformer"]["encoder"]["num_layers"] = 6
    head["transformer"]["decoder"]["num_layers"] = 6
    rpn, roi, atss = official["rpn_head"], official["roi_head"][0], official["bbox_head"][0]
    for loss in (
        rpn["loss_cls"], rpn["loss_bbox"], roi["bbox_head"]["loss_cls"],
        roi["bbox_head"]["loss_bbox"], atss["loss_cls"], atss["loss_bbox"],
        atss["loss_centerness"],
    ):  # fmt: skip
        loss["loss_weight"] *= 3
    derived = with_collaborative_scheme(codetr_model_config(official), official)
    preset = load_config("co_deformable_detr_r50_12ep").model
    assert replace(derived, num_classes=preset.num_classes) == preset
