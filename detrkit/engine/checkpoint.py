# SPDX-License-Identifier: Apache-2.0
"""detrkit checkpoints: safetensors files, no pickle anywhere.

Two kinds of file share one format (:data:`FORMAT_VERSION`):

* **weights** (``<run>/model.safetensors``, ``<run>/model_ema.safetensors``, converted official
  checkpoints): the model state dict under its own keys, so any safetensors reader can load it;
  what inference, ``--init-from`` and sharing need (a tiny ResNet-18 model: 46 MB).
* **training** (``<run>/checkpoints/checkpoint_<step>.safetensors``): everything exact resume
  needs, self-contained: tensors ``model.<key>`` (the weights) and ``state.<path>`` (optimiser
  moments, scheduler, GradScaler, RNG states, EMA). The weights are stored here as well as in
  ``model.safetensors`` on purpose: a training state that pointed at a shared weights file would
  break whenever a kill landed between the two writes, or once an older state outlived the
  weights file it needs. AdamW's two moments make a training state about 3x the weights.

Metadata of every file: ``detrkit.format`` (the version), ``detrkit.kind`` (``weights`` or
``training``), ``detrkit.meta`` (:class:`CheckpointMeta` as JSON) and, in training files,
``detrkit.state`` (the JSON skeleton of the state, see :mod:`detrkit.engine.tree_codec`).

Saving is atomic: the file is written next to its destination, fsync'ed and renamed over it, so a
crash never leaves a half-written checkpoint at the destination.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from detrkit.data.labels import LabelMap
from detrkit.engine.ema import inference_weights
from detrkit.engine.state import LoopState
from detrkit.engine.tree_codec import TreeEncoder, decode_tree
from detrkit.errors import UserError

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointMeta",
    "ConvertedFrom",
    "TrainingState",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Version 2: weights files and typed metadata. Version 1 files (one file per step holding
weights and state) are refused with a message saying how to redo them."""

_KEY_FORMAT = "detrkit.format"
_KEY_KIND = "detrkit.kind"
_KEY_META = "detrkit.meta"
_KEY_STATE = "detrkit.state"
_KIND_WEIGHTS = "weights"
_KIND_TRAINING = "training"
_MODEL_PREFIX = "model."
_STATE_PREFIX = "state"


@dataclass(frozen=True)
class ConvertedFrom:
    """Where a converted official checkpoint came from: its source layout and file name."""

    source: str
    file: str


@dataclass(frozen=True)
class CheckpointMeta:
    """What every checkpoint file says about itself.

    Attributes:
        config: the experiment config as a plain dict (``config_to_dict``).
        label_map: dataset category ids and names of the model's labels.
        epoch: epochs completed when the file was written.
        step: optimiser steps taken.
        git_sha: detrkit source revision that wrote the file ("unknown" outside a checkout).
        ema: the weights are the exponential moving average (``model_ema.safetensors``).
        converted_from: set for official checkpoints converted by ``detrkit convert``.
        format_version: :data:`FORMAT_VERSION` of the file (read from it on load).
    """

    config: dict[str, Any]
    label_map: LabelMap
    epoch: int = 0
    step: int = 0
    git_sha: str = "unknown"
    ema: bool = False
    converted_from: ConvertedFrom | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        """JSON text stored in the file (``format_version`` lives in its own metadata key)."""
        data = {
            "config": self.config,
            "label_map": self.label_map.to_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "git_sha": self.git_sha,
            "ema": self.ema,
            "converted_from": vars(self.converted_from) if self.converted_from else None,
        }
        try:
            return json.dumps(data, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TypeError(f"checkpoint meta must be plain JSON: {err}") from None

    @classmethod
    def from_json(cls, text: str, format_version: int) -> CheckpointMeta:
        """Inverse of :meth:`to_json`; raises KeyError / TypeError / ValueError when malformed."""
        data = json.loads(text)
        converted = data.get("converted_from")
        return cls(
            config=dict(data["config"]),
            label_map=LabelMap.from_dict(data["label_map"]),
            epoch=int(data["epoch"]),
            step=int(data["step"]),
            git_sha=str(data.get("git_sha", "unknown")),
            ema=bool(data.get("ema", False)),
            converted_from=ConvertedFrom(**converted) if converted else None,
            format_version=format_version,
        )


@dataclass
class TrainingState:
    """Everything besides the weights that exact resume restores.

    Attributes:
        optimizer: ``optimizer.state_dict()``.
        scheduler: ``lr_scheduler.state_dict()``.
        rng: torch / numpy / python (/ cuda) generator states (``engine.state.rng_state``).
        loop: epoch and step counters.
        scaler: ``GradScaler.state_dict()`` with fp16, else None.
        ema: ``WeightEMA.state_dict()`` when ``train.ema_decay`` is set, else None.
    """

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any] = field(default_factory=dict)
    loop: LoopState = field(default_factory=LoopState)
    scaler: dict[str, Any] | None = None
    ema: dict[str, Any] | None = None

    def to_tree(self) -> dict[str, Any]:
        """Plain nested dict for :class:`TreeEncoder` (the tensors are not copied)."""
        return {
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "rng": self.rng,
            "loop": vars(self.loop).copy(),
            "scaler": self.scaler,
            "ema": self.ema,
        }

    @classmethod
    def from_tree(cls, tree: Mapping[str, Any]) -> TrainingState:
        """Inverse of :meth:`to_tree`; raises KeyError / TypeError when malformed."""
        return cls(
            optimizer=tree["optimizer"],
            scheduler=tree["scheduler"],
            rng=tree["rng"],
            loop=LoopState(**tree["loop"]),
            scaler=tree["scaler"],
            ema=tree["ema"],
        )


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint file of either kind.

    Attributes:
        path: the file.
        model: model state dict (CPU tensors unless another device was asked for).
        meta: what the file says about itself.
        training: the training state; None for weights files.
    """

    path: Path
    model: dict[str, torch.Tensor]
    meta: CheckpointMeta
    training: TrainingState | None = None

    def inference_weights(self) -> tuple[dict[str, torch.Tensor], str]:
        """The weights to run: a training state's EMA when it kept one, else ``model``; with
        "EMA" or "raw" saying which."""
        weights, kind = inference_weights(self.model, self.training)
        return weights, "EMA" if self.meta.ema else kind


# --------------------------------------------------------------------------- save


def save_checkpoint(
    path: Path,
    *,
    model: Mapping[str, torch.Tensor],
    meta: CheckpointMeta,
    training: TrainingState | None = None,
) -> None:
    """Write a checkpoint atomically to ``path`` (parent folders are created).

    Args:
        path: destination ``.safetensors`` file; replaced only once the new file is complete.
        model: model state dict (any device; copied to CPU).
        meta: config, label map, epoch, step, ...
        training: the training state for a resumable file; None writes a weights file.

    Raises:
        TypeError: the state holds an unsupported type, or the config is not plain JSON.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    encoder = TreeEncoder(tensors)
    prefix = _MODEL_PREFIX if training is not None else ""
    for key, tensor in model.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"model entry '{key}' is a {type(tensor).__name__}, not a tensor")
        encoder.add_tensor(prefix + key, tensor)
    metadata = {_KEY_FORMAT: str(FORMAT_VERSION), _KEY_META: meta.to_json()}
    if training is None:
        metadata[_KEY_KIND] = _KIND_WEIGHTS
    else:
        metadata[_KEY_KIND] = _KIND_TRAINING
        metadata[_KEY_STATE] = json.dumps(encoder.encode(training.to_tree(), _STATE_PREFIX))
    _atomic_save(tensors, metadata, path)


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write to a temporary file in ``path``'s folder, fsync, then ``os.replace`` it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata=metadata)
        # mkstemp creates the file 0600; give it the permissions of any file the user writes.
        os.chmod(tmp_name, 0o666 & ~_current_umask())
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (POSIX); silently skipped where folders cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        logger.debug("could not fsync folder %s", directory)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- load


