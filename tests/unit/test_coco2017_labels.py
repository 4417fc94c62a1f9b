# SPDX-License-Identifier: Apache-2.0
"""Converted official checkpoints (91-slot COCO heads) on COCO-2017-shaped data: the 80 real
categories with their real ids, as in ``instances_val2017.json``."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from detrkit.cli.__main__ import main
from detrkit.cli.evaluate import eval_file_names
from detrkit.data.coco_names import COCO_CATEGORY_NAMES
from detrkit.data.labels import NO_CATEGORY, LabelMap
from detrkit.data.synth import write_synthetic_coco
from detrkit.inference import load_model
from detrkit.models.postprocess import SoftmaxPostprocess, TopKSigmoidPostprocess
from detrkit.structures import PredictionGroup
from tests.golden.golden_case import SHIPPED_DIR, official_state_dict

COCO_UNUSED = (0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
# The synthetic shapes become these real COCO classes.
AS_COCO = {1: 1, 3: 18, 7: 62}  # person, dog, chair


def write_coco2017(root: Path, num_train: int = 2, num_val: int = 2) -> Path:
    """A synthetic COCO folder whose ``categories`` are COCO 2017's 80 (real ids and names)."""
    write_synthetic_coco(root, num_train=num_train, num_val=num_val, seed=0, max_size=64)
    categories = [
        {"id": i, "name": n, "supercategory": "x"} for i, n in COCO_CATEGORY_NAMES.items()
    ]
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}.json"
        data = json.loads(path.read_text())
        data["categories"] = categories
        for annotation in data["annotations"]:
            annotation["category_id"] = AS_COCO[annotation["category_id"]]
        path.write_text(json.dumps(data))
    return root


def official_pth(tmp_path: Path, case: str, **changes) -> Path:
    """A golden case's official weights and args saved as the original repositories do."""
    path = SHIPPED_DIR / f"{case}.json"
    if not path.is_file():
        pytest.skip(f"golden case {path} not available")
    spec = json.loads(path.read_text())
    state = official_state_dict(spec, path.parent)
    out = tmp_path / f"{case}.pth"
    torch.save({"model": state, "args": argparse.Namespace(**{**spec["args"], **changes})}, out)
    return out


def converted(tmp_path: Path, case: str, source: str) -> Path:
    out = tmp_path / f"{case}.safetensors"
    assert (
        main(["convert", "--from", source, str(official_pth(tmp_path, case)), "--out", str(out)])
        == 0
    )
    return out


@pytest.fixture(scope="module")
def coco2017(tmp_path_factory):
    return write_coco2017(tmp_path_factory.mktemp("coco2017"))


def test_label_map_marks_unused_slots_and_round_trips():
    label_map = LabelMap(tuple(range(91)), tuple(map(str, range(91))), COCO_UNUSED)
    assert len(label_map.used_ids) == 80 and 12 not in label_map.used_ids
    assert LabelMap.from_dict(json.loads(json.dumps(label_map.to_dict()))) == label_map
    table = label_map.category_table(keep={1, 18})
    assert (
        table[1] == 1 and table[18] == 18 and table[12] == NO_CATEGORY and table[2] == NO_CATEGORY
    )
    assert label_map.ignored_labels() == COCO_UNUSED
    assert "unused_category_ids" not in LabelMap((1, 2), ("a", "b")).to_dict()  # old format
    with pytest.raises(ValueError, match="unused"):
        LabelMap((1, 2), ("a", "b"), (5,))


def _group(logits: torch.Tensor) -> PredictionGroup:
    boxes = torch.full((*logits.shape[:-1], 4), 0.5)
    return PredictionGroup("main", logits[None], boxes[None], at_inference=True)


def test_postprocess_never_reports_ignored_labels():
    sizes = torch.tensor([[10, 10]])
    logits = torch.tensor([[[5.0, 1.0, 0.0, -9.0], [0.0, 4.0, 3.0, -9.0]]])  # [B=1, Q=2, C+1]
    (softmax,) = SoftmaxPostprocess(ignored_labels=(1,))(_group(logits), sizes)
    assert softmax.labels.tolist() == [0, 2]
    # The N/A logits stay in the softmax: the scores are the original's probabilities.
    torch.testing.assert_close(softmax.scores[1], logits[0, 1].softmax(-1)[2])
    (topk,) = TopKSigmoidPostprocess(top_k=100, ignored_labels=(0, 3))(_group(logits), sizes)
    assert sorted(topk.labels.tolist()) == [1, 1, 2, 2]  # every pair but the ignored classes


@pytest.mark.parametrize(
    "case,source", [("detr_r18", "detr"), ("deformable_detr_r18_ms", "deformable_detr")]
)
def test_converted_checkpoint_evaluates_and_predicts_on_coco2017(
    tmp_path, coco2017, capsys, case, source
):
    checkpoint = converted(tmp_path, case, source)
    label_map = load_model(checkpoint).label_map
    assert label_map.unused_ids == COCO_UNUSED and label_map.names[18] == "dog"
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(coco2017), "--split", "val"]
    assert main([*argv, "--output-dir", str(out), "--device", "cpu"]) == 0
    assert "Average Precision" in capsys.readouterr().out
    results = json.loads((out / eval_file_names(checkpoint, coco2017, "val")[1]).read_text())
    assert results and {r["category_id"] for r in results} <= set(COCO_CATEGORY_NAMES)
    predicted = tmp_path / "predict"
    images = ["predict", str(coco2017 / "val"), "--checkpoint", str(checkpoint)]
    assert main([*images, "--output-dir", str(predicted), "--score-threshold", "0"]) == 0
    records = json.loads((predicted / "predictions.json").read_text())
    assert records and {r["category_id"] for r in records} <= set(COCO_CATEGORY_NAMES)
    assert "N/A" not in {r["category_name"] for r in records}


def test_dataset_category_unknown_to_the_checkpoint_is_one_clear_error(tmp_path, capsys):
    root = write_coco2017(tmp_path / "data", num_train=0, num_val=1)
    path = root / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    data["categories"].append({"id": 12, "name": "street sign"})  # an unused slot in the head
    path.write_text(json.dumps(data))
    checkpoint = converted(tmp_path, "detr_r18", "detr")
    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(root), "--split", "val"]
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # one line, exit code 2
    assert last.startswith("detrkit eval: error: ") and last.endswith("--init-from")
    assert "12 'street sign' are not classes of the checkpoint" in last


def test_subset_dataset_opens_with_the_checkpoint_label_map(tmp_path):
    """3 of the 80 categories: the evaluator reports only those, the others never score."""
    root = write_coco2017(tmp_path / "data", num_train=0, num_val=1)
    path = root / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    data["categories"] = [c for c in data["categories"] if c["id"] in AS_COCO.values()]
    path.write_text(json.dumps(data))
    checkpoint = converted(tmp_path, "deformable_detr_r18_ms", "deformable_detr")
    out = tmp_path / "out"
    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(root), "--split", "val"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    results = json.loads((out / eval_file_names(checkpoint, root, "val")[1]).read_text())
    # 20 queries x 3 classes: fewer pairs than the top-100, and none of another class.
    assert len(results) == 20 * 3 and {r["category_id"] for r in results} == set(AS_COCO.values())
