# SPDX-License-Identifier: Apache-2.0
"""Co-DETR's collaborative hybrid assignments (Zong et al. 2023), Co-DINO form: dense
auxiliary heads (a Faster R-CNN RPN + RoI head, an ATSS head) on the encoder memory, and per
auxiliary head a decoder pass of "positive queries" built from the boxes that head assigned.

Per training step (the official order of the random draws):

1. maps: the memory per level + a downsampled level (``MemoryPyramid``, Co-DETR's ``x_enc``);
2. the RPN (its sampler draws per image), the RoI head on the RPN's proposals (its sampler
   draws per image), the ATSS head; their losses are ``DenseLoss`` es;
3. per auxiliary head h and image, ``n = max(9, min(max_pos_coords, most positives of an
   image))`` candidates are kept: the positives (a random subset when more than n) then random
   negatives to pad to n (Co-DETR's ``get_aux_targets``);
4. the kept boxes (cxcywh normalised by the image size) become queries, reference = the box;
   ``positive_query="dino"`` (Co-DINO): content = ``aux_pos_trans_norm[h](aux_pos_trans[h](
   sine(box)))``, the decoder derives the positions from the boxes; ``"deformable"``
   (Co-Deformable-DETR): the 2D-wide ``aux_pos_trans_norm[h](aux_pos_trans[h](sine(box)))``
   splits into (pos, content), content += ``pos_feats_norm[h](pos_feats_trans[h](feature))``
   (the candidate's RoIAlign mean / memory vector), pos += the scalar ``head_pos_embed[h]``,
   constant over the layers. They are decoded in their own pass as group ``aux{h}`` whose
   positives are assigned their head's targets (``FixedAssignment`` with explicit
   targets), the rest "no object".

Loss names (official mmdet name -> detrkit name; ``{l}`` = feature level, ``{d}`` = decoder
layer, the last layer being the official name without ``d`` prefix):

* ``loss_rpn_cls.{l}`` / ``loss_rpn_bbox.{l}`` -> ``aux0/rpn_cls/l{l}`` / ``aux0/rpn_bbox/l{l}``
* ``loss_cls0`` / ``loss_bbox0`` -> ``aux0/roi_cls`` / ``aux0/roi_bbox`` (``acc0`` is no loss)
* ``loss_cls1.{l}`` / ``loss_bbox1.{l}`` / ``loss_centerness1.{l}`` -> ``aux1/atss_cls/l{l}`` /
  ``aux1/atss_bbox/l{l}`` / ``aux1/atss_centerness/l{l}``
* ``d{d}.loss_{cls,bbox,iou}_aux{h}`` -> ``aux{h}/{cls,l1,giou}/d{d}``

(The head numbers follow the heads built: with only ATSS it is ``aux0``.)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from detrkit.errors import UserError
from detrkit.matching.max_iou import MaxIoUAssigner
from detrkit.matching.sampler import RandomSampler
from detrkit.models.dense.anchors import AnchorGenerator
from detrkit.models.dense.atss import ATSSHead, ATSSLossConfig
from detrkit.models.dense.box_coder import DeltaXYWHCoder
from detrkit.models.dense.multiscale import MemoryPyramid
from detrkit.models.dense.positive_queries import (
    Candidates,
    PositiveQueries,
    anchor_candidates,
    roi_candidates,
    select_positive_queries,
)
from detrkit.models.dense.roi_head import RoIHead, Shared2FCBBoxHead
from detrkit.models.dense.rpn import ProposalSettings, RPNHead
from detrkit.models.two_stage import proposal_sine_embedding
from detrkit.ops.boxes import box_cxcywh_to_xyxy, inverse_sigmoid
from detrkit.schemes.base import AuxiliaryResult, TrainingScheme
from detrkit.schemes.randomness import RandomSource
from detrkit.schemes.registry import SchemeContext, SchemeSpec, register_scheme
from detrkit.structures import (
    DenseLoss,
    EncoderMemory,
    FixedAssignment,
    QueryGroup,
    QuerySet,
    Supervision,
    Target,
)


@dataclass(frozen=True)
class RPNRoIOptions:
    """The Faster R-CNN branch (official Co-DINO values). Weights are before the
    ``num_layers x lambda_2`` factor."""

    strides: tuple[int, ...] = (4, 8, 16, 32, 64, 128)
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    octave_base_scale: float = 4.0
    scales_per_octave: int = 3
    rpn_pos_iou: float = 0.7
    rpn_neg_iou: float = 0.3
    rpn_min_pos_iou: float = 0.3
    rpn_samples: int = 256
    rpn_pos_fraction: float = 0.5
    nms_pre: int = 4000
    max_proposals: int = 1000
    nms_iou: float = 0.7
    roi_strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    finest_scale: float = 56.0
    fc_channels: int = 1024
    roi_size: int = 7
    roi_iou: float = 0.5
    roi_samples: int = 512
    roi_pos_fraction: float = 0.25
    rpn_cls_weight: float = 1.0
    rpn_bbox_weight: float = 1.0
    roi_cls_weight: float = 1.0
    roi_bbox_weight: float = 10.0


@dataclass(frozen=True)
class ATSSOptions:
    """The ATSS branch (official Co-DINO values); weights before ``num_layers x lambda_2``."""

    strides: tuple[int, ...] = (4, 8, 16, 32, 64, 128)
    stacked_convs: int = 1
    octave_base_scale: float = 8.0
    topk: int = 9
    cls_weight: float = 1.0
    bbox_weight: float = 2.0
    centerness_weight: float = 1.0


@dataclass(frozen=True)
class CollaborativeConfig:
    """``model.schemes.collaborative``: Co-DETR's auxiliary heads (Co-DINO).

    Attributes:
        rpn_roi: build the RPN + RoI head (auxiliary head 0); None = no such head.
        atss: build the ATSS head (the next auxiliary head); None = no such head.
        lambda_1: scale of the positive-query losses (``PredictionGroup`` scale); they
            otherwise carry the query head's own term weights. 1 reproduces the official
            Co-DINO (its recorded positive-query losses carry no ``lambda_2``).
        lambda_2: weight of the dense heads; as the official configs, every dense weight is
            multiplied by ``lambda_2 x`` the decoder's layer count.
        max_pos_coords: the most positive queries per image and head.
        with_pos_coord: decode the positive queries (False: dense losses only).
        positive_query: how the positive queries are built: "dino" (Co-DINO: content from
            the boxes, positions from the references in the decoder) or "deformable"
            (Co-Deformable-DETR: (pos, content) from the boxes, plus the candidates'
            features and a per-head scalar offset; constant positions).
    """

    rpn_roi: RPNRoIOptions | None = field(default_factory=RPNRoIOptions)
    atss: ATSSOptions | None = field(default_factory=ATSSOptions)
    lambda_1: float = 1.0
    lambda_2: float = 2.0
    max_pos_coords: int = 300
    with_pos_coord: bool = True
    positive_query: str = "dino"


def _renamed(losses: list[DenseLoss], names: dict[str, str]) -> list[DenseLoss]:
    """Dense losses under detrkit names: ``names`` maps a head's name (or name stem, e.g.
    ``rpn/cls`` of ``rpn/cls/3``, ``loss_cls1`` of ``loss_cls1.3``) to the new one; a level
    suffix becomes ``/l{level}``."""
    renamed = []
    for loss in losses:
        for old, new in names.items():
            if loss.name == old or loss.name.startswith(old):
                rest = loss.name[len(old) :].lstrip("/.")
                loss = DenseLoss(
                    f"{new}/l{rest}" if rest else new,
                    loss.compute,
                    loss.inputs,
                    loss.count,
                    loss.weight,
                )
                break
        renamed.append(loss)
    return renamed


class Collaborative(TrainingScheme):
    """Dense auxiliary heads on the memory and their positive-query passes.

    Args:
        dim: width D.
        num_classes: C.
        options: the scheme's config.
        dense_scale: multiplies every dense weight (``lambda_2 x`` decoder layers).
    """

    def __init__(
        self, dim: int, num_classes: int, options: CollaborativeConfig, dense_scale: float
    ) -> None:
        super().__init__()
        self.num_classes, self.options = num_classes, options
        self.pyramid = MemoryPyramid(dim)
        self.rpn = self.roi = self.atss = None
        heads = 0
        if options.rpn_roi is not None:
            self.rpn, self.roi = _faster_rcnn(dim, num_classes, options.rpn_roi, dense_scale)
            heads += 1
        if options.atss is not None:
            self.atss = _atss(dim, num_classes, options.atss, dense_scale, heads)
            heads += 1
        self.deformable = options.positive_query == "deformable"
        width = 2 * dim if self.deformable else dim
        self.aux_pos_trans = nn.ModuleList(nn.Linear(2 * dim, width) for _ in range(heads))
        self.aux_pos_trans_norm = nn.ModuleList(nn.LayerNorm(width) for _ in range(heads))
        if self.deformable:
            self.pos_feats_trans = nn.ModuleList(nn.Linear(dim, dim) for _ in range(heads))
            self.pos_feats_norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(heads))
            # [heads, 1]: one scalar per head (the official Embedding(heads, 1) layout).
            self.head_pos_embed = nn.Embedding(heads, 1)
        self.dim, self.random = dim, RandomSource()

    def auxiliary(self, memory: EncoderMemory, targets: list[Target] | None) -> AuxiliaryResult:
        """The dense losses of every head, and one positive-query pass per head."""
        if targets is None:
            return AuxiliaryResult()
        if memory.image_sizes is None:
            raise ValueError("the collaborative scheme needs memory.image_sizes")
        sizes = memory.image_sizes
        gt_boxes, gt_labels = _pixel_targets(targets, sizes)
        maps = self.pyramid(memory.tokens, memory.spatial_shapes)
        dense, candidates = [], []
        if self.rpn is not None:
            head = len(candidates)
            rpn_out = self.rpn.train_step(maps, sizes, gt_boxes, self.random)
            roi_out = self.roi.train_step(maps, rpn_out.proposals, gt_boxes, gt_labels, self.random)
            dense += _renamed(
                rpn_out.losses,
                {"rpn/cls": f"aux{head}/rpn_cls", "rpn/bbox": f"aux{head}/rpn_bbox"},
            )
            dense += _renamed(
                roi_out.losses, {"roi/cls": f"aux{head}/roi_cls", "roi/bbox": f"aux{head}/roi_bbox"}
            )
            found = roi_candidates(roi_out)
            candidates.append(found if self.deformable else replace(found, features=None))
        if self.atss is not None:
            head = len(candidates)
            out = self.atss(maps)
            atss_targets = self.atss.get_targets(out.feature_sizes, sizes, gt_boxes, gt_labels)
            index = self.atss.index
            dense += _renamed(
                self.atss.losses(out, atss_targets),
                {
                    f"loss_cls{index}": f"aux{head}/atss_cls",
                    f"loss_bbox{index}": f"aux{head}/atss_bbox",
                    f"loss_centerness{index}": f"aux{head}/atss_centerness",
                },
            )
            coords, labels, boxes = atss_targets.positive_coords()
            if self.deformable:
                candidates.append(anchor_candidates(coords, labels, boxes, maps))
            else:
                candidates.append(Candidates(list(coords), list(labels), list(boxes)))
        passes = []
        if self.options.with_pos_coord:
            for head, found in enumerate(candidates):
                chosen = self.select(found, sizes)
                passes.append(self.positive_pass(head, chosen, memory.tokens.dtype))
        return AuxiliaryResult(dense_losses=dense, passes=passes)

    def select(self, found: Candidates, sizes: Tensor) -> PositiveQueries:
        """The positive queries of one head (``select_positive_queries``), drawing from
        ``self.random``."""
        return select_positive_queries(
            found, sizes, self.num_classes, self.options.max_pos_coords, self.random
        )

    def positive_pass(self, head: int, chosen: PositiveQueries, dtype: torch.dtype) -> QuerySet:
        """The queries of head ``head``: content (and, "deformable", positions) from the
        boxes' sine embedding, reference = the boxes, supervised by the head's assignment."""
        logits = inverse_sigmoid(chosen.coords)
        embedded = self.aux_pos_trans_norm[head](
            self.aux_pos_trans[head](proposal_sine_embedding(logits, self.dim).to(dtype))
        )
        pos = None
        if self.deformable:
            pos, content = embedded.split(self.dim, dim=-1)
            features = chosen.features.to(dtype)
            content = content + self.pos_feats_norm[head](self.pos_feats_trans[head](features))
            pos = pos + self.head_pos_embed.weight[head]
        else:
            content = embedded
        pairs, explicit = [], []
        for image, num_pos in enumerate(chosen.num_positive):
            index = torch.arange(num_pos, device=content.device)
            pairs.append((index, index))
            explicit.append(Target(chosen.labels[image, :num_pos], chosen.targets[image, :num_pos]))
        supervision = Supervision(
            FixedAssignment(tuple(pairs), tuple(explicit)), scale=self.options.lambda_1
        )
        group = QueryGroup(f"aux{head}", 0, 0, supervision=supervision)
        reference = chosen.coords  # box arithmetic stays float32 under autocast
        empty_pos = None if pos is None else pos[:, :0]
        empty = QuerySet(content[:, :0], empty_pos, reference[:, :0], ())
        return empty.append(group, content, pos=pos, reference=reference)


def _pixel_targets(targets: list[Target], sizes: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Per image the boxes as xyxy pixels of its unpadded size, and the labels."""
    boxes = []
    for target, (height, width) in zip(targets, sizes.tolist()):
        scale = target.boxes.new_tensor([width, height, width, height])
        boxes.append(box_cxcywh_to_xyxy(target.boxes.float()) * scale)
    return boxes, [t.labels for t in targets]


