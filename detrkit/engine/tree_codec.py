# SPDX-License-Identifier: Apache-2.0
"""A nested training state <-> a JSON skeleton plus flat tensors, exactly (no pickle).

Every skeleton node is a ``[tag, payload]`` pair, so int dict keys, tuples vs lists, big ints and
inf/nan floats come back exactly as they were saved; tensor nodes hold the name of their tensor,
numpy arrays are stored as raw bytes in a uint8 tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["TreeEncoder", "decode_tree"]


class TreeEncoder:
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


def decode_tree(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :meth:`TreeEncoder.encode`."""
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
        return np.dtype(payload["dtype"]).type(decode_tree(payload["value"], tensors))
    if tag == "list":
        return [decode_tree(n, tensors) for n in payload]
    if tag == "tuple":
        return tuple(decode_tree(n, tensors) for n in payload)
    if tag == "dict":
        return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in payload}
    raise ValueError(f"unknown node tag {tag!r}")
