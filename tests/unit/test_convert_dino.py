# SPDX-License-Identifier: Apache-2.0
"""``detrkit convert --from dino``: a tiny random checkpoint written in the official
IDEA-Research/DINO key layout (docs/methods.md#dino-checkpoints) converts, every tensor lands,
the aliased heads become one tensor, and the presets equal what the converter derives from the
official configs."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from detrkit.cli.__main__ import main
from detrkit.config.build import build_model
from detrkit.config.load import load_config
from detrkit.convert.deformable_detr import DEFORMABLE_SPLITS
from detrkit.convert.dino import OFFICIAL_ARGS, dino_config, dino_rules
from detrkit.convert.rules import convert_state_dict
from detrkit.data.collate import pad_images
from detrkit.inference import load_model
from tests.unit.test_coco2017_labels import official_pth

# A test-size DINO run: the official defaults with these changed.
TINY_ARGS = dict(
    backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2,
    dim_feedforward=64, num_queries=12, enc_n_points=2, dec_n_points=2, dn_number=10,
)  # fmt: skip
_RESNET18_CHANNELS = (64, 128, 256, 512)


def _tensor(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * 0.1


def _mlp(prefix: str, dims: list[tuple[int, int]], g: torch.Generator) -> dict:
    """DINO's ``MLP``: ``{prefix}.layers.{i}`` Linear layers of (in, out)."""
    out = {}
    for index, (fan_in, fan_out) in enumerate(dims):
        out[f"{prefix}.layers.{index}.weight"] = _tensor(g, fan_out, fan_in)
        out[f"{prefix}.layers.{index}.bias"] = _tensor(g, fan_out)
    return out


def _linear(prefix: str, fan_in: int, fan_out: int, g: torch.Generator) -> dict:
    return {f"{prefix}.weight": _tensor(g, fan_out, fan_in), f"{prefix}.bias": _tensor(g, fan_out)}


def _norm(prefix: str, dim: int, g: torch.Generator) -> dict:
    return {f"{prefix}.weight": 1 + _tensor(g, dim), f"{prefix}.bias": _tensor(g, dim)}


def _msda(prefix: str, d: int, heads: int, levels: int, points: int, g) -> dict:
    return {
        **_linear(f"{prefix}.sampling_offsets", d, heads * levels * points * 2, g),
        **_linear(f"{prefix}.attention_weights", d, heads * levels * points, g),
        **_linear(f"{prefix}.value_proj", d, d, g),
        **_linear(f"{prefix}.output_proj", d, d, g),
    }


def _backbone(stages: int) -> dict:
    """torchvision ResNet-18 with FrozenBatchNorm2d under ``backbone.0.body``, as
    IntermediateLayerGetter stores it (no fc)."""
    net = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    with torch.no_grad():
        for name, buffer in net.named_buffers():
            if name.endswith(("running_mean", "bias")):
                buffer.normal_(0, 0.1)
    state = net.state_dict()
    return {f"backbone.0.body.{k}": v for k, v in state.items() if not k.startswith("fc.")}