def _faster_rcnn(dim: int, num_classes: int, o: RPNRoIOptions, scale: float):
    anchors = AnchorGenerator(
        strides=tuple(o.strides),
        ratios=tuple(o.ratios),
        octave_base_scale=o.octave_base_scale,
        scales_per_octave=o.scales_per_octave,
    )
    rpn = RPNHead(
        dim,
        dim,
        anchors,
        DeltaXYWHCoder((0.0,) * 4, (1.0,) * 4),
        MaxIoUAssigner(o.rpn_pos_iou, o.rpn_neg_iou, o.rpn_min_pos_iou),
        RandomSampler(o.rpn_samples, o.rpn_pos_fraction, -1, False),
        ProposalSettings(o.nms_pre, o.max_proposals, o.nms_iou, 0.0),
        cls_weight=o.rpn_cls_weight * scale,
        bbox_weight=o.rpn_bbox_weight * scale,
    )
    roi = RoIHead(
        Shared2FCBBoxHead(dim, o.roi_size, o.fc_channels, num_classes),
        tuple(o.roi_strides),
        o.finest_scale,
        DeltaXYWHCoder((0.0,) * 4, (0.1, 0.1, 0.2, 0.2)),
        MaxIoUAssigner(o.roi_iou, o.roi_iou, o.roi_iou, match_low_quality=False),
        RandomSampler(o.roi_samples, o.roi_pos_fraction, -1, True),
        cls_weight=o.roi_cls_weight * scale,
        bbox_weight=o.roi_bbox_weight * scale,
        roi_size=o.roi_size,
    )
    return rpn, roi


