# SPDX-License-Identifier: Apache-2.0
"""End to end on the CPU through the command line: train -> resume -> eval -> predict."""

from __future__ import annotations

import json

import pytest

from detrkit.cli.__main__ import main
from detrkit.engine.logging import read_jsonl
from tests.conftest import TINY_MODEL_OVERRIDES

TINY = [
    *TINY_MODEL_OVERRIDES,
    "data.train_scales=[64,80]",
    "data.val_size=64",
    "data.max_size=96",
    "data.batch_size=2",
    "data.eval_batch_size=3",
    "train.log_every=1",
]


PRESETS = [
    "detr_tiny",
    "deformable_detr_tiny",
    "dino_tiny",
    "co_dino_tiny",
    "co_deformable_detr_tiny",
]


def _train(data, out, *extra, resume=None, config="detr_tiny"):
    argv = [
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
        *TINY,
        *extra,
    ]
    if resume:
        argv += ["--resume", str(resume)]
    assert main(argv) == 0


def _losses(run_dir):
    return {
        r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"
    }


@pytest.fixture(scope="module", params=PRESETS)
def trained(synthetic_coco, tmp_path_factory, request):
    out = tmp_path_factory.mktemp("run")
    _train(synthetic_coco, out, "train.epochs=2", "train.lr_drop=1", config=request.param)
    return out


def test_train_writes_run_folder(trained):
    assert (trained / "config.yaml").is_file()
    assert list((trained / "checkpoints").glob("checkpoint_*.safetensors"))
    losses = _losses(trained)
    assert len(losses) == 16 and all(v is not None for v in losses.values())
    evals = [r for r in read_jsonl(trained / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals and set(evals[-1]) >= {"AP", "AP50", "ARl"}
    assert (trained / "results_val.json").is_file()
    assert (trained / "curves.png").stat().st_size > 0


def test_resume_reproduces_next_losses_exactly(trained, synthetic_coco, tmp_path, request):
    # The module's uninterrupted run is the reference; this one stops and resumes.
    config = request.node.callspec.params["trained"]
    _assert_resume_reproduces(synthetic_coco, trained, tmp_path, config, "train.lr_drop=1")


def test_resume_with_ema_reproduces_next_losses_exactly(synthetic_coco, tmp_path):
    straight = tmp_path / "straight"
    extra = ("train.ema_decay=0.9",)
    _train(synthetic_coco, straight, "train.epochs=2", *extra, config="deformable_detr_tiny")
    _assert_resume_reproduces(synthetic_coco, straight, tmp_path, "deformable_detr_tiny", *extra)


def _assert_resume_reproduces(data, straight, tmp_path, config, *extra):
    halted = tmp_path / "halted"
    # Stop mid-epoch (step 5 of 8 per epoch), then continue from that checkpoint.
    _train(data, halted, "train.epochs=2", "train.max_steps=5", *extra, config=config)
    _train(data, halted, "train.epochs=2", *extra, resume=halted, config=config)
    expected, resumed = _losses(straight), _losses(halted)
    assert sorted(resumed) == sorted(expected)
    for step in range(6, 17):
        assert resumed[step] == expected[step], f"step {step}: {resumed[step]} != {expected[step]}"
    # the evaluation at the end (of the EMA weights, when kept) is the same too
    assert _last_eval(halted)["AP"] == _last_eval(straight)["AP"]


def _last_eval(run_dir):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "eval"][-1]


def test_eval_and_predict_from_checkpoint(trained, synthetic_coco, tmp_path, capsys):
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(trained),
                "--data",
                str(synthetic_coco),
                "--output-dir",
                str(tmp_path),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in printed
    # eval writes files named for checkpoint, dataset and split, never the run's own.
    metrics = json.loads(next(tmp_path.glob("eval_*_val.json")).read_text())["metrics"]
    recorded = [r for r in read_jsonl(trained / "metrics.jsonl") if r["kind"] == "eval"][-1]
    assert metrics["AP"] == pytest.approx(recorded["AP"], abs=1e-9)

    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                str(synthetic_coco / "val"),
                "--checkpoint",
                str(trained),
                "--output-dir",
                str(out),
                "--score-threshold",
                "0.0",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    records = json.loads((out / "predictions.json").read_text())
    categories = {
        c["id"]
        for c in json.loads((synthetic_coco / "annotations" / "instances_val.json").read_text())[
            "categories"
        ]
    }
    assert records and {r["category_id"] for r in records} <= categories
    assert len(list(out.glob("*.png"))) == 8


def _two_class_copy(source, destination):
    """The synthetic dataset with its last category (and its boxes) removed."""
    for split in ("train", "val"):
        (destination / split).symlink_to(source / split)
        data = json.loads((source / "annotations" / f"instances_{split}.json").read_text())
        dropped = data["categories"].pop()["id"]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] != dropped]
        (destination / "annotations").mkdir(exist_ok=True)
        (destination / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return destination


def test_init_from_remaps_the_class_head_by_category(trained, synthetic_coco, tmp_path, caplog):
    caplog.set_level("INFO")
    data = _two_class_copy(synthetic_coco, tmp_path)
    checkpoint = sorted((trained / "checkpoints").glob("*.safetensors"))[-1]
    argv = [
        "train",
        "--config",
        str(trained / "config.yaml"),  # the resolved config of the run being fine-tuned
        "--data",
        str(data),
        "--output-dir",
        str(tmp_path / "finetune"),
        "--device",
        "cpu",
        "--init-from",
        str(checkpoint),
        "--set",
        *TINY,
        "train.max_steps=1",
    ]
    # The two remaining categories keep their trained rows: nothing needs --allow-partial.
    assert main(argv) == 0
    assert "rows taken by category id" in caplog.text
    assert "0 re-initialised" in caplog.text


@pytest.mark.parametrize(
    "argv,needle",
    [
        (
            ["train", "--config", "detr_tiny", "--output-dir", "x", "--set", "model.num_querys=3"],
            "model.num_queries",
        ),
        (["train", "--config", "no_such_preset", "--output-dir", "x"], "detr_r50"),
        (
            ["train", "--config", "detr_tiny", "--output-dir", "x", "--set", "train.epochs=ten"],
            "train.epochs",
        ),
        (
            ["train", "--config", "detr_tiny", "--data", "/nonexistent/data", "--output-dir", "x"],
            "/nonexistent/data",
        ),
        (
            ["eval", "--checkpoint", "/nonexistent/ckpt.safetensors", "--data", "x"],
            "/nonexistent/ckpt.safetensors",
        ),
    ],
)
def test_user_errors_are_one_clear_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