def official_dino_state(args: dict, seed: int = 0) -> dict:
    """A random state dict with every key a DINO model of ``args`` writes, aliases included."""
    a, g = {**OFFICIAL_ARGS, **args}, torch.Generator().manual_seed(seed)
    d, heads, ffn = a["hidden_dim"], a["nheads"], a["dim_feedforward"]
    levels = a["num_feature_levels"]
    classes, stages = a["num_classes"], len(a["return_interm_indices"])
    state = _backbone(stages)
    channels = _RESNET18_CHANNELS[-stages:]
    for level in range(levels):
        extra = level >= stages
        fan_in, kernel = (channels[-1], 3) if extra else (channels[level], 1)
        state[f"input_proj.{level}.0.weight"] = _tensor(g, d, fan_in, kernel, kernel)
        state[f"input_proj.{level}.0.bias"] = _tensor(g, d)
        state.update(_norm(f"input_proj.{level}.1", d, g))
    state["transformer.level_embed"] = _tensor(g, levels, d)
    for n in range(a["enc_layers"]):
        layer = f"transformer.encoder.layers.{n}"
        state.update(_msda(f"{layer}.self_attn", d, heads, levels, a["enc_n_points"], g))
        state.update(_norm(f"{layer}.norm1", d, g))
        state.update(_linear(f"{layer}.linear1", d, ffn, g))
        state.update(_linear(f"{layer}.linear2", ffn, d, g))
        state.update(_norm(f"{layer}.norm2", d, g))
    for n in range(a["dec_layers"]):
        layer = f"transformer.decoder.layers.{n}"
        state.update(_msda(f"{layer}.cross_attn", d, heads, levels, a["dec_n_points"], g))
        state.update(_norm(f"{layer}.norm1", d, g))
        state[f"{layer}.self_attn.in_proj_weight"] = _tensor(g, 3 * d, d)
        state[f"{layer}.self_attn.in_proj_bias"] = _tensor(g, 3 * d)
        state.update(_linear(f"{layer}.self_attn.out_proj", d, d, g))
        state.update(_norm(f"{layer}.norm2", d, g))
        state.update(_linear(f"{layer}.linear1", d, ffn, g))
        state.update(_linear(f"{layer}.linear2", ffn, d, g))
        state.update(_norm(f"{layer}.norm3", d, g))
    state.update(_norm("transformer.decoder.norm", d, g))
    state.update(_mlp("transformer.decoder.ref_point_head", [(2 * d, d), (d, d)], g))
    state["transformer.tgt_embed.weight"] = _tensor(g, a["num_queries"], d)
    state.update(_linear("transformer.enc_output", d, d, g))
    state.update(_norm("transformer.enc_output_norm", d, g))
    state.update(_linear("transformer.enc_out_class_embed", d, classes, g))
    state.update(_mlp("transformer.enc_out_bbox_embed", [(d, d), (d, d), (d, 4)], g))
    state["label_enc.weight"] = _tensor(g, a["dn_labelbook_size"] + 1, d)
    shared = a["dec_pred_bbox_embed_share"]
    class_heads = [_linear("x", d, classes, g) for _ in range(1 if shared else a["dec_layers"])]
    box_heads = [
        _mlp("x", [(d, d), (d, d), (d, 4)], g) for _ in range(1 if shared else a["dec_layers"])
    ]
    for n in range(a["dec_layers"]):
        for owner in ("", "transformer.decoder."):
            # The same tensor objects under every alias, as state_dict() writes shared modules.
            for key, value in class_heads[0 if shared else n].items():
                state[f"{owner}class_embed.{n}{key[1:]}"] = value
            for key, value in box_heads[0 if shared else n].items():
                state[f"{owner}bbox_embed.{n}{key[1:]}"] = value
    return state


def _save(tmp_path: Path, state: dict, args: dict, name: str = "dino.pth") -> Path:
    path = tmp_path / name
    namespace = argparse.Namespace(**{**OFFICIAL_ARGS, **args})
    torch.save({"model": state, "args": namespace, "epoch": 11}, path)
    return path


def _convert(tmp_path: Path, path: Path, source: str = "dino") -> tuple[int, Path]:
    out = tmp_path / "converted.safetensors"
    return main(["convert", "--from", source, str(path), "--out", str(out)]), out


def _images() -> object:
    return pad_images([torch.rand(3, 64, 80), torch.rand(3, 56, 64)])


