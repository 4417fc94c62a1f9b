# SPDX-License-Identifier: Apache-2.0
"""``detrkit convert --from codetr``: an mmdetection-2 Co-DETR checkpoint (Sense-X/Co-DETR)
in, a detrkit checkpoint out (docs/methods.md#co-detr).

mmdet writes ``{'state_dict': ..., 'meta': {'config': <text>, 'CLASSES': ..., ...}}``; the
config text is Python (``Config.pretty_text``). It is never executed: ``parse_config_text``
reads it with ``ast`` and accepts only literals, ``dict(...)`` calls, arithmetic on numbers and
names assigned earlier in the text. Anything else (imports, ``_base_`` inheritance, calls)
makes the converter ask for ``--config``: a JSON or YAML file holding the mmdet ``model``
section (the dict itself, or a mapping with a ``model`` key).

The 80 contiguous mmdet labels become COCO category ids (label 0 -> 1, label 79 -> 90) when
the head has 80 classes; any other head gets plain labels, named from ``meta['CLASSES']``
when it has them.
"""

from __future__ import annotations

import ast
import json
import operator
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from detrkit.config.build import build_model
from detrkit.config.schema import ExperimentConfig, ModelConfig
from detrkit.config.scheme_settings import SchemeSettings
from detrkit.config.validate import config_to_dict
from detrkit.convert.codetr import convert_codetr
from detrkit.convert.codetr_config import codetr_model_config, is_dino, query_head
from detrkit.convert.detect import check_family
from detrkit.convert.official import read_official_checkpoint
from detrkit.convert.rules import ConversionResult
from detrkit.data.coco_names import COCO_CATEGORY_NAMES
from detrkit.data.labels import LabelMap
from detrkit.engine.checkpoint import CheckpointMeta, ConvertedFrom, save_checkpoint
from detrkit.errors import UserError

SOURCE = "codetr"
_COCO_CLASSES = 80
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
}


class _Unsafe(ValueError):
    """The config text holds something other than plain data."""


def _value(node: ast.AST, names: Mapping[str, Any]) -> Any:
    """The value of a data-only expression; ``_Unsafe`` for anything that would run code."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_value(item, names) for item in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        if any(key is None for key in node.keys):
            raise _Unsafe("dict unpacking")
        return {_value(k, names): _value(v, names) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        if node.args or any(kw.arg is None for kw in node.keywords):
            raise _Unsafe("dict() with positional or ** arguments")
        return {kw.arg: _value(kw.value, names) for kw in node.keywords}
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _value(node.operand, names)
        if isinstance(operand, (int, float)) and not isinstance(operand, bool):
            return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left, names), _value(node.right, names)
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (left, right)):
            return _BINARY[type(node.op)](left, right)
    raise _Unsafe(type(node).__name__)


def parse_config_text(text: str) -> dict[str, Any] | None:
    """The top-level assignments of an mmdet config text, or None when it is not plain data
    (it is never executed)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    names: dict[str, Any] = {}
    for statement in tree.body:
        if not (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
        ):
            return None
        try:
            names[statement.targets[0].id] = _value(statement.value, names)
        except (_Unsafe, TypeError, ZeroDivisionError, OverflowError):
            return None
    return None if "_base_" in names else names


def read_config_file(path: Path) -> dict[str, Any]:
    """``--config``: the mmdet ``model`` section as JSON or YAML (the dict, or ``{model: ...}``)."""
    if not path.is_file():
        raise UserError(f"--config {path} not found")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:  # json / yaml parse errors
        raise UserError(f"--config {path} is not valid JSON/YAML: {error}") from error
    if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        data = data["model"]
    if not isinstance(data, Mapping) or "query_head" not in data:
        raise UserError(
            f"--config {path} must hold the mmdet Co-DETR 'model' section (a mapping with a "
            "'query_head'); detrkit presets are not accepted, as the key rules follow the "
            "mmdet layout"
        )
    return dict(data)


