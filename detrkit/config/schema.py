# SPDX-License-Identifier: Apache-2.0
"""Typed experiment configuration: frozen dataclasses validated from YAML and ``--set`` overrides.

Every field has a default reproducing the original DETR code (docs/methods.md#detr); presets in
``detrkit/configs`` change a few keys. ``config/load.py`` turns YAML into these objects and
rejects unknown keys and wrong types; ``config/build.py`` is the only place they become modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from detrkit.config.scheme_settings import SchemeSettings


@dataclass(frozen=True)
class BackboneConfig:
    """The image backbone (docs/methods.md#resnet-backbone).

    Attributes:
        name: a registered backbone (``detrkit.models.backbones.backbone_names()``): resnet18,
            resnet34, resnet50, resnet101 (torchvision), and the transformer families.
        dilation: DC5, i.e. layer4 with stride 1 and dilation 2 (original flag ``--dilation``).
        weights: local path to ImageNet weights (torchvision or timm format), never downloaded.
        trainable: train the stages after ``frozen_stages``; False freezes everything, like
            ``--lr_backbone 0``.
        frozen_stages: leading stages kept frozen; None = the family's original: 1 for ResNet
            (stem and layer1), 0 for Swin, CoaT and MPViT (everything trains).
        norm: "frozen_bn" (the originals, for pretrained weights) or "bn" (trainable
            BatchNorm, for backbones trained from scratch).
        drop_path_rate: stochastic depth of transformer backbones (Swin, CoaT, MPViT).
        checkpointing: recompute each backbone stage's activations in the backward pass
            (gradient checkpointing: less memory, more compute; H-DETR's ``--use_checkpoint``).
    """

    name: str = "resnet50"
    dilation: bool = False
    weights: str | None = None
    trainable: bool = True
    frozen_stages: int | None = None
    norm: Literal["frozen_bn", "bn"] = "frozen_bn"
    drop_path_rate: float = 0.0
    checkpointing: bool = False


@dataclass(frozen=True)
class PositionConfig:
    """2-D positional embedding of feature maps (docs/methods.md#positional-encoding).

    Attributes:
        kind: "sine" (all released models) or "learned" (row/column embeddings).
        temperature: T of the sine frequencies.
        offset: added to the cumulative coordinate before normalising (-0.5 in the Deformable
            family).
    """

    kind: Literal["sine", "learned"] = "sine"
    temperature: float = 10000.0
    offset: float = 0.0


@dataclass(frozen=True)
class TransformerConfig:
    """One stack of encoder or decoder layers.

    Attributes:
        num_layers: number of layers.
        ffn_dim: hidden width of the feed-forward block.
        dropout: dropout inside attention, FFN and residuals.
        pre_norm: LayerNorm before each sub-block instead of after (``--pre_norm``).
        activation: FFN activation.
        attention: the attention over image features: the encoder's self-attention or the
            decoder's cross-attention. "global" = dense multi-head attention (DETR),
            "ms_deform" = multi-scale deformable attention (Deformable DETR), "smca" (decoder
            only) = dense cross-attention with SMCA's Gaussian spatial prior (options in
            ``model.smca``), "smca_conv" (encoder only) = multi-scale SMCA's convolutional
            intra/cross-scale encoder (no attention).
        num_points: sampling points per head and level of deformable attention
            (``--enc_n_points`` / ``--dec_n_points``).
        order: decoder only: the order of its residual operations (MS-DETR puts
            ``cross_attn`` first).
        checkpointing: recompute each layer's activations in the backward pass (gradient
            checkpointing; H-DETR's ``--use_checkpoint``).
        query_pos: decoder only: where each layer's query positions come from: "constant" =
            the positions the query initialiser gives; "from_reference" = recomputed
            before every layer from the query's current reference box (sine embedding
            through a 2-layer MLP: DINO's ``ref_point_head``; needs 4-d reference boxes).
        output_norm: decoder only: a shared LayerNorm on every layer's output before the
            heads (the next layer still reads the un-normalised output); None = on for
            global and SMCA attention (DETR), off for ms_deform (Deformable DETR); DINO
            turns it on.
    """

    num_layers: int = 6
    ffn_dim: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    activation: Literal["relu", "gelu"] = "relu"
    attention: Literal["global", "ms_deform", "smca", "smca_conv"] = "global"
    num_points: int = 4
    order: tuple[str, ...] = ("self_attn", "cross_attn", "ffn")
    checkpointing: bool = False
    query_pos: Literal["constant", "from_reference"] = "constant"
    output_norm: bool | None = None


@dataclass(frozen=True)
class QueryConfig:
    """How the decoder's queries are initialised.

    Attributes:
        kind: "learned" = learned positions, zero content (DETR); "learned_with_reference" =
            learned position + content, reference points predicted from the position (Deformable
            DETR); "two_stage" = the top-scoring encoder proposals (``--two_stage``);
            "dino" = DINO's mixed query selection: the top-scoring encoder proposals (ranked
            by their best class) give the reference boxes, a learned table the content, and
            the positions come from the references (``model.decoder.query_pos=from_reference``).
        mixed_selection: two-stage only: learned content, proposal positions (``--mixed_selection``,
            H-DETR).
    """

    kind: Literal["learned", "learned_with_reference", "two_stage", "dino"] = "learned"
    mixed_selection: bool = False


@dataclass(frozen=True)
class MatcherConfig:
    """Hungarian matching costs (docs/methods.md#hungarian-matching)."""

    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0


@dataclass(frozen=True)
class LossConfig:
    """Loss weights (docs/methods.md#losses).

    Attributes:
        class_loss: "softmax_ce" = cross-entropy over C + 1 logits with a no-object class
            (DETR); "sigmoid_focal" = focal loss over C sigmoid logits (Deformable family);
            "quality_focal" = quality focal loss over C sigmoid logits whose positive target
            is the IoU of the (detached) predicted box with its target (Co-DINO).
        quality_beta: the quality focal loss's exponent beta (``QualityFocalLoss.beta``).
        eos_coef: weight of the no-object class in the cross-entropy (``--eos_coef``).
        aux_loss: supervise every decoder layer, not only the last (``--aux_loss``).
        encoder_class_weight, encoder_bbox_weight, encoder_giou_weight: loss weights of the
            two-stage encoder proposals (None: the same as the decoder's; MS-DETR's
            ``--enc_cls_loss_coef`` / ``--enc_bbox_loss_coef`` / ``--enc_giou_loss_coef``).
        encoder_matching: match encoder proposals by their predicted boxes (Deformable DETR) or
            by their anchors with no class cost (MS-DETR).
    """

    class_loss: Literal["softmax_ce", "sigmoid_focal", "quality_focal"] = "softmax_ce"
    class_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    eos_coef: float = 0.1
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    quality_beta: float = 2.0
    aux_loss: bool = True
    encoder_class_weight: float | None = None
    encoder_bbox_weight: float | None = None
    encoder_giou_weight: float | None = None
    encoder_matching: Literal["predictions", "anchors"] = "predictions"


@dataclass(frozen=True)
class SmcaConfig:
    """SMCA-DETR's spatially modulated co-attention (docs/methods.md#smca-detr); read when
    ``model.decoder.attention=smca``.

    Every decoder layer predicts, per query and head, a Gaussian-like log-prior around a centre
    (the first layer's reference point plus a per-head offset) and adds it to the cross-attention
    logits before the softmax.

    Attributes:
        scale: how each layer predicts the prior's width (``--dynamic_scale``): "none" = fixed
            unit scale (type1), "isotropic" = one scale per head (type2), "per_axis" = an x and
            a y scale per head (type3: the published models, hence the default; the original
            flag defaults to type1), "covariance_like" = x, y and a weight of the product of
            the squared x and y distances (type4).
        smooth: the log-prior is -distance / smooth (``--smooth``).
        head_mixture: only the first half of the heads are modulated, the others attend
            plainly (``--head_mixture``).
        query_mixture: the first half of the queries are unmodulated and predict boxes without
            a reference point (``--query_mixture``).
        encoder_kernel: multi-scale only (``model.encoder.attention=smca_conv``): the depthwise
            kernel of the convolutional encoder (5 in the zip's ``transformer.py``, 7 in
            ``transformer_44_dot_4.py``, the 44.4 AP model).
        shared_cross_scale: multi-scale only: one down- and one up-sampling convolution shared by
            every level pair (``transformer_44_dot_4.py``) instead of one per pair.
        first_image_level_weights: multi-scale only: weight every image's levels by the *first*
            image's per-level attention weights, reproducing the original's indexing bug (it is
            harmless at one image per GPU, as the published command trains); False weighs each
            image by its own.
    """

    scale: Literal["none", "isotropic", "per_axis", "covariance_like"] = "per_axis"
    smooth: float = 8.0
    head_mixture: bool = False
    query_mixture: bool = False
    encoder_kernel: int = 5
    shared_cross_scale: bool = False
    first_image_level_weights: bool = False


@dataclass(frozen=True)
class SoftNmsConfig:
    """Class-wise soft-NMS of the postprocessor (mmcv's ``soft_nms`` through ``batched_nms``,
    Co-DINO's ``test_cfg.nms``): the best ``candidates`` (query, class) pairs are visited in
    decreasing score; each decays the scores of the later boxes of its class that overlap it.

    Attributes:
        iou_threshold: "linear" decays a box whose IoU with the picked one is at least this,
            by the factor 1 - IoU (Co-DINO: 0.8).
        sigma: "gaussian" decays every box by exp(-IoU^2 / sigma).
        min_score: boxes whose score falls below this are dropped.
        method: "linear" or "gaussian".
        candidates: (query, class) pairs entering soft-NMS; None = ``model.num_queries``
            (mmdet takes as many as there are queries when NMS is on). ``model.top_k`` then
            caps the survivors (Co-DINO: 300).
    """

    iou_threshold: float = 0.8
    sigma: float = 0.5
    min_score: float = 1e-3
    method: Literal["linear", "gaussian"] = "linear"
    candidates: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The detector.

    Attributes:
        num_classes: number of object classes; None takes it from the training data's categories.
        hidden_dim: transformer width D.
        num_heads: attention heads.
        num_queries: object queries at inference.
        num_feature_levels: backbone stages used (C5 alone = 1; C3-C5 + one extra stride-64
            level = 4, Deformable DETR).
        num_backbone_stages: how many of the levels come from backbone stages (the last ones,
            ending at C5), the rest from extra stride-2 levels; None = up to 3 (C3-C5);
            4 = C2-C5 (DINO-5scale, Co-DINO: 5 levels = C2-C5 + one extra).
        box_refine: how decoder layers update reference boxes: "none", "iterative"
            (``--with_box_refine``) or "look_forward_twice" (``--look_forward_twice``, H-DETR).
        shared_heads: one class and one box predictor for every decoder layer; None = shared
            without box refinement, one per layer with it. DINO shares them with refinement;
            Deformable DETR, H-DETR and Co-DINO do not.
        inverse_sigmoid_eps: clamp of the logit of reference boxes when layers refine them
            and heads predict relative to them (1e-5 in Deformable DETR; 1e-3 in DINO and
            Co-DINO, whose denoising references sit at that clamp).
        top_k: detections kept per image by the postprocessor; None keeps every query (DETR) or
            100 (sigmoid heads).
        nms_iou_threshold: sigmoid heads only: class-wise NMS at this IoU over the best 10 000
            (query, class) pairs before keeping ``top_k`` (MS-DETR's ``--nms_iou_threshold``);
            None = no NMS.
        soft_nms: sigmoid heads only: class-wise soft-NMS over the best (query, class) pairs
            before keeping ``top_k`` (Co-DINO); None = none. Excludes ``nms_iou_threshold``.
        clip_boxes: clamp detected boxes to the image (mmdetection's DETR heads do).
        smca: options of SMCA's Gaussian-modulated cross-attention.
        schemes: training-only supervision schemes by registered name, each with its own
            options (docs/methods.md lists them). Absent = plain one-to-one training.
    """

    num_classes: int | None = None
    hidden_dim: int = 256
    num_heads: int = 8
    num_queries: int = 100
    num_feature_levels: int = 1
    num_backbone_stages: int | None = None
    box_refine: Literal["none", "iterative", "look_forward_twice"] = "none"
    shared_heads: bool | None = None
    inverse_sigmoid_eps: float = 1e-5
    queries: QueryConfig = field(default_factory=QueryConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    encoder: TransformerConfig = field(default_factory=TransformerConfig)
    decoder: TransformerConfig = field(default_factory=TransformerConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    top_k: int | None = None
    nms_iou_threshold: float | None = None
    soft_nms: SoftNmsConfig | None = None
    clip_boxes: bool = False
    schemes: SchemeSettings = field(default_factory=SchemeSettings)
    smca: SmcaConfig = field(default_factory=SmcaConfig)


@dataclass(frozen=True)
class DataConfig:
    """COCO-format data and the augmentation recipe (docs/methods.md#augmentation).

    Attributes:
        root: dataset folder (``--data``); see the README for the layout.
        train_split, val_split: split names, e.g. "train" -> ``annotations/instances_train.json``.
        train_scales: shorter-side sizes drawn for training.
        max_size: cap on the longer side.
        crop: use DETR's resize -> random crop -> resize branch with probability 0.5.
        crop_resize_scales: shorter sides drawn before the crop.
        crop_size: (min, max) crop side.
        val_size: shorter side at evaluation.
        batch_size: images per process and step.
        eval_batch_size: images per process at evaluation.
        num_workers: dataloader worker processes.
        group_by_aspect_ratio: training batches hold only landscape or only portrait images
            (less padding; the originals mix them).
        eval_group_by_size: evaluation batches hold images of one size only, so no image is
            padded and every prediction is the same at any ``eval_batch_size``.
        augmentation: "detr" (the recipe above) or "lsj", Co-DINO's large-scale jitter
            (``detrkit/data/lsj.py``); with "lsj" the keys from ``train_scales`` to ``val_size``
            are unused.
        lsj_size: LSJ's square canvas side (1024 in Co-DINO): training images are jittered,
            cropped to at most this side and padded to it; evaluation resizes the longer side
            to it.
        lsj_scale_range: (min, max) LSJ scale, times the scale that fits the image in the canvas.
    """

    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    train_scales: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    crop: bool = True
    crop_resize_scales: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)
    val_size: int = 800
    batch_size: int = 2
    eval_batch_size: int = 2
    num_workers: int = 2
    group_by_aspect_ratio: bool = False
    eval_group_by_size: bool = True
    augmentation: Literal["detr", "lsj"] = "detr"
    lsj_size: int = 1024
    lsj_scale_range: tuple[float, float] = (0.1, 2.0)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the training loop (docs/methods.md#optimisation).

    Attributes:
        lr_backbone: learning rate of backbone parameters (``model.backbone.trainable`` freezes).
        lr_linear_proj_mult: lr multiplier of deformable attention's sampling offsets and of the
            reference-point predictor (0.1 in the Deformable family).
        lr_drop: epoch at which the StepLR schedule multiplies the lr by ``lr_gamma``.
        clip_max_norm: global gradient-norm clip; 0 disables.
        grad_accum_steps: micro-batches accumulated per optimiser step.
        max_steps: stop after this many optimiser steps (None: run all epochs).
        eval_every: evaluate every N epochs (0: only at the end).
        checkpoint_every: also checkpoint every N optimiser steps (0: epoch ends only).
        keep_last: training states kept in ``checkpoints/`` for ``--resume`` (the weights for
            inference are ``model.safetensors``, written beside them).
        max_nonfinite_steps: consecutive non-finite steps that stop the run.
        compile: ``torch.compile`` the backbone and each encoder/decoder layer (opt-in; the
            first steps pay the compile time; needs a C++ compiler on the CPU).
        ema_decay: keep an exponential moving average of the weights with this decay per
            optimiser step (e.g. 0.9998); evaluation, ``detrkit eval`` and ``predict`` then use
            the averaged weights. None = off.
        tensorboard: also write the loss terms, lr and AP metrics as TensorBoard scalars under
            ``<output-dir>/tensorboard/`` (rank 0). None = on when the ``tensorboard`` package
            is installed; true without it is an error.
    """

    epochs: int = 300
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    lr_linear_proj_mult: float = 1.0
    weight_decay: float = 1e-4
    lr_drop: int = 200
    lr_gamma: float = 0.1
    clip_max_norm: float = 0.1
    grad_accum_steps: int = 1
    max_steps: int | None = None
    seed: int = 42
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    eval_every: int = 1
    checkpoint_every: int = 0
    keep_last: int = 1
    log_every: int = 10
    max_nonfinite_steps: int = 5
    ema_decay: float | None = None
    compile: bool = False
    tensorboard: bool | None = None


@dataclass(frozen=True)
class InferenceConfig:
    """How evaluation and ``detrkit predict`` run the model.

    Attributes:
        tta_scales: test-time augmentation: extra passes with the shorter side resized to each
            of these (the ``data.val_size`` pass always runs); empty = none.
        tta_flip: also run every pass horizontally flipped.
        tta_nms_iou: the passes' detections are merged by class-wise NMS at this IoU.
        tta_max_size: cap on the longer side of a rescaled pass; None = ``data.max_size``.
    """

    tta_scales: tuple[int, ...] = ()
    tta_flip: bool = False
    tta_nms_iou: float = 0.6
    tta_max_size: int | None = None

    @property
    def tta_enabled(self) -> bool:
        """Whether any pass besides the plain one runs."""
        return bool(self.tta_scales) or self.tta_flip


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: what is written to ``config.yaml`` and embedded in checkpoints."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
