"""The training loop every stage shares (CAAE, SemFormer, AffinityNet, DeepLab).

A script supplies the model, its training dataset, the optimiser (``tools.training.optimizer``) and callables:

- ``step_fn(model, batch) -> {"loss": Tensor, <name>: Tensor, ...}``: forward and loss of one
  micro-batch (already on the device), run under autocast; every returned scalar is logged;
- ``evaluate(model) -> {"score": float, ...}`` (optional): checkpoint selection, called after each
  epoch on rank 0 with the unwrapped model in eval mode under ``torch.no_grad`` (other ranks wait);
- ``export_state(model) -> state dict`` (optional): what the next stage loads from
  ``ExperimentPaths.model(tag)`` (default ``model.state_dict()``; SemFormer drops its frozen AE).

The ``Trainer`` does the rest: DDP under torchrun, the lr schedule, mixed precision, gradient
accumulation, logs, best/last model selection and full checkpoints for ``--resume`` (written every
epoch and when SIGINT/SIGTERM stops the run after the current optimiser step), ``--max_steps`` short runs,
and the times of its steps, evaluations and saves for a measuring driver (``tools.cli.measurements``).
Checkpoints leave out the parameters of frozen submodules (``tools.training.frozen``: SemFormer's CAAE), which
the script rebuilds on resume as it built them at the start. Sketch of a script::

    parser = StageArgumentParser()               # tools.cli.arguments: @file.args, cross-flag checks
    add_dataset_args(parser)                     # tools.cli.stage_data: --dataset ... --experiments_dir
    add_engine_args(parser, batch_size=8, max_epoch=20, lr=0.005, wd=5e-4, num_workers=6,
                    tag="SemFormer@DeiT-S")
    config = TrainConfig.from_args(args := parser.parse_args())
    with training_processes(config.seed) as context:   # torchrun's group; identical initial weights
        model = build_model(...)                        # declares model.parameter_groups()
        groups = parameter_groups(model, config.lr, config.weight_decay)
        optimizer = build_optimizer(groups, config.lr, config.weight_decay, config.momentum, config.nesterov,
                                    config.optimizer)
        result = Trainer(config, context, model, optimizer, dataset, train_step, evaluate=evaluate,
                         script_args=vars(args)).fit()
    finish_training(result, config.tag, context.is_main, "python <next stage> ...")   # tools.cli.stage_data
"""
from __future__ import annotations

import signal
import sys
import threading
import time
import uuid
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset

from tools.artifacts.files import ArtifactError, remove_stale_temporaries
from tools.artifacts.locks import hold_until_exit
from tools.artifacts.model_card import mark_finished, write_model
from tools.artifacts.provenance import run_record
from tools.cli.arguments import UsageError
from tools.cli.exits import TrainingDiverged
from tools.cli.measurements import EVALUATION, SAVE, STEP, measured
from tools.cli.signals import handled
from tools.training.config import TrainConfig, checkpoint_interval
from tools.training.distributed import (DistContext, any_rank, any_ranks, destroy_distributed, gather_to_all,
                                        init_distributed, mean_over_ranks)
from tools.training.frozen import FrozenParts
from tools.training.logger import TrainingLogger, format_duration
from tools.training.optimizer import build_scheduler
from tools.training.precision import resolve_amp
from tools.training.resume import start_mode
from tools.training.sampling import (EpochSampler, RepeatedDataset, SeededDataset, ignore_interrupts_in_worker,
                                     micro_batch_size, seed_everything)
from tools.training.state import (capture_rng_state, config_mismatches, load_checkpoint, plain_values,
                                  restore_rng_state, save_checkpoint, write_tensors)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CHECKPOINT_FORMAT = 1
# Settings a resumed run must share with its checkpoint: they fix the sample order and the schedule
# (the optimiser's lr / weight decay / momentum come back from the checkpoint, so changing them would be
# silently ignored).
RESUME_INVARIANTS = ("tag", "max_epoch", "max_iters", "batch_size", "optimizer", "lr", "weight_decay", "momentum",
                     "nesterov", "seed", "schedule", "warmup_iters", "clip_grad_norm", "max_steps")

