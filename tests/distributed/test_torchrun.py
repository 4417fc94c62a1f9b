# SPDX-License-Identifier: Apache-2.0
"""Two CPU processes under torchrun (gloo) train like one process with the same global batch.

Images all have one size and are never resized differently, so a batch of two and two batches
of one see identical pixels (padding would change the CNN's border features). With the mean
box count reduced across ranks and DDP averaging gradients, every step's loss and the final
weights must then agree with the single process up to float32 reduction order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detrkit.data.synth import write_synthetic_coco
from detrkit.engine.checkpoint import load_checkpoint
from detrkit.engine.logging import read_jsonl

pytestmark = pytest.mark.slow

SIZE = 96
SETTINGS = [
    "model.hidden_dim=32",
    "model.num_heads=2",
    "model.num_queries=10",
    "model.encoder.num_layers=1",
    "model.decoder.num_layers=2",
    # BatchNorm statistics would depend on the per-process batch: freeze them
    "model.backbone.norm=frozen_bn",
    f"data.train_scales=[{SIZE}]",
    f"data.val_size={SIZE}",
    f"data.max_size={SIZE}",
    "data.eval_batch_size=2",
    "train.log_every=1",
    "train.max_steps=3",
    "train.epochs=1",
]
HANG_TIMEOUT_S = 300


def _train(
    data: Path,
    out: Path,
    processes: int,
    batch_size: int,
    extra: tuple[str, ...] = (),
    config: str = "deformable_detr_tiny",
) -> None:
    launcher = [sys.executable, "-m", "detrkit"]
    if processes > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "detrkit",
        ]
    argv = [
        *launcher,
        "train",
        "--config",
        config,
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--device",
        "cpu",
        "--set",
        *SETTINGS,
        f"data.batch_size={batch_size}",
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=HANG_TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"}


@pytest.fixture(scope="module")
def uniform_coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uniform_coco")
    return write_synthetic_coco(root, num_train=8, num_val=5, seed=3, min_size=SIZE, max_size=SIZE)


def _first_gradients(run: Path) -> dict[int, torch.Tensor]:
    """The averaged, clipped gradient of the first optimiser step, read back from AdamW's first
    moment in the step-1 training checkpoint (``exp_avg = (1 - beta1) * grad`` after one step)."""
    first = sorted((run / "checkpoints").glob("*.safetensors"))[0]
    state = load_checkpoint(first).training
    assert state.loop.step == 1, first
    return {index: entry["exp_avg"] for index, entry in state.optimizer["state"].items()}


def test_two_processes_match_one_process_with_the_same_global_batch(uniform_coco, tmp_path):
    # Keep the checkpoint of every step: the first one holds the first step's gradients.
    every_step = ("train.checkpoint_every=1", "train.keep_last=3")
    _train(uniform_coco, tmp_path / "one", processes=1, batch_size=2, extra=every_step)
    _train(uniform_coco, tmp_path / "two", processes=2, batch_size=1, extra=every_step)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    # The all-reduced gradient equals the one-process gradient up to summation order. Weights
    # after several AdamW steps are not compared element by element: AdamW divides each
    # gradient by its own magnitude, so elements whose gradient is rounding noise move by a
    # full learning-rate step either way.
    grads = [_first_gradients(tmp_path / run) for run in ("one", "two")]
    assert grads[0].keys() == grads[1].keys()
    largest = max(g.norm() for g in grads[0].values())
    for index, grad in grads[0].items():
        if grad.norm() <= 1e-6 * largest:
            continue  # mathematically zero (cancelled by a normalisation): pure rounding noise
        error = (grads[1][index] - grad).norm() / grad.norm()
        assert error <= 1e-4, f"parameter {index}: relative gradient difference {error:.2e}"
    # evaluation covered every validation image exactly once, whatever the process count
    for run in ("one", "two"):
        results = json.loads((tmp_path / run / "results_val.json").read_text())
        assert {r["image_id"] for r in results} == set(range(1, 6))


DENOISING = (
    "model.queries.kind=two_stage",
    "model.box_refine=iterative",
    "model.schemes.denoising.dn_number=10",
)


@pytest.mark.parametrize(
    ("config", "scheme", "group"),
    [
        ("deformable_detr_tiny", (), None),
        ("deformable_detr_tiny", DENOISING, "dn/"),
        ("co_deformable_detr_tiny", (), "aux0/"),
    ],
    ids=["plain", "denoising", "collaborative"],
)
def test_a_rank_without_boxes_does_not_hang(tmp_path, config, scheme, group):
    """Rank 1's only image has no objects: every collective must still run on both ranks, and
    with denoising or the collaborative heads (whose queries come from the boxes) every
    parameter is still used."""
    root = write_synthetic_coco(tmp_path / "data", 2, 2, seed=0, min_size=SIZE, max_size=SIZE)
    annotations = root / "annotations" / "instances_train.json"
    coco = json.loads(annotations.read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 2]
    assert coco["annotations"], "image 1 must keep its objects"
    annotations.write_text(json.dumps(coco))
    _train(root, tmp_path / "run", processes=2, batch_size=1, extra=scheme, config=config)
    assert sorted(_losses(tmp_path / "run")) == [1]  # 2 images / 2 ranks = one step per epoch
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    if group is not None:  # the scheme's terms were computed and averaged over both ranks
        assert any(name.startswith(group) for name in records[0])
