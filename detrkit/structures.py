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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

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
        level_shapes: ``spatial_shapes`` as Python (H_l, W_l) pairs, read off the feature maps,
            or None (then :meth:`shapes` reads the tensor).
    """

    tokens: Tensor
    padding_mask: Tensor
    pos: Tensor
    spatial_shapes: Tensor
    level_start: Tensor
    valid_ratios: Tensor
    image_sizes: Tensor | None = None
    level_shapes: tuple[tuple[int, int], ...] | None = None

    def shapes(self) -> list[tuple[int, int]]:
        """(H_l, W_l) of every level as Python ints. Code that loops over levels uses these
        rather than ``spatial_shapes.tolist()``: under ``torch.export`` they stay symbolic
        sizes of the input (dynamic ONNX axes), where a tensor's values would be unknown."""
        if self.level_shapes is not None:
            return list(self.level_shapes)
        return [(int(h), int(w)) for h, w in self.spatial_shapes.tolist()]

    def level_starts(self) -> list[int]:
        """Offset of every level in S, as Python ints (see :meth:`shapes`)."""
        starts, total = [], 0
        for height, width in self.shapes():
            starts.append(total)
            total = total + height * width
        return starts


@dataclass(frozen=True)
class FixedAssignment:
    """Targets a scheme hands over for its queries instead of matching them (denoising,
    Co-DETR's positive queries).

    Attributes:
        pairs: per image, (query indices [M] int64 within the group, target indices [M] int64
            into that image's targets); queries in no pair are negatives ("no object").
        targets: per image, the targets the pairs index (explicit boxes and labels), or None for
            the images' own ground truth.
        normaliser_multiplier: the losses are divided by the rank-averaged ground-truth count
            (at least 1) times this (DINO divides its denoising losses by boxes x groups).
    """

    pairs: tuple[tuple[Tensor, Tensor], ...]
    targets: tuple[Target, ...] | None = None
    normaliser_multiplier: float = 1.0


@dataclass(frozen=True)
class Supervision:
    """How a query group is trained; the criterion reads it from the group.

    Attributes:
        assigner: the name of one of the criterion's assigners ("hungarian": the configured
            matching costs; "hungarian_no_class": the same without the class cost), an
            assigner object of the scheme's own (``matching.batch.Assigner``), or a
            ``FixedAssignment``.
        term_weights: loss-term name -> weight in the total; None = the configured weights.
        scale: multiplies every term of the group as reported (H-DETR's ``lambda_one2many``,
            which the original folds into the terms, not their weights).
        target_repeat: match and supervise against every target repeated this many times,
            tiled [g1..gG, g1..gG, ...] (H-DETR's one-to-many group).
        class_agnostic: every target label is 0 (two-stage encoder proposals).
        match_on: "predictions" = predicted boxes, "anchors" = the group's ``anchors``.
        merge_with: another group over the same queries whose pairs, layer by layer, are added
            to this group's (MS-DETR's ``--use_indices_merge``), or None.
    """

    assigner: object = "hungarian"
    term_weights: Mapping[str, float] | None = None
    scale: float = 1.0
    target_repeat: int = 1
    class_agnostic: bool = False
    match_on: Literal["predictions", "anchors"] = "predictions"
    merge_with: str | None = None

    @property
    def fixed(self) -> FixedAssignment | None:
        """The handed-over assignment, or None when the group is matched."""
        return self.assigner if isinstance(self.assigner, FixedAssignment) else None


@dataclass(frozen=True)
class QueryGroup:
    """A labelled span of the query axis and how it is supervised.

    Attributes:
        name: "main", "o2m", ... (used in loss names).
        start, stop: half-open span on the query axis.
        supervision: assigner, weights and targets of the group's losses.
        at_inference: whether this group is returned by ``DetectorOutput.for_inference``.
        valid: [B, stop - start] bool, False on padding queries of images with fewer queries
            (they take no loss and no query attends to them), or None = all valid.
    """

    name: str
    start: int
    stop: int
    supervision: Supervision = field(default_factory=Supervision)
    at_inference: bool = False
    valid: Tensor | None = None


@dataclass(frozen=True)
class QueryAttention:
    """Which queries a new span of queries attends to in self-attention. Queries already in
    the set never attend to a new span (training-only queries cannot change the others).

    Attributes:
        sees_existing: the new queries attend to the queries already in the set (DINO's
            denoising queries see the matching queries; H-DETR's one-to-many ones do not).
        blocked: [N, N] or [B, N, N] bool among the new queries, True = blocked (e.g. one
            denoising group may not see another), or None = all see each other.
    """

    sees_existing: bool = False
    blocked: Tensor | None = None


