# SPDX-License-Identifier: Apache-2.0
"""Swin backbones (docs/methods.md#h-detr-architecture): shapes at any input size, the official
window order, local
ImageNet weights in the official and timm layouts, and H-DETR Swin checkpoints
(docs/methods.md#h-detr-checkpoints)."""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.swin_transformer import SwinTransformer

from detrkit.config.build import backbone_spec, build_model
from detrkit.config.load import load_config
from detrkit.convert.rules import convert_state_dict
from detrkit.convert.sources import SOURCES
from detrkit.errors import UserError
from detrkit.models.backbones import build_backbone
from detrkit.models.backbones.swin import SWIN_VARIANTS, SwinBackbone, swin_block_forward
from tests.golden.golden_case import SHIPPED_DIR

STAGES = ("c3", "c4", "c5")


@pytest.fixture(scope="module")
def tiny() -> SwinBackbone:
    """Swin-T with drop path 0.2, built once (timm's initialisation of 28M weights is the slow
    part); tests that change it work on a ``copy.deepcopy``."""
    torch.manual_seed(0)
    return SwinBackbone("swin_tiny", drop_path_rate=0.2).eval()


@pytest.mark.parametrize("name", sorted(SWIN_VARIANTS))
def test_variants_report_strides_channels_and_shapes(name):
    variant = SWIN_VARIANTS[name]
    cfg = load_config("hdetr_swin_t_tricks_12ep", [f"model.backbone.name={name}"]).model.backbone
    with torch.device("meta"):  # shapes only: Swin-L has 195M parameters
        backbone = build_backbone(backbone_spec(cfg), STAGES)
        out = backbone(torch.empty(2, 3, 75, 101))
    channels = [variant.embed_dim * 2, variant.embed_dim * 4, variant.embed_dim * 8]
    assert backbone.out_channels == dict(zip(STAGES, channels))
    assert backbone.strides == {"c3": 8, "c4": 16, "c5": 32}
    for stage, stride in backbone.strides.items():
        size = (math.ceil(75 / stride), math.ceil(101 / stride))
        assert out[stage].shape == (2, backbone.out_channels[stage], *size)
    table = backbone.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == ((2 * variant.window_size - 1) ** 2, variant.num_heads[0])
    assert backbone.checkpointing and all(p.requires_grad for p in backbone.parameters())


def test_forward_backward_at_an_odd_size(tiny):
    backbone = copy.deepcopy(tiny).train()
    out = backbone(torch.randn(1, 3, 45, 61))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "c3": (1, 192, 6, 8),
        "c4": (1, 384, 3, 4),
        "c5": (1, 768, 2, 2),
    }
    assert out["c5"].is_contiguous()
    sum(v.mean() for v in out.values()).backward()
    unused = [n for n, p in backbone.named_parameters() if p.grad is None]
    assert not unused


def test_agrees_with_timm_where_window_orders_coincide(tiny):
    """At 224 x 224 every stage is a multiple of the window: timm's own forward must match."""
    reference = SwinTransformer(
        embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), num_classes=0,
        strict_img_size=False, always_partition=True,
    ).eval()  # fmt: skip
    reference.load_state_dict(
        {k: v for k, v in tiny.state_dict().items() if not k.startswith("norm")}, strict=False
    )
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = tiny(pixels)
        theirs = reference.forward_intermediates(pixels, indices=(1, 2, 3), intermediates_only=True)
    for index, (stage, value) in enumerate(ours.items(), start=1):
        expected = getattr(tiny, f"norm{index}")(theirs[index - 1].permute(0, 2, 3, 1))
        torch.testing.assert_close(value, expected.permute(0, 3, 1, 2), msg=stage)


def test_shifted_block_pads_before_shifting(tiny):
    """The official order at a size that is no multiple of the window: pad the normed map,
    then timm's shift + mask + attention (which pads nothing more), then crop."""
    block = tiny.layers[1].blocks[1]
    assert block.shift_size == (3, 3)
    x = torch.randn(2, 10, 13, 192)
    with torch.no_grad():
        padded = F.pad(block.norm1(x), (0, 0, 0, 1, 0, 4))
        attended = x + block._attn(padded)[:, :10, :13]
        expected = attended + block.mlp(block.norm2(attended))
        torch.testing.assert_close(swin_block_forward(block, x), expected)


