# SPDX-License-Identifier: Apache-2.0
"""What the training log says once at start-up and at each epoch's end."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from detrkit.config.schema import ExperimentConfig, ModelConfig
from detrkit.engine.step import StepResult
from detrkit.schemes.registry import scheme_spec

if TYPE_CHECKING:
    from detrkit.engine.trainer import Trainer

logger = logging.getLogger(__name__)
NAMES_SHOWN = 5  # class names listed in the summary before "..."


def display_epoch(epoch: int, steps_in_epoch: int) -> int:
    """The 1-based epoch number users see, from the loop's 0-based counters.

    The loop's ``epoch`` is the index of the epoch being run, and moves on only once that epoch
    is finished; so mid-epoch it is the running epoch (index + 1), and right after an epoch
    it is the number of the epoch just finished (0 before any training).
    """
    return epoch + 1 if steps_in_epoch else epoch


def model_family(cfg: ModelConfig) -> str:
    """A readable name of the detector a config builds, e.g. "H-DETR (two-stage, iterative
    box refinement)"."""
    families = [scheme_spec(name).family or name for name in cfg.schemes]
    if families:
        family = " + ".join(families)
    elif cfg.decoder.attention == "smca":
        family = "SMCA-DETR"
    elif cfg.encoder.attention == "ms_deform":
        family = "Deformable DETR"
    else:
        family = "DETR"
    traits = []
    if cfg.queries.kind == "two_stage":
        traits.append("two-stage")
    elif cfg.queries.kind == "dino":
        traits.append("mixed query selection")
    if cfg.box_refine != "none":
        traits.append(f"{cfg.box_refine.replace('_', ' ')} box refinement")
    return f"{family} ({', '.join(traits)})" if traits else family


def describe_model(cfg: ModelConfig) -> str:
    """Family, backbone and size in one line."""
    weights = cfg.backbone.weights or "random init"
    return (
        f"{model_family(cfg)}, {cfg.backbone.name} backbone ({weights}), D={cfg.hidden_dim}, "
        f"{cfg.encoder.num_layers} encoder / {cfg.decoder.num_layers} decoder layers, "
        f"{cfg.num_queries} queries"
    )


@dataclass(frozen=True)
class RunSummary:
    """The facts of a training run worth reading before its first step.

    Attributes:
        model: ``describe_model`` of the config.
        parameters, trainable: parameter counts (all / with ``requires_grad``).
        train_images, val_images: dataset sizes.
        class_names: the label set, in label order.
        epochs, steps_per_epoch, max_steps: the schedule (``max_steps`` None = all epochs).
        lr, lr_backbone, lr_drop, lr_gamma: the learning rates and the StepLR drop.
        batch_size, world_size, grad_accum_steps: images per step = their product.
        device: e.g. "cuda:0 (NVIDIA H100)".
        precision: "fp32", "bf16" or "fp16".
        output_dir: the run folder.
        start_step: the step training starts after (0, or the resumed checkpoint's).
    """

    model: str
    parameters: int
    trainable: int
    train_images: int
    val_images: int
    class_names: tuple[str, ...]
    epochs: int
    steps_per_epoch: int
    max_steps: int | None
    lr: float
    lr_backbone: float
    lr_drop: int
    lr_gamma: float
    batch_size: int
    world_size: int
    grad_accum_steps: int
    device: str
    precision: str
    output_dir: Path
    start_step: int = 0

    @property
    def images_per_step(self) -> int:
        return self.batch_size * self.world_size * self.grad_accum_steps

    @property
    def total_steps(self) -> int:
        planned = self.epochs * self.steps_per_epoch
        return planned if self.max_steps is None else min(planned, self.max_steps)

    def format(self) -> str:
        """The multi-line block logged at start-up."""
        names = ", ".join(self.class_names[:NAMES_SHOWN])
        if len(self.class_names) > NAMES_SHOWN:
            names += ", ..."
        planned = self.epochs * self.steps_per_epoch
        limit = f", stopping at step {self.total_steps} (train.max_steps)"
        limit = limit if self.total_steps < planned else ""
        resumed = f", resuming after step {self.start_step}" if self.start_step else ""
        processes = f"{self.world_size} process" + ("es" if self.world_size > 1 else "")
        rows = {
            "model": self.model,
            "parameters": f"{self.parameters:,} ({self.trainable:,} trainable)",
            "data": f"{self.train_images} train / {self.val_images} val images, "
            f"{len(self.class_names)} classes: {names}",
            "schedule": f"{self.epochs} epochs x {self.steps_per_epoch} steps = {planned} "
            f"steps{limit}{resumed}",
            "lr": f"{self.lr:g} (backbone {self.lr_backbone:g}), x{self.lr_gamma:g} every "
            f"{self.lr_drop} epochs",
            "batch": f"{self.batch_size} per process x {processes} x "
            f"{self.grad_accum_steps} accumulated = {self.images_per_step} images per step",
            "device": f"{self.device}, {processes}",
            "precision": self.precision,
            "output": str(self.output_dir),
        }
        width = max(map(len, rows))
        return "training run\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows.items())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)`` on CUDA, the device's name elsewhere."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def warn_random_backbone(cfg: ExperimentConfig) -> None:
    """One warning that ``model.backbone.weights`` is null, and how to pass ImageNet weights.

    Call it only when a run starts fresh: a resumed run or one initialised with ``--init-from``
    takes its backbone from the checkpoint.
    """
    if cfg.model.backbone.weights:
        return
    logger.warning(
        "model.backbone.weights is null: the %s backbone starts from random weights, which "
        "converges far slower than ImageNet initialisation (fine for the tiny presets). To "
        "start from ImageNet weights, pass a local torchvision/timm file (.pth or "
        ".safetensors; nothing is downloaded): --set model.backbone.weights=PATH",
        cfg.model.backbone.name,
    )


