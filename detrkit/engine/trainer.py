# SPDX-License-Identifier: Apache-2.0
"""The training loop: epochs of accumulated steps, LR schedule, logging, checkpoints, evaluation."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from detrkit.config.build import build_criterion, build_model, build_postprocess, build_tta
from detrkit.config.load import dump_config
from detrkit.config.schema import ExperimentConfig
from detrkit.config.validate import config_to_dict
from detrkit.data.labels import LabelMap
from detrkit.data.samplers import resumable_sampler
from detrkit.engine import distributed as dist
from detrkit.engine.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from detrkit.engine.compile import compile_regions
from detrkit.engine.data import eval_loader, open_split, train_loader
from detrkit.engine.ema import WeightEMA
from detrkit.engine.evaluate import evaluate
from detrkit.engine.logging import JsonlWriter
from detrkit.engine.optim import build_lr_scheduler, build_optimizer, describe_param_groups
from detrkit.engine.precision import Precision
from detrkit.engine.state import (
    CHECKPOINT_PATTERN,
    checkpoint_path,
    git_sha,
    restore_rng_state,
    rng_state,
    seed_everything,
)
from detrkit.engine.step import train_step
from detrkit.errors import UserError

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1


class TrainingDiverged(UserError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class LoopState:
    """Counters saved in checkpoints: the next epoch to run and the position inside it."""

    epoch: int = 0
    step: int = 0
    steps_in_epoch: int = 0
    nonfinite_streak: int = 0


class Trainer:
    """Builds everything from the config and runs ``fit``.

    Args:
        cfg: the experiment.
        output_dir: run folder (config.yaml, metrics.jsonl, checkpoints/, results).
        resume: checkpoint to continue exactly (weights, optimiser, schedule, RNG, data order).
        init_from: checkpoint whose weights initialise the model (everything else starts fresh).
        allow_partial: with ``init_from``, skip tensors of the wrong shape instead of failing.
        device: "cpu", "cuda", "mps" or None for the best available.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        output_dir: Path,
        *,
        resume: Path | None = None,
        init_from: Path | None = None,
        allow_partial: bool = False,
        device: str | None = None,
    ) -> None:
        self.cfg, self.output_dir = cfg, Path(output_dir)
        self.ctx = dist.init_distributed(device)
        seed_everything(cfg.train.seed + self.ctx.rank)
        self.train_set = open_split(cfg.data, cfg.data.train_split, train=True)
        self.label_map: LabelMap = self.train_set.label_map
        self.val_set = open_split(
            cfg.data, cfg.data.val_split, train=False, label_map=self.label_map
        )
        self.num_classes = self.label_map.num_classes
        if cfg.model.num_classes not in (None, self.num_classes):
            raise UserError(
                f"model.num_classes={cfg.model.num_classes} but {cfg.data.root} has "
                f"{self.num_classes} categories; remove the key to take it from the data"
            )
        self.model = build_model(cfg.model, self.num_classes).to(self.ctx.device)
        self.criterion = build_criterion(
            cfg.model, self.num_classes, reduce_num_boxes=dist.all_reduce_mean
        )
        self.postprocess = build_postprocess(cfg.model)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.train)
        self.precision = Precision(cfg.train.precision, self.ctx.device.type)
        decay = cfg.train.ema_decay
        self.ema = WeightEMA(self.model, decay) if decay is not None else None
        self.loader = train_loader(
            self.train_set,
            cfg.data,
            cfg.train.seed,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )
        self.loop = LoopState()
        self.last_table = ""
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.log = JsonlWriter(self.output_dir / "metrics.jsonl", self.ctx.is_main)
        if resume is None and any(self.checkpoint_dir.glob(CHECKPOINT_PATTERN)):
            raise UserError(
                f"{self.output_dir} already holds a run; pass --resume "
                f"{self.output_dir} to continue it or choose another --output-dir"
            )
        if init_from:
            self._init_from(init_from, allow_partial)
        if resume:
            self._resume(resume)
        if cfg.train.compile:
            compile_regions(self.model)
        self.ddp_model = self._wrap(self.model)
        logger.info(describe_param_groups(self.optimizer.param_groups))

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.ctx.distributed:
            return model
        cuda = self.ctx.device.type == "cuda"
        if cuda and self.cfg.model.backbone.norm == "bn":
            # Trainable BatchNorm statistics over the global batch, as the originals' SyncBN
            # (torch's SyncBatchNorm runs on CUDA only).
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.model = model
        return DistributedDataParallel(model, device_ids=[self.ctx.device.index] if cuda else None)

    @property
    def sampler(self):
        return resumable_sampler(self.loader)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        scaler = self.precision.scaler
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "rng": rng_state(),
            "loop": vars(self.loop).copy(),
            "ema": self.ema.state_dict() if self.ema else None,
        }

    def meta(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "config": config_to_dict(self.cfg),
            "label_map": self.label_map.to_dict(),
            "epoch": self.loop.epoch,
            "step": self.loop.step,
            "git_sha": git_sha(),
        }

    def save(self) -> Path | None:
        """Write a checkpoint of the current state (rank 0) and prune old ones."""
        path = checkpoint_path(self.checkpoint_dir, self.loop.step)
        if self.ctx.is_main:
            save_checkpoint(
                path, model=self.model.state_dict(), state=self.state(), meta=self.meta()
            )
            prune_checkpoints(self.checkpoint_dir, CHECKPOINT_PATTERN, self.cfg.train.keep_last)
        dist.barrier()
        return path

    def _resume(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
        saved_map = LabelMap.from_dict(checkpoint.meta["label_map"])
        if saved_map != self.label_map:
            raise UserError(
                f"{path} was trained on other categories than {self.cfg.data.root}; "
                "use --init-from to fine-tune on a new label set"
            )
        self.model.load_state_dict(checkpoint.model, strict=True)
        state = checkpoint.state
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler and state["scaler"]:
            self.precision.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if not state.get("ema"):
                raise UserError(
                    f"{path} has no EMA weights but train.ema_decay is set; resume with the "
                    "config it was trained with, or start from it with --init-from"
                )
            self.ema.load_state_dict(state["ema"])
        self.loop = LoopState(**state["loop"])
        restore_rng_state(state["rng"])
        if self.ctx.is_main:  # a killed run leaves its half-written checkpoint behind
            for stale in self.checkpoint_dir.glob(".checkpoint_*.tmp"):
                stale.unlink(missing_ok=True)
        # Records after this line supersede those of the interrupted run for the same steps.
        self.log.write({"kind": "resume", "epoch": self.loop.epoch, "step": self.loop.step})
        logger.info("resumed from %s at epoch %d, step %d", path, self.loop.epoch, self.loop.step)

    def _init_from(self, path: Path, allow_partial: bool) -> None:
        from detrkit.engine.init import load_weights_report

        report = load_weights_report(self.model, load_checkpoint(path).model, allow_partial)
        logger.info("initialised from %s: %s", path, report)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict | None:
        """Train to ``train.epochs`` (or ``train.max_steps``); returns the last eval metrics."""
        if self.ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.output_dir / "config.yaml")
        metrics = None
        done = self.loop.epoch >= self.cfg.train.epochs or self._step_limit_reached()
        while not done:
            self._train_epoch()
            finished = self._epoch_finished()
            if finished:
                self.scheduler.step()
                self.loop.epoch += 1
                self.loop.steps_in_epoch = 0
            self.save()
            done = self.loop.epoch >= self.cfg.train.epochs or self._step_limit_reached()
            every = self.cfg.train.eval_every
            if done or (finished and every > 0 and self.loop.epoch % every == 0):
                metrics = self.evaluate()
        return metrics

    def _step_limit_reached(self) -> bool:
        return self.cfg.train.max_steps is not None and self.loop.step >= self.cfg.train.max_steps

    def _steps_per_epoch(self) -> int:
        return (
            self.sampler.num_samples // self.cfg.data.batch_size // self.cfg.train.grad_accum_steps
        )

    def _epoch_finished(self) -> bool:
        return self.loop.steps_in_epoch >= self._steps_per_epoch()

    def _train_epoch(self) -> None:
        accum = self.cfg.train.grad_accum_steps
        self.sampler.set_epoch(self.loop.epoch)
        self.sampler.skip(self.loop.steps_in_epoch * accum * self.cfg.data.batch_size)
        batches = iter(self.loader)
        remaining = self._steps_per_epoch() - self.loop.steps_in_epoch
        progress = tqdm(
            total=remaining,
            disable=not self.ctx.is_main,
            leave=False,
            desc=f"epoch {self.loop.epoch}",
            dynamic_ncols=True,
        )
        for _ in range(remaining):
            micro = [self._to_device(b) for b in itertools.islice(batches, accum)]
            self._one_step(micro, progress)
            if self._step_limit_reached():
                break
        progress.close()

    def _to_device(self, batch):
        images, targets = batch
        return images.to(self.ctx.device), [t.to(self.ctx.device) for t in targets]

    def _one_step(self, micro, progress) -> None:
        started = time.perf_counter()
        self.ddp_model.train()
        result = train_step(
            self.ddp_model,
            self.criterion,
            micro,
            self.optimizer,
            self.precision,
            self.cfg.train.clip_max_norm or None,
            all_finite=dist.all_true,
        )
        self.loop.step += 1
        self.loop.steps_in_epoch += 1
        if self.ema is not None and result.updated:
            self.ema.update(self.model)
        self._check_finite(result, micro)
        progress.set_postfix(loss=f"{result.loss:.3f}")
        progress.update()
        if self.loop.step % self.cfg.train.log_every == 0 or self.loop.step == 1:
            self.log.write(
                {
                    "kind": "train",
                    "epoch": self.loop.epoch,
                    "step": self.loop.step,
                    "loss": dist.mean_over_ranks(result.loss),
                    "grad_norm": result.grad_norm,
                    "lr": self.optimizer.param_groups[0]["lr"],  # the default group
                    "seconds": time.perf_counter() - started,
                }
            )
        every = self.cfg.train.checkpoint_every
        if every and self.loop.step % every == 0 and not self._epoch_finished():
            self.save()

    def _check_finite(self, result, micro) -> None:
        if result.finite:
            self.loop.nonfinite_streak = 0
            return
        self.loop.nonfinite_streak += 1
        image_ids = [t.image_id for _, targets in micro for t in targets]
        logger.warning(
            "step %d: non-finite loss %.4g or grad norm %.4g; step skipped (images %s)",
            self.loop.step,
            result.loss,
            result.grad_norm,
            image_ids,
        )
        if self.loop.nonfinite_streak >= self.cfg.train.max_nonfinite_steps:
            raise TrainingDiverged(
                f"{self.loop.nonfinite_streak} consecutive non-finite steps (last images "
                f"{image_ids}); lower train.lr, check the data with the images named above, or "
                "use --precision fp32"
            )

    def evaluate(self) -> dict:
        """COCO evaluation on the val split; writes results JSON and logs the table (rank 0)."""
        from detrkit.engine.report import report_eval

        loader = eval_loader(
            self.val_set, self.cfg.data, rank=self.ctx.rank, world_size=self.ctx.world_size
        )
        metrics, results = evaluate(
            self.ema.module if self.ema else self.model,
            self.postprocess,
            loader,
            self.val_set.coco_json,
            self.label_map.category_ids,
            self.ctx.device,
            self.precision,
            build_tta(self.cfg),
        )
        if self.ctx.is_main:
            report_eval(metrics, results, self.output_dir, self.loop, self.log)
        self.last_table = metrics.format_table()
        return metrics.as_dict()
