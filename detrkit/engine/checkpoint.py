# SPDX-License-Identifier: Apache-2.0
"""detrkit checkpoints: one safetensors file, no pickle anywhere.

Layout of a checkpoint file:

* tensors ``model.<key>``: the model state dict;
* tensors ``state.<path>``: every tensor (and numpy array) found in the nested training state
  (optimizer, scheduler, RNG states, GradScaler, sampler, ...);
* metadata ``detrkit.format``: :data:`FORMAT_VERSION`;
* metadata ``detrkit.meta``: the caller's JSON-able metadata (config, label map, epoch, ...);
* metadata ``detrkit.state``: the non-tensor *skeleton* of the state as JSON. Every node is a
  ``[tag, payload]`` pair, so int dict keys, tuples vs lists, big ints and inf/nan floats come back
  exactly as they were saved; tensor nodes hold the name of their tensor in the file.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from detrkit.errors import UserError

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_KEY_FORMAT = "detrkit.format"
_KEY_META = "detrkit.meta"
_KEY_STATE = "detrkit.state"
_MODEL_PREFIX = "model."
_STATE_PREFIX = "state."


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: model state dict (CPU tensors unless another device was asked for).
        state: the nested training state exactly as saved (tuples, int keys, numpy arrays).
        meta: the JSON metadata given to :func:`save_checkpoint`.
    """

    model: dict[str, torch.Tensor]
    state: Any
    meta: dict[str, Any]


# --------------------------------------------------------------------------- encoding


class _Encoder:
    """Turns a nested state into a JSON skeleton plus a flat ``name -> tensor`` dict."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        """Collect into ``tensors`` (shared with the caller)."""
        self.tensors = tensors
        self._storages: set[int] = set()

    def add_tensor(self, name: str, tensor: torch.Tensor) -> str:
        """Store ``tensor`` under a unique ``name`` (de-duplicated); returns the name used."""
        unique, n = name, 1
        while unique in self.tensors:
            unique, n = f"{name}~{n}", n + 1
        self.tensors[unique] = self._detached(tensor)
        return unique

    def _detached(self, tensor: torch.Tensor) -> torch.Tensor:
        """CPU, contiguous, with storage not shared with any tensor already stored."""
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_meta:
            raise TypeError(f"cannot checkpoint a {tensor.layout} / quantized / meta tensor")
        tensor = tensor.detach().to("cpu")
        if tensor.untyped_storage().data_ptr() in self._storages or not tensor.is_contiguous():
            # safetensors refuses shared storage; a copy is cheap next to the file write.
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        if tensor.numel() > 0:
            self._storages.add(tensor.untyped_storage().data_ptr())
        return tensor

    def encode(self, value: Any, path: str) -> list:
        """JSON node of ``value``; tensors found at ``path`` go to ``self.tensors``."""
        if value is None:
            return ["none", None]
        if isinstance(value, bool):
            return ["bool", value]
        if isinstance(value, int):
            return ["int", str(value)]  # as text: exact for ints beyond 2**53 in any reader
        if isinstance(value, float):
            return ["float", repr(value)]  # repr round-trips exactly, inf and nan included
        if isinstance(value, str):
            return ["str", value]
        if isinstance(value, torch.Tensor):
            return ["tensor", self.add_tensor(path, value)]
        if isinstance(value, np.ndarray):
            return ["ndarray", self._encode_array(value, path)]
        if isinstance(value, np.generic):
            return [
                "npscalar",
                {"dtype": value.dtype.str, "value": self.encode(value.item(), path)},
            ]
        if isinstance(value, (list, tuple)):
            items = [self.encode(v, f"{path}.{i}") for i, v in enumerate(value)]
            return ["tuple" if isinstance(value, tuple) else "list", items]
        if isinstance(value, Mapping):
            return [
                "dict",
                [[self.encode(k, path), self.encode(v, f"{path}.{k}")] for k, v in value.items()],
            ]
        raise TypeError(f"cannot checkpoint a {type(value).__name__} at '{path}'")

    def _encode_array(self, array: np.ndarray, path: str) -> dict[str, Any]:
        """Store an ndarray's raw bytes as a uint8 tensor: exact for every numeric dtype."""
        if array.dtype.hasobject:
            raise TypeError(f"cannot checkpoint an object ndarray at '{path}'")
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        name = self.add_tensor(path, torch.from_numpy(raw.copy()))
        return {"tensor": name, "dtype": array.dtype.str, "shape": list(array.shape)}


