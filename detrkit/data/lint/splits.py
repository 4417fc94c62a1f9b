# SPDX-License-Identifier: Apache-2.0
"""Locating the annotation files of a dataset folder (or one JSON file) and their images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from detrkit.data.coco import resolve_split
from detrkit.errors import UserError


@dataclass(frozen=True)
class SplitFiles:
    name: str
    annotation_json: Path
    images_dir: Path | None  # None: no images folder was found


def find_splits(
    path: Path, splits: Sequence[str] | None = None, images_dir: Path | None = None
) -> list[SplitFiles]:
    """The annotation files under ``path`` (a COCO folder or one JSON file) and their images.

    Raises:
        UserError: ``path`` does not exist, holds no ``annotations/instances_*.json`` or lacks
            a split asked for (usage mistakes, exit code 2).
    """
    path = Path(path)
    if path.is_file():
        return [_json_split(path, images_dir)]
    if not path.is_dir():
        raise UserError(f"{path} does not exist; pass a COCO-format folder or annotation file")
    if not splits:
        found = sorted((path / "annotations").glob("instances_*.json"))
        splits = [p.name.removeprefix("instances_").removesuffix(".json") for p in found]
    if not splits:
        raise UserError(
            f"no annotation files under {path}: expected annotations/instances_<split>.json"
        )
    return [_folder_split(path, name, images_dir) for name in splits]


def _folder_split(root: Path, name: str, images_dir: Path | None) -> SplitFiles:
    try:
        found_images, annotation = resolve_split(root, name)
    except UserError:
        annotation = root / "annotations" / f"instances_{name}.json"
        if not annotation.is_file():
            raise
        found_images = None  # the JSON exists, its images do not: a finding, not a usage error
    return SplitFiles(name, annotation, images_dir or found_images)


def _json_split(path: Path, images_dir: Path | None) -> SplitFiles:
    """Images of a lone JSON file: where ``resolve_split`` would look, else next to the file."""
    name = path.stem.removeprefix("instances_")
    in_annotations = path.parent.name == "annotations"
    root = path.parent.parent if in_annotations else path.parent
    candidates = [root / name, root / "images" / name, root / "images"]
    candidates += [] if in_annotations else [root]
    found = next((c for c in candidates if c.is_dir()), None)
    return SplitFiles(name, path, images_dir or found)
