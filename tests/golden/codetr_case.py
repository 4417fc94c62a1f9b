# SPDX-License-Identifier: Apache-2.0
"""Loading a Co-DETR golden case (``cases/codetr``, mmdetection layout) and running detrkit's
model of its query head on it, in float32 or float64 (shared by the Co-DETR golden tests:
Co-DINO in ``test_codetr_dino.py``, Co-Deformable-DETR in ``test_codetr_deformable.py``).

The model comes from the case's mmdet ``config.model`` (``convert.codetr_config``), the weights
from the folder's ``refgen.py`` under official key names through ``convert.codetr``, the inputs
from the folder's inputs file with the masks of each image's ``img_shape``. Intermediate
tensors are read with forward hooks; nothing in the model knows about them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from detrkit.config.build import build_model, build_postprocess
from detrkit.config.schema import ModelConfig
from detrkit.convert.codetr import convert_codetr
from detrkit.convert.codetr_config import codetr_model_config
from detrkit.convert.rules import ConversionResult
from detrkit.errors import UserError
from detrkit.models.postprocess import TopKSigmoidPostprocess
from detrkit.ops.boxes import box_xyxy_to_cxcywh
from detrkit.ops.soft_nms import batched_soft_nms, class_offset_boxes
from detrkit.structures import (
    DecoderOutput,
    Detections,
    DetectorOutput,
    ImageBatch,
    QuerySet,
    Target,
)
from tests.golden.golden_case import case_format, case_id, list_cases, official_state_dict

DTYPES = {"f32": torch.float32, "f64": torch.float64}
DINO_HEAD = "CoDINOHead"


def codetr_cases(dino: bool | None = None) -> list:
    """pytest params of the Co-DINO (``dino``), the Co-Deformable-DETR (not ``dino``) or all
    (None) Co-DETR cases."""
    found = []
    for path in list_cases():
        spec = json.loads(path.read_text())
        try:
            fmt = case_format(spec)
        except ValueError:
            continue
        if fmt.name == "codetr" and (dino is None or (_head_type(spec) == DINO_HEAD) == dino):
            found.append(pytest.param(path, id=case_id(path)))
    kind = {None: "Co-DETR", True: "Co-DINO", False: "Co-Deformable-DETR"}[dino]
    return found or [pytest.param(None, marks=pytest.mark.skip(reason=f"no {kind} cases"))]


def _head_type(spec: dict) -> str:
    return spec["config"]["model"]["query_head"]["type"]


def assert_pairs(pairs: dict, tolerance: dict) -> int:
    """Integer tensors exactly, float tensors within ``tolerance``; -> how many compared."""
    for name, (ours, theirs) in pairs.items():
        assert ours.shape == theirs.shape, f"{name}: shape {ours.shape} vs {theirs.shape}"
        if not theirs.is_floating_point():
            assert torch.equal(ours.to(theirs.dtype), theirs), f"{name}: {ours} vs {theirs}"
        else:
            assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} vs {theirs.dtype}"
            torch.testing.assert_close(ours, theirs, **tolerance, msg=lambda m, n=name: f"{n}: {m}")
    return len(pairs)


# mmdet loss names of the one-to-one groups -> (detrkit group, term); layer from the prefix.
_TERMS = {"cls": "cls", "bbox": "l1", "iou": "giou"}


def official_loss_name(name: str, num_layers: int) -> str | None:
    """mmdet names of the query head's losses -> detrkit term names (None: auxiliary heads)."""
    layer, _, rest = name.rpartition(".")
    group = "main"
    if rest.startswith("enc_loss_"):
        group, rest = "enc", rest.removeprefix("enc_")
    elif rest.startswith("dn_loss_"):
        group, rest = "dn", rest.removeprefix("dn_")
    term = rest.removeprefix("loss_")
    if term not in _TERMS or (group == "enc" and layer):
        return None
    index = int(layer[1:]) if layer else (0 if group == "enc" else num_layers - 1)
    return f"{group}/{_TERMS[term]}/d{index}"


@dataclass
class EvalRun:
    """One eval forward and what the hooks saw.

    Attributes:
        output: the detector's output (groups "main" and "enc").
        decoded: the decoder's output (hidden [L, B, Q, D] after the output norm, L + 1
            references).
        levels: the neck's feature maps [B, D, h, w] per level.
        memory: the encoder's tokens [B, S, D].
        top: [B, K] selected token indices; select_scores [B, S] (best class logit per token:
            Co-DINO's ranking score).
        queries: the decoder's input (content, positions, references [B, Q, ...]).
    """

    output: DetectorOutput
    decoded: DecoderOutput
    levels: list[torch.Tensor]
    memory: torch.Tensor
    top: torch.Tensor
    select_scores: torch.Tensor
    queries: QuerySet


