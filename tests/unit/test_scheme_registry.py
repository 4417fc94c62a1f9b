# SPDX-License-Identifier: Apache-2.0
"""The scheme registry: ``model.schemes`` is validated against it, and a scheme written in one
file outside detrkit (tests/unit/toy_scheme.py) builds, trains and stays out of inference."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from detrkit.config.build import build_criterion, build_model
from detrkit.config.load import config_from_mapping, load_config
from detrkit.config.validate import config_to_dict
from detrkit.engine.logging import read_jsonl
from detrkit.engine.trainer import Trainer
from detrkit.errors import UserError
from detrkit.schemes.registry import registered_schemes, unregister_scheme
from detrkit.structures import ImageBatch, Target
from tests.conftest import TINY_RUN_OVERRIDES
from tests.unit import toy_scheme
from tests.unit.test_schemes import TINY

TWO_STAGE = "deformable_detr_r50_two_stage"


@pytest.fixture
def toy():
    toy_scheme.register()
    yield toy_scheme
    unregister_scheme(toy_scheme.NAME)


def test_builtin_schemes_register_themselves():
    assert {"hybrid", "mixed", "denoising"} <= set(registered_schemes())


def test_scheme_options_are_validated_like_any_section(toy):
    cfg = load_config(TWO_STAGE, ["model.schemes.toy.max_queries=2"])
    assert cfg.model.schemes["toy"] == toy.ToyConfig(max_queries=2)
    with pytest.raises(UserError, match=r"did you mean 'model\.schemes\.toy\.max_queries'"):
        load_config(TWO_STAGE, ["model.schemes.toy.max_querys=2"])
    with pytest.raises(UserError, match="expects int"):
        load_config(TWO_STAGE, ["model.schemes.toy.max_queries=many"])


def test_unknown_scheme_names_the_nearest():
    with pytest.raises(
        UserError, match=r"unknown training scheme 'model\.schemes\.hybird'.*'hybrid'"
    ):
        load_config(TWO_STAGE, ["model.schemes.hybird={}"])
    with pytest.raises(UserError, match="hybrid"):
        config_from_mapping({"model": {"schemes": {"hybrd": {}}}}, source="x.yaml")


def test_scheme_checks_run_at_build(toy):
    with pytest.raises(UserError, match="max_queries must be at least 1"):
        build_model(load_config(TWO_STAGE, TINY + ["model.schemes.toy.max_queries=0"]).model, 3)


def test_schemes_keep_the_registry_order_and_round_trip():
    data = {"model": {"schemes": {"mixed": {}, "hybrid": {"repeat_k": 2}}}}
    cfg = config_from_mapping(data, source="x.yaml")
    assert list(cfg.model.schemes) == [n for n in registered_schemes() if n in ("hybrid", "mixed")]
    again = config_from_mapping(config_to_dict(cfg), source="dump")
    assert again == cfg and hash(again.model) == hash(cfg.model)
    off = load_config(None, ["model.schemes.hybrid={}", "model.schemes.hybrid=null"])
    assert "hybrid" not in off.model.schemes


def _batch():
    torch.manual_seed(1)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 60:] = True
    images = ImageBatch(torch.randn(2, 3, 64, 80), mask, torch.tensor([[64, 80], [64, 60]]))
    targets = [
        Target(torch.tensor([0, 2]), torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])),
        Target(torch.tensor([1]), torch.tensor([[0.5, 0.5, 0.4, 0.4]])),
    ]
    return images, targets


def test_toy_scheme_uses_every_extension_point(toy):
    cfg = load_config(TWO_STAGE, TINY + ["model.schemes.toy={}"]).model
    model = build_model(cfg, 3).train()
    images, targets = _batch()
    output = model(images, targets)
    toy_group = output.group("toy")
    assert toy_group.logits.shape[2] == 3 and toy_group.valid[1].tolist() == [True, False, False]
    losses = build_criterion(cfg, 3)(output, targets)
    assert losses.weights["toy/l1/d1"] == 3.0 and losses.weights["toy/dense"] == 0.5
    tokens = model.schemes["toy"].dense_head
    assert "toy_pass/giou/d0" in losses.terms
    bump = torch.zeros_like(toy_group.logits)
    bump[:, 1, 1:] = 100.0  # padding queries of image 1: they take no loss at all
    bumped = [replace(g, logits=g.logits + bump) if g.name == "toy" else g for g in output.groups]
    again = build_criterion(cfg, 3)(replace(output, groups=bumped), targets)
    torch.testing.assert_close(again.terms["toy/cls/d1"], losses.terms["toy/cls/d1"])
    bump[:, 1, 0] = 100.0  # a real query does
    bumped = [replace(g, logits=g.logits + bump) if g.name == "toy" else g for g in output.groups]
    moved = build_criterion(cfg, 3)(replace(output, groups=bumped), targets)
    assert not torch.allclose(moved.terms["toy/cls/d1"], losses.terms["toy/cls/d1"])
    # the dense loss is normalised by the rank-averaged box count (3 boxes)
    criterion = build_criterion(cfg, 3)
    criterion.reduce_num_boxes = lambda n: n * 0 + 6.0
    halved = criterion(output, targets)
    ratio = halved.terms["toy/dense"] / losses.terms["toy/dense"]
    torch.testing.assert_close(ratio, torch.tensor(0.5), rtol=1e-4, atol=0)
    losses.total.backward()
    assert tokens.weight.grad is not None and tokens.weight.grad.abs().sum() > 0


def test_toy_queries_change_neither_the_matching_queries_nor_inference(toy):
    cfg = load_config(TWO_STAGE, TINY + ["model.schemes.toy={}"]).model
    model = build_model(cfg, 3).train()
    images, targets = _batch()
    with_toy = model(images, targets).group("main")
    schemes = model.schemes
    model.schemes = torch.nn.ModuleDict()
    without = model(images, targets).group("main")
    model.schemes = schemes
    torch.testing.assert_close(with_toy.logits, without.logits)
    eval_groups = [g.name for g in model.eval()(images).groups]
    assert "toy" not in eval_groups and "toy_pass" not in eval_groups


def test_toy_scheme_trains_end_to_end(toy, synthetic_coco, tmp_path):
    overrides = [
        f"data.root={synthetic_coco}",
        *TINY_RUN_OVERRIDES,
        "model.queries.kind=two_stage",
        "model.box_refine=iterative",
        "model.schemes.toy.max_queries=4",
        "train.epochs=1",
        "train.max_steps=2",
        "train.eval_every=0",
        "train.log_every=1",
        "train.tensorboard=false",
    ]
    cfg = load_config("deformable_detr_tiny", overrides)
    Trainer(cfg, tmp_path / "run", device="cpu").fit()
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(records) == 2 and all("toy/dense" in r and "toy/l1/d1" in r for r in records)


def test_installed_packages_register_schemes_through_entry_points(monkeypatch):
    from detrkit.schemes import registry

    class Entry:
        name = "toy"

        @staticmethod
        def load():
            toy_scheme.register()

    groups = []
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: groups.append(group) or [Entry])
    try:
        assert "toy" in registry.registered_schemes()
        assert groups == [registry.ENTRY_POINT_GROUP]
    finally:
        unregister_scheme(toy_scheme.NAME)