def _decode(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :meth:`_Encoder.encode`."""
    tag, payload = node
    if tag in ("none", "bool", "str"):
        return payload
    if tag == "int":
        return int(payload)
    if tag == "float":
        return float(payload)
    if tag == "tensor":
        return tensors[payload]
    if tag == "ndarray":
        raw = tensors[payload["tensor"]].cpu().numpy().tobytes()
        return np.frombuffer(raw, dtype=np.dtype(payload["dtype"])).reshape(payload["shape"]).copy()
    if tag == "npscalar":
        return np.dtype(payload["dtype"]).type(_decode(payload["value"], tensors))
    if tag == "list":
        return [_decode(n, tensors) for n in payload]
    if tag == "tuple":
        return tuple(_decode(n, tensors) for n in payload)
    if tag == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in payload}
    raise ValueError(f"unknown node tag {tag!r}")


# --------------------------------------------------------------------------- save


def save_checkpoint(
    path: Path,
    *,
    model: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> None:
    """Write a checkpoint atomically to ``path`` (parent folders are created).

    Args:
        path: destination ``.safetensors`` file; replaced only once the new file is complete.
        model: model state dict (any device; copied to CPU).
        state: nested dict/list/tuple of tensors, numpy arrays, int, float, str, bool and None,
            e.g. ``{"optimizer": opt.state_dict(), "rng": {"python": random.getstate()}}``.
        meta: JSON-able metadata (config dict, label map, epoch, step, git sha, ...).

    Raises:
        TypeError: ``state`` holds an unsupported type, or ``meta`` is not JSON-able.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    encoder = _Encoder(tensors)
    for key, tensor in model.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"model entry '{key}' is a {type(tensor).__name__}, not a tensor")
        encoder.add_tensor(_MODEL_PREFIX + key, tensor)
    skeleton = encoder.encode(state, _STATE_PREFIX.rstrip("."))
    try:
        meta_json = json.dumps(dict(meta), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"checkpoint meta must be plain JSON: {err}") from None
    metadata = {
        _KEY_FORMAT: str(FORMAT_VERSION),
        _KEY_META: meta_json,
        _KEY_STATE: json.dumps(skeleton),
    }
    _atomic_save(tensors, metadata, path)


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write to a temporary file in ``path``'s folder, fsync, then ``os.replace`` it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata=metadata)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


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
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the ``.safetensors`` file.
        device: where tensors are placed (numpy arrays are always host memory).

    Raises:
        UserError: the file is missing, corrupt, not a detrkit checkpoint, or from a newer format.
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
    if _KEY_FORMAT not in metadata:
        raise UserError(f"{path} is a safetensors file but not a detrkit checkpoint (no metadata)")
    version = metadata[_KEY_FORMAT]
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise UserError(
            f"{path} has checkpoint format {version}; this detrkit reads up to {FORMAT_VERSION}"
        )
    try:
        meta = json.loads(metadata[_KEY_META])
        state = _decode(json.loads(metadata[_KEY_STATE]), tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"cannot read checkpoint {path}: corrupt metadata ({err})") from None
    model = {
        key[len(_MODEL_PREFIX) :]: tensor
        for key, tensor in tensors.items()
        if key.startswith(_MODEL_PREFIX)
    }
    return Checkpoint(model=model, state=state, meta=meta)


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
