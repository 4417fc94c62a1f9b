# SPDX-License-Identifier: Apache-2.0
"""Tests of the safetensors checkpoint format: exact round trips, resume, atomicity, errors."""

from __future__ import annotations

import copy
import json
import math
import os
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from detrkit.data.labels import LabelMap
from detrkit.engine import checkpoint as checkpoint_module
from detrkit.engine.checkpoint import (
    FORMAT_VERSION,
    CheckpointMeta,
    ConvertedFrom,
    TrainingState,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from detrkit.engine.state import LoopState
from detrkit.errors import UserError

META = CheckpointMeta(
    config={"train": {"lr": 1e-4}}, label_map=LabelMap((1, 3), ("cat", "dog")), epoch=3, step=7
)


def _nested(value) -> TrainingState:
    """A training state carrying ``value`` where the optimiser state goes (any nesting)."""
    return TrainingState(optimizer=value, scheduler={})


def _same(a, b):
    """Recursive equality that also checks container and scalar types (and nan == nan)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, strict=True)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b
        if isinstance(a, float):
            assert math.copysign(1.0, a) == math.copysign(1.0, b)


# --------------------------------------------------------------------------- training resume


def _make_run(seed):
    """A small model with dropout, AdamW over it and a StepLR schedule."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps):
    """Steps that draw on the python, numpy and torch RNGs; returns the losses."""
    losses = []
    for _ in range(steps):
        inputs = torch.from_numpy(np.random.randn(4, 6)).float()
        targets = torch.randn(4, 2) * random.uniform(0.5, 2.0)
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.detach())
    return losses


def _rng_state():
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "numpy_dict": np.random.get_state(legacy=False),
        "python": random.getstate(),
    }


def test_resume_is_bit_identical(tmp_path):
    random.seed(0)
    np.random.seed(0)
    model, optimizer, scheduler = _make_run(seed=0)
    _train(model, optimizer, scheduler, steps=3)
    state = TrainingState(
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        scaler=torch.amp.GradScaler("cpu").state_dict(),
        rng=_rng_state(),
        loop=LoopState(epoch=3, step=7, steps_in_epoch=1),
    )
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model=model.state_dict(), meta=META, training=state)
    saved_state = copy.deepcopy(state)  # the optimizer's tensors change in place below
    expected_losses = _train(model, optimizer, scheduler, steps=3)

    loaded = load_checkpoint(path)
    _same(loaded.training.to_tree(), saved_state.to_tree())
    assert loaded.training.loop == LoopState(epoch=3, step=7, steps_in_epoch=1)
    assert loaded.meta == META
    model2, optimizer2, scheduler2 = _make_run(seed=1)
    model2.load_state_dict(loaded.model)
    optimizer2.load_state_dict(loaded.training.optimizer)
    scheduler2.load_state_dict(loaded.training.scheduler)
    torch.set_rng_state(loaded.training.rng["torch"])
    np.random.set_state(loaded.training.rng["numpy"])
    random.setstate(loaded.training.rng["python"])
    losses = _train(model2, optimizer2, scheduler2, steps=3)

    for got, want in zip(losses, expected_losses, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(model2.parameters(), model.parameters(), strict=True):
        assert torch.equal(got, want)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_rng_states_restore_the_same_draws(tmp_path):
    random.seed(5)
    np.random.seed(5)
    state = _rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    path = tmp_path / "rng.safetensors"
    save_checkpoint(path, model={}, meta=META, training=TrainingState({}, {}, rng=state))
    rng = load_checkpoint(path).training.rng
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy_dict"])
    torch.set_rng_state(rng["torch"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


# --------------------------------------------------------------------------- skeleton fidelity


def test_nested_state_types_round_trip(tmp_path):
    state = {
        0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2, 3, dtype=torch.bfloat16)},
        "mixed": [1, (2, [3.5, None]), ("a", True)],
        "floats": (math.inf, -math.inf, math.nan, -0.0, 1e-300, 0.1),
        "big": 2**100,
        -7: "negative int key",
        "empty": ([], (), {}, torch.empty(0, 4)),
        "numpy": {
            "u32": np.arange(5, dtype=np.uint32),
            "f16": np.ones((2, 2), dtype=np.float16),
            "bool0d": np.array(True),
            "scalar": np.float32(1.5),
            "int64": np.int64(-3),
        },
        "dotted.key": torch.ones(1),
        "dotted": {"key": torch.zeros(1)},
    }
    path = tmp_path / "s.safetensors"
    save_checkpoint(path, model={}, meta=META, training=_nested(state))
    _same(load_checkpoint(path).training.optimizer, state)


def test_shared_and_non_contiguous_tensors(tmp_path):
    base = torch.arange(24.0).reshape(4, 6)
    weight = nn.Parameter(torch.randn(3, 3))
    model = {
        "full": base,
        "row": base[1],
        "column": base[:, 2],
        "transposed": base.t(),
        "tied_a": weight,
        "tied_b": weight,
    }
    state = {"also_base": base, "slice": base[2:]}
    path = tmp_path / "shared.safetensors"
    save_checkpoint(path, model=model, meta=META, training=_nested(state))
    loaded = load_checkpoint(path)
    assert set(loaded.model) == set(model)
    for key, tensor in model.items():
        assert torch.equal(loaded.model[key], tensor.detach())
    _same(loaded.training.optimizer, state)


def test_unsupported_values_raise(tmp_path):
    with pytest.raises(TypeError, match="object"):
        save_checkpoint(tmp_path / "a", model={}, meta=META, training=_nested({"x": object()}))
    with pytest.raises(TypeError, match="meta"):
        bad_meta = CheckpointMeta(config={"x": {1, 2}}, label_map=META.label_map)
        save_checkpoint(tmp_path / "b", model={}, meta=bad_meta)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- atomic write


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, error):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model={"w": torch.ones(3)}, meta=META, training=_nested({"epoch": 1}))

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise error

    monkeypatch.setattr(checkpoint_module, "save_file", broken_save)
    with pytest.raises(type(error)):
        save_checkpoint(path, model={"w": torch.zeros(3)}, meta=META, training=_nested({"e": 2}))
    old = load_checkpoint(path)
    assert torch.equal(old.model["w"], torch.ones(3)) and old.training.optimizer == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / "sub" / "ckpt.safetensors"
    save_checkpoint(path, model={"w": torch.ones(1)}, meta=replace(META, step=1))
    save_checkpoint(path, model={"w": torch.zeros(1)}, meta=replace(META, step=2))
    assert load_checkpoint(path).meta.step == 2
    assert len(list(path.parent.iterdir())) == 1


