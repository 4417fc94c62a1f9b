# SPDX-License-Identifier: Apache-2.0
"""onnxruntime against PyTorch eager on one input: the check ``detrkit export --format onnx``
runs before it keeps a file (docs/onnx.md#the-parity-check)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from detrkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detrkit.export.onnx_graph import INPUT_NAMES, DeployableDetector, GraphOutputs

# Largest difference accepted on scores and on boxes (as fractions of the original image's
# width / height, see ParityResult), and the score gap below which two detections are a tie.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class ParityResult:
    """How far onnxruntime is from eager PyTorch on one input.

    Attributes:
        input_shape: (B, 3, H, W) of the compared input.
        box_diff: max |ort - eager| over box coordinates, in pixels of the original images.
        box_diff_relative: the same, each coordinate divided by its image's width (x) or height
            (y); this is what is held to ``tolerance`` (see docs/onnx.md#the-parity-check).
        score_diff: max |ort - eager| over scores.
        order_ok: the detections come in the same order, except within ties (scores within
            ``tolerance``), and have the same labels (except between tied classes).
        tolerance: the accepted difference.
        num_detections: K, detections per image.
    """

    input_shape: tuple[int, ...]
    box_diff: float
    box_diff_relative: float
    score_diff: float
    order_ok: bool
    tolerance: float = TOLERANCE
    num_detections: int = 0

    @property
    def ok(self) -> bool:
        return (
            self.order_ok
            and self.box_diff_relative <= self.tolerance
            and self.score_diff <= self.tolerance
        )

    def describe(self) -> str:
        order = "same order" if self.order_ok else "ORDER/LABELS DIFFER"
        shape = "x".join(map(str, self.input_shape))
        return (
            f"input {shape}: max |diff| boxes {self.box_diff:.2e} px "
            f"({self.box_diff_relative:.2e} of the image size), scores {self.score_diff:.2e}, "
            f"{order} (tolerance {self.tolerance:g})"
        )


def sample_input(batch: int, height: int, width: int) -> tuple[Tensor, Tensor]:
    """A deterministic synthetic batch: smooth gradients with bright rectangles, normalised like
    the eval transforms; original sizes 1.5x the input (so the boxes are rescaled).

    Returns:
        pixels [B, 3, H, W] float32 and orig_sizes [B, 2] int64 (h, w).
    """
    ys = torch.linspace(0, 1, height)[:, None].expand(height, width)
    xs = torch.linspace(0, 1, width)[None, :].expand(height, width)
    images = []
    for index in range(batch):
        image = torch.stack((xs, ys, (xs + ys + 0.25 * index) % 1.0))
        top, left = height // (4 + index), width // (3 + index)
        image[:, top : top + height // 3, left : left + width // 3] = torch.tensor(
            [0.9, 0.8 - 0.2 * index, 0.1]
        )[:, None, None]
        images.append(image)
    pixels = torch.stack(images)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    orig = torch.tensor([[height * 3 // 2, width * 3 // 2]] * batch, dtype=torch.int64)
    return ((pixels - mean) / std).float(), orig


def run_onnxruntime(path: Path, pixels: Tensor, orig_sizes: Tensor) -> GraphOutputs:
    """The graph at ``path`` on onnxruntime's CPUExecutionProvider."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: not its notes on nodes it cannot fold
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = dict(zip(INPUT_NAMES, (pixels.numpy(), orig_sizes.numpy())))
    boxes, scores, labels = session.run(None, feeds)
    return GraphOutputs(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels))


@torch.no_grad()
def compare(
    module: DeployableDetector, onnx_path: Path, pixels: Tensor, orig_sizes: Tensor
) -> ParityResult:
    """Run ``module`` eagerly and the graph at ``onnx_path`` on (pixels, orig_sizes) and measure
    the differences (shapes as ``DeployableDetector.forward``)."""
    expected = module.detections(pixels, orig_sizes)
    found = run_onnxruntime(onnx_path, pixels, orig_sizes)
    result = measure(expected, found, orig_sizes, ranked=module_is_ranked(module))
    return replace(result, input_shape=tuple(pixels.shape), num_detections=expected.scores.shape[1])


def module_is_ranked(module: DeployableDetector) -> bool:
    """Top-k heads return detections best first; DETR's softmax head returns them by query."""
    return hasattr(module.postprocess, "top_k")


