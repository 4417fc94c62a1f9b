# SPDX-License-Identifier: Apache-2.0
"""SMCA: the Gaussian prior, where it enters the attention, the multi-scale level softmax, the
original's batch bug behind its option, validation, scheme composition, presets and conversion."""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import replace

import pytest
import torch

from detrkit.cli.__main__ import main
from detrkit.config.build import build_criterion, build_model, build_postprocess
from detrkit.config.load import load_config
from detrkit.config.schema import SmcaConfig
from detrkit.config.scheme_settings import SchemeSettings
from detrkit.convert.sources import SOURCES
from detrkit.errors import UserError
from detrkit.inference import load_model
from detrkit.layers.attention import CrossAttention
from detrkit.layers.smca import (
    GaussianCrossAttention,
    gaussian_log_prior,
    level_softmax_attention,
    token_grid,
)
from detrkit.models.encoder import valid_ratio
from detrkit.schemes.hybrid import HybridConfig
from detrkit.schemes.mixed import MixedConfig
from detrkit.structures import EncoderMemory, ImageBatch, Target
from tests.golden.golden_case import SHIPPED_DIR, GoldenCase, published_config

DIM, HEADS = 16, 4


def _memory(shapes=((3, 4),), batch: int = 2, seed: int = 0) -> EncoderMemory:
    """Random memory over levels of ``shapes``; image 1 is padded on the right of every level."""
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for height, width in shapes:
        mask = torch.zeros(batch, height, width, dtype=torch.bool)
        mask[1:, :, width - 1 :] = True
        masks.append(mask)
    sizes = [h * w for h, w in shapes]
    tokens = torch.randn(batch, sum(sizes), DIM, generator=generator)
    pos = torch.randn(batch, sum(sizes), DIM, generator=generator)
    spatial = torch.tensor(shapes)
    start = torch.cat((spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]))
    ratios = torch.stack([valid_ratio(m) for m in masks], 1)
    image_sizes = torch.tensor([[96, 128], [90, 100]])[:batch]
    padding = torch.cat([m.flatten(1) for m in masks], 1)
    return EncoderMemory(tokens, padding, pos, spatial, start, ratios, image_sizes)


def _attention(**kwargs) -> GaussianCrossAttention:
    torch.manual_seed(0)
    kwargs.setdefault("level_strides", (32,))
    module = GaussianCrossAttention(DIM, HEADS, predicts_reference=True, **kwargs).eval()
    # Non-trivial scales (they start at exactly 1).
    if module.scale_head is not None:
        torch.nn.init.normal_(module.scale_head.weight, std=0.3)
    return module


def _queries(batch: int = 2, num: int = 6, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, num, DIM)
    return tuple(torch.randn(shape, generator=generator) for _ in range(3))


@pytest.mark.parametrize("mode", ["none", "isotropic", "per_axis", "covariance_like"])
def test_each_scale_mode_equals_a_direct_computation(mode):
    generator = torch.Generator().manual_seed(3)
    centres = torch.rand(1, 2, HEADS, 2, generator=generator) * 4
    per_head = {"none": 0, "isotropic": 1, "per_axis": 2, "covariance_like": 3}[mode]
    scales = torch.rand(1, 2, HEADS, per_head, generator=generator) if per_head else None
    prior = gaussian_log_prior(centres, scales, token_grid(2, 3), mode, smooth=4.0)
    assert prior.shape == (1, HEADS, 2, 6)
    for query, head, row, col in itertools.product(range(2), range(HEADS), range(2), range(3)):
        cx, cy = centres[0, query, head].tolist()
        dx, dy = (cx - col) ** 2, (cy - row) ** 2
        s = scales[0, query, head].tolist() if scales is not None else []
        if mode == "none":
            distance = dx + dy
        elif mode == "isotropic":
            distance = s[0] * (dx + dy)
        elif mode == "per_axis":
            distance = s[0] * dx + s[1] * dy
        else:
            distance = s[0] * dx + s[1] * dy + s[2] * dx * dy
        want = torch.tensor(-abs(distance) / 4.0)
        got = prior[0, head, query, row * 3 + col]  # tokens row-major
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_reference_and_centres_follow_the_unpadded_image_size():
    module = _attention(scale="none")
    content, pos, _ = _queries()
    memory = _memory()
    reference = module.predict_reference(content, pos)
    modulation = module._modulation_input(content, pos)
    offsets = module.offset_head(modulation).view(2, 6, HEADS, 2)
    # (x, y) of the reference scaled by each image's (w, h) to stride-32 pixels, plus offsets.
    wh = torch.tensor([[128.0, 96.0], [100.0, 90.0]])[:, None, None, :]
    centres = reference[:, :, None, :] * wh / 32 + offsets
    want = gaussian_log_prior(centres, None, token_grid(3, 4), "none", 8.0)
    torch.testing.assert_close(module.prior(modulation, reference, memory), want)


