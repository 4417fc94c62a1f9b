# SPDX-License-Identifier: Apache-2.0
"""DINO's contrastive denoising: noised copies of the ground truth are decoded beside the
matching queries and trained to reconstruct their boxes (positives) or to say "no object"
(negatives) (docs/methods.md#dino-denoising)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detrkit.errors import UserError
from detrkit.models.reference_position import ReferencePositionHead
from detrkit.ops.boxes import box_cxcywh_to_xyxy, inverse_sigmoid
from detrkit.schemes.base import TrainingScheme
from detrkit.schemes.randomness import RandomSource
from detrkit.schemes.registry import SchemeContext, SchemeSpec, register_scheme
from detrkit.structures import (
    EncoderMemory,
    FixedAssignment,
    QueryAttention,
    QueryGroup,
    QuerySet,
    Supervision,
    Target,
)

DN_GROUP = "dn"
# The noised boxes enter the decoder through a logit clamped at this eps (DINO, Co-DINO).
REFERENCE_EPS = 1e-3


@dataclass(frozen=True)
class DenoisingConfig:
    """``model.schemes.denoising``: DINO's contrastive denoising (CDN).

    Attributes:
        dn_number: the denoising budget: each batch gets max(1, dn_number // the most boxes
            of one of its images) groups, each a positive and a negative noised copy of every
            ground-truth box (``--dn_number``; Co-DINO's ``num_dn_queries``).
        label_noise_ratio: a copy's label is replaced by a uniformly drawn class with
            probability half of this (``--dn_label_noise_ratio``).
        box_noise_scale: each corner moves by up to this times half the box size (positives),
            or by 1-2 times that (negatives) (``--dn_box_noise_scale``; the official scripts
            pass 1.0, their configs say 0.4).
        extra_label_row: the label embedding has num_classes + 1 rows (DINO's
            ``dn_labelbook_size + 1``) instead of num_classes (Co-DINO).
        dynamic_groups: the group count follows the most crowded image (above); False = always
            ``dn_number`` groups (mmdetection's ``dynamic=False``; the original DINO code
            behaves so, with 2 x ``--dn_number`` groups, when ``--dn_number`` is below 50).
    """

    dn_number: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0
    extra_label_row: bool = True
    dynamic_groups: bool = True


@dataclass
class NoisedCopies:
    """The 2G noised copies of a batch's ground truth, copy-major: entry ``c * T + j`` is copy
    c of the j-th box of the batch (images concatenated); even copies are positives.

    Attributes:
        labels: [2G * T] int64.
        boxes: [2G * T, 4] cxcywh, normalised (widths may be negative after the clamp).
        groups: G.
    """

    labels: Tensor
    boxes: Tensor
    groups: int


def num_groups(dn_number: int, targets: list[Target], dynamic: bool = True) -> int:
    """max(1, dn_number // the most boxes in one image), or ``dn_number`` when not
    ``dynamic``; 1 when no image has a box."""
    most = max((len(t) for t in targets), default=0)
    if not most:
        return 1
    return max(1, dn_number // most) if dynamic else dn_number


def noised_copies(
    labels: Tensor,
    boxes: Tensor,
    groups: int,
    *,
    num_classes: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    random: RandomSource,
) -> NoisedCopies:
    """Noise 2G copies of the batch's boxes; the draws come from ``random`` in DINO's order
    (label-noise probabilities, new labels, box signs, box magnitudes).

    Args:
        labels: [T] int64, the batch's ground truth, images concatenated.
        boxes: [T, 4] cxcywh, normalised.
    """
    copies = 2 * groups
    labels, boxes = labels.repeat(copies), boxes.repeat(copies, 1)
    if label_noise_ratio > 0:
        draw = random.rand_like(labels.float())
        chosen = torch.nonzero(draw < label_noise_ratio * 0.5).view(-1)
        labels = labels.scatter(0, chosen, random.randint_like(chosen, 0, num_classes))
    if box_noise_scale > 0:
        corners = box_cxcywh_to_xyxy(boxes)
        half = boxes[:, 2:].repeat(1, 2) / 2
        sign = random.randint_like(boxes, 0, 2) * 2.0 - 1.0
        magnitude = random.rand_like(boxes)
        copy_index = torch.arange(copies, device=boxes.device).repeat_interleave(
            len(boxes) // copies
        )
        magnitude = magnitude + (copy_index % 2 == 1)[:, None].to(magnitude.dtype)
        corners = (corners + (magnitude * sign) * half * box_noise_scale).clamp(0.0, 1.0)
        centre = (corners[:, :2] + corners[:, 2:]) / 2
        boxes = torch.cat((centre, corners[:, 2:] - corners[:, :2]), 1)
    return NoisedCopies(labels, boxes, groups)


def group_blocks(groups: int, group_size: int, device: torch.device) -> Tensor:
    """[G * S, G * S] bool: True between different denoising groups (each sees only itself)."""
    group_of = torch.arange(groups * group_size, device=device) // group_size
    return group_of[:, None] != group_of[None, :]


class ContrastiveDenoising(TrainingScheme):
    """Append the noised copies as a "dn" query group with fixed targets.

    Per image, copy c of its k-th box sits at slot ``c * M + k`` (M = the most boxes of one
    image in the batch; slots of images with fewer boxes stay zero and are supervised as "no
    object", as in the original). Positives are assigned their box; negatives and padding are
    negatives. Denoising groups see the matching queries and their own group only; no matching
    query sees them. The losses are normalised by the box count times G.

    Args:
        dim: width D.
        num_classes: classes of the label noise.
        label_rows: rows of the label embedding.
        options: the scheme's config.
        pos_head: positions of the denoising queries from their boxes, for decoders whose
            queries bring a constant position; None when the decoder derives positions.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        label_rows: int,
        options: DenoisingConfig,
        pos_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.label_embedding = nn.Embedding(label_rows, dim)
        self.num_classes, self.options = num_classes, options
        self.pos_head = pos_head
        self.random = RandomSource()

    def extend_queries(
        self,
        queries: QuerySet,
        memory: EncoderMemory,
        targets: list[Target] | None,
        slots: range,
    ) -> QuerySet:
        """``queries`` with the "dn" group appended (empty when the batch has no box, so every
        rank reports the same terms and uses the same parameters)."""
        if targets is None:
            return queries
        if queries.reference is None or queries.reference.shape[-1] != 4:
            raise ValueError("denoising needs queries with 4-d reference boxes")
        copies = noised_copies(
            torch.cat([t.labels for t in targets]),
            torch.cat([t.boxes for t in targets]).float(),
            num_groups(self.options.dn_number, targets, self.options.dynamic_groups),
            num_classes=self.num_classes,
            label_noise_ratio=self.options.label_noise_ratio,
            box_noise_scale=self.options.box_noise_scale,
            random=self.random,
        )
        content, reference_logit, per_copy = self._scatter(copies, targets, queries.content.dtype)
        reference = reference_logit.sigmoid()
        pos = None
        if queries.pos is not None:
            if self.pos_head is None:
                raise ValueError("these queries bring positions; build the scheme with a pos_head")
            pos = self.pos_head(reference, memory.valid_ratios)
        group = QueryGroup(
            DN_GROUP,
            0,
            0,
            supervision=Supervision(
                FixedAssignment(
                    self._pairs(targets, copies.groups, per_copy),
                    normaliser_multiplier=copies.groups,
                )
            ),
        )
        blocks = group_blocks(copies.groups, 2 * per_copy, content.device)
        return queries.append(
            group,
            content,
            pos=pos,
            reference=reference,
            attention=QueryAttention(sees_existing=True, blocked=blocks),
        )

    def _scatter(
        self, copies: NoisedCopies, targets: list[Target], dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, int]:
        """-> content [B, 2G*M, D], reference logits [B, 2G*M, 4], M."""
        batch, device = len(targets), copies.boxes.device
        per_copy = max((len(t) for t in targets), default=0)
        size = 2 * copies.groups * per_copy
        image = torch.cat(
            [torch.full((len(t),), i, dtype=torch.int64) for i, t in enumerate(targets)]
        ).to(device)
        within = torch.cat([torch.arange(len(t)) for t in targets]).to(device)
        copy = torch.arange(2 * copies.groups, device=device).repeat_interleave(len(image))
        rows = (image.repeat(2 * copies.groups), copy * per_copy + within.repeat(2 * copies.groups))
        embedded = self.label_embedding(copies.labels).to(dtype)
        content = embedded.new_zeros(batch, size, embedded.shape[-1]).index_put(rows, embedded)
        logits = inverse_sigmoid(copies.boxes, REFERENCE_EPS)
        reference = logits.new_zeros(batch, size, 4).index_put(rows, logits)
        return content, reference, per_copy

    @staticmethod
    def _pairs(targets: list[Target], groups: int, per_copy: int) -> tuple:
        """Per image: the positive slot of every (group, box) -> that box."""
        pairs = []
        for target in targets:
            boxes = torch.arange(len(target), device=target.labels.device)
            starts = torch.arange(groups, device=boxes.device) * 2 * per_copy
            pairs.append(((starts[:, None] + boxes).flatten(), boxes.repeat(groups)))
        return tuple(pairs)


def build(context: SchemeContext, options: DenoisingConfig) -> ContrastiveDenoising:
    model = context.model
    pos_head = None if decoder_derives_positions(model) else ReferencePositionHead(model.hidden_dim)
    rows = context.num_classes + 1 if options.extra_label_row else context.num_classes
    return ContrastiveDenoising(model.hidden_dim, context.num_classes, rows, options, pos_head)


def decoder_derives_positions(model) -> bool:
    """Whether the decoder recomputes query positions from the reference boxes (DINO)."""
    return getattr(model.decoder, "query_pos", "constant") == "from_reference"


def check(model, options: DenoisingConfig) -> None:
    if model.queries.kind == "learned_with_reference" or model.queries.kind == "learned":
        raise UserError(
            "model.schemes.denoising decodes noised boxes, so the queries need 4-d reference "
            "boxes: set model.queries.kind to two_stage or dino"
        )
    if model.box_refine == "none":
        raise UserError("model.schemes.denoising needs box refinement: set model.box_refine")
    if options.dn_number < 1:
        raise UserError("model.schemes.denoising.dn_number must be at least 1")
    if not 0 <= options.label_noise_ratio <= 1 or options.box_noise_scale < 0:
        raise UserError(
            "model.schemes.denoising: label_noise_ratio must lie in [0, 1] and "
            "box_noise_scale must not be negative"
        )


register_scheme(SchemeSpec("denoising", DenoisingConfig, build, check, family="DINO"))
