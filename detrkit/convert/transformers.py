# SPDX-License-Identifier: Apache-2.0
"""Hugging Face transformers checkpoints in: ``DetrForObjectDetection`` and
``DeformableDetrForObjectDetection`` folders (docs/transformers.md).

A checkpoint is a folder with ``config.json`` and ``model.safetensors`` (or its shards), or the
``.safetensors`` file with ``config.json`` beside it. The config becomes a detrkit config
(``transformers_config.py``), the weights go through one key table (``transformers_keys.py``)
strictly: every transformers tensor is used and every detrkit tensor filled.

Tied heads (Deformable DETR, ``tie_word_embeddings=True``): transformers saves a tied head once
and leaves its other indices out of the file; the model it ran used the index-0 head there.
detrkit converts them *as tied*: each missing head is a copy of the index-0 head, which
reproduces exactly what transformers computed. With ``with_box_refine`` the official model has
independent per-layer heads, so the copies are reported with a warning: they are equal at first
and train independently in detrkit. Refusing instead would leave such checkpoints (the
transformers default) unusable for no gain in faithfulness.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from detrkit.config.build import build_model
from detrkit.config.schema import ExperimentConfig
from detrkit.config.validate import config_to_dict
from detrkit.convert.transformers_config import (
    DETR,
    HfModel,
    experiment_config,
    hf_model,
    label_map,
)
from detrkit.convert.transformers_keys import hf_keys, legacy_renamed, tied_source
from detrkit.data.labels import LabelMap
from detrkit.engine.checkpoint import CheckpointMeta, ConvertedFrom, save_checkpoint
from detrkit.errors import UserError

logger = logging.getLogger(__name__)

SOURCE = "transformers"
WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TransformersCheckpoint:
    """A transformers checkpoint read from disk.

    Attributes:
        config: the ``config.json`` contents.
        state: every tensor, under today's transformers names.
        weights: the weights file (or the shard index).
    """

    config: dict
    state: dict[str, Tensor]
    weights: Path


@dataclass
class TransformersConversion:
    """The converted weights and how each was obtained.

    Attributes:
        state_dict: detrkit key -> tensor, complete for the built model.
        used: transformers keys read.
        tied: detrkit keys filled from an index-0 head the file ties them to.
        defaulted: detrkit keys transformers has no tensor for (``num_batches_tracked``).
    """

    state_dict: dict[str, Tensor]
    used: set[str] = field(default_factory=set)
    tied: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"{len(self.state_dict)} tensors converted from {len(self.used)}"]
        if self.tied:
            parts.append(f"{len(self.tied)} copied from tied index-0 heads")
        if self.defaulted:
            parts.append(f"{len(self.defaulted)} BatchNorm counters set to 0")
        return "; ".join(parts)


@dataclass(frozen=True)
class ImportedModel:
    """A transformers checkpoint as a detrkit model.

    Attributes:
        config: the derived detrkit config.
        model: the detrkit detector with the converted weights.
        label_map: category ids and names from ``id2label``.
        conversion: the weights' provenance.
    """

    config: ExperimentConfig
    model: nn.Module
    label_map: LabelMap
    conversion: TransformersConversion


def read_transformers_checkpoint(path: Path) -> TransformersCheckpoint:
    """Read ``config.json`` and the safetensors weights of a saved folder (or of the file given);
    an unsupported architecture is refused before the weights are read."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"{path}: no config.json found in {folder}; give the folder written by "
            "save_pretrained (config.json + model.safetensors)"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{config_file} is not valid JSON: {error}") from None
    # Refuse other architectures before reading (possibly large) weights.
    hf_model(config, str(config_file))
    if path.is_dir():
        files = _weight_files(path)
    elif path.suffix == ".safetensors" and path.is_file():
        files = [path]
    else:
        raise UserError(f"{path}: not a transformers folder or .safetensors file")
    state: dict[str, Tensor] = {}
    for file in files:
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError) as error:
            raise UserError(f"cannot read {file}: {error}") from None
        state.update({legacy_renamed(k): v for k, v in tensors.items()})
    return TransformersCheckpoint(config, state, files[0] if len(files) == 1 else folder / _INDEX)


def _weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / _INDEX).is_file():
        index = json.loads((folder / _INDEX).read_text())
        return [folder / name for name in sorted(set(index["weight_map"].values()))]
    if (folder / "pytorch_model.bin").is_file():
        raise UserError(
            f"{folder} holds pytorch_model.bin, which detrkit does not unpickle; re-save it with "
            "model.save_pretrained(folder) (safetensors is the default)"
        )
    raise UserError(f"{folder}: no {WEIGHTS} (or {_INDEX}) found")