# --------------------------------------------------------------------------- errors


def test_missing_file_is_user_error(tmp_path):
    path = tmp_path / "missing.safetensors"
    with pytest.raises(UserError, match="missing.safetensors"):
        load_checkpoint(path)


def test_corrupt_file_is_user_error_naming_it(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 definitely not safetensors" * 10)
    with pytest.raises(UserError, match="garbage.safetensors"):
        load_checkpoint(garbage)

    truncated = tmp_path / "truncated.safetensors"
    save_checkpoint(truncated, model={"w": torch.randn(64, 64)}, meta=META)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated.safetensors"):
        load_checkpoint(truncated)


def test_foreign_safetensors_file_is_user_error(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(UserError, match="not a detrkit checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("version", [FORMAT_VERSION - 1, FORMAT_VERSION + 1])
def test_other_format_versions_are_user_errors(tmp_path, version):
    path = tmp_path / f"v{version}.safetensors"
    metadata = {"detrkit.format": str(version), "detrkit.meta": META.to_json()}
    save_file({"w": torch.ones(2)}, str(path), metadata=metadata)
    with pytest.raises(UserError, match=rf"v{version}.safetensors has .*format {version}"):
        load_checkpoint(path)


def test_corrupt_metadata_is_user_error_naming_the_file(tmp_path):
    path = tmp_path / "meta.safetensors"
    metadata = {"detrkit.format": str(FORMAT_VERSION), "detrkit.meta": json.dumps({"epoch": 1})}
    save_file({"w": torch.ones(2)}, str(path), metadata=metadata)
    with pytest.raises(UserError, match="meta.safetensors: corrupt metadata"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- weights files


def test_weights_file_holds_plain_keys_and_typed_meta(tmp_path):
    from safetensors.torch import load_file

    weights = {"layer.weight": torch.randn(3, 2), "layer.bias": torch.zeros(3)}
    meta = replace(META, ema=True, converted_from=ConvertedFrom(source="detr", file="x.pth"))
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model=weights, meta=meta)
    loaded = load_checkpoint(path)
    assert loaded.training is None and loaded.meta == meta and loaded.path == path
    assert loaded.meta.format_version == FORMAT_VERSION
    for key, tensor in weights.items():
        assert torch.equal(loaded.model[key], tensor)
    assert loaded.inference_weights() == (loaded.model, "EMA")
    assert set(load_file(str(path))) == set(weights)  # readable by plain safetensors


def test_training_file_prefers_its_ema_for_inference(tmp_path):
    raw, averaged = {"w": torch.ones(2)}, {"w": torch.full((2,), 0.5)}
    state = TrainingState({}, {}, ema={"weights": averaged, "updates": 4})
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model=raw, meta=META, training=state)
    weights, kind = load_checkpoint(path).inference_weights()
    assert kind == "EMA" and torch.equal(weights["w"], averaged["w"])


def test_saved_files_follow_the_umask(tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model={"w": torch.ones(1)}, meta=META)
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600


# --------------------------------------------------------------------------- pruning


def test_prune_keeps_last_by_natural_order(tmp_path):
    for step in (5, 10, 100, 900, 1000):
        (tmp_path / f"step_{step}.safetensors").write_bytes(b"x")
    (tmp_path / "best.safetensors").write_bytes(b"x")
    removed = prune_checkpoints(tmp_path, "step_*.safetensors", keep_last=2)
    assert sorted(p.name for p in removed) == [
        "step_10.safetensors",
        "step_100.safetensors",
        "step_5.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.safetensors",
        "step_1000.safetensors",
        "step_900.safetensors",
    ]
    assert prune_checkpoints(tmp_path, "step_*.safetensors", keep_last=5) == []
    with pytest.raises(ValueError):
        prune_checkpoints(tmp_path, "step_*", keep_last=-1)
