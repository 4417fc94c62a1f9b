# SPDX-License-Identifier: Apache-2.0
"""Co-DETR's positive queries: the boxes a dense auxiliary head assigned (its ``pos_coords``)
and the fixed-size per-image selection of them (its ``get_aux_targets``). Boxes are xyxy
pixels in, cxcywh normalised by each image's unpadded size out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from detrkit.models.dense.roi_head import RoITrainOutput
from detrkit.ops.boxes import box_xyxy_to_cxcywh
from detrkit.schemes.randomness import RandomSource

# Co-DETR keeps at most this many RoIs per image as positive-query candidates.
MAX_ROI_CANDIDATES = 2000
# ... and always at least this many queries per image.
MIN_AUX_QUERIES = 9


@dataclass
class Candidates:
    """One auxiliary head's assigned boxes, per image (Co-DETR's ``pos_coords``).

    Attributes:
        coords: per image [N_i, 4] xyxy pixels (anchors or sampled RoIs).
        labels: per image [N_i] int64, ``num_classes`` = background.
        targets: per image [N_i, 4] the assigned ground truth, xyxy pixels.
        features: per image [N_i, D] each candidate's feature vector (Co-Deformable-DETR's
            ``pos_feats``: RoIAlign mean of a RoI, the memory vector at an anchor), or None.
    """

    coords: list[Tensor]
    labels: list[Tensor]
    targets: list[Tensor]
    features: list[Tensor] | None = None


@dataclass
class PositiveQueries:
    """What ``select_positive_queries`` keeps of the candidates, per batch (n per image).

    Attributes:
        selected: per image [n] candidate indices (positives first).
        num_positive: per image, how many of them are positives.
        coords, targets: [B, n, 4] cxcywh normalised by the image size.
        labels: [B, n] int64.
        features: [B, n, D] the kept candidates' features, or None (candidates without).
    """

    selected: list[Tensor]
    num_positive: list[int]
    coords: Tensor
    labels: Tensor
    targets: Tensor
    features: Tensor | None = None


def select_positive_queries(
    found: Candidates,
    sizes: Tensor,
    num_classes: int,
    max_pos_coords: int,
    random: RandomSource,
) -> PositiveQueries:
    """Co-DETR's ``get_aux_targets``: n = max(9, min(max_pos_coords, most positives of an
    image)) per image, its positives (a random subset when more than n) then random negatives;
    the draws go through ``random``, image by image (a positive ``randperm`` only when there
    are more than n, a negative one only when fewer).

    Args:
        found: the head's candidates.
        sizes: [B, 2] (h, w) unpadded image sizes in pixels.
        num_classes: C; candidate label C is background.
        max_pos_coords: the most queries per image.
        random: the draws.
    """
    positives = [((lab >= 0) & (lab < num_classes)).nonzero().view(-1) for lab in found.labels]
    most = max((len(p) for p in positives), default=0)
    count = max(MIN_AUX_QUERIES, min(max_pos_coords, most))
    selected, num_positive, coords, labels, boxes = [], [], [], [], []
    for image, pos in enumerate(positives):
        label = found.labels[image]
        if len(pos) > count:
            pos = pos[random.randperm(len(pos), pos.device)[:count]]
        chosen = pos
        if len(pos) < count:
            neg = (label == num_classes).nonzero().view(-1)
            neg = neg[random.randperm(len(neg), neg.device)[: count - len(pos)]]
            chosen = torch.cat((pos, _cycled(neg, count - len(pos))))
        height, width = (float(v) for v in sizes[image])
        factor = found.coords[image].new_tensor([width, height, width, height])
        selected.append(chosen)
        num_positive.append(len(pos))
        coords.append(box_xyxy_to_cxcywh(found.coords[image][chosen] / factor))
        boxes.append(box_xyxy_to_cxcywh(found.targets[image][chosen] / factor))
        labels.append(label[chosen])
    stack = torch.stack
    features = None
    if found.features is not None:
        features = stack([f[index] for f, index in zip(found.features, selected)])
    return PositiveQueries(
        selected, num_positive, stack(coords), stack(labels), stack(boxes), features
    )


def _cycled(negatives: Tensor, count: int) -> Tensor:
    """``count`` negatives; where an image has fewer (the official code fails there, e.g. a
    tiny image with under 9 RoIs), they are repeated (still "no object")."""
    if len(negatives) >= count:
        return negatives
    if len(negatives) == 0:
        raise ValueError(f"{count} positive-query slots to pad and no negative candidate")
    return negatives.repeat((count + len(negatives) - 1) // len(negatives))[:count]


def roi_candidates(out: RoITrainOutput) -> Candidates:
    """The sampled RoIs of every image (positives first), their labels, box targets and
    mean-pooled features, the first ``min(2000, fewest sampled of an image)`` of each
    (Co-DETR's ``pos_coords``)."""
    counts = [s.pos_inds.numel() + s.neg_inds.numel() for s in out.samplings]
    keep = min(MAX_ROI_CANDIDATES, min(counts))
    labels = out.targets.labels.split(counts)
    boxes = out.targets.boxes.split(counts)
    features = None if out.features is None else [f[:keep] for f in out.features.split(counts)]
    return Candidates(
        [s.boxes[:keep] for s in out.samplings],
        [lab[:keep] for lab in labels],
        [b[:keep] for b in boxes],
        features,
    )


def anchor_candidates(
    coords: Tensor, labels: Tensor, targets: Tensor, maps: list[Tensor]
) -> Candidates:
    """An anchor head's candidates (ATSS: anchors [B, N, 4], labels [B, N], targets
    [B, N, 4]) with, per anchor, the feature vector of its location: ``maps`` [B, D, h, w]
    flattened level by level, row-major, each location's vector repeated for its
    ``N / locations`` anchors (Co-Deformable-DETR's ``get_aux_targets``)."""
    vectors = torch.cat([m.flatten(2) for m in maps], 2).transpose(1, 2)
    per_location = coords.shape[1] // vectors.shape[1]
    vectors = vectors.repeat_interleave(per_location, dim=1)
    return Candidates(list(coords), list(labels), list(targets), list(vectors))
