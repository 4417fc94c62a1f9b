# SPDX-License-Identifier: Apache-2.0
"""MPViT backbones (docs/methods.md#mpvit-and-coat-mpvit): shapes, official checkpoints, freezing,
gradient checkpointing."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from torchvision.ops import FrozenBatchNorm2d

from detrkit.config.load import load_config
from detrkit.convert.sources import source_for_repo
from detrkit.errors import UserError
from detrkit.models.backbones import BackboneSpec, build_backbone
from detrkit.models.backbones.mpvit import MPViTBackbone
from detrkit.models.backbones.mpvit_layers import MHCAEncoder
from tests.golden.golden_case import SHIPPED_DIR

STAGES = ("c3", "c4", "c5")
# docs/methods.md#mpvit-and-coat-mpvit: stage3..stage5 channels per variant.
CHANNELS = {
    "mpvit_tiny": (176, 216, 216),
    "mpvit_xsmall": (192, 256, 256),
    "mpvit_small": (216, 288, 288),
    "mpvit_base": (368, 480, 480),
}
GOLDEN_CASE = SHIPPED_DIR / "deformable_detr_mpvit_tiny_ms.json"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(**kwargs) -> MPViTBackbone:
    torch.manual_seed(0)
    backbone = MPViTBackbone("mpvit_tiny", return_stages=STAGES, **kwargs)
    for name, buffer in backbone.named_buffers():  # non-trivial BatchNorm statistics
        if name.endswith("running_mean"):
            buffer.normal_(0, 0.1)
        elif name.endswith("running_var"):
            buffer.uniform_(0.5, 1.5)
    return backbone


def _official_layout(backbone: MPViTBackbone) -> dict[str, torch.Tensor]:
    """Our weights under the official names: + per-block aliases of the shared cpe/crpe + head."""
    state = dict(backbone.state_dict())
    for name, module in backbone.named_modules():
        if isinstance(module, MHCAEncoder):
            for k in range(len(module.MHCA_layers)):
                block = f"{name}.MHCA_layers.{k}"
                for key, value in module.cpe.state_dict().items():
                    state[f"{block}.cpe.{key}"] = value.clone()
                for key, value in module.crpe.state_dict().items():
                    state[f"{block}.crpe.{key}"] = value.clone()
                    state[f"{block}.factoratt_crpe.crpe.{key}"] = value.clone()
    state["cls_head.cls.weight"] = torch.randn(1000, 216)
    state["cls_head.cls.bias"] = torch.randn(1000)
    return state


@pytest.mark.parametrize("name", ["mpvit_tiny", "mpvit_xsmall", "mpvit_small"])
def test_variants_run_forward_and_backward(name):
    backbone = MPViTBackbone(name, return_stages=STAGES)
    assert backbone.out_channels == dict(zip(STAGES, CHANNELS[name]))
    assert backbone.strides == {"c3": 8, "c4": 16, "c5": 32}
    out = backbone(torch.randn(2, 3, 32, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        s: (2, c, 32 // stride, 64 // stride)
        for s, c, stride in zip(STAGES, CHANNELS[name], (8, 16, 32))
    }
    sum(v.square().mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in backbone.parameters())


def test_base_variant_shapes_on_meta_device():
    with torch.device("meta"):
        backbone = MPViTBackbone("mpvit_base", return_stages=("c2", *STAGES))
        out = backbone(torch.randn(2, 3, 64, 96))
    assert backbone.out_channels == {"c2": 224, **dict(zip(STAGES, CHANNELS["mpvit_base"]))}
    assert backbone.strides["c2"] == 4
    assert [tuple(v.shape) for v in out.values()] == [
        (2, 224, 16, 24),
        (2, 368, 8, 12),
        (2, 480, 4, 6),
        (2, 480, 2, 3),
    ]
    sum(v.sum() for v in out.values()).backward()
    # Official MPViT-B has 74.8 M parameters with its 1000-class head (481 k).
    assert sum(p.numel() for p in backbone.parameters()) == 74_364_976


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_official_checkpoint_loads_and_reproduces_outputs(tmp_path, fmt):
    source = _tiny().eval()
    official = _official_layout(source)
    path = tmp_path / f"mpvit_tiny.{fmt}"
    if fmt == "pth":
        torch.save({"model": official}, path)
    else:
        save_file({f"module.{k}": v.contiguous() for k, v in official.items()}, str(path))
    torch.manual_seed(1)
    loaded = MPViTBackbone("mpvit_tiny", return_stages=STAGES).eval()
    loaded.load_pretrained(path)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want, got = source(pixels), loaded(pixels)
    for stage in STAGES:
        torch.testing.assert_close(got[stage], want[stage])


def test_official_checkpoint_loads_into_frozen_batchnorm(tmp_path):
    path = tmp_path / "mpvit_tiny.pth"
    torch.save(_official_layout(_tiny()), path)  # with num_batches_tracked, as published
    frozen = MPViTBackbone("mpvit_tiny", norm="frozen_bn")
    assert isinstance(frozen.stem[0].bn, FrozenBatchNorm2d)
    frozen.load_pretrained(path)
    torch.testing.assert_close(frozen.stem[0].bn.running_var, _tiny().stem[0].bn.running_var)


def test_wrong_variant_or_missing_file_is_a_clear_error(tmp_path):
    path = tmp_path / "mpvit_tiny.pth"
    torch.save(_official_layout(_tiny()), path)
    with pytest.raises(UserError, match=r"mpvit_tiny\.pth.*check model\.backbone\.name"):
        MPViTBackbone("mpvit_xsmall").load_pretrained(path)
    with pytest.raises(UserError, match="not found"):
        MPViTBackbone("mpvit_tiny").load_pretrained(tmp_path / "missing.pth")


@pytest.mark.skipif(not GOLDEN_CASE.is_file(), reason="golden MPViT case not available")
def test_official_layout_equals_the_recorded_checkpoint():
    spec = json.loads(GOLDEN_CASE.read_text())
    prefix = "backbone.0.backbone."
    recorded = {
        e["key"][len(prefix) :]: e["shape"]
        for e in spec["state_dict"]
        if e["key"].startswith(prefix)
    }
    ours = _official_layout(MPViTBackbone("mpvit_tiny"))
    del ours["cls_head.cls.weight"], ours["cls_head.cls.bias"]
    assert {k: list(v.shape) for k, v in ours.items()} == recorded


def test_gradient_checkpointing_gives_same_loss_gradients_and_statistics():
    plain = _tiny(drop_path_rate=0.3)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointing = True
    pixels = torch.randn(2, 3, 48, 48, requires_grad=True)
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(3)  # the same drop-path masks; recomputation replays them
        loss = sum((v * v.detach().sin()).mean() for v in model.train()(pixels).values())
        (grad_input,) = torch.autograd.grad(loss, pixels, retain_graph=True)
        loss.backward()
        results.append((loss, grad_input, model))
    (loss_a, input_a, a), (loss_b, input_b, b) = results
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(input_a, input_b)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # Running statistics were updated once, not again during recomputation.
    for (name, x), y in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(x, y, msg=name)


def test_frozen_stages_and_trainable():
    def trained(backbone):
        return {n.split(".")[0] + n.split(".")[1] for n, p in backbone.named_parameters()
                if p.requires_grad}  # fmt: skip

    everything = {f"{part}{i}" for part in ("patch_embed_stages", "mhca_stages") for i in range(4)}
    assert trained(MPViTBackbone("mpvit_tiny")) == everything | {"stem0", "stem1"}
    frozen = MPViTBackbone("mpvit_tiny", frozen_stages=1).train()
    assert trained(frozen) == everything - {"patch_embed_stages0", "mhca_stages0"}
    assert not frozen.stem.training and not frozen.mhca_stages[0].training
    assert frozen.mhca_stages[1].training
    assert trained(MPViTBackbone("mpvit_tiny", trainable=False)) == set()
    with pytest.raises(UserError, match="frozen_stages"):
        MPViTBackbone("mpvit_tiny", frozen_stages=5)


def test_registry_builds_from_config():
    cfg = BackboneSpec(name="mpvit_tiny", norm="bn", frozen_stages=0, checkpointing=True)
    backbone = build_backbone(cfg, STAGES)
    assert isinstance(backbone, MPViTBackbone) and backbone.checkpointing
    with pytest.raises(UserError, match="dilation"):
        build_backbone(replace(cfg, dilation=True), STAGES)


@pytest.mark.skipif(not GOLDEN_CASE.is_file(), reason="golden MPViT case not available")
def test_converted_config_and_preset():
    """The official args give the original's backbone setup, and the preset equals the published
    MPViT-S run (Deformable DETR defaults at full size, docs/methods.md#mpvit-and-coat)."""
    args = json.loads(GOLDEN_CASE.read_text())["args"]
    source = source_for_repo("MPViT-deformable_detr")
    backbone = source.config_from_args(args).model.backbone
    assert (backbone.name, backbone.norm, backbone.frozen_stages) == ("mpvit_tiny", "bn", 0)
    kwargs = dict(args, backbone_kwargs="{'drop_path_rate': 0.1}")
    assert source.config_from_args(kwargs).model.backbone.drop_path_rate == 0.1
    with pytest.raises(UserError, match="backbone_kwargs"):
        source.config_from_args(dict(args, backbone_kwargs="{'norm': 'BN'}"))
    published = dict(
        args, backbone="mpvit_small", hidden_dim=256, enc_layers=6, dec_layers=6,
        dim_feedforward=1024, num_queries=300, dropout=0.1,
    )  # fmt: skip
    converted = source.config_from_args(published)
    preset = load_config("deformable_detr_mpvit_small")
    assert replace(converted.model, num_classes=None) == preset.model
    assert converted.train == replace(preset.train, seed=converted.train.seed)
    assert converted.data.batch_size == preset.data.batch_size == 2
