# SPDX-License-Identifier: Apache-2.0
"""``--init-from``: class heads matched by category id, and a short grouped summary."""

from dataclasses import replace

import pytest
import torch

from detrkit.cli.__main__ import main
from detrkit.config.build import build_model
from detrkit.config.load import dump_config
from detrkit.config.validate import config_from_dict
from detrkit.data.coco_names import COCO_CATEGORY_NAMES
from detrkit.data.labels import LabelMap
from detrkit.engine.checkpoint import load_checkpoint
from detrkit.engine.init import load_init_weights
from detrkit.errors import UserError
from tests.conftest import tiny_model_config
from tests.unit.test_coco2017_labels import COCO_UNUSED, converted, write_coco2017

COCO_SLOTS = LabelMap(
    tuple(range(91)), tuple(COCO_CATEGORY_NAMES.get(i, "N/A") for i in range(91)), COCO_UNUSED
)
COCO_80 = LabelMap(tuple(COCO_CATEGORY_NAMES), tuple(COCO_CATEGORY_NAMES.values()))


def _models(target_classes: int, **changes):
    cfg = tiny_model_config(num_classes=None, **changes)
    return build_model(cfg, 91), build_model(cfg, target_classes)


def test_softmax_head_rows_follow_their_category_and_no_object():
    source, target = _models(80)
    report = load_init_weights(target, source.state_dict(), False, COCO_SLOTS, COCO_80)
    trained = source.state_dict()["head.class_embed.0.weight"]
    loaded = target.state_dict()["head.class_embed.0.weight"]
    torch.testing.assert_close(loaded[:80], trained[list(COCO_CATEGORY_NAMES)], atol=0, rtol=0)
    torch.testing.assert_close(loaded[80], trained[91], atol=0, rtol=0)  # no-object
    assert not report.partial and report.reinitialised == 0
    assert "class heads (2 tensors): 91 → 80 classes, rows taken by category id" in report.format()
    assert "(80 classes + no-object)" in report.format()


def test_partly_known_classes_need_allow_partial_and_are_summarised(caplog):
    source, target = _models(3, loss=replace(tiny_model_config().loss, class_loss="sigmoid_focal"))
    dataset = LabelMap((1, 18, 95), ("person", "dog", "unicorn"))
    with pytest.raises(UserError, match="--allow-partial"):
        load_init_weights(target, source.state_dict(), False, COCO_SLOTS, dataset)
    report = load_init_weights(target, source.state_dict(), True, COCO_SLOTS, dataset)
    assert "91 → 3 classes, 2 rows taken by category id, 1 re-initialised ('unicorn')" in str(
        report.class_heads
    )
    bias = target.state_dict()["head.class_embed.0.bias"]
    torch.testing.assert_close(bias[1], source.state_dict()["head.class_embed.0.bias"][18])
    assert "95 'unicorn'" in caplog.text and "class names" in caplog.text


def test_unrelated_classes_reinitialise_the_head_with_a_warning(caplog):
    source, target = _models(3)
    dataset = LabelMap((1, 2, 3), ("cat", "dog", "bird"))
    report = load_init_weights(target, source.state_dict(), True, COCO_SLOTS, dataset)
    text = report.format()
    assert text.startswith(f"{report.loaded} tensors loaded, 2 re-initialised; ")
    assert "class heads (2 tensors): 91 → 3 classes, re-initialised" in text
    assert "1 'cat' (is 'person' there)" in caplog.text


def test_train_init_from_converted_checkpoint_on_coco2017(tmp_path, caplog):
    caplog.set_level("INFO")
    data = write_coco2017(tmp_path / "coco", num_train=2, num_val=1)
    checkpoint = converted(tmp_path, "detr_r18", "detr")
    config = config_from_dict(load_checkpoint(checkpoint).meta.config, source=str(checkpoint))
    config = replace(config, model=replace(config.model, num_classes=None))
    dump_config(config, tmp_path / "finetune.yaml")
    small = ["data.train_scales=[64]", "data.val_size=64", "data.max_size=96"]
    argv = ["train", "--config", str(tmp_path / "finetune.yaml"), "--data", str(data)]
    run = tmp_path / "run"
    steps = ["--device", "cpu", "--set", *small, "train.max_steps=1"]
    assert main([*argv, "--output-dir", str(run), "--init-from", str(checkpoint), *steps]) == 0
    assert "91 → 80 classes, rows taken by category id (80 classes + no-object)" in caplog.text
    caplog.clear()
    # A run folder resolves to its newest checkpoint; same classes: loaded as they are.
    again = ["--output-dir", str(tmp_path / "again"), "--init-from", str(run)]
    assert main([*argv, *again, *steps]) == 0
    assert "class heads (2 tensors): loaded as they are (80 classes)" in caplog.text


def test_denoising_label_table_rows_follow_their_category():
    """DINO's label embedding is indexed by label like the class heads (+ its own extra row);
    fine-tuning on fewer classes takes its rows by category id."""
    from detrkit.config.load import load_config

    tiny = ["model.hidden_dim=32", "model.num_heads=2", "model.backbone.name=resnet18"]
    cfg = replace(load_config("dino_tiny", tiny).model, num_classes=None)
    source, target = build_model(cfg, 91), build_model(cfg, 80)
    report = load_init_weights(target, source.state_dict(), False, COCO_SLOTS, COCO_80)
    key = "schemes.denoising.label_embedding.weight"
    trained, loaded = source.state_dict()[key], target.state_dict()[key]
    assert trained.shape[0] == 92 and loaded.shape[0] == 81
    torch.testing.assert_close(loaded[:80], trained[list(COCO_CATEGORY_NAMES)], atol=0, rtol=0)
    torch.testing.assert_close(loaded[80], trained[91], atol=0, rtol=0)  # the extra row
    assert not report.partial and report.reinitialised == 0
    assert "(80 classes)" in report.format()  # sigmoid heads: no no-object row