@dataclass
class PostRun:
    """Post-processing of one image, stage by stage.

    Attributes:
        candidates: the top-k (query, class) pairs before soft-NMS (boxes clamped, in
            original pixels).
        keep, scores: soft-NMS of the candidates (indices in picking order, decayed scores);
            None without soft-NMS (Co-Deformable-DETR: the candidates are the detections).
        final: the configured postprocessor's detections (end to end).
    """

    candidates: Detections
    keep: torch.Tensor | None
    scores: torch.Tensor | None
    final: Detections


@dataclass
class CodetrCase:
    """One Co-DETR case with detrkit's model of it built and loaded."""

    path: Path
    spec: dict
    config: ModelConfig
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    conversion: ConversionResult | None = None
    model: torch.nn.Module | None = None
    _runs: dict[str, EvalRun] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: Path) -> CodetrCase:
        """Build and load the case's model; ``UserError`` when detrkit cannot model it."""
        spec = json.loads(path.read_text())
        mmdet_model = spec["config"]["model"]
        case = cls(path, spec, codetr_model_config(mmdet_model))
        case.tensors = load_file(str(path.with_suffix(".safetensors")))
        case.inputs = load_file(str(path.parent / Path(spec["inputs"]["file"]).name))
        state = official_state_dict(spec, path.parent)
        case.conversion = convert_codetr(state, mmdet_model)
        torch.manual_seed(0)
        case.model = build_model(case.config)
        case.model.load_state_dict(case.conversion.state_dict, strict=True)
        case.model.eval()
        return case

    @property
    def dino(self) -> bool:
        """Co-DINO (else Co-Deformable-DETR)."""
        return _head_type(self.spec) == DINO_HEAD

    def batch(self, dtype: torch.dtype = torch.float32) -> ImageBatch:
        """The padded images with the masks mmdet builds from each ``img_shape``."""
        pixels = self.inputs["img"].to(dtype)
        mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.bool)
        sizes = []
        for image, meta in enumerate(self.spec["img_metas"]):
            height, width = meta["img_shape"][:2]
            mask[image, :height, :width] = False
            sizes.append((height, width))
        return ImageBatch(pixels, mask, torch.tensor(sizes))

    def run(self, precision: str) -> EvalRun:
        """Eval forward in ``precision`` ("f32" or "f64"), computed once."""
        if precision not in self._runs:
            self._runs[precision] = self._run(precision)
        return self._runs[precision]

    def _run(self, precision: str) -> EvalRun:
        model = self.model if precision == "f32" else copy.deepcopy(self.model).double()
        seen: dict[str, object] = {}

        def keep(name):
            return lambda module, args, output: seen.__setitem__(name, (args, output))

        hooks = [
            getattr(model, name).register_forward_hook(keep(name))
            for name in ("neck", "encoder", "queries", "decoder")
        ]
        try:
            with torch.no_grad():
                output = model(self.batch(DTYPES[precision]))
                memory = seen["queries"][0][0]
                top, logits, _, _ = model.queries.rank(memory, self.config.num_queries)
        finally:
            for hook in hooks:
                hook.remove()
        return EvalRun(
            output=output,
            decoded=seen["decoder"][1],
            levels=[level.features for level in seen["neck"][1]],
            memory=seen["encoder"][1].tokens,
            top=top,
            select_scores=logits.max(-1).values,
            queries=seen["decoder"][0][0],
        )

    def targets(self) -> list[Target]:
        """The ground truth mmdet used: pixel xyxy over each ``img_shape`` -> cxcywh-n."""
        targets = []
        for image, meta in enumerate(self.spec["img_metas"]):
            height, width = meta["img_shape"][:2]
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            boxes = box_xyxy_to_cxcywh(self.inputs[f"gt_bboxes.{image}"] / scale)
            targets.append(Target(self.inputs[f"gt_labels.{image}"], boxes, image_id=image))
        return targets

    def original_sizes(self) -> torch.Tensor:
        """[B, 2] (h, w) of the original images (mmdet's ``ori_shape``)."""
        return torch.tensor([meta["ori_shape"][:2] for meta in self.spec["img_metas"]])

    def postprocess(self, precision: str) -> list[PostRun]:
        """The configured postprocessor end to end, and its two stages separately."""
        inference = self.run(precision).output.for_inference()
        sizes = self.original_sizes()
        postprocess = build_postprocess(self.config)
        if not isinstance(postprocess, TopKSigmoidPostprocess):
            raise UserError("Co-DETR cases post-process sigmoid scores")
        if postprocess.soft_nms is None:
            return [PostRun(f, None, None, f) for f in postprocess(inference, sizes)]
        soft = postprocess.soft_nms
        stage_one = TopKSigmoidPostprocess(soft.candidates, clip=postprocess.clip)
        runs = []
        for candidates, final in zip(stage_one(inference, sizes), postprocess(inference, sizes)):
            keep, scores = batched_soft_nms(
                candidates.boxes_xyxy, candidates.scores, candidates.labels, **soft.options()
            )
            runs.append(PostRun(candidates, keep, scores, final))
        return runs

    def post_pairs(self, precision: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Ours and the recorded ``{precision}.post.*`` / ``.result.*`` tensors."""
        num_classes = self.config.num_classes
        pairs = {}
        for image, run in enumerate(self.postprocess(precision)):
            found, final = run.candidates, run.final
            prefix = f"eval.{precision}.post.{image}"
            offset = class_offset_boxes(found.boxes_xyxy, found.labels)
            final_rows = torch.cat((final.boxes_xyxy, final.scores[:, None]), 1)
            # mmdet's bbox2result: the detections of each class in order, classes in order.
            by_class = torch.sort(final.labels, stable=True).indices
            flat_index = found.query_index * num_classes + found.labels
            if run.keep is None:
                ours = {f"{prefix}.flat_index": flat_index}
            else:
                ours = {
                    f"{prefix}.pre_nms.flat_index": flat_index,
                    f"{prefix}.softnms.scores_in": found.scores,
                    f"{prefix}.softnms.boxes_with_class_offset": offset,
                    f"{prefix}.softnms.keep": run.keep,
                    f"{prefix}.softnms.dets": torch.cat((offset[run.keep], run.scores[:, None]), 1),
                }
            ours |= {
                f"{prefix}.bboxes": final_rows,
                f"{prefix}.labels": final.labels,
                f"eval.{precision}.result.{image}.bboxes": final_rows[by_class],
                f"eval.{precision}.result.{image}.class_counts": torch.bincount(
                    final.labels, minlength=num_classes
                ),
            }
            pairs |= {name: (value, self.tensors[name]) for name, value in ours.items()}
        return pairs

    def output_pairs(self, precision: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Ours and the recorded ``eval.{precision}.out.*`` tensors (Co-Deformable-DETR
        records the encoder's outputs in float32 only)."""
        output = self.run(precision).output
        main, enc = output.group("main"), output.group("enc")
        ours = {
            "cls_scores": main.logits,
            "bbox_preds": main.boxes,
            "enc_cls_scores": enc.logits[0],
            "enc_bbox_preds": enc.boxes[0],
        }
        names = {f"eval.{precision}.out.{name}": value for name, value in ours.items()}
        return {
            name: (value, self.tensors[name])
            for name, value in names.items()
            if name in self.tensors
        }

    def mid_pairs(self, precision: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Ours and the recorded ``eval.{precision}.mid.*`` tensors that detrkit computes
        (``x_enc`` of the auxiliary heads' downsampling is not one of them)."""
        run = self.run(precision)
        prefix = f"eval.{precision}.mid"
        references = run.decoded.references
        ours = {
            f"{prefix}.topk_proposals": run.top,
            f"{prefix}.enc_select_scores": run.select_scores,
            f"{prefix}.hs": run.decoded.hidden,
            f"{prefix}.dec_in.reference_points": references[0],
            f"{prefix}.memory.ch32": run.memory[..., ::32],
        }
        if self.dino:  # the initial references and each layer's
            ours[f"{prefix}.inter_references"] = torch.stack(references)
        else:  # Co-Deformable: the initial ones apart, the positions from the proposals
            ours[f"{prefix}.init_reference"] = references[0]
            ours[f"{prefix}.inter_references"] = torch.stack(references[1:])
            ours[f"{prefix}.dec_in.query_pos"] = run.queries.pos
        ours |= {
            f"{prefix}.neck.{level}.ch32": features[:, ::32]
            for level, features in enumerate(run.levels)
        }
        return {
            name: (value, self.tensors[name])
            for name, value in ours.items()
            if name in self.tensors
        }


# Proposals whose RPN scores differ by less than this are tied: float rounding of the maps
# (about 1e-6 from the official ones) may order them either way.
TIED_SCORE = 1e-6


def assert_boxes_equal_up_to_tied_proposals(
    ours: torch.Tensor, recorded: torch.Tensor, proposals: torch.Tensor, atol: float
) -> torch.Tensor:
    """``ours`` and ``recorded`` [N, 4] xyxy pixels are equal row by row within ``atol``,
    except rows where each side holds a different one of two tied RPN proposals
    (``proposals`` [P, 5]: recorded xyxy + score). Returns the [N] bool mask of such rows."""
    close = torch.isclose(ours, recorded, rtol=1e-5, atol=atol).all(-1)
    swapped = ~close
    for row in swapped.nonzero().flatten().tolist():
        ours_at = _proposal_index(ours[row], proposals, atol)
        recorded_at = _proposal_index(recorded[row], proposals, atol)
        assert ours_at is not None and recorded_at is not None, f"row {row}: not a proposal"
        gap = abs(proposals[ours_at, 4] - proposals[recorded_at, 4]).item()
        assert gap <= TIED_SCORE, f"row {row}: proposals {ours_at}/{recorded_at}, score gap {gap}"
    return swapped


def _proposal_index(box: torch.Tensor, proposals: torch.Tensor, atol: float) -> int | None:
    found = torch.isclose(proposals[:, :4], box, rtol=1e-5, atol=atol).all(-1).nonzero()
    return int(found[0]) if len(found) else None
