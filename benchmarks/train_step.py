# SPDX-License-Identifier: Apache-2.0
"""Whole-model benchmark: detrkit vs Hugging Face transformers, same architecture and widths.

``--model deformable`` (default): detrkit's preset ``deformable_detr_r50_two_stage`` (two-stage +
iterative box refinement) against transformers' ``DeformableDetrForObjectDetection`` with
``two_stage=True, with_box_refine=True``: ResNet-50, 300 queries, 6 + 6 layers, FFN 1024,
dropout 0.1. transformers runs its pure-PyTorch deformable attention
(``disable_custom_kernels=True``). ``--model detr``: detrkit's preset ``detr_r50`` against
``DetrForObjectDetection`` with a ResNet-50 built from transformers' own ``ResNetConfig`` (no
timm, nothing downloaded): d_model 256, 6 + 6 layers, FFN 2048, 100 queries, dropout 0.1 (also
on the attention probabilities and inside the FFN, as the original), auxiliary losses. Both:
random weights, 91 classes, 10 ground-truth boxes per image, ResNet stages 2-4 trained (stem and
stage 1 frozen, as detrkit and the originals; transformers' own freezing filter is fixed, see
``_train_resnet_stages``), one AdamW step per train step. Nothing is downloaded
(``HF_HUB_OFFLINE=1``).

Modes: ``train`` is forward + loss (+ matching) + backward + optimiser step; ``inference`` is
``model.eval()`` under ``torch.inference_mode``, detrkit including its postprocess (top-k boxes
in image coordinates), transformers its forward (its postprocess lives in the image processor).
With ``--precision bf16`` the forward pass runs under ``torch.autocast(device, bfloat16)`` and
the backward pass outside it; detrkit computes matching and losses outside autocast (in fp32,
as ``detrkit.engine.step.train_step`` does), transformers computes its loss inside its forward,
so under autocast.

Times: both implementations are built in this process and alternate step by step (A B A B ...)
after ``--warmup`` steps each; the table gives the median of ``--repeats`` (the device is
synchronised around every timed step). Peak memory: each (implementation, batch, mode) runs two
steps in a fresh subprocess; the peak is what those steps need beyond the model and its inputs
(CUDA: ``max_memory_allocated`` minus ``memory_allocated`` before; CPU: peak RSS minus RSS
before), so gradients, optimiser state and activations count, imports and weights do not.

``--flops`` counts the FLOPs of one detrkit train step (forward + backward) with
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; gathers and the
deformable sampling count nothing), divides them by the measured median step time, and compares
that with this device's ``torch.mm`` peak in the same precision (best of several 2048^2 on the
CPU, 4096^2 on CUDA).

Usage::

    .venv/bin/python benchmarks/train_step.py [--model deformable|detr] [--device cpu|cuda]
        [--precision fp32|bf16] [--size 640 640] [--batch-sizes 1 2]
        [--modes train inference] [--repeats 3] [--warmup 1] [--flops]
    .venv/bin/python benchmarks/train_step.py --modes inference --size 800 1333 --batch-sizes 1 4

Needs the ``bench`` extra (``pip install -e .[bench]``). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_common_args,
    autocast,
    check_device,
    common_argv,
    header,
    interleaved_times,
    markdown_table,
    matmul_peak_flops,
    medians,
    print_child_result,
    run_child,
    step_peak_mb,
)

from detrkit.engine.optim import make_adamw  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

NUM_CLASSES = 91
BOXES_PER_IMAGE = 10
IMPLEMENTATIONS = ("detrkit", "transformers")
PRESETS = {"deformable": "deformable_detr_r50_two_stage", "detr": "detr_r50"}
TITLES = {
    "deformable": "Deformable DETR two-stage + iterative refinement, R50, 300 queries",
    "detr": "DETR R50, 100 queries, aux loss",
}


def _targets(batch: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        centres = torch.rand(BOXES_PER_IMAGE, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(BOXES_PER_IMAGE, 2, generator=generator) * 0.2 + 0.05
        labels = torch.randint(1, NUM_CLASSES, (BOXES_PER_IMAGE,), generator=generator)
        out.append((labels.to(device), torch.cat((centres, sizes), 1).to(device)))
    return out


def _pixels(batch: int, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, *size, generator=generator).to(device)


def _detrkit(kind: str, batch: int, size: tuple[int, int], device, precision: str):
    from detrkit.config.build import build_criterion, build_model, build_postprocess
    from detrkit.config.load import load_config
    from detrkit.structures import ImageBatch, Target

    cfg = load_config(PRESETS[kind]).model
    model = build_model(cfg, NUM_CLASSES).to(device)
    criterion = build_criterion(cfg, NUM_CLASSES)
    postprocess = build_postprocess(cfg)
    mask = torch.zeros(batch, *size, dtype=torch.bool, device=device)
    sizes = torch.tensor([list(size)] * batch, device=device)
    images = ImageBatch(_pixels(batch, size, device), mask, sizes)
    targets = [Target(labels, boxes) for labels, boxes in _targets(batch, device)]
    optimizer = make_adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            output = model(images, targets)
        criterion(output, targets).total.backward()  # fp32 loss, as detrkit's engine
        optimizer.step()

    @torch.inference_mode()
    def infer():
        model.eval()
        with autocast(device, precision):
            postprocess(model(images).for_inference(), sizes)

    return train, infer


def _resnet50_config(out_features: list[str]):
    from transformers import ResNetConfig

    return ResNetConfig(
        depths=[3, 4, 6, 3],
        hidden_sizes=[256, 512, 1024, 2048],
        layer_type="bottleneck",
        out_features=out_features,
    )


def _train_resnet_stages(backbone: torch.nn.Module) -> None:
    """Train ResNet stages 2-4 as the originals and detrkit do. transformers means to, but its
    name filter ("stage.1") never matches its own parameter names ("stages.1"), which leaves
    the whole backbone frozen and skips its backward pass."""
    for name, parameter in backbone.named_parameters():
        if any(f"stages.{i}." in name for i in (1, 2, 3)):
            parameter.requires_grad_(True)


def _transformers_model(kind: str) -> torch.nn.Module:
    if kind == "detr":
        from transformers import DetrConfig, DetrForObjectDetection

        config = DetrConfig(
            backbone_config=_resnet50_config(["stage4"]),
            num_queries=100,
            d_model=256,
            encoder_layers=6,
            decoder_layers=6,
            encoder_ffn_dim=2048,
            decoder_ffn_dim=2048,
            encoder_attention_heads=8,
            decoder_attention_heads=8,
            num_labels=NUM_CLASSES,
            auxiliary_loss=True,
            # The original (and detrkit's preset) applies dropout 0.1 after attention, on the
            # attention probabilities and inside the FFN; transformers defaults the last two to 0.
            dropout=0.1,
            activation_dropout=0.1,
            attention_dropout=0.1,
        )
        return DetrForObjectDetection(config)
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    config = DeformableDetrConfig(
        backbone_config=_resnet50_config(["stage2", "stage3", "stage4"]),
        num_queries=300,
        d_model=256,
        encoder_layers=6,
        decoder_layers=6,
        encoder_ffn_dim=1024,
        decoder_ffn_dim=1024,
        num_feature_levels=4,
        two_stage=True,
        with_box_refine=True,
        num_labels=NUM_CLASSES,
        # The original (and detrkit's preset) applies dropout 0.1 after attention, inside the
        # FFN and on the decoder's self-attention probabilities; transformers splits these into
        # three settings and defaults the last two to 0.
        dropout=0.1,
        activation_dropout=0.1,
        attention_dropout=0.1,
        disable_custom_kernels=True,
    )
    return DeformableDetrForObjectDetection(config)


def _transformers(kind: str, batch: int, size: tuple[int, int], device, precision: str):
    model = _transformers_model(kind).to(device)
    _train_resnet_stages(model.model.backbone)
    pixels = _pixels(batch, size, device)
    pixel_mask = torch.ones(batch, *size, dtype=torch.long, device=device)
    labels = [{"class_labels": lab, "boxes": box} for lab, box in _targets(batch, device)]
    optimizer = make_adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = model(pixel_values=pixels, pixel_mask=pixel_mask, labels=labels).loss
        loss.backward()
        optimizer.step()

    @torch.inference_mode()
    def infer():
        model.eval()
        with autocast(device, precision):
            model(pixel_values=pixels, pixel_mask=pixel_mask)

    return train, infer


def _build(impl: str, args, batch: int, mode: str):
    torch.manual_seed(0)
    build = _detrkit if impl == "detrkit" else _transformers
    train, infer = build(args.model, batch, tuple(args.size), args.device, args.precision)
    return train if mode == "train" else infer


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _flops(step) -> tuple[int, dict[str, int]]:
    """FLOPs of one call of ``step`` (forward + backward) and their split by op."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    by_op = {str(op): count for op, count in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), by_op


