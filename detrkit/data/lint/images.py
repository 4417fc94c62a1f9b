# SPDX-License-Identifier: Apache-2.0
"""Checks on the image files: that they exist, then what opening each one shows.

The files are opened in a thread pool: decodability (``corrupt_image``), colour mode, EXIF
orientation, and the size against the annotation file's (``size_mismatch``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detrkit.data.images import exif_orientation
from detrkit.data.lint.findings import Collector
from detrkit.data.lint.splits import SplitFiles
from detrkit.data.lint.table import Table

_ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_MODE_CODES = {"L": "grayscale", "1": "grayscale", "I": "sixteen_bit", "F": "sixteen_bit"}
_MODE_CODES |= dict.fromkeys(("RGBA", "RGBa", "LA", "La", "PA"), "rgba")
_MODE_CODES |= dict.fromkeys(("I;16", "I;16B", "I;16L", "I;16N"), "sixteen_bit")


def missing_files(images_dir: Path, file_names: Sequence[str]) -> np.ndarray:
    """[I] bool: True where ``images_dir / file_name`` does not exist.

    One directory listing per folder instead of one ``stat`` per file (a network file system
    answers 118k stats slowly); names absent from the listing are confirmed with ``exists``, so
    case-insensitive file systems and odd paths give no false alarms.
    """
    listings: dict[str, set[str] | None] = {}
    missing = np.zeros(len(file_names), dtype=bool)
    for row, name in enumerate(file_names):
        folder, _, base = name.rpartition("/")
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(images_dir / folder))
            except OSError:
                listings[folder] = None
        listed = listings[folder]
        if listed is None or base not in listed:
            missing[row] = not (images_dir / name).exists()
    return missing


@dataclass(frozen=True)
class _ImageInfo:
    """What opening one file told: an error, or its mode, stored (w, h) and EXIF orientation."""

    error: str | None = None
    missing: bool = False
    mode: str = ""
    size: tuple[int, int] = (0, 0)
    orientation: int = 1


def _inspect_image(path: Path) -> _ImageInfo:
    """Header read plus the cheapest decode that still reads every byte of the file."""
    try:
        with Image.open(path) as image:
            # PNG: Pillow decodes the whole image to look for a late eXIf chunk; one before the
            # pixel data (where the PNG spec puts it) is already in ``info``.
            late_exif_only = image.format == "PNG" and "exif" not in image.info
            orientation = 1 if late_exif_only else exif_orientation(image)
            info = _ImageInfo(mode=image.mode, size=image.size, orientation=orientation)
            if image.format == "PNG":
                image.verify()  # every chunk's CRC up to IEND: catches truncation, no inflate
            else:
                if image.format == "JPEG":  # DCT-domain 1/8 scaling: still reads all the data
                    image.draft(image.mode, (image.width // 8, image.height // 8))
                image.load()
    except FileNotFoundError:
        return _ImageInfo(missing=True)
    except Exception as exc:  # any decoder failure is a finding: the linter must not stop
        return _ImageInfo(error=f"{type(exc).__name__}: {exc}")
    return info


def _inspect_all(
    paths: list[Path], desc: str, workers: int | None, progress: bool
) -> list[_ImageInfo]:
    from tqdm import tqdm

    # Threads, not processes: the work is file reads and Pillow decoders, both release the GIL.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_inspect_image, paths)
        return list(tqdm(results, total=len(paths), desc=desc, unit="img", disable=not progress))


def check_files(
    table: Table, files: SplitFiles, col: Collector, *, open_images: bool, **options: Any
) -> None:
    """missing_images_dir / missing_image, then (``open_images``) what opening each file shows."""
    if files.images_dir is None:
        where = f"<root>/{files.name}/, <root>/images/{files.name}/ or <root>/images/"
        col.add("missing_images_dir", 1, [f"looked for {where}; or pass the folder explicitly"])
        return
    missing = missing_files(files.images_dir, table.file_names)
    present = np.flatnonzero(~missing).tolist()
    infos: list[_ImageInfo] = []
    if open_images:
        paths = [files.images_dir / table.file_names[row] for row in present]
        infos = _inspect_all(paths, f"{files.name} images", **options)
        missing[[row for row, info in zip(present, infos) if info.missing]] = True
    col.add_rows("missing_image", np.flatnonzero(missing), table.image)
    _image_findings(table, present, infos, col)


def _image_findings(
    table: Table, rows: Sequence[int], infos: Sequence[_ImageInfo], col: Collector
) -> None:
    """corrupt_image, size_mismatch, exif_rotated and the colour-mode warnings."""
    codes = ("corrupt_image", "size_mismatch", "exif_rotated", *set(_MODE_CODES.values()))
    found: dict[str, list[str]] = {code: [] for code in (*codes, "other_mode")}
    for row, info in zip(rows, infos):
        name = table.image(row)
        if info.error is not None:
            found["corrupt_image"].append(f"{name}: {info.error}")
        if info.error is not None or info.missing:
            continue
        if info.mode != "RGB":
            found[_MODE_CODES.get(info.mode, "other_mode")].append(f"{name} ({info.mode})")
        if info.orientation != 1:
            found["exif_rotated"].append(f"{name} (orientation {info.orientation})")
        upright = info.size[::-1] if info.orientation in _ROTATING_ORIENTATIONS else info.size
        json_wh = tuple(int(v) for v in table.sizes_wh[row])
        if json_wh not in (info.size, upright):
            turned = f" (upright {upright[0]}x{upright[1]})" if upright != info.size else ""
            found["size_mismatch"].append(
                f"{name}: file {info.size[0]}x{info.size[1]}{turned}, "
                f"annotation {json_wh[0]}x{json_wh[1]}"
            )
    for code, examples in found.items():
        col.add(code, len(examples), examples)