def test_prior_is_added_after_the_padding_mask_and_before_the_softmax():
    module = _attention()
    query, pos, layer_input = _queries()
    memory = _memory()
    reference = module.predict_reference(layer_input, pos)
    got = module(query, pos, reference, memory, layer_input=layer_input)
    # By hand: logits, -inf on padding, + prior, softmax, values, output projection.
    attn = module.attn
    prior = module.prior(module._modulation_input(layer_input, pos), reference, memory)
    q = attn._split_heads(attn.q_proj(query + pos))
    k = attn._split_heads(attn.k_proj(memory.tokens + memory.pos))
    v = attn._split_heads(attn.v_proj(memory.tokens))
    logits = q @ k.transpose(-1, -2) / math.sqrt(DIM // HEADS)
    logits = logits.masked_fill(memory.padding_mask[:, None, None, :], float("-inf")) + prior
    weights = logits.softmax(-1)
    assert (weights[1][..., memory.padding_mask[1]] == 0).all()
    out = (weights @ v).transpose(1, 2).reshape(2, 6, DIM)
    torch.testing.assert_close(got, attn.out_proj(out), rtol=1e-5, atol=1e-5)
    # The prior changes the result (it is not a no-op).
    plain = attn(query + pos, memory.tokens + memory.pos, memory.tokens, memory.padding_mask)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_with_a_zero_prior_the_layer_equals_plain_cross_attention():
    module = _attention(smooth=math.inf)  # -|d| / inf = 0 for every token
    plain = CrossAttention(DIM, HEADS).eval()
    plain.attn.load_state_dict(module.attn.state_dict())
    query, pos, layer_input = _queries()
    memory = _memory()
    reference = module.predict_reference(layer_input, pos)
    assert not module.prior(module._modulation_input(layer_input, pos), reference, memory).any()
    torch.testing.assert_close(
        module(query, pos, reference, memory, layer_input=layer_input),
        plain(query, pos, None, memory),
    )


def test_head_and_query_mixture_leave_half_the_heads_and_queries_unmodulated():
    module = _attention(head_mixture=True, num_plain_queries=2)
    _, pos, layer_input = _queries()
    reference = module.predict_reference(layer_input, pos)
    assert (reference[:, :2] == 0.5).all() and (reference[:, 2:] != 0.5).all()
    prior = module.prior(module._modulation_input(layer_input, pos), reference, _memory())
    assert not prior[:, HEADS // 2 :].any() and not prior[:, :, :2].any()
    assert (prior[:, : HEADS // 2, 2:] < 0).all()


def test_level_softmax_normalises_each_level_and_weights_the_levels():
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(2, HEADS, 6, 4, generator=generator)
    k = torch.randn(2, HEADS, 10, 4, generator=generator)
    bias = -torch.rand(2, HEADS, 6, 10, generator=generator)
    bias[1, ..., 5] = float("-inf")  # a padded key
    level_weights = torch.softmax(torch.randn(2, 6, 2, generator=generator), -1)
    identity = torch.eye(10).expand(2, HEADS, -1, -1)  # values = one-hot: returns the weights
    weights = level_softmax_attention(
        q, k, identity, bias, 0.0, level_sizes=[6, 4], level_weights=level_weights
    )
    per_head = level_weights[:, None].expand(-1, HEADS, -1, -1)
    torch.testing.assert_close(weights[..., :6].sum(-1), per_head[..., 0])
    torch.testing.assert_close(weights[..., 6:].sum(-1), per_head[..., 1])
    assert (weights[1, ..., 5] == 0).all()
    # One level with weight 1 is ordinary attention.
    one = level_softmax_attention(
        q, k, identity, bias, 0.0, level_sizes=[10], level_weights=torch.ones(2, 6, 1)
    )
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, identity, attn_mask=bias)
    torch.testing.assert_close(one, sdpa)


def test_first_image_level_weights_reproduce_the_original_bug_only_when_asked():
    shapes = ((2, 3), (2, 2))
    query, pos, layer_input = _queries()
    memory = _memory(shapes)
    outputs = {}
    for flag in (False, True):
        module = _attention(level_strides=(16, 32), first_image_level_weights=flag)
        reference = module.predict_reference(layer_input, pos)
        outputs[flag] = module(query, pos, reference, memory, layer_input=layer_input)
        # Image 1 alone: what it gets in a batch must not depend on image 0 (fixed behaviour).
        alone = replace(
            memory,
            tokens=memory.tokens[1:],
            pos=memory.pos[1:],
            padding_mask=memory.padding_mask[1:],
            valid_ratios=memory.valid_ratios[1:],
            image_sizes=memory.image_sizes[1:],
        )
        single = module(query[1:], pos[1:], reference[1:], alone, layer_input=layer_input[1:])
        if not flag:
            torch.testing.assert_close(outputs[flag][1:], single)
        else:
            assert not torch.allclose(outputs[flag][1:], single, atol=1e-4)
    torch.testing.assert_close(outputs[False][:1], outputs[True][:1])


TINY = [
    "model.hidden_dim=32",
    "model.num_heads=2",
    "model.num_queries=8",
    "model.encoder.num_layers=1",
    "model.encoder.ffn_dim=64",
    "model.decoder.num_layers=2",
    "model.decoder.ffn_dim=64",
    "model.backbone.name=resnet18",
]


def _step(cfg) -> dict:
    """One training step and one eval pass at tiny size; returns the loss terms."""
    torch.manual_seed(0)
    model, criterion = build_model(cfg, 3), build_criterion(cfg, 3)
    pixels = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 100:] = True
    images = ImageBatch(pixels, mask, torch.tensor([[96, 128], [96, 100]]))
    targets = [
        Target(torch.tensor([0, 2]), torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])),
        Target(torch.tensor([1]), torch.tensor([[0.5, 0.5, 0.4, 0.4]])),
    ]
    losses = criterion(model.train()(images, targets), targets)
    losses.total.backward()
    assert torch.isfinite(losses.total)
    with torch.no_grad():
        found = build_postprocess(cfg)(model.eval()(images).for_inference(), images.sizes)
    assert len(found[0].scores) == cfg.top_k
    return losses.terms