def measure(
    expected: GraphOutputs,
    found: GraphOutputs,
    orig_sizes: Tensor,
    ranked: bool,
    tolerance: float = TOLERANCE,
) -> ParityResult:
    """Differences of ``found`` from ``expected`` (both [B, K, ...]); for ``ranked`` outputs,
    detections tied with their neighbours (scores within ``tolerance``) may come in any order
    and are paired by label and box before the boxes are compared."""
    if found.boxes.shape != expected.boxes.shape:
        return ParityResult(
            tuple(found.boxes.shape), float("inf"), float("inf"), float("inf"), False
        )
    scale = orig_sizes.flip(-1).repeat(1, 2).to(expected.boxes)[:, None, :]  # (w, h, w, h)
    order_ok = True
    aligned = found
    if ranked:
        aligned, order_ok = _align_ties(expected, found, scale, tolerance)
    else:
        order_ok = bool((found.labels == expected.labels).all()) or _tied_labels(
            expected, found, tolerance
        )
    box_diff = (aligned.boxes - expected.boxes).abs()
    return ParityResult(
        input_shape=(),
        box_diff=_max(box_diff),
        box_diff_relative=_max(box_diff / scale),
        score_diff=_max((found.scores - expected.scores).abs()),
        order_ok=order_ok,
        tolerance=tolerance,
    )


def _max(values: Tensor) -> float:
    """The largest entry (NaN if any is NaN, so that a NaN never passes), 0 when empty."""
    if not values.numel():
        return 0.0
    if values.isnan().any():
        return float("nan")
    return float(values.max())


def _tied_labels(expected: GraphOutputs, found: GraphOutputs, tolerance: float) -> bool:
    """Softmax head: a query may name another class only if the scores say it is a tie (the
    best class's probability is then within ``tolerance`` of the other's, both near the
    reported score)."""
    differ = found.labels != expected.labels
    return bool(((found.scores - expected.scores).abs()[differ] <= tolerance).all())


def _align_ties(
    expected: GraphOutputs, found: GraphOutputs, scale: Tensor, tolerance: float
) -> tuple[GraphOutputs, bool]:
    """``found`` reordered within each run of tied detections to pair with ``expected``.

    A run is a maximal stretch of positions whose consecutive expected scores differ by at most
    ``tolerance``; inside it a found detection pairs with the expected one of the same label
    and the nearest box. Returns the reordered outputs and whether every detection paired.
    """
    order = torch.arange(found.scores.shape[1]).repeat(found.scores.shape[0], 1)
    ok = True
    for image in range(expected.scores.shape[0]):
        for start, stop in _tie_runs(expected.scores[image], tolerance):
            picks = _pair_run(expected, found, image, start, stop, scale[image, 0])
            if picks is None:
                ok = False
                continue
            order[image, start:stop] = torch.tensor(picks) + start
    index = order[..., None]
    boxes = torch.gather(found.boxes, 1, index.expand(-1, -1, 4))
    return GraphOutputs(boxes, found.scores, torch.gather(found.labels, 1, order)), ok


def _tie_runs(scores: Tensor, tolerance: float) -> list[tuple[int, int]]:
    """Half-open spans of consecutive positions whose neighbouring scores are within
    ``tolerance``."""
    runs, start = [], 0
    values = scores.tolist()
    for position in range(1, len(values) + 1):
        if position == len(values) or abs(values[position] - values[position - 1]) > tolerance:
            runs.append((start, position))
            start = position
    return runs


def _pair_run(
    expected: GraphOutputs, found: GraphOutputs, image: int, start: int, stop: int, scale: Tensor
) -> list[int] | None:
    """For each expected detection in [start, stop), the offset of the found one in the run with
    its label and the nearest box (each used once), or None if some label has no partner."""
    free = list(range(stop - start))
    picks = []
    for position in range(start, stop):
        label = int(expected.labels[image, position])
        candidates = [i for i in free if int(found.labels[image, start + i]) == label]
        if not candidates:
            return None
        distances = [
            float(
                ((found.boxes[image, start + i] - expected.boxes[image, position]) / scale)
                .abs()
                .max()
            )
            for i in candidates
        ]
        best = candidates[int(np.argmin(distances))]
        free.remove(best)
        picks.append(best)
    return picks