def import_transformers(
    hf: Mapping, state: Mapping[str, Tensor], where: str = "transformers checkpoint"
) -> ImportedModel:
    """Build the detrkit model of a transformers config and load its weights strictly.

    Args:
        hf: the ``config.json`` contents.
        state: the weights under transformers' names.
        where: the file, quoted in errors.

    Raises:
        UserError: an unsupported architecture, or weights that do not fit it.
    """
    model = hf_model(hf, where)
    rows = _class_rows(state, model, where)
    shared = None if model.family == DETR or model.refine else _heads_shared(state, model)
    config = experiment_config(hf, model, rows, shared, where)
    detector = build_model(config.model)  # every tensor is overwritten below
    conversion = convert_weights(state, model, detector.state_dict(), bool(shared), where)
    try:
        detector.load_state_dict(conversion.state_dict, strict=True)
    except RuntimeError as error:
        raise UserError(f"{where}: converted weights do not fit: {str(error)[:800]}") from error
    if conversion.tied and model.refine:
        logger.warning(
            "%s: tie_word_embeddings=true ties %d per-layer head tensors to layer 0; converted "
            "as tied copies (the same predictions), which train independently in detrkit",
            where,
            len(conversion.tied),
        )
    labels = label_map(hf, config.model.num_classes, where)
    return ImportedModel(config, detector.eval(), labels, conversion)


def _class_rows(state: Mapping[str, Tensor], model: HfModel, where: str) -> int:
    names = (
        ("class_labels_classifier.weight",)
        if model.family == DETR
        else (
            "class_embed.0.weight",
            "model.decoder.class_embed.0.weight",
        )
    )
    for name in names:
        if name in state:
            return int(state[name].shape[0])
    raise UserError(f"{where}: no class head ({names[0]}) in the weights")


def _heads_shared(state: Mapping[str, Tensor], model: HfModel) -> bool:
    """Whether every decoder layer's head equals layer 0's (missing = tied to it)."""
    for kind in ("class_embed", "bbox_embed"):
        first = {k[len(kind) + 3 :]: v for k, v in state.items() if k.startswith(f"{kind}.0.")}
        for layer in range(1, model.decoder_layers):
            for rest, value in first.items():
                other = state.get(f"{kind}.{layer}.{rest}")
                if other is not None and not torch.equal(other, value):
                    return False
    return True


def convert_weights(
    state: Mapping[str, Tensor],
    model: HfModel,
    target: Mapping[str, Tensor],
    shared: bool,
    where: str,
) -> TransformersConversion:
    """Fill every key of ``target`` (a built detrkit model's state) from ``state``; every key
    of ``state`` must be used (``num_batches_tracked`` counters aside)."""
    result = TransformersConversion(state_dict={})
    missing, mismatched = [], []
    for key, reference in target.items():
        names = hf_keys(key, model, shared)
        if not names:
            result.state_dict[key] = torch.zeros_like(reference)
            result.defaulted.append(key)
            continue
        value = _read_copies(state, key, names, model, where, result)
        if value is None:
            missing.append(names[0])
        elif value.shape != reference.shape:
            mismatched.append(f"{names[0]} {tuple(value.shape)} != {tuple(reference.shape)}")
        else:
            result.state_dict[key] = value.to(reference.dtype)
    unused = sorted(k for k in state if k not in result.used and "num_batches_tracked" not in k)
    problems = [
        f"{label}: {items[:6]}{' ...' if len(items) > 6 else ''}"
        for label, items in (("missing", missing), ("shape", mismatched), ("unused", unused))
        if items
    ]
    if problems:
        raise UserError(
            f"{where} does not match the transformers {model.family} layout its config.json "
            f"describes ({'; '.join(problems)}); check that config.json belongs to these weights"
        )
    return result


def _read_copies(
    state: Mapping[str, Tensor],
    key: str,
    names: tuple[str, ...],
    model: HfModel,
    where: str,
    result: TransformersConversion,
) -> Tensor | None:
    """The tensor of detrkit's ``key`` stored under ``names`` (all present copies must be
    equal); a tied head absent from the file is read from the index-0 key it is tied to."""
    present = [name for name in names if name in state]
    if not present and model.tied:
        present = sorted({tied_source(n) for n in names if tied_source(n) in state})
        if present:
            result.tied.append(key)
    if not present:
        return None
    value = state[present[0]]
    for name in present[1:]:
        if not torch.equal(state[name], value):
            raise UserError(
                f"{where}: {present[0]} and {name} differ: transformers predicts with the "
                "first and refines boxes (or scores proposals) with the second, detrkit and the "
                "official code use one head for both; set both to the same tensor in the weights "
                "if different predictions are acceptable"
            )
    result.used.update(present)
    return value


def convert_transformers_checkpoint(path: Path, out: Path) -> TransformersConversion:
    """Convert the transformers checkpoint at ``path`` to a detrkit weights file ``out``.

    Raises:
        UserError: unreadable files, an unsupported architecture or mismatched weights.
    """
    checkpoint = read_transformers_checkpoint(Path(path))
    imported = import_transformers(checkpoint.config, checkpoint.state, str(checkpoint.weights))
    meta = CheckpointMeta(
        config=config_to_dict(imported.config),
        label_map=imported.label_map,
        converted_from=ConvertedFrom(source=SOURCE, file=checkpoint.weights.name),
    )
    save_checkpoint(Path(out), model=imported.model.state_dict(), meta=meta)
    return imported.conversion