def _model_section(data: Mapping[str, Any], path: Path, config: Path | None) -> dict[str, Any]:
    if config is not None:
        return read_config_file(config)
    meta = data.get("meta")
    text = meta.get("config") if isinstance(meta, Mapping) else None
    if not isinstance(text, str):
        raise UserError(
            f"{path} stores no mmdet config (meta['config']); pass --config with the mmdet "
            "'model' section as JSON or YAML"
        )
    parsed = parse_config_text(text)
    model = parsed.get("model") if parsed else None
    if not isinstance(model, Mapping):
        raise UserError(
            f"{path}'s stored config is not plain data detrkit can read without running it "
            "(or has no 'model'); pass --config with the mmdet 'model' section as JSON or YAML"
        )
    return dict(model)


def _head(model: Mapping[str, Any], index_key: str) -> Mapping[str, Any]:
    section = model[index_key]
    return section[0] if isinstance(section, list) else section


def collaborative_options(model: Mapping[str, Any]) -> dict[str, Any]:
    """``model.schemes.collaborative`` (as a mapping) from a Co-DINO or Co-Deformable-DETR
    mmdet model: RoI head 0 and ATSS head 0, weights divided back by ``num_dec_layer x
    lambda_2``, the positive queries built the way the query head builds them."""
    head = query_head(model)
    rpn, roi, atss = model["rpn_head"], _head(model, "roi_head"), _head(model, "bbox_head")
    train = model["train_cfg"][1]
    layers = head["transformer"]["decoder"]["num_layers"]
    lambda_2 = rpn["loss_cls"]["loss_weight"] / layers
    scale = layers * lambda_2
    anchors, bbox = rpn["anchor_generator"], roi["bbox_head"]
    rpn_roi = dict(
        strides=tuple(anchors["strides"]),
        ratios=tuple(anchors["ratios"]),
        octave_base_scale=anchors["octave_base_scale"],
        scales_per_octave=anchors["scales_per_octave"],
        rpn_pos_iou=train["rpn"]["assigner"]["pos_iou_thr"],
        rpn_neg_iou=train["rpn"]["assigner"]["neg_iou_thr"],
        rpn_min_pos_iou=train["rpn"]["assigner"]["min_pos_iou"],
        rpn_samples=train["rpn"]["sampler"]["num"],
        rpn_pos_fraction=train["rpn"]["sampler"]["pos_fraction"],
        nms_pre=train["rpn_proposal"]["nms_pre"],
        max_proposals=train["rpn_proposal"]["max_per_img"],
        nms_iou=train["rpn_proposal"]["nms"]["iou_threshold"],
        roi_strides=tuple(roi["bbox_roi_extractor"]["featmap_strides"]),
        finest_scale=roi["bbox_roi_extractor"]["finest_scale"],
        fc_channels=bbox["fc_out_channels"],
        roi_size=bbox["roi_feat_size"],
        roi_iou=train["rcnn"]["assigner"]["pos_iou_thr"],
        roi_samples=train["rcnn"]["sampler"]["num"],
        roi_pos_fraction=train["rcnn"]["sampler"]["pos_fraction"],
        rpn_cls_weight=rpn["loss_cls"]["loss_weight"] / scale,
        rpn_bbox_weight=rpn["loss_bbox"]["loss_weight"] / scale,
        roi_cls_weight=bbox["loss_cls"]["loss_weight"] / scale,
        roi_bbox_weight=bbox["loss_bbox"]["loss_weight"] / scale,
    )
    atss_options = dict(
        strides=tuple(atss["anchor_generator"]["strides"]),
        stacked_convs=atss["stacked_convs"],
        octave_base_scale=atss["anchor_generator"]["octave_base_scale"],
        topk=atss["train_cfg"]["assigner"]["topk"],
        cls_weight=atss["loss_cls"]["loss_weight"] / scale,
        bbox_weight=atss["loss_bbox"]["loss_weight"] / scale,
        centerness_weight=atss["loss_centerness"]["loss_weight"] / scale,
    )
    return dict(
        rpn_roi=rpn_roi,
        atss=atss_options,
        lambda_2=lambda_2,
        max_pos_coords=head.get("max_pos_coords", 300),
        with_pos_coord=head["transformer"].get("with_pos_coord", True),
        positive_query="dino" if is_dino(head) else "deformable",
    )


