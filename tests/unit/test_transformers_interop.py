# SPDX-License-Identifier: Apache-2.0
"""Hugging Face transformers import and export on tiny CPU models (docs/transformers.md)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from detrkit.cli.__main__ import main
from detrkit.config.build import build_model, build_postprocess
from detrkit.config.load import load_config
from detrkit.config.schema import ExperimentConfig, MatcherConfig
from detrkit.config.validate import config_to_dict
from detrkit.convert.transformers import convert_transformers_checkpoint
from detrkit.data.labels import LabelMap
from detrkit.engine.checkpoint import CheckpointMeta, save_checkpoint
from detrkit.errors import UserError
from detrkit.export.transformers import export_transformers
from detrkit.inference import LoadedModel, load_model
from detrkit.structures import ImageBatch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

LABELS = LabelMap((1, 2, 5), ("cat", "dog", "emu"))
TOL = dict(atol=1e-5, rtol=1e-5)


def _loaded(preset: str, *overrides: str, seed: int = 0) -> LoadedModel:
    """A randomly initialised tiny model (with random BatchNorm statistics, so the backbone
    mapping is exercised) as if loaded from a checkpoint."""
    config = load_config(preset, overrides)
    torch.manual_seed(seed)
    model = build_model(config.model, LABELS.num_classes)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buffer.uniform_(-0.1, 0.1)
        for name, parameter in model.named_parameters():
            if name.startswith("head.") or name.startswith("queries."):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return LoadedModel(model.eval(), config, LABELS, Path("memory"))


def _batch() -> ImageBatch:
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    pixels[1, :, 80:, :] = 0
    pixels[1, :, :, 100:] = 0
    mask[1, 80:, :] = True
    mask[1, :, 100:] = True
    return ImageBatch(pixels, mask, torch.tensor([[96, 128], [80, 100]]))


def _hf_outputs(model, batch: ImageBatch):
    with torch.no_grad():
        return model.eval()(pixel_values=batch.pixels, pixel_mask=(~batch.padding_mask).long())


def _export_and_load(loaded: LoadedModel, out: Path):
    report = export_transformers(loaded, out)
    model_class = getattr(transformers, report.architecture)
    model, info = model_class.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    return report, model


def _assert_same_predictions(loaded: LoadedModel, hf_model, batch: ImageBatch) -> None:
    with torch.no_grad():
        ours = loaded.model(batch).for_inference()
    theirs = _hf_outputs(hf_model, batch)
    torch.testing.assert_close(theirs.logits, ours.logits[-1], **TOL)
    torch.testing.assert_close(theirs.pred_boxes, ours.boxes[-1], **TOL)
    # The same detections through both post-processors.
    sizes = torch.tensor([[480, 640], [400, 500]])
    detrkit_post = build_postprocess(loaded.config.model)(ours, sizes)
    deformable = hf_model.config.model_type == "deformable_detr"
    processor = (
        transformers.DeformableDetrImageProcessor()
        if deformable
        else transformers.DetrImageProcessor()
    )
    extra = {"top_k": loaded.config.model.top_k} if deformable else {}
    hf_post = processor.post_process_object_detection(
        theirs, threshold=0.0, target_sizes=sizes, **extra
    )
    for mine, hers in zip(detrkit_post, hf_post, strict=True):
        torch.testing.assert_close(mine.scores, hers["scores"], **TOL)
        assert torch.equal(mine.labels, hers["labels"])
        torch.testing.assert_close(mine.boxes_xyxy, hers["boxes"], atol=1e-3, rtol=1e-5)


def test_tiny_detr_exports_and_runs_in_transformers(tmp_path):
    loaded = _loaded("detr_tiny")
    report, model = _export_and_load(loaded, tmp_path / "hf")
    assert report.architecture == "DetrForObjectDetection"
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "emu"}
    assert model.config.backbone_config.model_type == "resnet"
    _assert_same_predictions(loaded, model, _batch())


def test_tiny_deformable_detr_exports_tied_heads(tmp_path):
    loaded = _loaded(
        "deformable_detr_tiny", "model.queries.kind=learned_with_reference", "model.box_refine=none"
    )
    _, model = _export_and_load(loaded, tmp_path / "hf")
    # One detrkit head for every layer: transformers' tied heads compute the same.
    assert model.config.tie_word_embeddings is True
    _assert_same_predictions(loaded, model, _batch())


def test_refine_two_stage_export_unties_heads_and_matches(tmp_path):
    loaded = _loaded("deformable_detr_tiny")  # two-stage + box refinement
    _, model = _export_and_load(loaded, tmp_path / "hf")
    assert model.config.tie_word_embeddings is False
    assert model.config.two_stage and model.config.with_box_refine
    heads = [model.class_embed[i].weight for i in range(3)]
    assert not torch.equal(heads[0], heads[1]), "per-layer heads were tied"
    _assert_same_predictions(loaded, model, _batch())


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("detr_tiny", ("model.position.kind=learned",)),
        (
            "deformable_detr_tiny",
            ("model.num_feature_levels=4", "model.num_backbone_stages=4"),
        ),
        (
            "deformable_detr_tiny",
            (
                "model.queries.kind=learned_with_reference",
                "model.box_refine=none",
                "model.shared_heads=false",
            ),
        ),
        (
            "deformable_detr_tiny",
            ("model.queries.kind=learned_with_reference", "model.num_feature_levels=1"),
        ),
    ],
    ids=["detr-learned-position", "c2-c5", "per-layer-heads-no-refine", "single-level-refine"],
)
def test_other_layouts_export_match_and_round_trip(tmp_path, preset, overrides):
    loaded = _loaded(preset, *overrides, "model.backbone.norm=frozen_bn")
    _, model = _export_and_load(loaded, tmp_path / "hf")
    _assert_same_predictions(loaded, model, _batch())
    convert_transformers_checkpoint(tmp_path / "hf", tmp_path / "back.safetensors")
    ours, theirs = loaded.model.state_dict(), load_model(tmp_path / "back.safetensors").model
    assert all(torch.equal(ours[k], v) for k, v in theirs.state_dict().items())
    assert set(ours) == set(theirs.state_dict())


def test_export_import_round_trip_is_exact(tmp_path):
    loaded = _loaded("deformable_detr_tiny", "model.backbone.norm=frozen_bn")
    export_transformers(loaded, tmp_path / "hf")
    convert_transformers_checkpoint(tmp_path / "hf", tmp_path / "back.safetensors")
    back = load_model(tmp_path / "back.safetensors")
    ours, theirs = loaded.model.state_dict(), back.model.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert back.label_map == LABELS  # category ids (1, 2, 5) survive the round trip


def _tiny_hf_deformable(tmp_path: Path, **options) -> Path:
    backbone = transformers.ResNetConfig(
        layer_type="basic",
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        out_features=["stage2", "stage3", "stage4"],
    )
    config = transformers.DeformableDetrConfig(
        backbone_config=backbone,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_queries=10,
        num_feature_levels=3,
        disable_custom_kernels=True,
        id2label={0: "a", 1: "b"},
        **options,
    )
    torch.manual_seed(0)
    model = transformers.DeformableDetrForObjectDetection(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "embed" in name and not name.startswith("model.decoder."):
                parameter.add_(torch.randn_like(parameter) * 0.1)
        # Untied, the decoder keeps its own copies of the heads; detrkit needs them equal.
        for kind in ("class_embed", "bbox_embed"):
            copies = getattr(model.model.decoder, kind)
            if copies is not None and not config.tie_word_embeddings:
                for copy, head in zip(copies, getattr(model, kind), strict=True):
                    copy.load_state_dict(head.state_dict())
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_tied_refine_checkpoint_converts_as_tied_with_a_warning(tmp_path, caplog):
    folder = _tiny_hf_deformable(tmp_path, with_box_refine=True, tie_word_embeddings=True)
    hf_model = transformers.DeformableDetrForObjectDetection.from_pretrained(folder)
    with caplog.at_level(logging.WARNING):
        result = convert_transformers_checkpoint(folder, tmp_path / "out.safetensors")
    assert result.tied, "no head was read from its tied index-0 copy"
    assert any("tie_word_embeddings" in record.getMessage() for record in caplog.records)
    loaded = load_model(tmp_path / "out.safetensors")
    assert loaded.config.model.box_refine == "iterative"
    batch = _batch()
    with torch.no_grad():
        ours = loaded.model(batch).for_inference()
    theirs = _hf_outputs(hf_model, batch)
    torch.testing.assert_close(theirs.logits, ours.logits[-1], **TOL)
    torch.testing.assert_close(theirs.pred_boxes, ours.boxes[-1], **TOL)


def test_untied_refine_checkpoint_imports_per_layer_heads(tmp_path):
    folder = _tiny_hf_deformable(
        tmp_path,
        with_box_refine=True,
        two_stage=True,
        two_stage_num_proposals=10,
        tie_word_embeddings=False,
    )
    hf_model = transformers.DeformableDetrForObjectDetection.from_pretrained(folder)
    result = convert_transformers_checkpoint(folder, tmp_path / "out.safetensors")
    assert not result.tied
    loaded = load_model(tmp_path / "out.safetensors")
    assert loaded.config.model.queries.kind == "two_stage"
    assert loaded.label_map.names == ("a", "b")
    with torch.no_grad():
        ours = loaded.model(_batch()).for_inference()
    theirs = _hf_outputs(hf_model, _batch())
    torch.testing.assert_close(theirs.logits, ours.logits[-1], **TOL)
    torch.testing.assert_close(theirs.pred_boxes, ours.boxes[-1], **TOL)


def test_differing_refinement_head_copies_are_refused(tmp_path):
    folder = _tiny_hf_deformable(tmp_path, with_box_refine=True, tie_word_embeddings=False)
    model = transformers.DeformableDetrForObjectDetection.from_pretrained(folder)
    with torch.no_grad():
        model.model.decoder.bbox_embed[1].layers[0].bias.add_(1.0)
    model.save_pretrained(tmp_path / "changed")
    with pytest.raises(UserError) as error:
        convert_transformers_checkpoint(tmp_path / "changed", tmp_path / "out.safetensors")
    assert "model.decoder.bbox_embed.1.layers.0.bias" in _one_line(error)


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


def _refused_export(config: ExperimentConfig) -> str:
    loaded = LoadedModel(None, config, LABELS, Path("memory"))  # refused before any tensor
    with pytest.raises(UserError) as error:
        export_transformers(loaded, Path("unused"))
    text = _one_line(error)
    assert "DetrForObjectDetection and DeformableDetrForObjectDetection" in text
    return text


def test_export_refuses_what_transformers_does_not_have():
    assert "DINO" in _refused_export(load_config("dino_tiny"))
    assert "SMCA" in _refused_export(load_config("smca_r50"))
    swin = load_config("deformable_detr_swin_t_tricks_12ep")
    assert "swin" in _refused_export(swin)
    detr = load_config("detr_tiny")
    refined = replace(detr, model=replace(detr.model, box_refine="iterative"))
    assert "refinement" in _refused_export(refined)
    fractional = replace(detr, model=replace(detr.model, matcher=MatcherConfig(cost_class=1.5)))
    assert "whole number" in _refused_export(fractional)


def _hf_config_folder(tmp_path: Path, config: dict) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")  # never read: the config is refused first
    return folder


def test_import_refuses_detr_auxiliary_loss_and_other_architectures(tmp_path, caplog):
    detr = _tiny_detr_folder(tmp_path)
    config = json.loads((detr / "config.json").read_text())
    config["auxiliary_loss"] = True
    (detr / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as error:
        convert_transformers_checkpoint(detr, tmp_path / "out.safetensors")
    text = _one_line(error)
    assert "auxiliary_loss" in text and "LayerNorm" in text
    conditional = _hf_config_folder(tmp_path, {"model_type": "conditional_detr"})
    with pytest.raises(UserError) as error:
        convert_transformers_checkpoint(conditional, tmp_path / "out.safetensors")
    assert "DetrForObjectDetection and DeformableDetrForObjectDetection" in _one_line(error)


def _tiny_detr_folder(tmp_path: Path) -> Path:
    loaded = _loaded("detr_tiny")
    export_transformers(loaded, tmp_path / "detr")
    return tmp_path / "detr"


def test_cli_convert_and_export(tmp_path, capsys):
    loaded = _loaded("detr_tiny", "model.backbone.norm=frozen_bn")
    checkpoint = tmp_path / "model.safetensors"
    meta = CheckpointMeta(config=config_to_dict(loaded.config), label_map=LABELS)
    save_checkpoint(checkpoint, model=loaded.model.state_dict(), meta=meta)
    out = tmp_path / "hf"
    assert main(["export", "--format", "transformers", str(checkpoint), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    back = tmp_path / "back.safetensors"
    assert main(["convert", "--from", "transformers", str(out), "--out", str(back)]) == 0
    assert "tensors converted" in capsys.readouterr().err
    restored = load_model(back)
    original = loaded.model.state_dict()
    assert all(torch.equal(original[k], v) for k, v in restored.model.state_dict().items())
    # The .safetensors file with its config.json beside it works too.
    assert (
        main(
            [
                "convert",
                "--from",
                "transformers",
                str(out / "model.safetensors"),
                "--out",
                str(tmp_path / "again.safetensors"),
            ]
        )
        == 0
    )


def test_timm_backbone_checkpoint_and_transformers_4_names(tmp_path):
    """Hub DETRs use timm's ResNet (``use_timm_backbone=True``) and, when saved by transformers
    4, older key names (``backbone.conv_encoder``, ``out_proj``, ``fc1``)."""
    pytest.importorskip("timm", reason="timm builds the reference model")
    config = transformers.DetrConfig(
        use_timm_backbone=True,
        backbone="resnet18",
        use_pretrained_backbone=False,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_queries=10,
        id2label={0: "a", 1: "b"},
    )
    torch.manual_seed(0)
    hf_model = transformers.DetrForObjectDetection(config).eval()
    hf_model.save_pretrained(tmp_path / "new")
    old = tmp_path / "old"
    old.mkdir()
    state = load_file(str(tmp_path / "new" / "model.safetensors"))
    renamed = {
        re.sub(r"\.mlp\.fc(\d)", r".fc\1", k.replace("o_proj", "out_proj")).replace(
            "model.backbone.model.", "model.backbone.conv_encoder.model."
        ): v
        for k, v in state.items()
    }
    save_file(renamed, str(old / "model.safetensors"))
    legacy = json.loads((tmp_path / "new" / "config.json").read_text())
    del legacy["backbone_config"]
    legacy.update(use_timm_backbone=True, backbone="resnet18")
    (old / "config.json").write_text(json.dumps(legacy))
    batch = _batch()
    theirs = _hf_outputs(hf_model, batch)
    for folder in (tmp_path / "new", old):
        convert_transformers_checkpoint(folder, tmp_path / "out.safetensors")
        loaded = load_model(tmp_path / "out.safetensors")
        assert loaded.config.model.backbone.name == "resnet18"
        with torch.no_grad():
            ours = loaded.model(batch).for_inference()
        torch.testing.assert_close(theirs.logits, ours.logits[-1], **TOL)
        torch.testing.assert_close(theirs.pred_boxes, ours.boxes[-1], **TOL)