def test_checkpointing_keeps_outputs_and_gradients(tiny):
    results, calls = [], []
    for checkpointing in (False, True):
        backbone = copy.deepcopy(tiny).train()
        backbone.checkpointing = checkpointing
        backbone.layers[2].blocks[3].attn.register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(1)  # the same drop-path draws in both runs
        out = backbone(torch.randn(1, 3, 40, 56))
        sum(v.square().mean() for v in out.values()).backward()
        results.append((out, {n: p.grad for n, p in backbone.named_parameters()}))
    assert len(calls) == 3  # once without checkpointing, forward + recomputation with it
    (out, grads), (out_ckpt, grads_ckpt) = results
    torch.testing.assert_close(out_ckpt, out, atol=0, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_stride_4_stage_and_unused_stages():
    with torch.device("meta"):
        backbone = SwinBackbone("swin_base", return_stages=("c2", "c4"))
        out = backbone(torch.empty(1, 3, 45, 61))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "c2": (1, 128, 12, 16),
        "c4": (1, 512, 3, 4),
    }
    assert len(backbone.layers) == 3  # the stride-32 stage would get no gradient
    norms = {name for name, _ in backbone.named_children() if name.startswith("norm")}
    assert norms == {"norm0", "norm2"}


def test_frozen_stages_and_trainable():
    with torch.device("meta"):
        frozen = SwinBackbone("swin_tiny", frozen_stages=1)
        off = SwinBackbone("swin_tiny", trainable=False)
    trained = {n.split(".")[0] + n.split(".")[1] for n, p in frozen.named_parameters()
               if p.requires_grad and n.startswith(("patch_embed", "layers"))}  # fmt: skip
    assert trained == {"layers1", "layers2", "layers3"}
    assert not any(p.requires_grad for p in off.parameters())


def test_dc5_is_refused():
    cfg = load_config("hdetr_swin_t_tricks_12ep", ["model.backbone.dilation=true"]).model.backbone
    with pytest.raises(UserError, match="dilation"):
        build_backbone(backbone_spec(cfg), STAGES)


def official_layout(backbone: SwinBackbone, *, imagenet: bool) -> dict[str, torch.Tensor]:
    """This backbone's weights as microsoft/Swin-Transformer names them: patch merging at the
    end of stage i, persistent relative position indices; ImageNet files also hold the
    classifier, the final norm and the shifted blocks' attention masks, but no output norms."""
    state = {}
    for key, value in backbone.state_dict().items():
        if imagenet and key.startswith("norm"):
            continue
        key = re.sub(
            r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", key
        )
        state[key] = value
    for name, module in backbone.named_modules():
        if name.endswith(".attn"):
            state[f"{name}.relative_position_index"] = module.relative_position_index
        if imagenet and name.endswith(".blocks.1"):
            state[f"{name}.attn_mask"] = torch.zeros(4, 49, 49)
    if imagenet:
        state |= {"norm.weight": torch.ones(768), "norm.bias": torch.zeros(768)}
        state |= {"head.weight": torch.zeros(1000, 768), "head.bias": torch.zeros(1000)}
    return state


def _timm_layout(backbone: SwinBackbone) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("norm")}
    return state | {"norm.weight": torch.ones(768), "head.fc.weight": torch.zeros(1000, 768)}


def _randomised(backbone: SwinBackbone) -> SwinBackbone:
    backbone = copy.deepcopy(backbone)
    with torch.no_grad():
        for param in backbone.parameters():
            param.normal_(0, 0.05)
    return backbone


@pytest.mark.parametrize("layout", ["official", "timm"])
def test_imagenet_weights_load_and_reproduce_outputs(tmp_path, tiny, layout):
    source = _randomised(tiny)
    if layout == "official":
        path = tmp_path / "swin_tiny_patch4_window7_224.pth"
        torch.save({"model": official_layout(source, imagenet=True)}, path)
    else:
        path = tmp_path / "swin_tiny.safetensors"
        save_file({k: v.contiguous() for k, v in _timm_layout(source).items()}, str(path))
    target = copy.deepcopy(tiny)
    target.load_pretrained(path)
    for index in (1, 2, 3):  # the output norms are not in ImageNet files: they start fresh
        getattr(target, f"norm{index}").load_state_dict(
            getattr(source, f"norm{index}").state_dict()
        )
    pixels = torch.randn(1, 3, 52, 70)
    with torch.no_grad():
        expected, loaded = source(pixels), target(pixels)
    for stage in STAGES:
        torch.testing.assert_close(loaded[stage], expected[stage], atol=0, rtol=0)


def test_wrong_variant_is_a_clear_error(tmp_path, tiny):
    path = tmp_path / "swin_tiny.pth"
    torch.save({"model": official_layout(tiny, imagenet=True)}, path)
    for name in ("swin_small", "swin_large_window12"):
        with torch.device("meta"):
            other = SwinBackbone(name)
        with pytest.raises(UserError, match=rf"swin_tiny.pth .*model.backbone.name={name}"):
            other.load_pretrained(path)
    with pytest.raises(UserError, match="not found"):
        tiny.load_pretrained(tmp_path / "missing.pth")