@dataclass
class QuerySet:
    """Queries entering the decoder.

    Attributes:
        content: [B, Q, D] content embeddings (DETR starts from zeros).
        pos: [B, Q, D] positional embedding of each query, or None when the decoder derives it
            from ``reference``.
        reference: [B, Q, 2 | 4] sigmoid-space reference points/boxes, or None (DETR).
        groups: the labelled spans covering [0, Q).
        self_attn_mask: [Q, Q] or [B, Q, Q] bool, True where attention is blocked, or None.
    """

    content: Tensor
    pos: Tensor | None
    reference: Tensor | None
    groups: tuple[QueryGroup, ...]
    self_attn_mask: Tensor | None = None

    @property
    def num_queries(self) -> int:
        return self.content.shape[1]

    def append(
        self,
        group: QueryGroup,
        content: Tensor,
        *,
        pos: Tensor | None = None,
        reference: Tensor | None = None,
        attention: QueryAttention | None = None,
    ) -> QuerySet:
        """A new set with ``content`` [B, N, D] appended as ``group`` (its ``start``/``stop``
        are set here), with positions [B, N, D] and references [B, N, 2 | 4] where the set has
        them, attending as ``attention`` says (default: only among themselves)."""
        start, count = self.num_queries, content.shape[1]
        group = replace(group, start=start, stop=start + count)
        return QuerySet(
            content=torch.cat((self.content, content), 1),
            pos=_cat_optional(self.pos, pos, "pos"),
            reference=_cat_optional(self.reference, reference, "reference"),
            groups=self.groups + (group,),
            self_attn_mask=self._extended_mask(count, attention or QueryAttention(), group.valid),
        )

    def _extended_mask(self, count: int, attention: QueryAttention, valid: Tensor | None) -> Tensor:
        """The [Q + N, Q + N] (or per-image [B, Q + N, Q + N]) mask after appending N queries."""
        old, total = self.num_queries, self.num_queries + count
        device = self.content.device
        per_image = valid is not None or any(
            m is not None and m.dim() == 3 for m in (self.self_attn_mask, attention.blocked)
        )
        shape = (self.content.shape[0], total, total) if per_image else (total, total)
        mask = torch.zeros(shape, dtype=torch.bool, device=device)
        if self.self_attn_mask is not None:
            mask[..., :old, :old] = self.self_attn_mask
        mask[..., :old, old:] = True
        if not attention.sees_existing:
            mask[..., old:, :old] = True
        if attention.blocked is not None:
            mask[..., old:, old:] = attention.blocked
        if valid is not None:
            mask[:, :, old:] |= ~valid[:, None, :]
        # A query always sees itself, so no row of the softmax is empty.
        mask.diagonal(dim1=-2, dim2=-1).fill_(False)
        return mask


def _cat_optional(existing: Tensor | None, new: Tensor | None, name: str) -> Tensor | None:
    if existing is None and new is None:
        return None
    if existing is None or new is None:
        raise ValueError(f"appended queries must bring '{name}' exactly when the set has it")
    return torch.cat((existing, new.to(existing.dtype)), 1)


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
        supervision: how the criterion assigns targets and weighs the terms.
        at_inference: whether the group is the detector's inference output.
        anchors: [L, B, Qg, 4] cxcywh boxes the predictions started from (two-stage proposals),
            or None; ``supervision.match_on="anchors"`` matches on them.
        valid: [B, Qg] bool, False on padding queries (no loss), or None = all valid.
    """

    name: str
    logits: Tensor
    boxes: Tensor
    supervision: Supervision = field(default_factory=Supervision)
    at_inference: bool = False
    anchors: Tensor | None = None
    valid: Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.logits.shape[0]


@dataclass
class DenseLoss:
    """A loss computed beside the decoder (an anchor- or proposal-based head over the encoder
    memory). The criterion evaluates it in fp32 outside autocast and normalises it.

    Attributes:
        name: the logged name, e.g. ``rpn/cls``.
        compute: ``compute(*inputs) -> scalar``, the loss summed over what it supervises.
        inputs: tensors handed to ``compute``, cast to float32 first.
        count: local normaliser (a scalar tensor, e.g. the positives); it is averaged over ranks
            like the box count and clamped to at least 1. None = the batch's box count.
        weight: the term's weight in the total.
    """

    name: str
    compute: Callable[..., Tensor]
    inputs: tuple[Tensor, ...]
    count: Tensor | None = None
    weight: float = 1.0


@dataclass
class DetectorOutput:
    """Everything a detector returns.

    Attributes:
        groups: prediction groups (in eval mode: the inference group only, plus any group the
            detector always computes).
        dense_losses: losses of training-only heads beside the decoder (empty at inference).
    """

    groups: list[PredictionGroup]
    dense_losses: list[DenseLoss] = field(default_factory=list)

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
        terms: name -> scalar as reported (a group's ``supervision.scale`` included, its weight
            not), named ``{group}/{term}/d{layer}``; dense losses by their own names.
        weights: name -> the weight applied to the term in ``total``.
    """

    total: Tensor
    terms: dict[str, Tensor]
    weights: dict[str, float]
