# SPDX-License-Identifier: Apache-2.0
"""The training loop: epochs of accumulated steps, LR schedule, logging, checkpoints, evaluation."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import replace
from pathlib import Path

from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from detrkit.config.build import build_criterion, build_model, build_postprocess, build_tta
from detrkit.config.load import dump_config
from detrkit.config.schema import ExperimentConfig
from detrkit.config.validate import config_to_dict
from detrkit.data.coco import CocoDetection
from detrkit.data.labels import LabelMap
from detrkit.data.samplers import resumable_sampler
from detrkit.engine import distributed as dist
from detrkit.engine.checkpoint import (
    CheckpointMeta,
    TrainingState,
    prune_checkpoints,
    save_checkpoint,
)
from detrkit.engine.compile import compile_regions
from detrkit.engine.data import eval_loader, open_split, train_loader
from detrkit.engine.ema import WeightEMA
from detrkit.engine.evaluate import evaluate
from detrkit.engine.init import init_from_checkpoint
from detrkit.engine.logging import JsonlWriter
from detrkit.engine.meter import LossMeter
from detrkit.engine.optim import build_lr_scheduler, build_optimizer, describe_param_groups
from detrkit.engine.precision import Precision
from detrkit.engine.progress import Progress
from detrkit.engine.resume import read_resume_checkpoint, remove_stale_temp_files
from detrkit.engine.state import (
    CHECKPOINT_DIR,
    CHECKPOINT_PATTERN,
    EMA_FILE,
    MODEL_FILE,
    LoopState,
    checkpoint_path,
    git_sha,
    restore_rng_state,
    rng_state,
    seed_everything,
)
from detrkit.engine.step import StepResult, check_finite, train_step
from detrkit.engine.summary import (
    EpochSummary,
    EpochTally,
    display_epoch,
    summarize_run,
    warn_random_backbone,
)
from detrkit.engine.tensorboard import TensorBoardLog, tensorboard_wanted
from detrkit.errors import UserError

logger = logging.getLogger(__name__)


class Trainer:
    """Builds what it is not given from the config and runs ``fit``.

    Args:
        cfg: the experiment.
        output_dir: run folder (config.yaml, metrics.jsonl, checkpoints/, results).
        resume: checkpoint to continue exactly (weights, optimiser, schedule, RNG, data order).
        init_from: checkpoint whose weights initialise the model (everything else starts fresh).
        allow_partial: with ``init_from``, skip tensors of the wrong shape instead of failing.
        device: "cpu", "cuda", "mps" or None for the best available.
        model: a built detector (moved to the device) instead of ``build_model(cfg.model)``; it
            takes images and returns the outputs ``criterion`` expects.
        criterion: a built loss ``(outputs, targets) -> LossOutput`` (``.total``, ``.terms``)
            instead of ``build_criterion(cfg.model)``.
        train_set: an opened training split (``open_split``'s result: ``label_map``, items of
            (image, target)) instead of ``cfg.data.train_split``; the label map and number of
            classes come from it.
        val_set: an opened validation split (with ``coco_json``) instead of
            ``cfg.data.val_split``.
        optimizer: a built optimiser over ``model``'s parameters instead of
            ``build_optimizer(model, cfg.train)``; the LR schedule is still built on it.

    Everything not given is built from ``cfg`` as before; the schedule, precision, EMA, data
    loader and postprocessor always are.
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
        model: nn.Module | None = None,
        criterion: nn.Module | None = None,
        train_set: CocoDetection | None = None,
        val_set: CocoDetection | None = None,
        optimizer: Optimizer | None = None,
    ) -> None:
        self.cfg, self.output_dir = cfg, Path(output_dir)
        self.ctx = dist.init_distributed(device)
        self.use_tensorboard = tensorboard_wanted(cfg.train.tensorboard)  # fails fast if missing
        # Before the parts built here, so a run built from the config alone is reproducible.
        seed_everything(cfg.train.seed + self.ctx.rank)
        self._open_data(train_set, val_set)
        self._build_model(model, criterion, optimizer)
        self.loop = LoopState()
        self.last_table = ""
        self.checkpoint_dir = self.output_dir / CHECKPOINT_DIR
        if resume is None and any(self.checkpoint_dir.glob(CHECKPOINT_PATTERN)):
            raise UserError(
                f"{self.output_dir} already holds a run; pass --resume "
                f"{self.output_dir} to continue it or choose another --output-dir"
            )
        self.log = JsonlWriter(self.output_dir / "metrics.jsonl", self.ctx.is_main)
        self.meter = LossMeter()
        self.tensorboard = TensorBoardLog(self.output_dir, enabled=False)  # opened by fit
        self._interval_started = time.perf_counter()
        if init_from:
            self._init_from(init_from, allow_partial)
        if resume:
            self._resume(resume)
        if cfg.train.compile:
            compile_regions(self.model)
        self.ddp_model = self._wrap(self.model)
        if self.ctx.is_main:
            logger.info(summarize_run(self, self._steps_per_epoch()).format())
            logger.info(describe_param_groups(self.optimizer.param_groups))
            if resume is None and init_from is None:  # otherwise the checkpoint has the weights
                warn_random_backbone(cfg)

    def _open_data(self, train_set: CocoDetection | None, val_set: CocoDetection | None) -> None:
        """The splits (given ones as they are), the label map and the number of classes."""
        cfg = self.cfg
        if train_set is None:
            train_set = open_split(cfg.data, cfg.data.train_split, train=True)
        self.train_set = train_set
        self.label_map: LabelMap = self.train_set.label_map
        if val_set is None:
            val_set = open_split(
                cfg.data, cfg.data.val_split, train=False, label_map=self.label_map
            )
        self.val_set = val_set
        self.num_classes = self.label_map.num_classes
        if cfg.model.num_classes not in (None, self.num_classes):
            raise UserError(
                f"model.num_classes={cfg.model.num_classes} but {cfg.data.root} has "
                f"{self.num_classes} categories; remove the key to take it from the data"
            )

    def _build_model(
        self,
        model: nn.Module | None,
        criterion: nn.Module | None,
        optimizer: Optimizer | None,
    ) -> None:
        """Model, criterion, postprocessor, optimiser, schedule, precision, EMA, data loader;
        the given parts are used as they are."""
        cfg = self.cfg
        if model is None:
            model = build_model(cfg.model, self.num_classes)
        # Module.to moves the parameters in place, so an optimiser given over them stays valid.
        self.model = model.to(self.ctx.device)
        if criterion is None:
            criterion = build_criterion(
                cfg.model, self.num_classes, reduce_num_boxes=dist.all_reduce_mean
            )
        self.criterion = criterion
        self.postprocess = build_postprocess(cfg.model)
        if optimizer is None:
            optimizer = build_optimizer(self.model, cfg.train)
        self.optimizer = optimizer
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
    def state(self) -> TrainingState:
        """Everything besides the weights that exact resume restores."""
        scaler = self.precision.scaler
        return TrainingState(
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            rng=rng_state(),
            loop=replace(self.loop),
            scaler=scaler.state_dict() if scaler else None,
            ema=self.ema.state_dict() if self.ema else None,
        )

    def meta(self, *, ema: bool = False) -> CheckpointMeta:
        """Config, label map and counters written into every checkpoint file of the run."""
        return CheckpointMeta(
            config=config_to_dict(self.cfg),
            label_map=self.label_map,
            epoch=self.loop.epoch,
            step=self.loop.step,
            git_sha=git_sha(),
            ema=ema,
        )

    def save(self) -> Path | None:
        """Write (rank 0) the training state to ``checkpoints/checkpoint_<step>.safetensors``,
        keeping the last ``train.keep_last``, and the weights to ``model.safetensors`` (and
        ``model_ema.safetensors``); returns the training state's path."""
        path = checkpoint_path(self.checkpoint_dir, self.loop.step)
        if self.ctx.is_main:
            weights, meta = self.model.state_dict(), self.meta()
            save_checkpoint(path, model=weights, meta=meta, training=self.state())
            save_checkpoint(self.output_dir / MODEL_FILE, model=weights, meta=meta)
            if self.ema is not None:
                save_checkpoint(
                    self.output_dir / EMA_FILE,
                    model=self.ema.module.state_dict(),
                    meta=self.meta(ema=True),
                )
            prune_checkpoints(self.checkpoint_dir, CHECKPOINT_PATTERN, self.cfg.train.keep_last)
        dist.barrier()
        return path

    def _resume(self, path: Path) -> None:
        checkpoint = read_resume_checkpoint(
            path, self.label_map, self.cfg.data.root, needs_ema=self.ema is not None
        )
        state = checkpoint.training
        self.model.load_state_dict(checkpoint.model, strict=True)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if self.precision.scaler and state.scaler:
            self.precision.scaler.load_state_dict(state.scaler)
        if self.ema is not None:
            self.ema.load_state_dict(state.ema)
        self.loop = state.loop
        restore_rng_state(state.rng)
        if self.ctx.is_main:
            remove_stale_temp_files(self.checkpoint_dir, self.output_dir)
        epoch = display_epoch(self.loop.epoch, self.loop.steps_in_epoch)
        # Records after this line supersede those of the interrupted run for the same steps.
        self.log.write({"kind": "resume", "epoch": epoch, "step": self.loop.step})
        logger.info("resumed from %s at epoch %d, step %d", path, epoch, self.loop.step)

    def _init_from(self, path: Path, allow_partial: bool) -> None:
        found, report = init_from_checkpoint(self.model, path, allow_partial, self.label_map)
        logger.info("initialised from %s: %s", found, report.format())

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict | None:
        """Train to ``train.epochs`` (or ``train.max_steps``); returns the last eval metrics."""
        if self.ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.output_dir / "config.yaml")
        enabled = self.ctx.is_main and self.use_tensorboard
        self.tensorboard = TensorBoardLog(self.output_dir, enabled)
        try:
            return self._fit()
        finally:
            self.tensorboard.close()

    def _fit(self) -> dict | None:
        metrics = None
        self._interval_started = time.perf_counter()
        done = self.loop.epoch >= self.cfg.train.epochs or self._step_limit_reached()
        while not done:
            summary = self._train_epoch()
            finished = self._epoch_finished()
            if finished:
                self._report_epoch(summary)
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

    def _train_epoch(self) -> EpochSummary:
        """Run the rest of the current epoch (or up to ``train.max_steps``)."""
        accum = self.cfg.train.grad_accum_steps
        self.sampler.set_epoch(self.loop.epoch)
        self.sampler.skip(self.loop.steps_in_epoch * accum * self.cfg.data.batch_size)
        batches = iter(self.loader)
        remaining = self._steps_per_epoch() - self.loop.steps_in_epoch
        tally = EpochTally(self.loop.epoch + 1, self.cfg.train.epochs, self.ctx.world_size)
        # No plain progress lines: the log line every train.log_every steps is the progress.
        bar = Progress(remaining, tally.desc, every=1, enabled=self.ctx.is_main, plain_lines=False)
        with bar:
            for _ in range(remaining):
                micro = [self._to_device(b) for b in itertools.islice(batches, accum)]
                result = self._one_step(micro)
                tally.add(result, sum(len(targets) for _, targets in micro))
                bar.update(f"loss {result.loss:.3f}")
                if self._step_limit_reached():
                    break
            self._flush_log()  # the epoch's (or the run's) last, partial interval
        return tally.summary(self.optimizer.param_groups[0]["lr"])

    def _report_epoch(self, summary: EpochSummary) -> None:
        if self.ctx.is_main:
            logger.info(summary.format())
        self.log.write(summary.record(self.loop.step))

    def _to_device(self, batch):
        images, targets = batch
        return images.to(self.ctx.device), [t.to(self.ctx.device) for t in targets]

    def _one_step(self, micro) -> StepResult:
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
        image_ids = [t.image_id for _, targets in micro for t in targets]
        check_finite(result, self.loop, image_ids, self.cfg.train.max_nonfinite_steps)
        self.meter.add(result, time.perf_counter() - started)
        if self.loop.step % self.cfg.train.log_every == 0 or self.loop.step == 1:
            self._flush_log()
        every = self.cfg.train.checkpoint_every
        if every and self.loop.step % every == 0 and not self._epoch_finished():
            self.save()
        return result

    def _flush_log(self) -> None:
        """One record of the interval's means: metrics.jsonl, TensorBoard and the console.

        Every rank calls it at the same steps: the means over ranks are one collective.
        """
        if not self.meter.steps:
            return
        stats = self.meter.flush(dist.all_reduce_mean, self.ctx.device)
        now = time.perf_counter()
        wall, self._interval_started = (now - self._interval_started) / stats.steps, now
        lr = self.optimizer.param_groups[0]["lr"]  # the default group
        epoch = display_epoch(self.loop.epoch, self.loop.steps_in_epoch)
        scalars = {"loss": stats.loss, "grad_norm": stats.grad_norm, "lr": lr}
        self.log.write(
            {
                "kind": "train",
                "epoch": epoch,
                "step": self.loop.step,
                "steps": stats.steps,
                "skipped": stats.skipped,
                **scalars,
                "seconds": stats.seconds,  # mean per step of train_step alone
                **stats.terms,
            }
        )
        self.tensorboard.scalars("train", {**scalars, **stats.terms}, self.loop.step)
        if self.ctx.is_main:
            line = stats.console_line(
                epoch=epoch,
                epochs=self.cfg.train.epochs,
                step=self.loop.step,
                total_steps=self._total_steps(),
                lr=lr,
                wall=wall,
            )
            logger.info(line)

    def _total_steps(self) -> int:
        train = self.cfg.train
        total = train.epochs * self._steps_per_epoch()
        return total if train.max_steps is None else min(total, train.max_steps)

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
            show_progress=self.ctx.is_main,
            log_every=self.cfg.train.log_every,
        )
        epoch = display_epoch(self.loop.epoch, self.loop.steps_in_epoch)
        if self.ctx.is_main:
            report_eval(
                metrics, results, self.output_dir, epoch=epoch, step=self.loop.step, log=self.log
            )
        self.tensorboard.scalars("eval", metrics.as_dict(), self.loop.step)
        self.tensorboard.flush()
        self.last_table = metrics.format_table()
        return metrics.as_dict()
