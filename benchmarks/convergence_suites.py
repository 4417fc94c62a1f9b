# SPDX-License-Identifier: Apache-2.0
"""The arms, settings and suites of ``benchmarks/convergence.py``.

An *arm* is one way to train: a CPU-size preset plus overrides, with the arm it is compared
against (its base) and the claim it tests. A *setting* is a dataset, a model size and a budget
shared by its arms. A *suite* is a list of settings with their seeds.

Each paper's recommended weights are the schemes' defaults in detrkit (they equal the official
defaults): H-DETR lambda_one2many = 1 and k = 6 with 5x the primary queries (1500 / 300);
MS-DETR one-to-many weights 2 / 5 / 2 with one-to-one class weight 1 and the encoder matched by
anchors (``msdetr_r50``); Co-DETR lambda_1 = 1, lambda_2 = 2; DINO's class weight 1 and
dn_number 100 (``dino_4scale_r50_12ep``).
"""

from __future__ import annotations

from dataclasses import dataclass

CROSS_FIRST = ("model.decoder.order=[cross_attn,self_attn,ffn]",)
# MS-DETR's recipe on top of a two-stage Deformable DETR (as msdetr_r50 on its base).
MIXED = (
    "model.schemes.mixed={}",
    *CROSS_FIRST,
    "model.loss.class_weight=1.0",
    "model.loss.encoder_class_weight=2.0",
    "model.loss.encoder_bbox_weight=5.0",
    "model.loss.encoder_giou_weight=2.0",
    "model.loss.encoder_matching=anchors",
)
SMCA = (
    "model.decoder.attention=smca",
    "model.loss.class_loss=sigmoid_focal",
    "model.loss.class_weight=2.0",
    "model.matcher.cost_class=2.0",
)


def hybrid(num_queries: int, loss_weight: float = 1.0) -> tuple[str, ...]:
    """H-DETR's one-to-many group: ``num_queries`` extra queries, targets repeated 6 times."""
    return (
        f"model.schemes.hybrid.num_queries={num_queries}",
        "model.schemes.hybrid.repeat_k=6",
        f"model.schemes.hybrid.loss_weight={loss_weight}",
    )


@dataclass(frozen=True)
class Arm:
    """One way to train.

    Attributes:
        name: the arm's row in the table.
        preset: the CPU-size preset it starts from.
        overrides: config overrides on top of the preset and the setting's own.
        base: the arm it is compared against (None: a base itself).
        claim: the paper (or the control) the comparison with ``base`` tests.
    """

    name: str
    preset: str
    overrides: tuple[str, ...] = ()
    base: str | None = None
    claim: str = ""


