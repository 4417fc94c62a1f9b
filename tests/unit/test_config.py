# SPDX-License-Identifier: Apache-2.0
"""Tests of config loading: presets, base merging, overrides, strict validation, round trips."""

from __future__ import annotations

import dataclasses
import importlib.resources
import re

import pytest
import yaml

from detrkit.config.load import (
    config_from_dict,
    config_to_dict,
    dump_config,
    list_presets,
    load_config,
)
from detrkit.config.schema import ExperimentConfig, TrainConfig
from detrkit.errors import UserError

EXPECTED_PRESETS = {
    "detr_r50",
    "detr_r50_dc5",
    "detr_r101",
    "detr_r101_dc5",
    "detr_r50_150ep",
    "detr_tiny",
}


def _write(tmp_path, name, text):
    """Write a YAML file into ``tmp_path`` and return its path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- presets


def test_expected_presets_ship():
    assert EXPECTED_PRESETS <= set(list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_and_has_a_header_comment(name):
    cfg = load_config(name)
    assert isinstance(cfg, ExperimentConfig)
    text = importlib.resources.files("detrkit.configs").joinpath(f"{name}.yaml").read_text()
    assert text.startswith("# ")


def test_detr_r50_is_defaults_plus_schedule():
    cfg = load_config("detr_r50")
    expected = dataclasses.replace(
        ExperimentConfig(),
        train=dataclasses.replace(TrainConfig(), epochs=500, lr_drop=400),
    )
    assert cfg == expected


def test_base_chain_merges_nested_keys():
    cfg = load_config("detr_r101_dc5")  # -> detr_r50_dc5 -> detr_r50
    assert cfg.model.backbone.name == "resnet101"
    assert cfg.model.backbone.dilation is True
    assert (cfg.data.batch_size, cfg.data.eval_batch_size) == (1, 1)
    assert (cfg.train.epochs, cfg.train.lr_drop) == (500, 400)
    assert cfg.model.backbone.trainable is True  # untouched default survives the merge


def test_tiny_preset_values():
    cfg = load_config("detr_tiny")
    assert cfg.model.backbone.name == "resnet18"
    assert (cfg.model.hidden_dim, cfg.model.num_heads, cfg.model.num_queries) == (64, 4, 20)
    assert cfg.model.encoder == cfg.model.decoder
    assert (cfg.model.encoder.num_layers, cfg.model.encoder.ffn_dim) == (2, 128)
    assert cfg.model.encoder.dropout == 0.0
    assert cfg.data.train_scales == (96, 112, 128)
    assert (cfg.data.max_size, cfg.data.val_size, cfg.data.crop) == (192, 128, False)
    # No ImageNet weights in the demo: the whole backbone trains, at the transformer's lr.
    assert cfg.model.backbone.weights is None
    assert (cfg.model.backbone.frozen_stages, cfg.model.backbone.norm) == (0, "bn")
    assert cfg.train.lr_backbone == cfg.train.lr
    assert cfg.train.lr_drop < cfg.train.epochs


def test_user_file_with_base_preset_and_relative_base(tmp_path):
    _write(tmp_path, "parent.yaml", "base: detr_tiny\ntrain:\n  epochs: 7\n")
    child = _write(tmp_path, "child.yaml", "base: parent.yaml\nmodel:\n  num_queries: 9\n")
    cfg = load_config(str(child))
    assert (cfg.train.epochs, cfg.model.num_queries, cfg.model.hidden_dim) == (7, 9, 64)


def test_base_cycle_is_reported(tmp_path):
    _write(tmp_path, "a.yaml", "base: b.yaml\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))


def test_unknown_preset_lists_nearest_first():
    with pytest.raises(UserError) as info:
        load_config("detr_r5")
    message = str(info.value)
    assert "unknown config preset 'detr_r5'" in message
    assert message.split("nearest first): ")[1].startswith("detr_r50")


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    assert load_config(str(_write(tmp_path, "empty.yaml", ""))) == ExperimentConfig()
    assert load_config(None) == ExperimentConfig()


# --------------------------------------------------------------------------- overrides


def test_overrides_nested_tuple_optional_and_float():
    cfg = load_config(
        "detr_tiny",
        [
            "model.backbone.dilation=true",
            "data.train_scales=[64, 80]",
            "data.crop_size=[32, 48]",
            "model.num_classes=3",
            "model.top_k=null",
            "train.lr=1e-3",
            "train.lr_backbone=0",
            "data.root=/data/my coco",
        ],
    )
    assert cfg.model.backbone.dilation is True
    assert cfg.data.train_scales == (64, 80)
    assert cfg.data.crop_size == (32, 48)
    assert cfg.model.num_classes == 3 and cfg.model.top_k is None
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr_backbone, float)
    assert cfg.data.root == "/data/my coco"
    assert cfg.model.hidden_dim == 64  # the preset's siblings survive


def test_override_mapping_merges_and_numeric_string_stays_string():
    cfg = load_config("detr_r50_dc5", ["model.backbone={name: resnet101}", "data.val_split=2017"])
    assert cfg.model.backbone.name == "resnet101" and cfg.model.backbone.dilation is True
    assert cfg.data.val_split == "2017"


def test_override_unknown_key_names_nearest_and_source():
    with pytest.raises(UserError) as info:
        load_config("detr_r50", ["model.num_querys=10"])
    assert str(info.value) == (
        "unknown key 'model.num_querys' in --set; did you mean 'model.num_queries'?"
    )


def test_override_key_in_wrong_section():
    with pytest.raises(UserError, match="did you mean 'data.batch_size'"):
        load_config(None, ["train.batch_size=4"])


def test_override_without_equals():
    with pytest.raises(UserError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_override_bad_yaml_value():
    with pytest.raises(UserError, match="invalid YAML in --set train.lr"):
        load_config(None, ["train.lr=[1,"])


# --------------------------------------------------------------------------- validation


def test_unknown_key_in_file_names_file_and_nearest(tmp_path):
    path = _write(tmp_path, "mine.yaml", "base: detr_r50\nmodel:\n  num_querys: 10\n")
    with pytest.raises(UserError) as info:
        load_config(str(path))
    assert str(info.value) == (
        f"unknown key 'model.num_querys' in {path}; did you mean 'model.num_queries'?"
    )


def test_unknown_key_from_dict_names_source():
    with pytest.raises(UserError, match=r"'model\.num_querys' in detr_r50\.yaml; did you mean"):
        config_from_dict({"model": {"num_querys": 1}}, source="detr_r50.yaml")


def test_wrong_type_names_key_type_and_value():
    with pytest.raises(UserError) as info:
        config_from_dict({"train": {"epochs": "many"}}, source="x.yaml")
    message = str(info.value)
    assert "'train.epochs'" in message and "x.yaml" in message
    assert "expects int" in message and "'many'" in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"train": {"epochs": True}}, "expects int"),
        ({"train": {"lr": False}}, "expects float"),
        ({"train": {"epochs": 1.0}}, "expects int"),
        ({"data": {"crop_size": [1, 2, 3]}}, "list of 2 values"),
        ({"data": {"train_scales": [1, True]}}, "list of int"),
        ({"data": {"train_scales": 512}}, "list of int"),
        ({"model": {"num_classes": "5"}}, "int or null"),
        ({"model": {"backbone": 3}}, "must be a mapping"),
        ({"data": {"crop": "yes"}}, "expects bool"),
    ],
)
def test_strict_types(data, expected):
    with pytest.raises(UserError, match=expected):
        config_from_dict(data, source="t")


def test_int_accepted_for_float():
    cfg = config_from_dict({"train": {"lr": 1, "weight_decay": 0}}, source="t")
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0


def test_literal_error_lists_choices():
    with pytest.raises(UserError) as info:
        config_from_dict({"train": {"precision": "fp8"}}, source="t")
    message = str(info.value)
    assert "'train.precision'" in message
    for choice in ("'fp32'", "'bf16'", "'fp16'"):
        assert choice in message


def test_config_from_dict_other_class():
    assert config_from_dict({"epochs": 3}, TrainConfig, source="t") == TrainConfig(epochs=3)


# --------------------------------------------------------------------------- YAML safety


def test_unsafe_yaml_tag_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = _write(
        tmp_path,
        "evil.yaml",
        f"train: !!python/object/apply:os.system ['touch {marker}']\n",
    )
    with pytest.raises(UserError, match="tag not allowed"):
        load_config(str(path))
    assert not marker.exists()


def test_unsafe_tag_in_override_refused():
    with pytest.raises(UserError, match="tag not allowed"):
        load_config(None, ["data.root=!!python/name:os.system"])


def test_bad_yaml_syntax_names_file_and_line(tmp_path):
    path = _write(tmp_path, "broken.yaml", "train:\n  epochs: 3\n  lr: [1, 2\n")
    with pytest.raises(UserError) as info:
        load_config(str(path))
    message = str(info.value)
    assert str(path) in message and "line " in message


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(UserError, match="mapping"):
        load_config(str(_write(tmp_path, "list.yaml", "- 1\n- 2\n")))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_round_trip_dict(name):
    cfg = load_config(name)
    data = config_to_dict(cfg)
    assert isinstance(data["data"]["train_scales"], list)
    assert config_from_dict(data, source="dict") == cfg


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_round_trip_yaml_file(tmp_path, name):
    cfg = load_config(name, ["train.lr=3e-5", "model.num_classes=7"])
    path = tmp_path / "config.yaml"
    dump_config(cfg, path)
    assert yaml.safe_load(path.read_text())["train"]["lr"] == 3e-5
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.keep_last=0", "train.keep_last=0 in --set must be at least 1"),
        ("data.batch_size=0", "data.batch_size=0"),
        ("model.decoder.order=[cross_attn,ffn]", "must list each of self_attn, cross_attn, ffn"),
        ("model.encoder.order=[cross_attn,self_attn,ffn]", "model.encoder.order is not used"),
    ],
)
def test_nonsense_values_are_refused_naming_the_key(override, needle):
    from detrkit.config.build import validate_model_config

    with pytest.raises(UserError, match=re.escape(needle)):
        validate_model_config(load_config("detr_r50", [override]).model)