@pytest.mark.parametrize("scheme", ["hybrid", "mixed_layer_output", "mixed_cross_attn"])
def test_schemes_compose_with_smca(scheme):
    cfg = load_config("smca_r50", TINY).model
    schemes = {
        "hybrid": SchemeSettings({"hybrid": HybridConfig(num_queries=16, repeat_k=2)}),
        "mixed_layer_output": SchemeSettings({"mixed": MixedConfig(predict_from="layer_output")}),
        "mixed_cross_attn": SchemeSettings({"mixed": MixedConfig()}),
    }[scheme]
    cfg = replace(cfg, schemes=schemes, top_k=8)
    if scheme == "mixed_cross_attn":
        cfg = replace(cfg, decoder=replace(cfg.decoder, order=("cross_attn", "self_attn", "ffn")))
    terms = _step(cfg)
    group = {"hybrid": "o2m", "mixed_layer_output": "ms_o2m", "mixed_cross_attn": "ms_o2m"}
    assert any(name.startswith(group[scheme] + "/") for name in terms)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.queries.kind=learned_with_reference"], "model.queries.kind=learned"),
        (["model.box_refine=iterative"], "model.box_refine=none"),
        (["model.encoder.attention=smca"], "smca_conv"),
        (["model.smca.encoder_kernel=4"], "odd"),
        (["model.smca.query_mixture=true", "model.schemes.hybrid.num_queries=16"], "hybrid"),
        (["model.decoder.attention=global"], "model.decoder.attention=smca"),
    ],
)
def test_invalid_smca_configs_fail_validation_with_a_reason(overrides, message):
    base = ["model.smca.smooth=4"] if "model.decoder.attention=global" in overrides else []
    cfg = load_config("smca_r50", TINY + base + overrides).model
    with pytest.raises(UserError, match=message):
        build_model(cfg, 3)