# H-DETR's flags for its Swin rows (docs/methods.md#h-detr-results) on top of a golden case's
# official defaults.
_TRICKS = dict(
    hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6, dim_feedforward=2048,
    num_feature_levels=4, with_box_refine=True, two_stage=True, dropout=0.0,
    mixed_selection=True, look_forward_twice=True, num_queries_one2one=300, epochs=12,
    lr_drop=11, drop_path_rate=0.2, backbone="swin_tiny",
)  # fmt: skip
_HYBRID = dict(_TRICKS, num_queries_one2many=1500, k_one2many=6, lambda_one2many=1.0)
_L36 = dict(_HYBRID, backbone="swin_large", epochs=36, lr_drop=30, drop_path_rate=0.5)
PUBLISHED = [
    ("hdetr_swin_t_tricks_12ep", _HYBRID),
    ("hdetr_swin_t_tricks_36ep", dict(_HYBRID, epochs=36, lr_drop=30)),
    ("hdetr_swin_t_tricks_wd005_12ep", dict(_HYBRID, weight_decay=0.05)),
    ("hdetr_swin_t_tricks_wd005_36ep", dict(_HYBRID, epochs=36, lr_drop=30, weight_decay=0.05)),
    ("hdetr_swin_l_tricks_12ep", dict(_HYBRID, backbone="swin_large")),
    ("hdetr_swin_l_tricks_dp05_36ep", _L36),
    (
        "hdetr_swin_l_tricks_900q_12ep",
        dict(_HYBRID, backbone="swin_large", num_queries_one2one=900),
    ),
    ("hdetr_swin_l_tricks_900q_dp05_36ep", dict(_L36, num_queries_one2one=900)),
    ("hdetr_swin_l_tricks_900q_dp05_36ep_top300", dict(_L36, num_queries_one2one=900, topk=300)),
    (
        "hdetr_swin_l_tricks_900q_dp05_wd005_36ep_top300",
        dict(_L36, num_queries_one2one=900, topk=300, weight_decay=0.05),
    ),
    ("deformable_detr_swin_t_tricks_12ep", dict(_TRICKS, num_queries_one2many=0, k_one2many=0)),
    (
        "deformable_detr_swin_l_tricks_dp05_36ep",
        dict(_L36, num_queries_one2many=0, k_one2many=0),
    ),
]


def _hdetr_case() -> dict:
    path = SHIPPED_DIR / "hdetr_r18_ms_refine_twostage_mqs_lft.json"
    if not path.is_file():
        pytest.skip(f"golden case {path} not available (its args are the official defaults)")
    return json.loads(path.read_text())


@pytest.mark.parametrize(("preset", "flags"), PUBLISHED)
def test_swin_presets_equal_the_published_scripts(preset, flags):
    args = dict(_hdetr_case()["args"], **flags)
    converted = SOURCES["hdetr"].config_from_args(args)
    ours = load_config(preset)
    assert replace(converted.model, num_classes=None) == ours.model
    assert (converted.train.epochs, converted.train.lr_drop, converted.train.weight_decay) == (
        ours.train.epochs,
        ours.train.lr_drop,
        ours.train.weight_decay,
    )


def test_hdetr_swin_checkpoint_converts_strictly(tmp_path, tiny):
    """An H-DETR Swin-T checkpoint in the official layout (docs/methods.md#h-detr-checkpoints):
    ``backbone.0.body.*``
    with patch merging at the end of each stage, index buffers and ``norm1/2/3``."""
    from tests.golden.golden_case import official_state_dict

    spec = _hdetr_case()
    args = dict(spec["args"], backbone="swin_tiny")
    source = SOURCES["hdetr"]
    config = source.config_from_args(args)
    assert config.model.backbone.name == "swin_tiny" and config.model.backbone.frozen_stages == 0
    swin = _randomised(tiny)
    state = {
        k: v for k, v in official_state_dict(spec, SHIPPED_DIR).items() if "backbone.0" not in k
    }
    state |= {f"backbone.0.body.{k}": v for k, v in official_layout(swin, imagenet=False).items()}
    for level, channels in enumerate(
        (192, 384, 768, 768)
    ):  # input_proj in-channels: 2C, 4C, 8C, 8C
        weight = state[f"input_proj.{level}.0.weight"]
        state[f"input_proj.{level}.0.weight"] = torch.randn(
            weight.shape[0], channels, *weight.shape[2:]
        )
    assert "backbone.0.body.layers.0.downsample.reduction.weight" in state
    result = convert_state_dict(state, source.rules_for(args), source.splits)
    assert result.clean, result.describe()
    index_buffers = [k for k in result.dropped if k.endswith("relative_position_index")]
    assert len(index_buffers) == sum(SWIN_VARIANTS["swin_tiny"].depths)
    model = build_model(config.model)
    model.load_state_dict(result.state_dict, strict=True)
    torch.testing.assert_close(model.backbone.norm3.weight, swin.norm3.weight)
    # The same file also loads as backbone weights alone (the detector keys are ignored).
    path = tmp_path / "hdetr_swin_tiny.pth"
    torch.save({"model": state}, path)
    alone = copy.deepcopy(tiny)
    alone.load_pretrained(path)
    torch.testing.assert_close(
        alone.layers[2].downsample.reduction.weight, swin.layers[2].downsample.reduction.weight
    )
