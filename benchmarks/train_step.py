# SPDX-License-Identifier: Apache-2.0
"""Whole-model benchmark: detrkit Deformable DETR vs Hugging Face transformers, same config.

Both models are Deformable DETR, two-stage + iterative refinement, ResNet-50, 300 queries,
91 classes, random weights, one 640x640 image per sample. transformers runs its pure-PyTorch
deformable attention (``disable_custom_kernels=True``); nothing is downloaded
(``HF_HUB_OFFLINE=1``). Each (implementation, batch, mode) runs in a fresh subprocess; peak
memory is, on the CPU, the process's maximum RSS minus its RSS just before the first step (so
library imports and the model itself are not counted), and ``max_memory_allocated`` on CUDA.

    python benchmarks/train_step.py [--device cpu|cuda] [--repeats 3] [--batch-sizes 1 2]

Needs the ``bench`` extra (``pip install -e .[bench]``). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from detrkit.engine.optim import make_adamw

IMAGE_SIZE = 640
NUM_CLASSES = 91
BOXES_PER_IMAGE = 10


def _targets(batch: int, device):
    import torch

    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        centres = torch.rand(BOXES_PER_IMAGE, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(BOXES_PER_IMAGE, 2, generator=generator) * 0.2 + 0.05
        labels = torch.randint(1, NUM_CLASSES, (BOXES_PER_IMAGE,), generator=generator)
        out.append((labels.to(device), torch.cat((centres, sizes), 1).to(device)))
    return out


def _detrkit(batch: int, device):
    import torch

    from detrkit.config.build import build_criterion, build_model, build_postprocess
    from detrkit.config.load import load_config
    from detrkit.structures import ImageBatch, Target

    cfg = load_config("deformable_detr_r50_two_stage").model
    model = build_model(cfg, NUM_CLASSES).to(device)
    criterion = build_criterion(cfg, NUM_CLASSES)
    postprocess = build_postprocess(cfg)
    pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    mask = torch.zeros(batch, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool, device=device)
    sizes = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * batch, device=device)
    images = ImageBatch(pixels, mask, sizes)
    targets = [Target(labels, boxes) for labels, boxes in _targets(batch, device)]
    optimizer = make_adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        criterion(model(images, targets), targets).total.backward()
        optimizer.step()

    @torch.inference_mode()
    def infer():
        model.eval()
        postprocess(model(images).for_inference(), sizes)

    return train, infer


def _transformers(batch: int, device):
    import torch
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(
        depths=[3, 4, 6, 3],
        hidden_sizes=[256, 512, 1024, 2048],
        layer_type="bottleneck",
        out_features=["stage2", "stage3", "stage4"],
    )
    config = DeformableDetrConfig(
        backbone_config=backbone,
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
    model = DeformableDetrForObjectDetection(config).to(device)
    # Train ResNet stages 2-4 as the original and detrkit do. transformers means to, but its
    # name filter ("stage.1") never matches its own parameter names ("stages.1"), which leaves
    # the whole backbone frozen and skips its backward pass.
    for name, parameter in model.model.backbone.named_parameters():
        if any(f"stages.{i}." in name for i in (1, 2, 3)):
            parameter.requires_grad_(True)
    pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    pixel_mask = torch.ones(batch, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.long, device=device)
    labels = [{"class_labels": lab, "boxes": box} for lab, box in _targets(batch, device)]
    optimizer = make_adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        model(pixel_values=pixels, pixel_mask=pixel_mask, labels=labels).loss.backward()
        optimizer.step()

    @torch.inference_mode()
    def infer():
        model.eval()
        model(pixel_values=pixels, pixel_mask=pixel_mask)

    return train, infer


def _run_one(impl: str, batch: int, mode: str, device_name: str, repeats: int) -> dict:
    import torch

    device = torch.device(device_name)
    torch.manual_seed(0)
    train, infer = (_detrkit if impl == "detrkit" else _transformers)(batch, device)
    step = train if mode == "train" else infer
    resident_mb = _resident_mb()  # model, inputs and imported libraries
    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        # Memory the steps needed beyond what was resident before them (imports excluded).
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - resident_mb
    return {
        "seconds": statistics.median(times),
        "peak_mb": peak_mb,
        "threads": torch.get_num_threads(),
    }


def _resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _subprocess(impl: str, batch: int, mode: str, args) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [
        sys.executable,
        __file__,
        "--child",
        impl,
        str(batch),
        mode,
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
    ]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} batch {batch} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--modes", nargs="+", default=["train", "inference"], choices=["train", "inference"]
    )
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "BATCH", "MODE"))
    args = parser.parse_args()
    if args.child:
        impl, batch, mode = args.child
        print(json.dumps(_run_one(impl, int(batch), mode, args.device, args.repeats)))
        return
    rows = []
    for mode in args.modes:
        for batch in args.batch_sizes:
            ours = _subprocess("detrkit", batch, mode, args)
            theirs = _subprocess("transformers", batch, mode, args)
            rows.append((mode, batch, ours, theirs))
    threads = rows[0][2]["threads"]
    print(
        f"Deformable DETR two-stage + refine, R50, {IMAGE_SIZE}x{IMAGE_SIZE}, "
        f"device {args.device}, {threads} threads, median of {args.repeats}\n"
    )
    print(
        "| step | batch | detrkit s | transformers s | speed-up | detrkit step MB | "
        "transformers step MB | memory ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode, batch, ours, theirs in rows:
        print(
            f"| {mode} | {batch} | {ours['seconds']:.3f} | {theirs['seconds']:.3f} | "
            f"{theirs['seconds'] / ours['seconds']:.2f}x | {ours['peak_mb']:.0f} | "
            f"{theirs['peak_mb']:.0f} | {ours['peak_mb'] / theirs['peak_mb']:.2f} |"
        )


if __name__ == "__main__":
    main()