# The README commands (docs/methods.md#smca-detr-training) and the 44.4 AP log's model (C6.6),
# applied to the official
# defaults a golden case records; each preset must equal what the converter derives from them.
_R50 = dict(backbone="resnet50", enc_layers=6, dec_layers=6, dim_feedforward=2048, dropout=0.1,
            num_queries=300, epochs=50, lr_drop=40, dynamic_scale="type3")  # fmt: skip
_MS = dict(_R50, enc_layers=5, dim_feedforward=1024, batch_size=1)
PUBLISHED = [
    ("smca_r50", "smca_r18_type3", _R50),
    ("smca_r50_ms", "smca_ms_r18_type3", _MS),
    ("smca_r50_ms_150ep", "smca_ms_r18_type3", dict(_MS, epochs=150, lr_drop=100)),
    ("smca_r50_ms_k7", "smca_ms_k7_r18_type3", dict(_MS, enc_layers=6)),
    ("smca_r50_ms_head_mixture", "smca_ms_r18_type3", dict(_MS, head_mixture=True)),
    ("smca_r50_ms_query_mixture", "smca_ms_r18_type3", dict(_MS, query_mixture=True)),
]


@pytest.mark.parametrize(("preset", "case", "flags"), PUBLISHED)
def test_presets_equal_the_published_commands(preset, case, flags):
    converted = published_config(case, flags)
    ours = load_config(preset)
    assert replace(converted.model, num_classes=None) == ours.model
    assert (converted.train.epochs, converted.train.lr_drop) == (
        ours.train.epochs,
        ours.train.lr_drop,
    )
    assert converted.data.batch_size == ours.data.batch_size


def _case(name: str) -> GoldenCase:
    path = SHIPPED_DIR / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"golden case {path} not available")
    return GoldenCase.load(path)


def test_cli_converts_an_official_smca_checkpoint(tmp_path):
    case = _case("smca_r18_type3")
    official = tmp_path / "official.pth"
    args = argparse.Namespace(**case.spec["args"])
    torch.save({"model": case.official_state, "args": args}, official)
    out = tmp_path / "converted.safetensors"
    assert main(["convert", "--from", "smca", str(official), "--out", str(out)]) == 0
    loaded = load_model(out)
    assert loaded.label_map.num_classes == 92  # the original's 92 sigmoid outputs
    with torch.no_grad():
        output = loaded.model(case.batch()).for_inference()
    torch.testing.assert_close(
        output.logits[-1], case.tensors["eval.f32.out.pred_logits"], atol=1e-4, rtol=1e-4
    )


def test_multi_scale_arguments_are_refused_by_the_single_scale_source():
    case = _case("smca_ms_r18_type3")
    with pytest.raises(UserError, match="smca_ms"):
        SOURCES["smca"].config_from_args(case.spec["args"])


def test_converted_multi_scale_config_fixes_the_batch_bug_unless_asked():
    case = _case("smca_ms_r18_type3")
    source = SOURCES["smca_ms"]
    config = source.config_from_args(case.spec["args"])
    assert config.model.smca == SmcaConfig(first_image_level_weights=False)
    assert source.original_bugs(config).model.smca.first_image_level_weights


def test_cli_converts_an_official_multi_scale_checkpoint_without_the_batch_bug(tmp_path):
    case = _case("smca_ms_k7_r18_type3")
    official = tmp_path / "official.pth"
    args = argparse.Namespace(**case.spec["args"])
    torch.save({"model": case.official_state, "args": args}, official)
    out = tmp_path / "converted.safetensors"
    assert main(["convert", "--from", "smca_ms_k7", str(official), "--out", str(out)]) == 0
    with torch.no_grad():
        logits = load_model(out).model(case.batch()).for_inference().logits[-1]
    recorded = case.tensors["eval.f32.out.pred_logits"]
    # Image 0 is what the original computes; image 1 gets its own level weights, not image 0's.
    torch.testing.assert_close(logits[0], recorded[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits[1], recorded[1], atol=1e-3)