def with_collaborative_scheme(config: ModelConfig, model: Mapping[str, Any]) -> ModelConfig:
    from detrkit.schemes.collaborative import ATSSOptions, CollaborativeConfig, RPNRoIOptions

    try:
        options = collaborative_options(model)
    except (KeyError, IndexError, TypeError, ZeroDivisionError) as error:
        raise UserError(
            f"--keep-aux: the mmdet config lacks the Co-DINO auxiliary-head settings ({error!r})"
        ) from None
    options = CollaborativeConfig(
        **{
            **options,
            "rpn_roi": RPNRoIOptions(**options["rpn_roi"]),
            "atss": ATSSOptions(**options["atss"]),
        }
    )
    schemes = dict(config.schemes)
    schemes["collaborative"] = options
    return replace(config, schemes=SchemeSettings(schemes))


def codetr_label_map(num_classes: int, classes: Any = None) -> LabelMap:
    """An 80-class head predicts the COCO categories in id order (label 0 -> id 1 ...
    label 79 -> id 90); other heads get labels 0..N-1, named from mmdet's CLASSES if given."""
    if num_classes == _COCO_CLASSES:
        ids = tuple(sorted(COCO_CATEGORY_NAMES))
        return LabelMap(ids, tuple(COCO_CATEGORY_NAMES[i] for i in ids))
    if isinstance(classes, (list, tuple)) and len(classes) == num_classes:
        return LabelMap(tuple(range(num_classes)), tuple(str(c) for c in classes))
    return LabelMap.identity(num_classes)


def convert_codetr_checkpoint(
    path: Path, out: Path, *, keep_aux: bool = False, config: Path | None = None
) -> ConversionResult:
    """Convert the mmdet Co-DETR checkpoint at ``path`` to a detrkit checkpoint at ``out``.

    Args:
        keep_aux: keep the collaborative heads (RPN + RoI, ATSS, positive-query projections)
            as the ``collaborative`` scheme, for fine-tuning; by default they are dropped.
        config: a JSON/YAML file with the mmdet ``model`` section, for files whose stored
            config cannot be read as plain data.
    """
    data = read_official_checkpoint(path)
    state = data.get("state_dict", data)
    if not isinstance(state, Mapping):
        raise UserError(f"{path} holds no state_dict")
    check_family(SOURCE, tuple(state), {}, str(path))
    if not any(key.startswith("query_head.") for key in state):
        raise UserError(f"{path} has no Co-DETR query head (query_head.*): not a Co-DETR file")
    mmdet = _model_section(data, path, config)
    model_config = codetr_model_config(mmdet)
    if keep_aux:
        model_config = with_collaborative_scheme(model_config, mmdet)
    result = convert_codetr(
        state,
        mmdet,
        with_denoising="denoising" in model_config.schemes,
        with_collaborative=keep_aux,
    )
    if not result.clean:
        raise UserError(f"{path} does not match the Co-DETR layout: {result.describe()}")
    model = build_model(model_config)
    try:
        model.load_state_dict(result.state_dict, strict=True)
    except RuntimeError as error:
        detail = str(error)[:800]
        raise UserError(f"converted weights do not fit {path}'s config: {detail}") from error
    meta_in = data.get("meta") if isinstance(data.get("meta"), Mapping) else {}
    meta = CheckpointMeta(
        config=config_to_dict(ExperimentConfig(model=model_config)),
        label_map=codetr_label_map(model_config.num_classes, meta_in.get("CLASSES")),
        converted_from=ConvertedFrom(source=SOURCE, file=path.name),
    )
    save_checkpoint(out, model=model.state_dict(), meta=meta)
    return result
