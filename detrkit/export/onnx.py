# SPDX-License-Identifier: Apache-2.0
"""``export_onnx``: a detrkit checkpoint as one ONNX graph, normalised images in, postprocessed
detections out, checked against PyTorch on onnxruntime before the file is kept (docs/onnx.md).

Example::

    from detrkit.inference import load_model
    from detrkit.export.onnx import export_onnx

    report = export_onnx(load_model("runs/demo/run"), Path("model.onnx"), dynamic=True)
    print(report.describe())
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from detrkit.config.build import build_postprocess
from detrkit.data.transforms import resized_size
from detrkit.errors import UserError
from detrkit.export.onnx_graph import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    DeployableDetector,
    check_exportable,
    dropped_parts,
)
from detrkit.export.onnx_parity import ParityResult, compare, sample_input
from detrkit.inference import LoadedModel
from detrkit.ops.ms_deform_attn import use_implementation

# The dynamo exporter's native opset; GridSample (deformable attention) needs at least 16.
DEFAULT_OPSET = 18
MIN_OPSET = 16
# Smallest image side (a dynamic graph's lower bound): the stride-32 backbone stages need 33+.
MIN_SIDE = 64
# The exporter's own graph optimiser is off: with torch 2.14 / onnxscript 0.7 it left a Clip
# whose bounds name a removed initializer (onnxruntime refuses the file); onnxruntime optimises
# the graph when loading it anyway (docs/onnx.md#exporter).
OPTIMIZE = False
EXPORTER = "torch.onnx.export(dynamo=True) (torch.export)"
# A traced batch of 1 would be specialised by torch.export (size-1 dims are), so a dynamic
# graph is traced with 2 images.
DYNAMIC_TRACE_BATCH = 2
INSTALL_HINT = "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'detrkit[onnx]'"


@dataclass(frozen=True)
class OnnxExportReport:
    """What ``export_onnx`` wrote and how well onnxruntime agreed with PyTorch.

    Attributes:
        path: the .onnx file.
        opset: ONNX opset of the graph.
        exporter: which torch exporter produced it.
        input_names, output_names: the graph's inputs (pixels [B, 3, H, W] float32,
            orig_sizes [B, 2] int64) and outputs (boxes [B, K, 4] xyxy pixels, scores [B, K],
            labels [B, K] int64).
        dynamic_axes: input/output name -> {axis: symbolic name}; empty for a static graph.
        traced_shape: (B, 3, H, W) of the traced input.
        num_detections: K.
        parity: one comparison per checked input (the traced shape, and another shape when
            the graph is dynamic).
        dropped: parts of the detector that the inference graph leaves out.
    """

    path: Path
    opset: int
    exporter: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    traced_shape: tuple[int, ...]
    num_detections: int
    parity: list[ParityResult] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def describe(self) -> str:
        axes = (
            "; ".join(
                f"{name}[{', '.join(f'{a}={n}' for a, n in sorted(dims.items()))}]"
                for name, dims in self.dynamic_axes.items()
            )
            or "none (static graph)"
        )
        lines = [
            f"opset {self.opset}, {self.exporter}",
            f"inputs {', '.join(self.input_names)}; outputs {', '.join(self.output_names)} "
            f"({self.num_detections} detections per image)",
            f"traced at {'x'.join(map(str, self.traced_shape))}; dynamic axes: {axes}",
            *(f"onnxruntime vs PyTorch, {p.describe()}" for p in self.parity),
            f"dropped: {', '.join(self.dropped) or 'nothing'}",
        ]
        return "\n  ".join(lines)


def export_onnx(
    loaded: LoadedModel,
    out: Path,
    size: tuple[int, int] | None = None,
    dynamic: bool = False,
    opset: int | None = None,
) -> OnnxExportReport:
    """Export ``loaded`` to ``out`` and check it on onnxruntime (CPU) against eager PyTorch.

    Args:
        loaded: the detector, config and label map (``detrkit.inference.load_model``).
        out: the .onnx file to write; it appears only once the parity check passed.
        size: (H, W) of the traced and checked input; None = the config's eval size of a 4:3
            landscape image.
        dynamic: make batch, height and width dynamic (checked at a second size too).
        opset: ONNX opset, at least 16; None = 18.

    Returns:
        The report (opset, names, dynamic axes, measured differences).

    Raises:
        UserError: onnx/onnxruntime missing, an unsupported config or opset, a failed export, or
            onnxruntime disagreeing with PyTorch beyond the tolerance (no file is left).
    """
    _require_onnx()
    opset = DEFAULT_OPSET if opset is None else opset
    if opset < MIN_OPSET:
        raise UserError(f"--opset {opset}: the graph needs opset {MIN_OPSET}+ (GridSample)")
    config = loaded.config
    postprocess = build_postprocess(config.model, loaded.label_map.ignored_labels())
    check_exportable(config, postprocess)
    detector = loaded.model.to("cpu").eval()
    module = DeployableDetector(detector, postprocess).eval()
    height, width = size if size is not None else default_size(config.data)
    if min(height, width) < MIN_SIDE:
        raise UserError(f"--size {height} {width}: both sides must be at least {MIN_SIDE} pixels")
    pixels, orig_sizes = sample_input(DYNAMIC_TRACE_BATCH if dynamic else 1, height, width)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written next to ``out`` so that the final rename is atomic.
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        _export(module, pixels, orig_sizes, partial, opset, dynamic)
        _write_metadata(partial, loaded, (height, width), dynamic)
        inputs = [(pixels, orig_sizes)]
        if dynamic:
            inputs.append(sample_input(1, *second_size(height, width)))
        parity = [_checked(module, partial, *sizes) for sizes in inputs]
        failed = [p for p in parity if not p.ok]
        if failed:
            raise UserError(
                "onnxruntime disagrees with PyTorch, so no file was written: "
                + "; ".join(p.describe() for p in failed)
            )
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return OnnxExportReport(
        path=out,
        opset=opset,
        exporter=EXPORTER,
        input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES,
        dynamic_axes=dynamic_axes() if dynamic else {},
        traced_shape=tuple(pixels.shape),
        num_detections=parity[0].num_detections,
        parity=parity,
        dropped=dropped_parts(detector, config),
    )


def default_size(data) -> tuple[int, int]:
    """The eval transforms' output for a 480x640 (COCO's usual 4:3) image."""
    return resized_size(480, 640, data.val_size, data.max_size)


def second_size(height: int, width: int) -> tuple[int, int]:
    """Another (H, W) for checking a dynamic graph: other than the traced one on both axes."""
    return max(MIN_SIDE, height - height // 4 - 8), width + width // 4 + 8


def dynamic_axes() -> dict[str, dict[int, str]]:
    """The symbolic axes of a ``--dynamic`` graph."""
    image = {0: "batch", 2: "height", 3: "width"}
    return {
        "pixels": image,
        "orig_sizes": {0: "batch"},
        "boxes": {0: "batch"},
        "scores": {0: "batch"},
        "labels": {0: "batch"},
    }


def _require_onnx() -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise UserError(f"{INSTALL_HINT} ({name} is not installed)") from None


def _export(
    module: DeployableDetector,
    pixels: torch.Tensor,
    orig_sizes: torch.Tensor,
    path: Path,
    opset: int,
    dynamic: bool,
) -> None:
    """Trace ``module`` with torch.export and write the ONNX graph to ``path``."""
    dynamic_shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=1024)
        sides = {
            axis: torch.export.Dim(name, min=MIN_SIDE)
            for axis, name in ((2, "height"), (3, "width"))
        }
        image = {0: batch, **sides}
        dynamic_shapes = (image, {0: batch})
    # The grid_sample deformable attention exports (the fused one's autograd function does
    # not); SDPA's math kernel is what the exporter decomposes to, so tracing it gives the
    # decomposed graph the same strides.
    with (
        use_implementation("reference"),
        sdpa_kernel([SDPBackend.MATH]),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                (pixels, orig_sizes),
                dynamo=True,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=dynamic_shapes,
                verbose=False,
                optimize=OPTIMIZE,
            )
        except Exception as error:  # torch.export / onnxscript raise many types
            first = str(error).strip().splitlines()[0][:500] if str(error).strip() else ""
            raise UserError(f"ONNX export failed ({type(error).__name__}: {first})") from error
    program.save(str(path))


def _checked(
    module: DeployableDetector, path: Path, pixels: torch.Tensor, orig_sizes: torch.Tensor
) -> ParityResult:
    """:func:`compare`, onnxruntime failures (e.g. an input shape the graph refuses) as
    UserError."""
    try:
        return compare(module, path, pixels, orig_sizes)
    except Exception as error:
        if type(error).__module__.startswith("onnxruntime"):
            first = str(error).strip().splitlines()[0][:500]
            shape = "x".join(map(str, pixels.shape))
            raise UserError(
                f"onnxruntime could not run the exported graph on a {shape} input, so no file "
                f"was written: {first}"
            ) from error
        raise


def _write_metadata(path: Path, loaded: LoadedModel, size: tuple[int, int], dynamic: bool) -> None:
    """Label names and category ids, and the input convention, as ONNX metadata properties.

    Raises:
        UserError: a dynamic export whose image axes came out fixed (torch.onnx falls back to
            tracing strategies that may specialise a size instead of failing).
    """
    import onnx

    model = onnx.load(str(path))
    if dynamic:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        fixed = [axis for axis in (0, 2, 3) if dims[axis].HasField("dim_value")]
        if fixed:
            raise UserError(
                f"the exporter could not keep axes {fixed} of 'pixels' dynamic; export without "
                "--dynamic (one static graph per input size)"
            )
    label_map = loaded.label_map
    entries = {
        "detrkit.label_names": json.dumps(list(label_map.names)),
        "detrkit.category_ids": json.dumps([int(i) for i in label_map.category_ids]),
        "detrkit.input": (
            "pixels: RGB [B, 3, H, W] float32, /255 then normalised by mean "
            "(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225); orig_sizes: [B, 2] int64 (h, w)"
        ),
        "detrkit.traced_size": json.dumps(list(size)),
        "detrkit.source": str(loaded.path.name),
    }
    for key, value in entries.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