def _atss(dim: int, num_classes: int, o: ATSSOptions, scale: float, index: int) -> ATSSHead:
    return ATSSHead(
        num_classes,
        dim,
        tuple(o.strides),
        feat_channels=dim,
        stacked_convs=o.stacked_convs,
        octave_base_scale=o.octave_base_scale,
        losses=ATSSLossConfig(
            cls_weight=o.cls_weight * scale,
            bbox_weight=o.bbox_weight * scale,
            centerness_weight=o.centerness_weight * scale,
            topk=o.topk,
        ),
        index=index,
    )


def build(context: SchemeContext, options: CollaborativeConfig) -> Collaborative:
    model = context.model
    scale = options.lambda_2 * model.decoder.num_layers
    return Collaborative(model.hidden_dim, context.num_classes, options, scale)


def check(model, options: CollaborativeConfig) -> None:
    if options.rpn_roi is None and options.atss is None:
        raise UserError("model.schemes.collaborative: set rpn_roi or atss (no auxiliary head)")
    styles = {"dino": "from_reference", "deformable": "constant"}
    if options.positive_query not in styles:
        raise UserError(
            "model.schemes.collaborative.positive_query must be one of "
            f"{sorted(styles)}, not {options.positive_query!r}"
        )
    if options.with_pos_coord:
        query_pos = styles[options.positive_query]
        if getattr(model.decoder, "query_pos", "constant") != query_pos:
            raise UserError(
                f"model.schemes.collaborative.positive_query={options.positive_query} needs "
                f"model.decoder.query_pos {query_pos} (dino: positions from the boxes; "
                "deformable: constant positions), or with_pos_coord false"
            )
        if model.box_refine == "none":
            raise UserError(
                "model.schemes.collaborative needs box refinement: set model.box_refine"
            )
    if options.max_pos_coords < 1:
        raise UserError("model.schemes.collaborative.max_pos_coords must be at least 1")
    levels = getattr(model, "num_feature_levels", None)
    for name, head in (("rpn_roi", options.rpn_roi), ("atss", options.atss)):
        if head is not None and levels is not None and len(head.strides) != levels + 1:
            raise UserError(
                f"model.schemes.collaborative.{name}.strides needs one stride per encoder "
                f"level plus the downsampled one ({levels + 1})"
            )


register_scheme(SchemeSpec("collaborative", CollaborativeConfig, build, check, family="Co-DETR"))