StepFn = Callable[[nn.Module, Any], Mapping[str, torch.Tensor]]
EvaluateFn = Callable[[nn.Module], Mapping[str, Any]]
ExportFn = Callable[[nn.Module], Mapping[str, torch.Tensor]]


# ----------------------------------------------------------------------------- configuration
# ----------------------------------------------------------------------------- small helpers
def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) tuple / list / dict batch moved to ``device``; other items unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {name: move_to_device(item, device) for name, item in batch.items()}
    return batch


def _scalar_outputs(outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "loss" not in outputs:
        raise KeyError(f"step_fn must return a dict with a 'loss' entry, got keys {sorted(outputs)}")
    for name, value in outputs.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"step_fn output '{name}' must be a scalar tensor, got {type(value).__name__}"
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}")
    return dict(outputs)


def _plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    if "score" not in metrics:
        raise KeyError(f"evaluate must return a dict with a 'score' entry, got keys {sorted(metrics)}")
    return {name: value.tolist() if isinstance(value, (torch.Tensor, np.ndarray, np.generic)) else value
            for name, value in metrics.items()}


@contextmanager
def epoch_batches(loader: DataLoader) -> Iterator[Iterator[Any]]:
    """The loader's iterator, whose workers are shut down when the block ends, also on an error
    (a traceback keeps the iterator alive, and with it workers that would outlive the run)."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # multi-process iterators only
        if shutdown is not None:
            shutdown()


@contextmanager
def training_processes(seed: int) -> Iterator[DistContext]:
    """This process's place in a torchrun job (or a single process), every rank seeded with ``seed`` so
    that models start from identical weights; the process group is left when the block ends."""
    context = init_distributed()
    try:
        seed_everything(seed)
        yield context
    finally:
        destroy_distributed()


class _IntervalMeter:
    """Sums of the step values since the last log line (checkpointed, so a resumed interval is exact)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {name: total / self.count for name, total in self.sums.items()}

    def reset(self) -> None:
        self.sums, self.count = {}, 0

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums, self.count = dict(state["sums"]), state["count"]


