# SPDX-License-Identifier: Apache-2.0
"""What a training run leaves on disk: weights files apart from the last training states."""

from __future__ import annotations

import pytest
import torch

from detrkit.config.load import load_config
from detrkit.engine.checkpoint import load_checkpoint
from detrkit.engine.state import EMA_FILE, MODEL_FILE, inference_checkpoint, latest_checkpoint
from detrkit.engine.trainer import Trainer
from detrkit.errors import UserError
from detrkit.inference import load_model
from tests.conftest import TINY_RUN_OVERRIDES

TINY = [
    *TINY_RUN_OVERRIDES,
    "train.epochs=1",
    "train.eval_every=0",
    "train.tensorboard=false",
]


def _config(data, *extra):
    return load_config("detr_tiny", [f"data.root={data}", *TINY, *extra])


@pytest.fixture(scope="module")
def ema_run(synthetic_coco, tmp_path_factory):
    """4 steps with EMA, a training state every step, the last 2 kept."""
    run = tmp_path_factory.mktemp("ema_run")
    extra = ("train.ema_decay=0.9", "train.checkpoint_every=1", "train.keep_last=2")
    trainer = Trainer(_config(synthetic_coco, *extra), run, device="cpu")
    trainer.fit()
    return run, trainer


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_run_writes_weights_apart_from_the_last_training_states(ema_run):
    run, trainer = ema_run
    states = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert states == ["checkpoint_00000003.safetensors", "checkpoint_00000004.safetensors"]
    weights = load_checkpoint(run / MODEL_FILE)
    assert weights.training is None and weights.meta.step == 4 and not weights.meta.ema
    assert _same_weights(weights.model, trainer.model.state_dict())
    ema = load_checkpoint(run / EMA_FILE)
    assert ema.meta.ema and _same_weights(ema.model, trainer.ema.module.state_dict())
    assert weights.meta.label_map == trainer.label_map
    assert weights.meta.config["train"]["ema_decay"] == 0.9


def test_file_sizes_are_what_they_hold(ema_run):
    run, trainer = ema_run
    param_bytes = sum(t.numel() * t.element_size() for t in trainer.model.state_dict().values())
    model_size = (run / MODEL_FILE).stat().st_size
    assert param_bytes < model_size < param_bytes * 1.05  # the weights, plus a JSON header
    # weights + AdamW's two moments + EMA weights, nothing duplicated beyond that
    state_size = latest_checkpoint(run).stat().st_size
    assert 3.5 * param_bytes < state_size < 4.3 * param_bytes


def test_the_run_folder_resolves_for_resume_and_for_inference(ema_run):
    run, trainer = ema_run
    assert latest_checkpoint(run).name == "checkpoint_00000004.safetensors"
    assert inference_checkpoint(run) == run / EMA_FILE
    from_folder = load_model(run)
    assert from_folder.weights == "EMA" and from_folder.path == run / EMA_FILE
    from_state = load_model(latest_checkpoint(run))  # a training state: its EMA weights too
    assert from_state.weights == "EMA"
    raw = load_model(run / MODEL_FILE)
    assert raw.weights == "raw"
    for loaded, expected in ((from_folder, trainer.ema.module), (from_state, trainer.ema.module)):
        assert _same_weights(loaded.model.state_dict(), expected.state_dict())
    assert _same_weights(raw.model.state_dict(), trainer.model.state_dict())


def test_resume_from_a_weights_file_is_refused(ema_run, synthetic_coco, tmp_path):
    run, _ = ema_run
    cfg = _config(synthetic_coco, "train.ema_decay=0.9")
    with pytest.raises(UserError, match="model.safetensors holds weights only"):
        Trainer(cfg, tmp_path, resume=run / MODEL_FILE, device="cpu")


def test_default_keeps_one_training_state_and_no_ema_file(synthetic_coco, tmp_path):
    cfg = _config(synthetic_coco, "train.max_steps=2", "train.checkpoint_every=1")
    Trainer(cfg, tmp_path, device="cpu").fit()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [
        "checkpoint_00000002.safetensors"
    ]
    assert (tmp_path / MODEL_FILE).is_file() and not (tmp_path / EMA_FILE).exists()
    assert load_model(tmp_path).path == tmp_path / MODEL_FILE
