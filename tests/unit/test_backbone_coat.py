# SPDX-License-Identifier: Apache-2.0
"""CoaT / CoaT-Lite backbones (timm) and the Deformable-DETR-with-CoaT converter
(docs/methods.md#mpvit-and-coat-coat)."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import DropPath

import detrkit.models.backbones.coat as coat_module
from detrkit.config.load import load_config
from detrkit.convert.coat import COAT_BACKBONE_RULES, coat_config
from detrkit.convert.rules import convert_state_dict
from detrkit.errors import UserError
from detrkit.models.backbones import BackboneSpec
from detrkit.models.backbones.coat import CoaTBackbone, build_coat
from tests.golden.golden_case import SHIPPED_DIR

STAGES = ("c2", "c3", "c4", "c5")
# docs/methods.md#mpvit-and-coat-coat (the detector's x2/x3/x4 = c3/c4/c5) and timm for the
# scale-1 width and lite medium.
SPEC_CHANNELS = {
    "coat_lite_tiny": (64, 128, 256, 320),
    "coat_lite_mini": (64, 128, 320, 512),
    "coat_lite_small": (64, 128, 320, 512),
    "coat_lite_medium": (128, 256, 320, 512),
    "coat_tiny": (152, 152, 152, 152),
    "coat_mini": (152, 216, 216, 216),
    "coat_small": (152, 320, 320, 320),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: thread hand-offs would cost more than the arithmetic (and stall on a busy
    machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name: str, **kwargs) -> CoaTBackbone:
    """A backbone with cheap random weights (timm's truncated-normal init is slow on the CPU)."""
    with torch.device("meta"):
        backbone = CoaTBackbone(name, **kwargs)
    backbone.to_empty(device="cpu")
    with torch.no_grad():
        for param_name, param in backbone.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.05)
            elif ".norm" in param_name and param_name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.uniform_(-0.1, 0.1)
    return backbone


@pytest.fixture(scope="module")
def coat_tiny() -> CoaTBackbone:
    torch.manual_seed(0)
    return _build("coat_tiny")


def _loss(backbone: CoaTBackbone, pixels: torch.Tensor) -> torch.Tensor:
    return sum((x * x.detach().sin()).mean() for x in backbone(pixels).values())