def _peak_mb(impl: str, args, batch: int, mode: str) -> float:
    argv = ["--child", impl, str(batch), mode, "--model", args.model, *common_argv(args)]
    argv += ["--size", *map(str, args.size)]
    return run_child(__file__, argv)["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--model", choices=tuple(PRESETS), default="deformable")
    parser.add_argument("--size", type=int, nargs=2, default=[640, 640], metavar=("H", "W"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--modes", nargs="+", default=["train", "inference"], choices=["train", "inference"]
    )
    parser.add_argument("--flops", action="store_true", help="achieved FLOP/s of detrkit's step")
    parser.add_argument(
        "--child", nargs=3, metavar=("IMPL", "BATCH", "MODE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    check_device(args.device)
    if args.child:
        impl, batch, mode = args.child
        step = _build(impl, args, int(batch), mode)
        print_child_result({"peak_mb": step_peak_mb(step, args.device)})
        return

    import transformers

    height, width = args.size
    print(
        header(
            args.device,
            args.precision,
            transformers=transformers.__version__,
            model=f"{TITLES[args.model]} (detrkit preset {PRESETS[args.model]})",
            image=f"{height}x{width}",
            repeats=f"{args.repeats} (median, interleaved, after {args.warmup} warm-up)",
        ),
        flush=True,
    )
    flops_rows, failures = [], []
    for mode in args.modes:
        rows = []
        for batch in args.batch_sizes:
            steps = {}
            for impl in IMPLEMENTATIONS:
                try:  # the first warm-up step; an implementation that fails reads n/a
                    steps[impl] = _build(impl, args, batch, mode)
                    steps[impl]()
                except Exception as error:  # reported below the tables
                    steps.pop(impl, None)
                    failures.append(f"{impl} {mode} batch {batch}: {type(error).__name__}: {error}")
            warmup = max(args.warmup - 1, 0)
            seconds = medians(interleaved_times(steps, args.device, args.repeats, warmup))
            if args.flops and mode == "train" and "detrkit" in steps:
                total, by_op = _flops(steps["detrkit"])
                flops_rows.append((batch, total, by_op, seconds["detrkit"]))
            del steps
            _release(args.device)
            peak = {}
            for impl in seconds:
                try:
                    peak[impl] = _peak_mb(impl, args, batch, mode)
                except RuntimeError as error:
                    failures.append(f"peak memory of {impl} {mode} batch {batch}: {error}")
            rows.append(_row(batch, seconds, peak))
        print(f"\n{mode} (seconds per step of the whole batch; peak MiB beyond weights/inputs)\n")
        columns = ["batch", "detrkit s", "transformers s", "speed-up", "detrkit img/s"]
        columns += ["transformers img/s", "detrkit peak MiB", "transformers peak MiB"]
        columns += ["memory ratio"]
        print(markdown_table(columns, rows), flush=True)
    for failure in failures:
        print(f"\nfailed: {failure[-2000:]}")
    if args.flops:
        _print_flops(args, flops_rows)


def _row(batch: int, seconds: dict[str, float], peak: dict[str, float]) -> list[str]:
    """One table row; what an implementation failed to give reads n/a."""

    def cell(values, impl, text):
        return text(values[impl]) if impl in values else "n/a"

    row = [str(batch)]
    row += [cell(seconds, impl, lambda v: f"{v:.3f}") for impl in IMPLEMENTATIONS]
    both = all(impl in seconds for impl in IMPLEMENTATIONS)
    row.append(f"{seconds['transformers'] / seconds['detrkit']:.2f}x" if both else "n/a")
    row += [cell(seconds, impl, lambda v: f"{batch / v:.2f}") for impl in IMPLEMENTATIONS]
    row += [cell(peak, impl, lambda v: f"{v:.0f}") for impl in IMPLEMENTATIONS]
    both = all(impl in peak for impl in IMPLEMENTATIONS)
    ratio = peak["detrkit"] / max(peak["transformers"], 1e-9) if both else None
    row.append("n/a" if ratio is None else f"{ratio:.2f}")
    return row


def _print_flops(args, flops_rows) -> None:
    if not flops_rows:
        print("\n--flops counts the train step: add train to --modes")
        return
    peak = matmul_peak_flops(args.device, args.precision)
    print(
        f"\nFLOPs of one detrkit train step (forward + backward, FlopCounterMode), achieved "
        f"against this device's {args.precision} torch.mm peak ({peak / 1e9:.1f} GFLOP/s)\n"
    )
    rows = [
        [
            batch,
            f"{total / 1e9:.1f}",
            f"{seconds:.3f}",
            f"{total / seconds / 1e9:.1f}",
            f"{100 * total / seconds / peak:.1f}%",
        ]
        for batch, total, _, seconds in flops_rows
    ]
    columns = ["batch", "GFLOP / step", "step s", "achieved GFLOP/s", "of matmul peak"]
    print(markdown_table(columns, rows))
    batch, total, by_op, _ = flops_rows[0]
    top = sorted(by_op.items(), key=lambda item: -item[1])[:6]
    print(f"\nCounted FLOPs by op, batch {batch}\n")
    print(
        markdown_table(
            ["op", "GFLOP", "share"],
            [[op, f"{count / 1e9:.1f}", f"{100 * count / total:.1f}%"] for op, count in top],
        )
    )


if __name__ == "__main__":
    main()