@dataclass(frozen=True)
class EpochSummary:
    """One finished epoch, for the log line and the ``{"kind": "epoch"}`` record.

    Attributes:
        epoch, epochs: 1-based epoch number and the planned count.
        steps: steps run in this epoch by this process (fewer after a resume mid-epoch).
        loss: mean total loss over its finite steps (None if none was finite).
        seconds: wall-clock seconds of those steps.
        images: images seen by all processes.
        lr: the default group's learning rate during the epoch.
    """

    epoch: int
    epochs: int
    steps: int
    loss: float | None
    seconds: float
    images: int
    lr: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        loss = "n/a" if self.loss is None else f"{self.loss:.4f}"
        return (
            f"epoch {self.epoch}/{self.epochs} done: mean loss {loss}, {self.steps} steps in "
            f"{self.seconds:.1f} s ({self.images_per_second:.1f} images/s), lr {self.lr:.3g}"
        )

    def record(self, step: int) -> dict:
        """The JSONL record."""
        return {
            "kind": "epoch",
            "epoch": self.epoch,
            "step": step,
            "steps": self.steps,
            "loss": self.loss,
            "seconds": self.seconds,
            "images_per_second": self.images_per_second,
            "lr": self.lr,
        }


class EpochTally:
    """Adds up an epoch's steps on the host (from values the step has read anyway).

    Args:
        epoch, epochs: 1-based epoch number and the planned count.
        world_size: processes, each seeing as many images as this one.
    """

    def __init__(self, epoch: int, epochs: int, world_size: int) -> None:
        self.epoch, self.epochs, self.world_size = epoch, epochs, world_size
        self.steps = self.finite = self.images = 0
        self.loss_sum = 0.0
        self.started = time.perf_counter()

    @property
    def desc(self) -> str:
        return f"epoch {self.epoch}/{self.epochs}"

    def add(self, result: StepResult, images: int) -> None:
        self.steps, self.images = self.steps + 1, self.images + images
        if result.finite:
            self.finite, self.loss_sum = self.finite + 1, self.loss_sum + result.loss

    def summary(self, lr: float) -> EpochSummary:
        return EpochSummary(
            epoch=self.epoch,
            epochs=self.epochs,
            steps=self.steps,
            loss=self.loss_sum / self.finite if self.finite else None,
            seconds=time.perf_counter() - self.started,
            images=self.images * self.world_size,
            lr=lr,
        )


def summarize_run(trainer: Trainer, steps_per_epoch: int) -> RunSummary:
    """The start-up facts of ``trainer`` (after any resume, so the start step is right)."""
    cfg, train = trainer.cfg, trainer.cfg.train
    total, trainable = count_parameters(trainer.model)
    return RunSummary(
        model=describe_model(cfg.model),
        parameters=total,
        trainable=trainable,
        train_images=len(trainer.train_set),
        val_images=len(trainer.val_set),
        class_names=trainer.label_map.names,
        epochs=train.epochs,
        steps_per_epoch=steps_per_epoch,
        max_steps=train.max_steps,
        lr=train.lr,
        lr_backbone=train.lr_backbone,
        lr_drop=train.lr_drop,
        lr_gamma=train.lr_gamma,
        batch_size=cfg.data.batch_size,
        world_size=trainer.ctx.world_size,
        grad_accum_steps=train.grad_accum_steps,
        device=describe_device(trainer.ctx.device),
        precision=train.precision,
        output_dir=trainer.output_dir.resolve(),
        start_step=trainer.loop.step,
    )