@dataclass(frozen=True)
class Setting:
    """A dataset, a model size and a budget, shared by its arms.

    Attributes:
        dataset: "crowded" (``detrkit.data.synth_crowded``) or "shapes" (``detrkit.data.synth``).
        train_images, val_images: synthetic images per split (dataset seed 0 throughout).
        epochs: training epochs of every arm; evaluations at 1/4, 1/2, 3/4 and all of them.
        model: overrides applied to every arm's preset (size, queries, data scales).
        arms: the arms trained in this setting.
    """

    name: str
    dataset: str
    train_images: int
    val_images: int
    epochs: int
    model: tuple[str, ...]
    arms: tuple[Arm, ...]

    @property
    def eval_every(self) -> int:
        return max(1, self.epochs // 4)

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


# Tiny setting of round 1: 3 large shapes per image at most 4, D = 64, 20 queries.
def one_to_many_arms(num_queries: int) -> tuple[Arm, ...]:
    """Deformable DETR two-stage + refine (``deformable_detr_tiny``, whose setting gives it
    ``num_queries`` primary queries) with and without H-DETR's and MS-DETR's supervision, and
    the control of each; the hybrid branch gets 5x the primary queries."""
    o2m, base = 5 * num_queries, "deformable_detr_tiny"
    return (
        Arm("one_to_one", base),
        Arm("hybrid", base, hybrid(o2m), "one_to_one", "H-DETR"),
        Arm(
            "hybrid_unsupervised",
            base,
            hybrid(o2m, loss_weight=0.0),
            "one_to_one",
            f"control: the {o2m} extra queries decoded, not supervised",
        ),
        Arm("mixed", base, MIXED, "one_to_one", "MS-DETR"),
        Arm("cross_first", base, CROSS_FIRST, "one_to_one", "control: MS-DETR's order alone"),
        Arm("both", base, hybrid(o2m) + MIXED, "one_to_one", "H+MS"),
    )


TINY_QUERIES = 20
TINY_ARMS = (
    *one_to_many_arms(TINY_QUERIES),
    # Sensitivity to H-DETR's lambda (its ablations use 0.1-5): a quarter of the default weight.
    Arm(
        "hybrid_lambda_quarter",
        "deformable_detr_tiny",
        hybrid(5 * TINY_QUERIES, loss_weight=0.25),
        "one_to_one",
        "diagnosis: H-DETR with lambda_one2many 0.25",
    ),
    Arm("detr", "detr_tiny"),
    Arm("smca", "detr_tiny", (*SMCA, f"model.top_k={TINY_QUERIES}"), "detr", "SMCA"),
)

# Crowded setting: ~9 objects per image of 12 classes, D = 128, 100 queries (500 one-to-many).
CROWDED_QUERIES = 100
CROWDED_MODEL = (
    "model.hidden_dim=128",
    "model.num_heads=8",
    f"model.num_queries={CROWDED_QUERIES}",
    "model.top_k=100",
    "model.encoder.num_layers=3",
    "model.encoder.ffn_dim=512",
    "model.decoder.num_layers=3",
    "model.decoder.ffn_dim=512",
    # C2-C5 (strides 4-32): small objects need the stride-4 map, and two-stage selection of the
    # 100 + 500 hybrid queries needs more encoder tokens than C3-C5 give at this image size.
    "model.num_feature_levels=4",
    "model.num_backbone_stages=4",
    "data.train_scales=[112,128,144]",
    "data.max_size=192",
    "data.val_size=128",
)
# The collaborative heads' strides follow the four levels (plus their extra one).
CO_STRIDES = (
    "model.schemes.collaborative.rpn_roi.strides=[4,8,16,32,64]",
    "model.schemes.collaborative.rpn_roi.roi_strides=[4,8,16,32]",
    "model.schemes.collaborative.atss.strides=[4,8,16,32,64]",
)
CROWDED_ARMS = (
    *one_to_many_arms(CROWDED_QUERIES),
    Arm("dino", "dino_tiny", ("model.schemes.denoising.dn_number=100",), "one_to_one", "DINO"),
    Arm(
        "dino_no_denoising",
        "dino_tiny",
        ("model.schemes.denoising=null",),
        "one_to_one",
        "control: DINO's queries, refinement and heads without denoising",
    ),
    Arm("co_deformable_base", "co_deformable_detr_tiny", ("model.schemes.collaborative=null",)),
    Arm("co_deformable", "co_deformable_detr_tiny", CO_STRIDES, "co_deformable_base", "Co-DETR"),
)

SUITES: dict[str, dict[str, object]] = {
    # Every arm once, a few steps: checks the instrument end to end in minutes.
    "smoke": dict(
        seeds=(0,),
        settings=(
            Setting("crowded", "crowded", 24, 8, 4, CROWDED_MODEL, CROWDED_ARMS),
            Setting("tiny", "shapes", 32, 16, 4, (), TINY_ARMS),
        ),
    ),
    "full": dict(
        seeds=(0, 1, 2),
        settings=(
            Setting("crowded", "crowded", 256, 64, 12, CROWDED_MODEL, CROWDED_ARMS),
            Setting("tiny", "shapes", 256, 64, 8, (), TINY_ARMS),
        ),
    ),
}
