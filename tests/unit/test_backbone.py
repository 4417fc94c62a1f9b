# SPDX-License-Identifier: Apache-2.0
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from detrkit.errors import UserError
from detrkit.models.backbones.resnet import ResNetBackbone


def _imagenet_state(name="resnet18"):
    net = getattr(torchvision.models, name)(weights=None)
    for param in net.parameters():
        torch.nn.init.normal_(param)
    return net.state_dict()  # includes fc.* and num_batches_tracked, as published files do


@pytest.mark.parametrize("prefix,suffix", [("", ".pth"), ("model.", ".pth"), ("", ".safetensors")])
def test_pretrained_weights_load_from_local_file(tmp_path, prefix, suffix):
    state = {prefix + k: v for k, v in _imagenet_state().items()}
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state} if prefix else state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    backbone = ResNetBackbone("resnet18", return_stages=("c3", "c5"))
    backbone.load_pretrained(path)
    torch.testing.assert_close(
        backbone.layer3[0].conv1.weight, state[prefix + "layer3.0.conv1.weight"]
    )
    torch.testing.assert_close(backbone.bn1.running_var, state[prefix + "bn1.running_var"])


def test_wrong_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(_imagenet_state("resnet50"), path)
    with pytest.raises(UserError, match="r50.pth"):
        ResNetBackbone("resnet18").load_pretrained(path)
    with pytest.raises(UserError, match="not found"):
        ResNetBackbone("resnet18").load_pretrained(tmp_path / "missing.pth")


@pytest.mark.parametrize("dilation,last_stride", [(False, 32), (True, 16)])
def test_strides_channels_and_shapes(dilation, last_stride):
    backbone = ResNetBackbone("resnet50", return_stages=("c3", "c4", "c5"), dilation=dilation)
    assert backbone.out_channels == {"c3": 512, "c4": 1024, "c5": 2048}
    assert backbone.strides["c5"] == last_stride
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 96))
    assert out["c5"].shape == (1, 2048, 64 // last_stride, 96 // last_stride)


def test_frozen_stages_and_trainable():
    names = lambda b: {n.split(".")[0] for n, p in b.named_parameters() if p.requires_grad}  # noqa: E731
    assert names(ResNetBackbone("resnet18")) == {"layer2", "layer3", "layer4"}
    assert names(ResNetBackbone("resnet18", frozen_stages=0)) >= {"conv1", "layer1"}
    assert names(ResNetBackbone("resnet18", trainable=False)) == set()


def test_dc5_needs_bottleneck_resnet():
    with pytest.raises(UserError, match="dilation"):
        ResNetBackbone("resnet18", dilation=True)


def test_unknown_backbone_names_the_closest_known_ones():
    from detrkit.config.build import build_model
    from detrkit.config.load import load_config
    from detrkit.errors import UserError

    with pytest.raises(UserError, match="unknown model.backbone.name 'resnet05'; did you mean"):
        build_model(load_config("detr_r50", ["model.backbone.name=resnet05"]).model, 3)


def test_backbone_spec_mirrors_the_config_schema():
    # build.backbone_spec copies field by field: a field added to one side only would be lost.
    from dataclasses import fields

    from detrkit.config.build import backbone_spec
    from detrkit.config.schema import BackboneConfig
    from detrkit.models.backbones import BackboneSpec

    assert [f.name for f in fields(BackboneSpec)] == [f.name for f in fields(BackboneConfig)]
    cfg = BackboneConfig(name="resnet34", dilation=True, weights="w.pth", frozen_stages=2)
    assert backbone_spec(cfg) == BackboneSpec(
        name="resnet34", dilation=True, weights="w.pth", frozen_stages=2
    )