@pytest.mark.parametrize(
    "scales", [dict(), dict(num_feature_levels=5, return_interm_indices=[0, 1, 2, 3])]
)
def test_every_official_tensor_lands_and_the_model_runs(tmp_path, scales):
    args = {**TINY_ARGS, **scales}
    state = official_dino_state(args)
    code, out = _convert(tmp_path, _save(tmp_path, state, args))
    assert code == 0
    loaded = load_model(out)
    model = loaded.model
    assert loaded.label_map.num_classes == 91 and loaded.label_map.to_category(18) == 18
    converted = model.state_dict()
    alias = re.compile(r"(transformer\.decoder\.(class|bbox)_embed|(class|bbox)_embed\.[1-9])\..+")
    aliases = {k for k in state if alias.fullmatch(k)}
    result = convert_state_dict(state, dino_rules(args), DEFORMABLE_SPLITS)
    assert result.clean and set(result.dropped) == aliases
    assert set(result.state_dict) == set(converted)  # nothing missing, nothing unexpected
    for key, value in result.state_dict.items():
        torch.testing.assert_close(converted[key], value, rtol=0, atol=0)
    layer = "decoder.layers.1.self_attn.attn"
    qkv = torch.cat([converted[f"{layer}.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv, state["transformer.decoder.layers.1.self_attn.in_proj_weight"])
    expected = {
        "queries.tgt_embed.weight": "transformer.tgt_embed.weight",
        "decoder.query_pos_head.mlp.layers.0.weight":
            "transformer.decoder.ref_point_head.layers.0.weight",
        "decoder.output_norm.weight": "transformer.decoder.norm.weight",
        "decoder.layers.0.cross_attn_norm.weight": "transformer.decoder.layers.0.norm1.weight",
        "decoder.layers.0.self_attn_norm.weight": "transformer.decoder.layers.0.norm2.weight",
        "decoder.layers.0.ffn_norm.weight": "transformer.decoder.layers.0.norm3.weight",
        "queries.class_embed.weight": "transformer.enc_out_class_embed.weight",
        "queries.bbox_embed.layers.2.weight": "transformer.enc_out_bbox_embed.layers.2.weight",
        "schemes.denoising.label_embedding.weight": "label_enc.weight",
        "encoder.level_embed": "transformer.level_embed",
        f"neck.projections.{args.get('num_feature_levels', 4) - 1}.0.weight":
            f"input_proj.{args.get('num_feature_levels', 4) - 1}.0.weight",
    }  # fmt: skip
    for ours, theirs in expected.items():
        assert torch.equal(converted[ours], state[theirs]), ours
    with torch.no_grad():
        prediction = model.eval()(_images()).for_inference()
    assert prediction.logits.shape == (args["dec_layers"], 2, args["num_queries"], 91)
    assert torch.isfinite(prediction.logits).all() and torch.isfinite(prediction.boxes).all()


def test_aliased_heads_become_one_tensor(tmp_path):
    state = official_dino_state(TINY_ARGS)
    code, out = _convert(tmp_path, _save(tmp_path, state, TINY_ARGS))
    assert code == 0
    model = load_model(out).model
    assert len(model.head.class_embed) == 1 and len(model.head.bbox_embed) == 1
    for owner in ("", "transformer.decoder."):
        for layer in range(TINY_ARGS["dec_layers"]):
            assert torch.equal(
                model.head.class_embed[0].weight, state[f"{owner}class_embed.{layer}.weight"]
            )
            assert torch.equal(
                model.head.bbox_embed[0].layers[2].bias,
                state[f"{owner}bbox_embed.{layer}.layers.2.bias"],
            )
    # The encoder-proposal heads are copies of their own, not aliases of the decoder's.
    assert not torch.equal(model.queries.class_embed.weight, model.head.class_embed[0].weight)


def test_aliases_that_differ_are_refused(tmp_path, capsys):
    state = official_dino_state(TINY_ARGS)
    state["transformer.decoder.class_embed.1.weight"] = state["class_embed.1.weight"] + 1
    code, out = _convert(tmp_path, _save(tmp_path, state, TINY_ARGS))
    assert code == 2 and not out.exists()
    assert "transformer.decoder.class_embed.1.weight differs" in capsys.readouterr().err


def test_unshared_heads_convert_one_per_layer(tmp_path):
    args = dict(TINY_ARGS, dec_pred_bbox_embed_share=False, dec_pred_class_embed_share=False)
    state = official_dino_state(args)
    code, out = _convert(tmp_path, _save(tmp_path, state, args))
    assert code == 0
    model = load_model(out).model
    assert len(model.head.class_embed) == args["dec_layers"]
    assert torch.equal(model.head.class_embed[1].bias, state["class_embed.1.bias"])
    assert not torch.equal(model.head.class_embed[0].bias, model.head.class_embed[1].bias)


def test_without_denoising_the_label_embedding_is_dropped(tmp_path):
    args = dict(TINY_ARGS, use_dn=False)
    code, out = _convert(tmp_path, _save(tmp_path, official_dino_state(args), args))
    assert code == 0
    loaded = load_model(out)
    assert "denoising" not in loaded.config.model.schemes
    assert not any(k.startswith("schemes.") for k in loaded.model.state_dict())


def test_dino_checkpoint_under_deformable_detr_names_dino(tmp_path, capsys):
    path = _save(tmp_path, official_dino_state(TINY_ARGS), TINY_ARGS)
    code, out = _convert(tmp_path, path, source="deformable_detr")
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and not out.exists()
    assert "looks like a 'dino'" in last and last.endswith("convert it with --from dino")


def test_deformable_detr_checkpoint_under_dino_names_deformable_detr(tmp_path, capsys):
    official = official_pth(tmp_path, "deformable_detr_r18_ms")
    code, out = _convert(tmp_path, official, source="dino")
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and not out.exists()
    assert last.endswith("convert it with --from deformable_detr")


def test_files_without_args_take_the_official_defaults_and_args_json(tmp_path):
    """``--args-json`` needs only the keys a run changed from DINO-4scale."""
    path = tmp_path / "bare.pth"
    torch.save({"model": official_dino_state(TINY_ARGS)}, path)
    out = tmp_path / "bare.safetensors"
    assert main(["convert", "--from", "dino", str(path), "--out", str(out)]) == 2
    args_json = tmp_path / "args.json"
    args_json.write_text(json.dumps(TINY_ARGS))
    command = ["convert", "--from", "dino", str(path), "--out", str(out), "--args-json"]
    assert main([*command, str(args_json)]) == 0


def test_swin_keys_map_onto_detrkit_swin():
    """DINO keeps its Swin at ``backbone.0.*``; patch merging moves to the next stage, the
    position-index buffers are rebuilt."""
    args = dict(backbone="swin_L_384_22k", use_checkpoint=True)
    keys = {
        "backbone.0.patch_embed.proj.weight": "backbone.patch_embed.proj.weight",
        "backbone.0.layers.0.downsample.reduction.weight":
            "backbone.layers.1.downsample.reduction.weight",
        "backbone.0.layers.2.blocks.17.attn.qkv.weight":
            "backbone.layers.2.blocks.17.attn.qkv.weight",
        "backbone.0.norm3.weight": "backbone.norm3.weight",
        "backbone.0.layers.1.blocks.0.attn.relative_position_index": None,
    }  # fmt: skip
    result = convert_state_dict({k: torch.zeros(1) for k in keys}, dino_rules(args))
    assert result.clean
    assert result.dropped == ["backbone.0.layers.1.blocks.0.attn.relative_position_index"]
    assert set(result.state_dict) == {v for v in keys.values() if v}
    with torch.device("meta"):
        model = build_model(dino_config(args).model, 91)
    assert set(result.state_dict) <= set(model.state_dict())


# The official configs (config/DINO/*.py + the scripts' --options) and detrkit's schedule choice
# for the longer runs (docs/methods.md#dino-training).
PUBLISHED = [
    ("dino_4scale_r50_12ep", {}),
    ("dino_4scale_r50_24ep", dict(epochs=24, lr_drop=20)),
    ("dino_4scale_r50_36ep", dict(epochs=36, lr_drop=30)),
    (
        "dino_5scale_r50_12ep",
        dict(num_feature_levels=5, return_interm_indices=[0, 1, 2, 3], batch_size=1),
    ),
    ("dino_4scale_swin_l_12ep", dict(backbone="swin_L_384_22k", use_checkpoint=True)),
    (
        "dino_4scale_swin_l_36ep",
        dict(backbone="swin_L_384_22k", use_checkpoint=True, epochs=36, lr_drop=30),
    ),
]


@pytest.mark.parametrize(("preset", "flags"), PUBLISHED)
def test_dino_presets_equal_the_official_configs(preset, flags):
    converted, ours = dino_config(flags), load_config(preset)
    assert replace(converted.model, num_classes=None) == ours.model
    assert converted.train == ours.train
    assert converted.data.batch_size == ours.data.batch_size