def load_checkpoint(path: Path, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a weights or training checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the ``.safetensors`` file.
        device: where tensors are placed (numpy arrays are always host memory).

    Raises:
        UserError: the file is missing, corrupt, not a detrkit checkpoint, or of another format
            version; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise UserError(
            f"cannot read checkpoint {path}: corrupt or not safetensors ({err})"
        ) from None
    version = _format_version(path, metadata)
    try:
        meta = CheckpointMeta.from_json(metadata[_KEY_META], version)
        if metadata.get(_KEY_KIND) == _KIND_WEIGHTS:
            return Checkpoint(path, tensors, meta)
        tree = decode_tree(json.loads(metadata[_KEY_STATE]), tensors)
        training = TrainingState.from_tree(tree)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"cannot read checkpoint {path}: corrupt metadata ({err!r})") from None
    model = {
        key[len(_MODEL_PREFIX) :]: tensor
        for key, tensor in tensors.items()
        if key.startswith(_MODEL_PREFIX)
    }
    return Checkpoint(path, model, meta, training)


def _format_version(path: Path, metadata: Mapping[str, str]) -> int:
    """The file's format version; UserError unless it is :data:`FORMAT_VERSION`."""
    if _KEY_FORMAT not in metadata:
        raise UserError(f"{path} is a safetensors file but not a detrkit checkpoint (no metadata)")
    version = metadata[_KEY_FORMAT]
    if not version.isdigit():
        raise UserError(f"cannot read checkpoint {path}: corrupt format version {version!r}")
    if int(version) > FORMAT_VERSION:
        raise UserError(
            f"{path} has checkpoint format {version}; this detrkit reads format "
            f"{FORMAT_VERSION}: upgrade detrkit to load it"
        )
    if int(version) < FORMAT_VERSION:
        raise UserError(
            f"{path} has the old checkpoint format {version}; this detrkit reads format "
            f"{FORMAT_VERSION}: re-run 'detrkit convert' or the training with this version"
        )
    return int(version)


# --------------------------------------------------------------------------- prune


def _natural_key(path: Path) -> list:
    """Sort key that orders ``step_900`` before ``step_1000``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", path.name)]


def prune_checkpoints(directory: Path, pattern: str, keep_last: int) -> list[Path]:
    """Delete all but the last ``keep_last`` files in ``directory`` matching glob ``pattern``.

    "Last" is by natural order of the file names (``step_900`` < ``step_1000``), which follows the
    step or epoch number written into checkpoint names.

    Returns:
        The deleted paths.
    """
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    matches = sorted((p for p in Path(directory).glob(pattern) if p.is_file()), key=_natural_key)
    doomed = matches[: max(len(matches) - keep_last, 0)]
    for old in doomed:
        old.unlink(missing_ok=True)
        logger.info("removed old checkpoint %s", old)
    return doomed
