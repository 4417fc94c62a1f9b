# SPDX-License-Identifier: Apache-2.0
"""Inference latency: PyTorch eager against onnxruntime, per detector family.

Each family's full-size R50 preset is built with random weights (the latency does not depend on
them), exported with ``detrkit.export.onnx.export_onnx`` (static graph at ``--size``; the
export's own parity check runs) and then timed on one deterministic batch-1 input: the same
module both ways, backbone to postprocessed detections (``DeployableDetector``). The two
runtimes alternate run by run (interleaved, so a load change on the machine hits both alike);
the table gives the medians of ``--repeats`` runs after ``--warmup`` runs each (the device
synchronised around every run), and the largest difference between their outputs (boxes as a
fraction of the image size, scores).

``--precision bf16`` applies to the PyTorch column only: its forward runs under
``torch.autocast(device, bfloat16)``; the ONNX graph is exported and run in fp32, so the
difference column then includes the bf16 rounding.

PyTorch runs the fused deformable attention (its default), onnxruntime the exported
``grid_sample`` formulation. Both use all the CPU's threads unless ``--threads`` says otherwise.
With ``--device cuda`` PyTorch runs on the GPU and onnxruntime on its CUDAExecutionProvider
(needs the onnxruntime-gpu package; otherwise that column reads n/a).

Usage::

    .venv/bin/python benchmarks/inference.py [--families detr deformable dino smca]
        [--size 800 1333] [--repeats 10] [--warmup 1] [--device cpu|cuda]
        [--precision fp32|bf16] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_common_args,
    autocast,
    check_device,
    header,
    interleaved_times,
    markdown_table,
    medians,
)

from detrkit.config.build import build_model, build_postprocess  # noqa: E402
from detrkit.config.load import load_config  # noqa: E402
from detrkit.data.labels import LabelMap  # noqa: E402
from detrkit.export.onnx import export_onnx  # noqa: E402
from detrkit.export.onnx_graph import DeployableDetector, GraphOutputs  # noqa: E402
from detrkit.export.onnx_parity import measure, module_is_ranked, sample_input  # noqa: E402
from detrkit.inference import LoadedModel  # noqa: E402

FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "detr": ("DETR R50", "detr_r50", ()),
    "deformable": ("Deformable DETR R50 two-stage", "deformable_detr_r50_two_stage", ()),
    "dino": ("DINO-4scale R50", "dino_4scale_r50_12ep", ()),
    "smca": ("SMCA R50", "smca_r50", ()),
}
NUM_CLASSES = 91


@dataclass
class Row:
    """One family's measurements."""

    name: str
    torch_ms: float
    ort_ms: float | None
    box_diff: float
    score_diff: float

    def cells(self) -> list[str]:
        ort = "n/a" if self.ort_ms is None else f"{self.ort_ms:.1f}"
        ratio = "n/a" if self.ort_ms is None else f"{self.ort_ms / self.torch_ms:.2f}"
        diff = f"boxes {self.box_diff:.1e}, scores {self.score_diff:.1e}"
        return [self.name, f"{self.torch_ms:.1f}", ort, ratio, diff]


def build(family: str) -> LoadedModel:
    """The family's preset with random weights (seeded), as a loaded checkpoint would be."""
    _, preset, overrides = FAMILIES[family]
    config = load_config(preset, list(overrides))
    torch.manual_seed(0)
    model = build_model(config.model, NUM_CLASSES).eval()
    label_map = LabelMap(tuple(range(NUM_CLASSES)), tuple(f"c{i}" for i in range(NUM_CLASSES)))
    return LoadedModel(model, config, label_map, Path(f"{preset}.safetensors"))


def ort_session(path: Path, device: str, threads: int | None):
    """An onnxruntime session on CPU, or CUDA (None when the CUDA provider is absent)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if device == "cuda":
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return None
        providers = ["CUDAExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return onnxruntime.InferenceSession(str(path), options, providers=providers)


def bench(family: str, size: tuple[int, int], args) -> Row:
    device, threads = args.device, args.threads
    loaded = build(family)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{family}.onnx"
        started = time.perf_counter()
        report = export_onnx(loaded, path, size=size)
        print(f"{family}: exported in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        session = ort_session(path, device, threads)
        module = DeployableDetector(
            loaded.model.to(device),
            build_postprocess(loaded.config.model, loaded.label_map.ignored_labels()),
        ).to(device)
        pixels, orig_sizes = sample_input(1, *size)
        feeds = {"pixels": pixels.numpy(), "orig_sizes": orig_sizes.numpy()}
        on_device = pixels.to(device), orig_sizes.to(device)

        def run_torch():
            with torch.inference_mode(), autocast(device, args.precision):
                return module.detections(*on_device)

        def run_ort():
            return session.run(None, feeds)

        runs = {"torch": run_torch}
        if session is not None:
            runs["ort"] = run_ort
        seconds = medians(interleaved_times(runs, device, args.repeats, args.warmup))
        box_diff, score_diff = report.parity[0].box_diff_relative, report.parity[0].score_diff
        if session is not None:
            # The timed runtimes' own outputs (on CUDA they differ from the CPU export check).
            expected = run_torch()
            boxes, scores, labels = (torch.from_numpy(a) for a in run_ort())
            expected = GraphOutputs(
                *(
                    t.cpu().float() if t.is_floating_point() else t.cpu()
                    for t in expected.as_tuple()
                )
            )
            result = measure(
                expected, GraphOutputs(boxes, scores, labels), orig_sizes, module_is_ranked(module)
            )
            box_diff, score_diff = result.box_diff_relative, result.score_diff
    return Row(
        FAMILIES[family][0],
        seconds["torch"] * 1000,
        seconds["ort"] * 1000 if "ort" in seconds else None,
        box_diff,
        score_diff,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, repeats=10, warmup=1)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--size", nargs=2, type=int, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of both runtimes")
    args = parser.parse_args()
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = tuple(args.size)
    print(
        header(
            args.device,
            f"{args.precision} (PyTorch column; onnxruntime fp32)",
            input=f"batch 1, {size[0]}x{size[1]}",
            repeats=f"{args.repeats} (median, interleaved, after {args.warmup} warm-up)",
        )
    )
    rows = [bench(f, size, args) for f in args.families]
    print()
    columns = ["family", "torch ms", "onnxruntime ms", "ratio", "max diff"]
    print(markdown_table(columns, [row.cells() for row in rows]))
    print(f"\nload average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
