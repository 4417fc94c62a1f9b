# SPDX-License-Identifier: Apache-2.0
"""Tests of the safetensors checkpoint format: exact round trips, resume, atomicity, errors."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from detrkit.engine import checkpoint as checkpoint_module
from detrkit.engine.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from detrkit.errors import UserError

META = {"format_version": FORMAT_VERSION, "epoch": 3, "config": {"train": {"lr": 1e-4}}}


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
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": torch.amp.GradScaler("cpu").state_dict(),
        "rng": _rng_state(),
        "epoch": 3,
    }
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model=model.state_dict(), state=state, meta=META)
    saved_state = copy.deepcopy(state)  # the optimizer's tensors change in place below
    expected_losses = _train(model, optimizer, scheduler, steps=3)

    loaded = load_checkpoint(path)
    _same(loaded.state, saved_state)
    assert loaded.meta == META
    model2, optimizer2, scheduler2 = _make_run(seed=1)
    model2.load_state_dict(loaded.model)
    optimizer2.load_state_dict(loaded.state["optimizer"])
    scheduler2.load_state_dict(loaded.state["scheduler"])
    torch.set_rng_state(loaded.state["rng"]["torch"])
    np.random.set_state(loaded.state["rng"]["numpy"])
    random.setstate(loaded.state["rng"]["python"])
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
    save_checkpoint(path, model={}, state=state, meta={})
    rng = load_checkpoint(path).state
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
    save_checkpoint(path, model={}, state=state, meta={})
    _same(load_checkpoint(path).state, state)


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
    save_checkpoint(path, model=model, state=state, meta={})
    loaded = load_checkpoint(path)
    assert set(loaded.model) == set(model)
    for key, tensor in model.items():
        assert torch.equal(loaded.model[key], tensor.detach())
    _same(loaded.state, state)


def test_unsupported_values_raise(tmp_path):
    with pytest.raises(TypeError, match="object"):
        save_checkpoint(tmp_path / "a", model={}, state={"x": object()}, meta={})
    with pytest.raises(TypeError, match="meta"):
        save_checkpoint(tmp_path / "b", model={}, state={}, meta={"x": {1, 2}})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- atomic write


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, error):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model={"w": torch.ones(3)}, state={"epoch": 1}, meta={"v": 1})

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise error

    monkeypatch.setattr(checkpoint_module, "save_file", broken_save)
    with pytest.raises(type(error)):
        save_checkpoint(path, model={"w": torch.zeros(3)}, state={"epoch": 2}, meta={"v": 2})
    old = load_checkpoint(path)
    assert torch.equal(old.model["w"], torch.ones(3)) and old.state == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / "sub" / "ckpt.safetensors"
    save_checkpoint(path, model={"w": torch.ones(1)}, state={}, meta={"v": 1})
    save_checkpoint(path, model={"w": torch.zeros(1)}, state={}, meta={"v": 2})
    assert load_checkpoint(path).meta == {"v": 2}
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
    save_checkpoint(truncated, model={"w": torch.randn(64, 64)}, state={}, meta={})
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated.safetensors"):
        load_checkpoint(truncated)


def test_foreign_safetensors_file_is_user_error(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(UserError, match="not a detrkit checkpoint"):
        load_checkpoint(path)


def test_newer_format_is_user_error(tmp_path):
    path = tmp_path / "future.safetensors"
    save_file({}, str(path), metadata={"detrkit.format": str(FORMAT_VERSION + 1)})
    with pytest.raises(UserError, match="format"):
        load_checkpoint(path)


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