@pytest.mark.parametrize("name", list(SPEC_CHANNELS))
def test_strides_channels_and_shapes(name):
    with torch.device("meta"):
        backbone = CoaTBackbone(name, return_stages=STAGES)
        out = backbone(torch.zeros(1, 3, 64, 96))
    assert backbone.out_channels == dict(zip(STAGES, SPEC_CHANNELS[name]))
    assert backbone.strides == {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
    for stage, stride in backbone.strides.items():
        assert out[stage].shape == (1, backbone.out_channels[stage], 64 // stride, 96 // stride)


@pytest.mark.parametrize("name", ["coat_lite_tiny", "coat_tiny"])
def test_forward_backward_every_parameter_gets_a_gradient(name, coat_tiny):
    backbone = coat_tiny if name == "coat_tiny" else _build(name)
    backbone.zero_grad(set_to_none=True)
    _loss(backbone.train(), torch.randn(1, 3, 32, 32)).backward()
    unused = [n for n, p in backbone.named_parameters() if p.grad is None]
    assert not unused
    params = list(backbone.named_parameters(remove_duplicate=False))
    assert len({id(p) for _, p in params}) == len(params)  # nothing registered twice


def test_shared_modules_stay_shared_in_copies(coat_tiny):
    """EMA and the tests deep-copy models: the blocks must use the copy's own shared modules."""
    body = copy.deepcopy(coat_tiny).body
    assert body.serial_blocks2[1].cpe is body.cpe2 is not coat_tiny.body.cpe2
    assert body.serial_blocks2[1].factoratt_crpe.crpe is body.crpe2
    assert body.parallel_blocks[3].factoratt_crpe4.crpe is body.crpe4
    assert body.parallel_blocks[3].mlp4 is body.parallel_blocks[3].mlp2


def test_parallel_blocks_take_sizes_the_original_cannot(coat_tiny):
    """40 // 8 = 5 scale-2 rows do not nest with scales 3 and 4: padded, then cropped back."""
    with torch.no_grad():
        out = coat_tiny.eval()(torch.randn(1, 3, 40, 48))
    assert [tuple(x.shape[-2:]) for x in out.values()] == [(5, 6), (2, 3), (1, 1)]


def test_drop_path_rate_is_constant_over_blocks(coat_tiny):
    with torch.device("meta"):
        backbone = CoaTBackbone("coat_small", drop_path_rate=0.2)
    rates = [m.drop_prob for m in backbone.modules() if isinstance(m, DropPath)]
    assert len(rates) == 4 * 2 + 6 and set(rates) == {0.2}
    assert not any(isinstance(m, DropPath) for m in coat_tiny.modules())  # rate 0: Identity


@pytest.mark.parametrize("name", ["coat_lite_tiny", "coat_tiny"])
def test_checkpointing_gives_the_same_loss_and_gradients(name, monkeypatch, coat_tiny):
    plain = copy.deepcopy(coat_tiny) if name == "coat_tiny" else _build(name)
    for module in plain.modules():  # stochastic depth too: checkpointing replays the RNG
        if isinstance(getattr(module, "drop_path", None), torch.nn.Identity):
            module.drop_path = DropPath(0.3)
    ckpt = copy.deepcopy(plain)
    ckpt.checkpointing = True
    calls = []
    original = coat_module.checkpoint
    monkeypatch.setattr(
        coat_module, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    pixels = torch.randn(1, 3, 32, 32)
    losses = []
    for backbone in (plain.train(), ckpt.train()):
        torch.manual_seed(1)
        losses.append(_loss(backbone, pixels))
        losses[-1].backward()
    assert calls  # blocks were recomputed
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert a.grad is not None, n
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=n)


def test_frozen_stages_and_trainable():
    def trainable(**kwargs):
        with torch.device("meta"):
            backbone = CoaTBackbone("coat_lite_tiny", **kwargs)
        return {n.split(".")[1] for n, p in backbone.named_parameters() if p.requires_grad}

    everything = trainable()
    assert "serial_blocks1" in everything and "cls_token1" in everything
    frozen = {f"{p}{i}" for i in (1, 2) for p in ("patch_embed", "cls_token", "cpe", "crpe")}
    frozen |= {"serial_blocks1", "serial_blocks2"}
    assert trainable(frozen_stages=2) == everything - frozen
    assert trainable(trainable=False) == set()
    with pytest.raises(UserError, match="frozen_stages"):
        CoaTBackbone("coat_lite_tiny", frozen_stages=5)
    with pytest.raises(UserError, match="dilation"):
        build_coat(BackboneSpec(name="coat_lite_tiny", dilation=True), ("c5",))


def _with_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in the original layout: the blocks list the shared cpe/crpe again, the
    parallel blocks mlp2 as mlp3 and mlp4 (docs/methods.md#mpvit-and-coat-coat)."""
    out = dict(state)
    for key, value in state.items():
        block = re.match(r"serial_blocks([1-4])\.\d+\.", key)
        if block and key.endswith("norm1.weight"):
            i = block[1]
            for name, shared in state.items():
                if name.startswith(f"cpe{i}."):
                    out[block[0] + name.replace(f"cpe{i}.", "cpe.")] = shared
                if name.startswith(f"crpe{i}."):
                    out[block[0] + "factoratt_crpe." + name.replace(f"crpe{i}.", "crpe.")] = shared
        parallel = re.match(r"(parallel_blocks\.\d+\.)(mlp2|factoratt_crpe([234]))\.", key)
        if parallel and parallel[2] == "mlp2":
            for copy_name in ("mlp3", "mlp4"):
                out[key.replace("mlp2", copy_name)] = value
        if parallel and parallel[3] and key.endswith("qkv.weight"):
            i = parallel[3]
            for name, shared in state.items():
                if name.startswith(f"crpe{i}."):
                    out[key.replace("qkv.weight", name.replace(f"crpe{i}.", "crpe."))] = shared
    return out


def _official_imagenet_state(backbone: CoaTBackbone) -> dict[str, torch.Tensor]:
    """The original's classification checkpoint: aliases, norm1-4, head, aggregate (CoaT)."""
    state = _with_aliases(backbone.body.state_dict())
    dims = backbone.body.embed_dims
    for i, width in enumerate(dims, 1):
        state |= {f"norm{i}.weight": torch.ones(width), f"norm{i}.bias": torch.zeros(width)}
    state |= {"head.weight": torch.zeros(7, dims[-1]), "head.bias": torch.zeros(7)}
    if backbone.has_parallel_blocks:
        state |= {"aggregate.weight": torch.ones(1, 3, 1), "aggregate.bias": torch.zeros(1)}
    with torch.device("meta"):  # timm's classification model has the original's names
        full = timm.create_model(backbone.name, pretrained=False, num_classes=7)
    unused_norms = {k for k in state if re.fullmatch(r"norm[1-3]\.(weight|bias)", k)}
    assert set(full.state_dict()) <= set(state) <= set(full.state_dict()) | unused_norms
    return state


@pytest.mark.parametrize("name", ["coat_lite_tiny", "coat_tiny"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_official_checkpoint_loads(tmp_path, name, suffix, coat_tiny):
    source = coat_tiny if name == "coat_tiny" else _build(name)
    state = _official_imagenet_state(source)
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".pth":
        torch.save({"model": state, "epoch": 300}, path)
    else:  # safetensors files hold each shared tensor once
        dedup = {k: v for k, v in state.items() if not coat_module.ALIAS_KEYS.match(k)}
        save_file({k: v.contiguous() for k, v in dedup.items()}, str(path))
    target = _build(name)
    target.load_pretrained(path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    if name == "coat_lite_tiny":  # and computes the same
        pixels = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            want, got = source.eval()(pixels), target.eval()(pixels)
        for stage in want:
            torch.testing.assert_close(got[stage], want[stage], rtol=0, atol=0)


def test_wrong_variant_is_a_clear_error(tmp_path):
    path = tmp_path / "coat_lite_tiny.pth"
    torch.save({"model": _official_imagenet_state(_build("coat_lite_tiny"))}, path)
    mini = _build("coat_lite_mini")
    with pytest.raises(UserError, match=r"coat_lite_tiny\.pth.*wrong shape.*model\.backbone\.name"):
        mini.load_pretrained(path)
    with pytest.raises(UserError, match="not found"):
        mini.load_pretrained(tmp_path / "missing.pth")


def test_converter_maps_the_official_parallel_layout(coat_tiny):
    official = _with_aliases(coat_tiny.body.state_dict())
    source = {f"backbone.0.backbone.{k}": v for k, v in official.items()}
    result = convert_state_dict(source, COAT_BACKBONE_RULES)
    assert result.clean, result.describe()
    assert any(".mlp4." in k for k in result.dropped)
    assert result.state_dict.keys() == {f"backbone.{k}" for k in coat_tiny.state_dict()}


def _golden_args() -> dict:
    path = SHIPPED_DIR / "deformable_detr_coat_lite_tiny_ms.json"
    if not path.is_file():
        pytest.skip(f"golden case {path} not available (its args are the official defaults)")
    return json.loads(path.read_text())["args"]


def test_backbone_kwargs():
    args = dict(_golden_args(), backbone="coat_small", backbone_kwargs="{'drop_path_rate':0.2}")
    backbone = coat_config(args).model.backbone
    assert (backbone.name, backbone.drop_path_rate, backbone.frozen_stages) == (
        "coat_small",
        0.2,
        0,
    )
    with pytest.raises(UserError, match="drop_rate"):
        coat_config(dict(args, backbone_kwargs="{'drop_rate': 0.1}"))


# The published commands (docs/methods.md#mpvit-and-coat-coat): Deformable DETR defaults with the
# CoaT backbone.
_FULL = dict(
    hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6, dim_feedforward=1024, num_queries=300,
    dropout=0.1, num_feature_levels=4, epochs=50, lr_drop=40,
)  # fmt: skip


@pytest.mark.parametrize(
    ("preset", "flags"),
    [
        ("deformable_detr_coat_lite_small", dict(backbone="coat_lite_small")),
        (
            "deformable_detr_coat_small",
            dict(backbone="coat_small", backbone_kwargs="{'drop_path_rate':0.2}"),
        ),
    ],
)
def test_presets_equal_the_published_commands(preset, flags):
    converted = coat_config(dict(_golden_args(), **_FULL, **flags))
    ours = load_config(preset)
    assert replace(converted.model, num_classes=None) == ours.model
    assert converted.train == replace(ours.train, seed=converted.train.seed)
    assert converted.data.batch_size == ours.data.batch_size == 2