@dataclass(frozen=True)
class FitResult:
    """Where ``fit`` ended: ``interrupted`` when a signal stopped it (a checkpoint was saved)."""

    global_step: int
    epochs_done: int
    best_score: float | None
    interrupted: bool


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """Train ``model`` on ``dataset`` with ``optimizer`` for ``config.max_iters`` steps or ``max_epoch`` epochs.

    ``model`` may be on the CPU (it is moved to ``context.device``; optimiser parameter references stay
    valid). Iterations per epoch = ``len(dataset) // batch_size`` (drop_last), as the original.
    ``config.max_steps`` makes a short run: that many steps as one epoch, the dataset repeated to fill them
    when it is smaller, then the end of a run as usual (evaluation, model saved and marked finished), so the
    next stage can read the model.
    ``logger`` lets a script keep a handle for ``add_image`` in its ``evaluate``;
    ``script_args`` (e.g. ``vars(args)``) is stored in the checkpoint for the record; ``model_config``
    (``{"kind", "num_classes", ...}``, what the next stage rebuilds the model from) goes to
    ``models/<tag>.json`` with the provenance of the run (``tools.artifacts.provenance``: the script, its
    arguments, ``inputs``, versions, git commit), written together with every saved model;
    ``find_unused_parameters`` is passed to DDP (needed when trainable parameters get no gradient,
    e.g. CAAE's ``dist_token``).
    """

    def __init__(
        self, config: TrainConfig, context: DistContext, model: nn.Module, optimizer: Optimizer,
        dataset: Dataset, step_fn: StepFn, *, evaluate: EvaluateFn | None = None,
        export_state: ExportFn | None = None, collate_fn: Callable | None = None,
        logger: TrainingLogger | None = None, script_args: Mapping[str, Any] | None = None,
        find_unused_parameters: bool = False, model_config: Mapping[str, Any] | None = None,
        inputs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if evaluate is None and config.select_by == "gt":
            raise UsageError("--select_by gt needs an evaluation; this script has none, use --select_by last")
        self.config, self.context, self.paths = config, context, config.paths
        if context.is_main:  # one training run per tag; a killed writer's temporary files go
            hold_until_exit(self.paths.model_lock(config.tag), f"model {config.tag}")
            for name in (self.paths.model(config.tag), self.paths.checkpoint(config.tag),
                         self.paths.model_card(config.tag)):
                remove_stale_temporaries(name.parent, name.name)
        self.resuming = start_mode(config, self.paths) == "resume"
        self.step_fn, self.evaluate = step_fn, evaluate
        self.export_state = export_state or (lambda module: module.state_dict())
        self.script_args = plain_values(script_args or {})

        self._notes: list[str] = []
        if config.max_steps is not None and len(dataset) < config.max_steps * config.batch_size:
            self._notes.append(f"--max_steps {config.max_steps}: the {len(dataset)} samples repeated to fill "
                               f"{config.max_steps} batches of {config.batch_size}")
            dataset = RepeatedDataset(dataset, config.max_steps * config.batch_size)
        self.dataset_size = len(dataset)
        self.steps_per_epoch = self.dataset_size // config.batch_size
        if self.steps_per_epoch == 0:
            raise UsageError(f"the training set has {self.dataset_size} samples, fewer than --batch_size "
                             f"{config.batch_size}")
        self.max_step = config.max_steps or config.max_iters or self.steps_per_epoch * config.max_epoch
        self.num_epochs = -(-self.max_step // self.steps_per_epoch)  # the last one may be partial
        self.log_interval = max(1, int(self.steps_per_epoch * config.print_ratio))
        self.micro_batch = micro_batch_size(config.batch_size, context.world_size, config.accum_steps)

        self.amp_dtype = resolve_amp(config.amp, context.device)
        self.frozen = FrozenParts.of(model)  # left out of checkpoints (tools.training.frozen)
        self.module = model.to(context.device)
        self.model: nn.Module = self.module
        if context.is_distributed:
            device_ids = [context.device.index] if context.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=device_ids,
                                                 find_unused_parameters=find_unused_parameters)
        self.optimizer = optimizer
        try:
            self.scheduler = build_scheduler(optimizer, config.schedule, self.max_step, config.warmup_iters)
        except ValueError as error:
            raise UsageError(str(error)) from None
        self.scaler = torch.amp.GradScaler(context.device.type, enabled=self.amp_dtype == torch.float16)

        self.dataset = SeededDataset(dataset, config.seed)
        self.sampler = EpochSampler(self.dataset, context.rank, context.world_size, config.seed,
                                    self.micro_batch * config.accum_steps, self.steps_per_epoch)
        self.loader = DataLoader(
            self.dataset, batch_size=self.micro_batch, sampler=self.sampler, num_workers=config.num_workers,
            collate_fn=collate_fn, pin_memory=context.device.type == "cuda", drop_last=True,
            worker_init_fn=ignore_interrupts_in_worker,
            # A private generator: creating an epoch's iterator must not draw from the global torch RNG.
            generator=torch.Generator().manual_seed(config.seed),
        )
        self.logger = logger or TrainingLogger(self.paths, config.tag, enabled=context.is_main)

        self.epoch = 0           # completed epochs
        self.step_in_epoch = 0   # optimiser steps taken in the current epoch
        self.global_step = 0
        self.best_score: float | None = None
        self._interval = _IntervalMeter()
        self._last_lr = optimizer.param_groups[0]["lr"]
        self._interval_start = time.monotonic()
        self._stop_signal: str | None = None
        self._resumed_history: dict[str, list[dict[str, Any]]] | None = None
        self._checkpoint_iters, self._checkpoint_seconds = checkpoint_interval(config.checkpoint_every)
        self._last_checkpoint = (0, time.monotonic())  # (iteration, time) of the last checkpoint written
        self.run_id = uuid.uuid4().hex[:16]  # a resumed run keeps its checkpoint's
        seed_everything(config.seed + context.rank)
        if self.resuming:
            self._load_checkpoint()
        # The card's run record: what made the model, with the run's id (a retrained model is a new input).
        self.model_config = None if model_config is None else {
            **model_config, "run": run_record(Path(sys.argv[0]).name, script_args or {}, inputs, with_list=True,
                                              run_id=self.run_id)}

    # ------------------------------------------------------------------ public
    def autocast(self) -> AbstractContextManager:
        """The training autocast context (``evaluate`` may use it too)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.context.device.type, dtype=self.amp_dtype)

    def fit(self) -> FitResult:
        """Train ``max_step`` iterations, or until SIGINT/SIGTERM (then save a checkpoint and return)."""
        self.logger.start(self.global_step, self.max_step, self._resumed_history if self.resuming else None)
        self._log_header()
        self.module.train()
        self._interval_start = time.monotonic()
        try:
            with self._stop_on_signals():
                while self.epoch < self.num_epochs:
                    stopped = self._train_epoch()
                    if stopped:
                        self._save_checkpoint()
                    else:
                        self._finish_epoch()
                        stopped = any_rank(self._stop_signal is not None, self.context)
                    if stopped:
                        self._log_stop()
                        return self._result(interrupted=True)
            if self.context.is_main:
                self._mark_finished()
            best = "n/a" if self.best_score is None else f"{self.best_score:.6g}"
            self.logger.info(f"Finished {self.config.tag}: {self.global_step} iterations, best score {best}, "
                             f"model {self.paths.model(self.config.tag)}")
            return self._result(interrupted=False)
        finally:
            self.logger.close()

    # ------------------------------------------------------------------ one epoch
    def _train_epoch(self) -> bool:
        """Optimiser steps to the end of the epoch (or of training); True if a stop signal ended it early."""
        self.dataset.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch, self.step_in_epoch)
        with epoch_batches(self.loader) as batches:
            while self.step_in_epoch < self.steps_per_epoch and self.global_step < self.max_step:
                with measured(STEP):
                    values = self._optimizer_step(batches)
                self.step_in_epoch += 1
                self.global_step += 1
                self._interval.add(values)
                self.logger.advance(self.global_step, {"loss": values["loss"]})
                if self.global_step % self.log_interval == 0:
                    self._log_interval()
                stop, save = any_ranks([self._stop_signal is not None, self._checkpoint_due()], self.context)
                if stop:
                    return True
                if save and self.step_in_epoch < self.steps_per_epoch:  # the epoch's end saves anyway
                    self._save_checkpoint()
        return False

    def _checkpoint_due(self) -> bool:
        """``--checkpoint_every``: this many iterations, or minutes, since the last checkpoint."""
        iteration, written = self._last_checkpoint
        if self._checkpoint_iters is not None:
            return self.global_step - iteration >= self._checkpoint_iters
        return self._checkpoint_seconds is not None and time.monotonic() - written >= self._checkpoint_seconds

    def _optimizer_step(self, batches: Iterator[Any]) -> dict[str, float]:
        """Forward/backward over ``accum_steps`` micro-batches, one optimiser and scheduler step.
        Returns each output's mean over the micro-batches (of this rank)."""
        accum_steps = self.config.accum_steps
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        for micro_step in range(accum_steps):
            batch = move_to_device(next(batches), self.context.device)
            synchronise = micro_step == accum_steps - 1
            with self._gradient_sync(synchronise):
                with self.autocast():
                    outputs = _scalar_outputs(self.step_fn(self.model, batch))
                self.scaler.scale(outputs["loss"] / accum_steps).backward()
            for name, value in outputs.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float().reshape(()) / accum_steps
        if any_rank(not bool(torch.isfinite(totals["loss"])), self.context):
            self._diverged(float(totals["loss"]))
        self._last_lr = self.optimizer.param_groups[0]["lr"]
        if self.config.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        names = list(totals)
        return dict(zip(names, torch.stack([totals[name] for name in names]).tolist()))

    def _diverged(self, loss: float) -> None:
        """Stop on a non-finite loss before the step corrupts the weights: the model stays unfinished, the last
        checkpoint is kept, and the JSON log records the iteration (``TrainingLogger.log_divergence``)."""
        self.logger.log_divergence(self.global_step + 1, loss)
        iteration, _ = self._last_checkpoint
        kept = (f"the last checkpoint {self.paths.checkpoint(self.config.tag)} (iteration {iteration}) is kept"
                if self.paths.checkpoint(self.config.tag).is_file() else "no checkpoint was written yet")
        raise TrainingDiverged(
            f"training of {self.config.tag} diverged: the loss is {loss} (on some rank) at iteration "
            f"{self.global_step + 1}; the model is not marked finished and {kept}. Lower --lr, or add "
            "--clip_grad_norm / --warmup_iters, then start again with --overwrite")

    def _gradient_sync(self, synchronise: bool) -> AbstractContextManager:
        """DDP all-reduces gradients only on the last micro-batch of a step."""
        if synchronise or not self.context.is_distributed:
            return nullcontext()
        return self.model.no_sync()

    def _finish_epoch(self) -> None:
        """Evaluate (every ``eval_every`` epochs and after the last), keep the selected model, write
        the full checkpoint."""
        done = self.epoch + 1
        due = done % self.config.eval_every == 0 or done == self.num_epochs
        metrics = self._run_evaluation() if due else None
        self.epoch += 1
        self.step_in_epoch = 0
        with measured(SAVE):
            if self.context.is_main:
                self._select_model(metrics)
            self._save_checkpoint()

    def _run_evaluation(self) -> dict[str, Any] | None:
        if self.evaluate is None:
            return None
        metrics = None
        with measured(EVALUATION):
            if self.context.is_main:
                self.module.eval()
                with torch.no_grad():
                    metrics = _plain_metrics(self.evaluate(self.module))
                self.module.train()
            self.context.barrier()
        return metrics

    def _select_model(self, metrics: dict[str, Any] | None) -> None:
        """select_by gt: save when the score improves (the original); last: save every epoch."""
        score = None if metrics is None else float(metrics["score"])
        improved = score is not None and (self.best_score is None or score > self.best_score)
        if improved:
            self.best_score = score
        if metrics is not None:
            self.logger.log_validation({"iteration": self.global_step, "epoch": self.epoch, **metrics,
                                        "best_score": self.best_score})
        if improved or self.config.select_by == "last":
            self._save_model()
            self.logger.info(f"saved model of epoch {self.epoch} to {self.paths.model(self.config.tag)}")

    def _save_model(self) -> None:
        """The exported weights and the model card (``"finished": false`` until the run ends), written together."""
        path = self.paths.model(self.config.tag)
        if self.model_config is None:
            save_checkpoint(self.export_state(self.module), path)
            return
        write_model(path, {**self.model_config, "finished": False},
                    lambda weights: write_tensors(self.export_state(self.module), weights))

    def _mark_finished(self) -> None:
        """``"finished": true`` in the model card once the last iteration is done (the weights stay)."""
        if self.model_config is not None:
            mark_finished(self.paths.model(self.config.tag))

    # ------------------------------------------------------------------ logging
    def _log_header(self) -> None:
        config, context = self.config, self.context
        optimizer = type(self.optimizer).__name__
        if "momentum" in self.optimizer.param_groups[0]:
            optimizer += f" (momentum {self.optimizer.param_groups[0]['momentum']}, nesterov {config.nesterov})"
        self.logger.info(
            f"{'Resumed' if self.resuming else 'Started'} {config.tag} at iteration {self.global_step}: "
            f"{self.dataset_size} samples, {self.steps_per_epoch} iterations/epoch, {self.max_step} iterations "
            f"({self.num_epochs} epochs); global batch {config.batch_size} = {context.world_size} process(es) x "
            f"{config.accum_steps} accumulation step(s) x {self.micro_batch}; {optimizer}, lr {config.lr}, "
            f"weight decay {config.weight_decay}, {config.schedule} schedule"
            f"{f' after {config.warmup_iters} warm-up iterations' if config.warmup_iters else ''}"
            f"{f', gradient norm clipped at {config.clip_grad_norm}' if config.clip_grad_norm else ''}, "
            f"amp {self.amp_dtype or 'off'}, device {context.device}"
        )
        for note in self._notes:
            self.logger.info(note)

    def _log_interval(self) -> None:
        means = mean_over_ranks(self._interval.means(), self.context)
        elapsed = time.monotonic() - self._interval_start
        eta = elapsed / self._interval.count * (self.max_step - self.global_step)
        self.logger.log_train({"iteration": self.global_step, "epoch": self.epoch + 1,
                               "learning_rate": self._last_lr, **means,
                               "time": round(elapsed, 3), "eta": format_duration(eta)})
        self._interval.reset()
        self._interval_start = time.monotonic()

    def _log_stop(self) -> None:
        self.logger.info(
            f"Stopped by {self._stop_signal or 'a signal on another rank'} at iteration {self.global_step} "
            f"(epoch {self.epoch + 1}, step {self.step_in_epoch}/{self.steps_per_epoch}); checkpoint "
            f"{self.paths.checkpoint(self.config.tag)}. Continue with the same command plus --resume (or "
            "--resume auto)."
        )

    def _result(self, interrupted: bool) -> FitResult:
        return FitResult(self.global_step, self.epoch, self.best_score, interrupted)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self) -> None:
        """Every rank's RNG state is gathered; rank 0 writes ``ExperimentPaths.checkpoint(tag)``."""
        rng_states = gather_to_all(capture_rng_state(), self.context)
        if not self.context.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.frozen.trained_state(self.module.state_dict()),
            "frozen": self.frozen.record(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "dataset_size": self.dataset_size,
            "best_score": self.best_score,
            "interval": self._interval.state_dict(),
            "log_history": self.logger.history,
            "rng": rng_states,
            "config": plain_values(asdict(self.config)),
            "script_args": self.script_args,
            "run_id": self.run_id,
        }
        save_checkpoint(state, self.paths.checkpoint(self.config.tag))
        self._last_checkpoint = (self.global_step, time.monotonic())

    def _load_checkpoint(self) -> None:
        path = self.paths.checkpoint(self.config.tag)
        if not path.is_file():
            raise ArtifactError(f"{path}: no checkpoint to resume from; start the run without --resume (or with "
                                "--resume auto, which continues a checkpoint when there is one)")
        state = load_checkpoint(path)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ArtifactError(f"{path}: not a training checkpoint of this engine (format {state.get('format')})")
        changed = config_mismatches(state["config"], plain_values(asdict(self.config)), RESUME_INVARIANTS)
        if state["dataset_size"] != self.dataset_size:
            changed.append(f"training samples: {state['dataset_size']} -> {self.dataset_size}")
        if changed:
            raise ArtifactError(f"{path}: --resume needs the checkpoint's settings, but these changed: "
                             f"{'; '.join(changed)}. Use the original values, or a new --tag for a new run")
        self._load_model_state(path, state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best_score = state["global_step"], state["best_score"]
        self.run_id = state.get("run_id", self.run_id)
        self._last_checkpoint = (self.global_step, time.monotonic())
        self._interval.load_state_dict(state["interval"])
        self._resumed_history = state["log_history"]
        rng_states = state["rng"]
        if len(rng_states) == self.context.world_size:
            restore_rng_state(rng_states[self.context.rank])
        else:
            seed_everything(self.config.seed + self.context.rank + self.global_step)
            self._notes.append(f"the checkpoint has {len(rng_states)} process RNG states for "
                               f"{self.context.world_size} processes: RNGs reseeded, so random layers "
                               "(dropout) differ from the uninterrupted run; data order is unchanged")

    def _load_model_state(self, path: Path, state: Mapping[str, Any]) -> None:
        """The checkpoint's weights: all but the frozen parameters, which the script has rebuilt and which must
        be those the checkpoint was trained with (a checkpoint without a ``frozen`` record holds them all)."""
        if "frozen" in state and (mismatch := self.frozen.mismatch(state["frozen"])):
            raise ArtifactError(f"{path}: cannot resume: {mismatch}; resume with the same ones, or start again "
                                "with --overwrite")
        missing, unexpected = self.module.load_state_dict(state["model"], strict=False)
        missing = [key for key in missing if key not in self.frozen.keys]
        if missing or unexpected:
            raise ArtifactError(f"{path}: the checkpoint's model does not fit this one: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]} (of {len(missing)} and {len(unexpected)})")

    # ------------------------------------------------------------------ signals
    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM set a flag checked after each optimiser step; a second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        def request_stop(number: int, frame: object) -> None:
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(number).name
            sys.stderr.write(f"\n{self._stop_signal}: stopping after the current step and saving a "
                             "checkpoint (send again to stop at once)\n")

        with handled(STOP_SIGNALS, request_stop):
            yield
