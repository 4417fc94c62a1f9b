# SPDX-License-Identifier: Apache-2.0
"""Typed data flowing through detrkit.

Box conventions, stated once for the whole package:

* ``cxcywh`` boxes are (centre x, centre y, width, height) normalised to [0, 1] by the
  *unpadded* image width and height ("cxcywh-n" in the spec).
* ``xyxy`` boxes are (x1, y1, x2, y2); names say whether they are normalised or absolute pixels.
* ``reference`` tensors live in sigmoid space ([0, 1]); ``reference_logit`` in inverse-sigmoid
  space.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass
class ImageBatch:
    """A padded batch of normalised images.

    Attributes:
        pixels: [B, 3, H, W] float, normalised, zero-padded at the bottom/right.
        padding_mask: [B, H, W] bool, True on padded pixels.
        sizes: [B, 2] int64, (h, w) of each image before padding.
    """

    pixels: Tensor
    padding_mask: Tensor
    sizes: Tensor

    def to(self, device: torch.device | str) -> ImageBatch:
        return ImageBatch(
            self.pixels.to(device), self.padding_mask.to(device), self.sizes.to(device)
        )

    def __len__(self) -> int:
        return self.pixels.shape[0]


@dataclass
class Target:
    """Ground truth of one image.

    Attributes:
        labels: [N] int64 contiguous labels in [0, num_classes).
        boxes: [N, 4] float cxcywh, normalised by the unpadded (augmented) image size.
        image_id: the dataset's image id.
        orig_size: (h, w) of the image as stored on disk; predictions are scaled to it.
        size: (h, w) after the transforms (before padding).
    """

    labels: Tensor
    boxes: Tensor
    image_id: int = 0
    orig_size: tuple[int, int] = (0, 0)
    size: tuple[int, int] = (0, 0)

    def to(self, device: torch.device | str) -> Target:
        return replace(self, labels=self.labels.to(device), boxes=self.boxes.to(device))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class FeatureLevel:
    """One level of a feature pyramid.

    Attributes:
        features: [B, C, H_l, W_l].
        padding_mask: [B, H_l, W_l] bool, True on padding.
        pos: [B, D, H_l, W_l] positional embedding, or None before it is computed.
    """

    features: Tensor
    padding_mask: Tensor
    pos: Tensor | None = None


@dataclass
class EncoderMemory:
    """The encoder's output, flattened over all levels.

    Attributes:
        tokens: [B, S, D], S = sum of H_l * W_l, levels concatenated, each row-major.
        padding_mask: [B, S] bool, True on padding.
        pos: [B, S, D] positional (+ level) embedding of every token.
        spatial_shapes: [L, 2] int64, (H_l, W_l) of every level.
        level_start: [L] int64, offset of every level in S.
        valid_ratios: [B, L, 2] float, (w, h) valid fraction of every level.
        image_sizes: [B, 2] int64, (h, w) of each input image before padding, in pixels (set by
            the detector; SMCA places its spatial prior with it), or None.
    """

    tokens: Tensor
    padding_mask: Tensor
    pos: Tensor
    spatial_shapes: Tensor
    level_start: Tensor
    valid_ratios: Tensor
    image_sizes: Tensor | None = None


@dataclass(frozen=True)
class QueryGroup:
    """A labelled span of the query axis, supervised by one assigner.

    Attributes:
        name: "main", "o2m", ... (used in loss names).
        start, stop: half-open span on the query axis.
        assigner: key into ``SetCriterion.assigners``.
        loss_weight: multiplies every loss term of the group.
        at_inference: whether this group is returned by ``DetectorOutput.for_inference``.
        target_repeat: the group is supervised against every target repeated this many times
            (H-DETR's one-to-many group).
    """

    name: str
    start: int
    stop: int
    assigner: str = "hungarian"
    loss_weight: float = 1.0
    at_inference: bool = False
    target_repeat: int = 1


@dataclass
class QuerySet:
    """Queries entering the decoder.

    Attributes:
        content: [B, Q, D] content embeddings (DETR starts from zeros).
        pos: [B, Q, D] positional embedding of each query, or None when the decoder derives it
            from ``reference``.
        reference: [B, Q, 2 | 4] sigmoid-space reference points/boxes, or None (DETR).
        groups: the labelled spans covering [0, Q).
        self_attn_mask: [Q, Q] bool, True where attention is blocked, or None.
    """

    content: Tensor
    pos: Tensor | None
    reference: Tensor | None
    groups: tuple[QueryGroup, ...]
    self_attn_mask: Tensor | None = None

    @property
    def num_queries(self) -> int:
        return self.content.shape[1]


@dataclass
class DecoderOutput:
    """Hidden states of every decoder layer.

    Attributes:
        hidden: [L, B, Q, D].
        references: L + 1 sigmoid-space references [B, Q, 2 | 4] (index 0 = initial; index k is
            what layer k predicts relative to), or None. A tuple, since refinement turns a 2-d
            initial reference into 4-d boxes.
        taps: tap name -> [L, B, Q, D] hidden states recorded inside each layer.
    """

    hidden: Tensor
    references: tuple[Tensor, ...] | None = None
    taps: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class PredictionGroup:
    """Per-layer predictions of one query group.

    Attributes:
        name: group name, used in loss names ``{name}/{term}/d{layer}``.
        logits: [L, B, Qg, C] class logits (C includes "no object" for softmax heads).
        boxes: [L, B, Qg, 4] cxcywh in [0, 1].
        assigner: key into ``SetCriterion.assigners``.
        loss_weight: multiplies every term of the group.
        at_inference: whether the group is the detector's inference output.
        class_agnostic: match and supervise with every label set to 0 (two-stage proposals).
        target_repeat: supervise against the targets repeated this many times.
        anchors: [L, B, Qg, 4] cxcywh boxes the predictions started from (two-stage proposals),
            or None; some schemes match on them.
    """

    name: str
    logits: Tensor
    boxes: Tensor
    assigner: str = "hungarian"
    loss_weight: float = 1.0
    at_inference: bool = False
    class_agnostic: bool = False
    target_repeat: int = 1
    anchors: Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.logits.shape[0]


@dataclass
class DetectorOutput:
    """Everything a detector returns.

    Attributes:
        groups: prediction groups (in eval mode: the inference group only, plus any group the
            detector always computes).
        extra_losses: losses computed inside the model (e.g. dense auxiliary heads).
    """

    groups: list[PredictionGroup]
    extra_losses: dict[str, Tensor] = field(default_factory=dict)

    def for_inference(self) -> PredictionGroup:
        chosen = [g for g in self.groups if g.at_inference]
        if len(chosen) != 1:
            raise ValueError(f"expected exactly one inference group, found {len(chosen)}")
        return chosen[0]

    def group(self, name: str) -> PredictionGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)


@dataclass
class Detections:
    """Postprocessed detections of one image, in original-image pixels.

    Attributes:
        boxes_xyxy: [N, 4] absolute (x1, y1, x2, y2).
        scores: [N].
        labels: [N] int64 contiguous labels (mapped to category ids by the dataset's label map).
        query_index: [N] int64, the query each detection comes from, or None where unknown
            (e.g. after merging test-time augmentations).
    """

    boxes_xyxy: Tensor
    scores: Tensor
    labels: Tensor
    query_index: Tensor | None = None


@dataclass
class LossOutput:
    """Weighted total and every unweighted term.

    Attributes:
        total: scalar, sum of weighted terms (what is back-propagated).
        terms: name -> unweighted scalar, named ``{group}/{term}/d{layer}``.
        weights: name -> the weight applied to the term in ``total``.
    """

    total: Tensor
    terms: dict[str, Tensor]
    weights: dict[str, float]
