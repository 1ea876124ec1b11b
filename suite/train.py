"""The one training loop: every optimizer, every benchmark, every launcher goes through it."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

from core.errors import ConfigError
from core.likelihood import Likelihood
from datasets import DataBundle, Split, load_dataset
from models import build_model
from optimizers.registry import build_optimizer, family_of
from suite import distributed
from suite.checkpoint import Progress, load_checkpoint, save_checkpoint
from suite.console import print_end_of_run
from suite.environment import code_version, collect_environment
from suite.metrics import batch_accuracy, learned, trivial_baseline, window_mean
from suite.optimizer_settings import apply_optimizer_settings
from suite.resume import job_key, load_config, own_run, remember_run, resume_config
from suite.seeding import seed_everything
from suite.step import RunDiverged, take_step
from suite.store import (
    POINTER_FILE,
    FolderLock,
    FolderLocked,
    RunFolder,
    RunRecord,
    RunStatus,
    atomic_write_text,
    new_run_id,
    utc_now,
)
from suite.validate import check_writable, validate_config
from suite.wandb_logger import make_logger

RESUMABLE_STATUSES = (RunStatus.RUNNING.value, RunStatus.INTERRUPTED.value)
LOSS_REDUCTION = "nll summed over output dimensions, mean over examples"


@dataclass
class RunContext:
    """What Hydra knows about the job: preset names, sweep identity, its output folder."""

    model_preset: str
    optimizer_preset: str
    sweep_id: str | None = None
    job_dir: Path | None = None
    overrides: list[str] = field(default_factory=list)  # the job's command-line overrides
    run_folder: Path | None = None  # set by the trainer once it writes a run folder


class StopRequested:
    """Turns SIGTERM/SIGUSR1/SIGUSR2/SIGINT into a flag checked between steps."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    @contextmanager
    def installed(self) -> Iterator[StopRequested]:
        """Install the handlers for the duration of the block (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)

    def forward_to_previous(self) -> None:
        """Let a previous handler (e.g. submitit's requeue on SIGUSR2) act on the signal."""
        handler = self._previous.get(self.signal) if self.signal is not None else None
        if callable(handler) and self.signal is not None:
            handler(self.signal, None)


def resolve_device(choice: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def batch_order(num_examples: int, *, seed: int, epoch: int, device: torch.device) -> Tensor:
    """The permutation of training examples for ``epoch`` (a pure function of seed and epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).to(device)


def split_targets(split: Split, *, autoencoder: bool) -> Tensor:
    """What the loss compares the output with: the flattened input (autoencoders) or labels."""
    if autoencoder or split.y is None:
        return split.x.reshape(split.x.shape[0], -1)
    return split.y


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    likelihood: Likelihood,
    *,
    targets: Tensor,
    batch_size: int,
    classifier: bool = False,
) -> dict[str, float]:
    """Loss (and accuracy for classifiers: categorical or binary) over a split, in eval mode."""
    was_training = model.training
    model.eval()
    total, per_output, correct, count = 0.0, 0, 0.0, 0
    for start in range(0, split.x.shape[0], batch_size):
        x = split.x[start : start + batch_size]
        target = targets[start : start + batch_size]
        output = model(x)
        total += float(likelihood.per_example_nll(output, target).sum())
        per_output = likelihood.outputs_per_example(output)
        if classifier:
            correct += batch_accuracy(likelihood, output, target) * x.shape[0]
        count += x.shape[0]
    model.train(was_training)
    loss = total / max(count, 1)
    metrics = {"loss": loss, "loss_per_output": loss / max(per_output, 1)}
    if classifier:
        metrics["acc"] = correct / max(count, 1)
    return metrics


class Trainer:
    """Runs one configured job from start (or checkpoint) to a final status."""

    def __init__(self, cfg: DictConfig, ctx: RunContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self._caller_ctx = ctx
        self.stop = StopRequested()
        self.lock: FolderLock | None = None
        self.resumed_summary: dict[str, Any] = {}
        self.ranks_agree: bool | None = None  # parameters identical on every rank at the end

    # ----------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg = self.cfg
        validate_config(cfg)
        if cfg.trainer.threads is not None:
            torch.set_num_threads(int(cfg.trainer.threads))
        self.ranks = distributed.resolve_ranks(_value(cfg.trainer.distributed))
        self.device = distributed.start(self.ranks, resolve_device(str(_value(cfg.trainer.device))))
        self.dtype = torch.float64 if _value(cfg.trainer.dtype) == "float64" else torch.float32
        self.likelihood = Likelihood(_value(cfg.model.likelihood))
        self.family = family_of(cfg.optimizer)
        seed = int(cfg.trainer.seed)
        seed_everything(seed)
        data = load_dataset(str(cfg.model.dataset), cfg.data, device=self.device, seed=seed)
        self.data = _cast(data, self.dtype)
        autoencoder = _value(cfg.model.task) == "autoencoder"
        self.classifier = not autoencoder
        self.targets = {
            name: split_targets(split, autoencoder=autoencoder)
            for name in ("train", "val", "test")
            if (split := getattr(self.data, name)) is not None and split.x.shape[0] > 0
        }
        self.baseline = trivial_baseline(
            self.likelihood,
            self.targets,
            autoencoder=autoencoder,
            classes=int(getattr(cfg.model, "num_classes", None) or 0),
        )
        if self.data.train.x.shape[0] < cfg.trainer.batch_size:
            raise ConfigError(
                "trainer.batch_size",
                f"got {cfg.trainer.batch_size}; allowed: at most the {self.data.train.x.shape[0]} "
                f"training examples of {self.data.variant}",
            )
        self.local_rows = distributed.local_slice(self.ranks, int(cfg.trainer.batch_size))
        torch.manual_seed(seed)
        self.model = build_model(cfg.model).to(device=self.device, dtype=self.dtype)
        self._check_model_fits()
        self.train_model = distributed.wrap_model(self.ranks, self.model)  # DDP with several ranks
        self.optimizer = build_optimizer(self.train_model, cfg.optimizer)
        distributed.set_inverse_strategy(self.optimizer, _value(cfg.trainer.distributed_inverses))
        describe = getattr(self.optimizer, "describe", None)
        self.optimizer_description = (
            describe() if callable(describe) else type(self.optimizer).__name__
        )
        self.scheduler: Any = None
        self.plateau = cfg.trainer.get("lr_plateau_patience") is not None
        self.stopped_early_epoch: int | None = None  # set when early stopping ends the run
        if self.plateau:
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer,
                mode="min",
                factor=float(cfg.trainer.lr_gamma),
                patience=int(cfg.trainer.lr_plateau_patience),
                min_lr=float(cfg.trainer.lr_min),
            )
        elif len(cfg.trainer.lr_milestones) > 0:
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
                self.optimizer,
                milestones=list(cfg.trainer.lr_milestones),
                gamma=cfg.trainer.lr_gamma,
            )
        self.steps_per_epoch = self.data.train.x.shape[0] // int(cfg.trainer.batch_size)
        self.total_steps = int(cfg.trainer.epochs) * self.steps_per_epoch
        if cfg.trainer.max_steps is not None:
            self.total_steps = (
                min(self.total_steps, int(cfg.trainer.max_steps))
                if cfg.trainer.epochs
                else int(cfg.trainer.max_steps)
            )

    def _check_model_fits(self) -> None:
        x = self.data.train.x[:2]
        try:
            with torch.no_grad():
                self.likelihood.nll(self.model(x), self.targets["train"][:2])
        except (RuntimeError, ValueError, IndexError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                "model.dataset",
                f"model '{self.ctx.model_preset}' does not fit dataset '{self.data.variant}' "
                f"(input {tuple(self.data.train.x.shape[1:])}): {first}",
            ) from None

    def _lock(self, folder: RunFolder) -> None:
        lock = folder.lock()
        try:
            lock.acquire()
        except FolderLocked as err:
            raise ConfigError(
                "trainer.resume", f"{err}; allowed: a run folder no live process writes"
            ) from None
        self.lock = lock

    def _claim_resumed(self) -> RunFolder | None:
        """The run to continue (explicit ``trainer.resume`` or this job's own after a requeue),
        with ``self.cfg``/``self.ctx`` replaced by the run's own; None for a new run.

        Every rank reads the same files here, before the process group starts (so before any
        rank writes); rank 0 locks the folder after setup (`_run`)."""
        cfg = self.cfg
        explicit = cfg.trainer.resume
        self.job_key = job_key(cfg)
        if explicit is None:
            own = own_run(self.ctx.job_dir, self.job_key)
            if own is None:
                return None
            folder = RunFolder(own)
            try:
                status = folder.read_summary().get("status")
            except (OSError, ValueError):
                return None
            if status not in RESUMABLE_STATUSES or not folder.checkpoint_path.exists():
                return None
        else:
            folder = RunFolder(Path(explicit))
            if not folder.checkpoint_path.exists():
                done = (folder.path / "summary.json").is_file() and (
                    folder.read_summary().get("status") == RunStatus.COMPLETED.value
                )
                why = "it is completed and its checkpoint was removed" if done else "no checkpoint"
                raise ConfigError(
                    "trainer.resume",
                    f"{why} in '{explicit}'; allowed: a run folder with checkpoint.pt "
                    "(trainer.keep_checkpoint=true keeps it for extending a completed run)",
                )
        summary = folder.read_summary()
        stored = load_config(folder.read_config())
        presets = {"model": str(summary["model"]), "optimizer": str(summary["optimizer"])}
        if explicit is not None:
            stored = resume_config(
                stored,
                cfg,
                overrides=self.ctx.overrides,
                stored_presets=presets,
                given_presets={
                    "model": self.ctx.model_preset,
                    "optimizer": self.ctx.optimizer_preset,
                },
                folder=folder.path,
            )
        self.cfg = stored
        self.ctx = replace(
            self.ctx,
            model_preset=presets["model"],
            optimizer_preset=presets["optimizer"],
            sweep_id=summary.get("sweep_id"),
        )
        self.resumed_summary = summary
        return folder

    def _create_folder(self) -> RunFolder:
        """A fresh, locked run folder; the job's pointer to it for its own requeue."""
        cfg = self.cfg
        root = Path(str(cfg.results.root))
        check_writable(root)
        run_id = new_run_id(
            model=self.ctx.model_preset,
            optimizer=self.ctx.optimizer_preset,
            seed=int(cfg.trainer.seed),
        )
        folder = RunFolder.create(root, run_id)
        self._lock(folder)
        remember_run(self.ctx.job_dir, self.job_key, folder.path)
        return folder

    def _remember_job(self) -> None:
        if self.ctx.job_dir is not None:
            self.ctx.job_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                self.ctx.job_dir / POINTER_FILE, str(self.folder.path.resolve()) + "\n"
            )

    # --------------------------------------------------------------- summary
    def _summary(self, status: RunStatus, **extra: Any) -> dict[str, Any]:
        cfg = self.cfg
        last = self.record.evals[-1] if self.record.evals else {}
        best = self.progress.best
        summary: dict[str, Any] = {
            "run_id": self.folder.path.name,
            "sweep_id": self.ctx.sweep_id,
            "experiment": cfg.experiment,
            "scale": _value(cfg.scale),
            "status": status.value,
            "model": self.ctx.model_preset,
            "dataset": str(cfg.model.dataset),
            "data_variant": self.data.variant,
            "data_description": self.data.description,
            "optimizer": self.ctx.optimizer_preset,
            "optimizer_family": str(cfg.optimizer.name),
            "optimizer_description": self.optimizer_description,
            "hyperparameters": {
                k: _value(v)
                for k, v in OmegaConf.to_container(cfg.optimizer, resolve=True).items()  # type: ignore[union-attr]
            },
            "seed": int(cfg.trainer.seed),
            "batch_size": int(cfg.trainer.batch_size),
            "world_size": self.ranks.world,
            "ranks_identical_params": self.ranks_agree,
            "device": str(self.device),
            "likelihood": self.likelihood.value,
            "loss_reduction": LOSS_REDUCTION,
            "epochs_completed": self.progress.step / max(self.steps_per_epoch, 1),
            "steps_completed": self.progress.step,
            "wall_clock_s": self.progress.wall_time_s,
            "started_at": self.started_at,
            "finished_at": None,
            "code_version": code_version()["commit"],
            "tuning": OmegaConf.to_container(cfg.tuning) if cfg.tuning is not None else None,
            "diverged_step": None,
            "stopped_early_epoch": self.stopped_early_epoch,
            "error": None,
        }
        running = last.get("train_running_loss")
        running = None if running is None or math.isnan(running) else running
        baseline = self.baseline.losses.get("train")
        finished = status in (RunStatus.COMPLETED, RunStatus.DIVERGED)
        summary["final_train_running_loss"] = running
        summary["final_train_running_acc"] = last.get("train_running_acc")
        summary["baseline_train_loss"] = baseline
        summary["baseline_test_loss"] = self.baseline.losses.get("test")
        summary["baseline_predictor"] = self.baseline.predictor
        if status is RunStatus.DIVERGED:
            summary["learned"] = False
        else:
            summary["learned"] = learned(running, baseline) if finished else None
        for split in ("train", "val", "test"):
            summary[f"final_{split}_loss"] = last.get(f"{split}_loss")
            summary[f"best_{split}_loss"] = best.get(f"{split}_loss")
            summary[f"final_{split}_loss_per_output"] = last.get(f"{split}_loss_per_output")
            summary[f"final_{split}_acc"] = last.get(f"{split}_acc")
            summary[f"best_{split}_acc"] = best.get(f"{split}_acc")
        summary.update(extra)
        return summary

    def _write(self, status: RunStatus, **extra: Any) -> dict[str, Any]:
        if not self.ranks.is_main:  # only rank 0 writes
            return {}
        self.folder.write_metrics(self.record)
        summary = self._summary(status, **extra)
        self.folder.write_summary(summary)
        return summary

    # ------------------------------------------------------------ evaluation
    def _evaluate(self) -> None:
        if not self.ranks.is_main:  # rank 0 evaluates and records
            return
        row: dict[str, float] = {
            "step": self.progress.step,
            "epoch": self.progress.step / self.steps_per_epoch,
            "wall_time_s": self.progress.wall_time_s,
        }
        previous = int(self.record.evals[-1]["step"]) if self.record.evals else 0
        row["train_running_loss"] = window_mean(
            self.record.steps, "batch_loss", after_step=previous
        )
        if self.classifier:
            row["train_running_acc"] = window_mean(
                self.record.steps, "batch_acc", after_step=previous
            )
        batch = int(self.cfg.trainer.eval_batch_size)
        for name, targets in self.targets.items():
            split = getattr(self.data, name)
            metrics = evaluate(
                self.model,
                split,
                self.likelihood,
                targets=targets,
                batch_size=batch,
                classifier=self.classifier,
            )
            for key, value in metrics.items():
                row[f"{name}_{key}"] = value
        if self.cfg.trainer.diagnostics and hasattr(self.optimizer, "diagnostics"):
            for key, value in self.optimizer.diagnostics().items():
                row[f"diag_{key}"] = float(value)
        self.record.evals.append(row)
        for key, value in row.items():
            if key.endswith("_loss") and math.isfinite(value):
                self.progress.best[key] = min(self.progress.best.get(key, math.inf), value)
            if key.endswith("_acc"):
                self.progress.best[key] = max(self.progress.best.get(key, -math.inf), value)
        self.logger.log(row, step=self.progress.step)

    # ------------------------------------------------------------------ step
    def _step(self, x: Tensor, target: Tensor) -> float:
        """One `suite.step.take_step` (the model DDP-wrapped over several ranks); the loss and
        any stop request are agreed by every rank, so all ranks diverge or stop together."""
        try:
            outcome = take_step(
                self.train_model, self.optimizer, self.likelihood, x, target, diverge_loss=None
            )
        except RunDiverged as err:  # only with diverge_loss set; kept for the type checker
            raise RunDiverged(f"{err} at step {self.progress.step + 1}") from None
        self.last_output = outcome.output
        asked = self.stop.signal is not None
        value, stop = distributed.agree(self.ranks, outcome.loss, asked)
        if stop and self.stop.signal is None:  # another rank was asked to stop: stop together
            self.stop.signal = signal.SIGTERM
        if not math.isfinite(value) or value > float(self.cfg.trainer.diverge_loss):
            raise RunDiverged(f"batch loss {value:g} at step {self.progress.step + 1}")
        return value

    def _stops_early(self) -> bool:
        """Whether the epoch-mean running train loss has not improved for the patience's epochs.

        Recomputed from the recorded step losses (so a resumed run decides as an uninterrupted
        one); an epoch improves when its mean is below every earlier epoch's (delta 0).
        """
        patience = self.cfg.trainer.get("early_stop_patience")
        if patience is None:
            return False
        per_epoch: dict[int, list[float]] = {}
        for row in self.record.steps:
            epoch = (int(row["step"]) - 1) // self.steps_per_epoch
            per_epoch.setdefault(epoch, []).append(float(row["batch_loss"]))
        means = [sum(v) / len(v) for _, v in sorted(per_epoch.items())]
        if len(means) <= patience:
            return False
        best_at = min(range(len(means)), key=lambda i: (means[i], i))
        stop = len(means) - 1 - best_at >= int(patience)
        return bool(distributed.share(self.ranks, stop if self.ranks.is_main else None))

    def _plateau_loss(self) -> float:
        """The loss the plateau schedule watches: the test (else val, train) loss of this epoch."""
        row = self.record.evals[-1]
        if int(row["step"]) != self.progress.step:  # evaluations are not at epoch ends
            self._evaluate()
            row = self.record.evals[-1]
        for split in ("test", "val", "train"):
            if f"{split}_loss" in row:
                return float(row[f"{split}_loss"])
        raise RuntimeError("no evaluation loss for the plateau schedule")

    def _checkpoint(self) -> None:
        if not self.ranks.is_main:  # the state is held once, by rank 0
            return
        save_checkpoint(
            self.folder.checkpoint_path,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            progress=self.progress,
            record=self.record,
        )
        self._last_checkpoint = time.monotonic()
        self._last_checkpoint_step = self.progress.step

    def _checkpoint_due(self) -> bool:
        if not self.ranks.is_main:
            return False
        t = self.cfg.trainer
        if (
            t.checkpoint_every_steps is not None
            and self.progress.step - self._last_checkpoint_step >= t.checkpoint_every_steps
        ):
            return True
        minutes = t.checkpoint_every_minutes
        return minutes is not None and time.monotonic() - self._last_checkpoint >= 60.0 * minutes

    # ------------------------------------------------------------------- run
    def run(self) -> RunStatus:
        """Train to the end, a divergence or a stop signal; returns the final status."""
        self._started = time.monotonic()
        try:
            return self._run()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> RunStatus:
        resumed = self._claim_resumed()
        self._setup()
        if not self.ranks.is_main:
            return self._follow()
        try:
            if resumed is not None:  # one writer per folder; the same number of ranks
                self._lock(resumed)
                distributed.check_resume_ranks(self.resumed_summary, self.ranks)
                self._check_extends(resumed)
            self.folder = resumed if resumed is not None else self._create_folder()
        except ConfigError as err:
            distributed.share(self.ranks, err)  # the other ranks stop with the same error
            raise
        distributed.share(self.ranks, (str(self.folder.path), resumed is not None))
        self._caller_ctx.run_folder = self.folder.path
        self._remember_job()
        self.started_at = utc_now()
        self.record = RunRecord()
        self.progress = Progress()
        if resumed is not None:
            self.started_at = self.resumed_summary.get("started_at") or self.started_at
            self.progress, self.record = load_checkpoint(
                self.folder.checkpoint_path,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                device=self.device,
            )
            print(f"resuming {self.folder.path} at step {self.progress.step}", file=sys.stderr)
        # The stored config is the run's (extended settings included): summary, config and
        # metrics are written from this one config.
        self.folder.write_config(OmegaConf.to_yaml(self.cfg, resolve=True))
        self.folder.write_environment(collect_environment(self.device))
        self.logger = make_logger(
            self.cfg.logger,
            run_id=self.folder.path.name,
            run_dir=self.folder.path,
            group=self.ctx.sweep_id or self.cfg.experiment,
            config=OmegaConf.to_container(self.cfg, resolve=True),  # type: ignore[arg-type]
            resume=resumed is not None,
        )
        self._last_checkpoint = time.monotonic()
        self._last_checkpoint_step = self.progress.step
        self._log_every = max(int(self.cfg.logger.step_every), 1)
        if resumed is not None:
            self.logger.resumed(self._logged_history())
        if not self.record.evals:
            self._evaluate()
        self._write(RunStatus.RUNNING)
        status = RunStatus.FAILED
        try:
            with self.stop.installed():
                status = self._train()
            self.ranks_agree = distributed.params_agree(self.ranks, self.model)
        except RunDiverged as err:
            status = RunStatus.DIVERGED
            summary = self._write(
                status, diverged_step=self.progress.step + 1, error=str(err), finished_at=utc_now()
            )
            self._drop_checkpoint()
            print(
                f"diverged: {err}; run recorded as diverged in {self.folder.path}", file=sys.stderr
            )
            self.logger.finish(summary)
            self._tell(summary)
            return status
        except BaseException as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            interrupted = isinstance(err, KeyboardInterrupt) or distributed.is_peer_failure(
                self.ranks, err
            )
            status = RunStatus.INTERRUPTED if interrupted else RunStatus.FAILED
            summary = self._write(status, error=f"{type(err).__name__}: {message}")
            self.logger.finish(summary)
            self._tell(summary)
            raise
        if status is RunStatus.INTERRUPTED:
            self._checkpoint()
            summary = self._write(status, error=f"stopped by signal {self.stop.signal}")
            self.logger.finish(summary)
            print(
                f"interrupted at step {self.progress.step}; checkpoint in {self.folder.path}",
                file=sys.stderr,
            )
            self._tell(summary)
            self.stop.forward_to_previous()
            return status
        if self.cfg.trainer.keep_checkpoint:
            self._checkpoint()
        summary = self._write(RunStatus.COMPLETED, finished_at=utc_now())
        self._drop_checkpoint()
        self.logger.finish(summary)
        self._tell(summary)
        return RunStatus.COMPLETED

    def _check_extends(self, folder: RunFolder) -> None:
        """A completed run continues only when the config asks for more steps than it took."""
        done = self.resumed_summary.get("steps_completed") or 0
        if self.resumed_summary.get("status") == RunStatus.COMPLETED.value and (
            self.total_steps <= done
        ):
            raise ConfigError(
                "trainer.resume",
                f"run '{folder.path}' is already completed ({done} steps); allowed: "
                "a larger trainer.epochs or trainer.max_steps to extend it",
            )
        stopped = self.resumed_summary.get("stopped_early_epoch")
        if stopped is not None and self.cfg.trainer.get("early_stop_patience") is not None:
            raise ConfigError(
                "trainer.resume",
                f"run '{folder.path}' stopped early at epoch {stopped}; allowed: "
                "trainer.early_stop_patience=null (or a larger patience) to continue it",
            )

    def _tell(self, summary: dict[str, Any]) -> None:
        """The end-of-run block for the user (after the logger closed its files)."""
        print_end_of_run(
            summary,
            run_folder=self.folder.path,
            results_root=Path(str(self.cfg.results.root)),
            elapsed_s=time.monotonic() - self._started,
        )

    def _logged_history(self) -> list[dict[str, Any]]:
        """The rows the logger received so far (throttled steps, then evaluations, by step)."""
        steps = [r for r in self.record.steps if int(r["step"]) % self._log_every == 0]
        rows = [(int(r["step"]), 0, r) for r in steps]
        rows += [(int(r["step"]), 1, r) for r in self.record.evals]
        return [{**row, "step": step} for step, _, row in sorted(rows, key=lambda t: t[:2])]

    def _drop_checkpoint(self) -> None:
        """A finished run cannot continue: its checkpoint goes unless the config keeps it."""
        if not self.cfg.trainer.keep_checkpoint:
            self.folder.checkpoint_path.unlink(missing_ok=True)

    def _follow(self) -> RunStatus:
        """A rank other than 0: train in step with rank 0, write nothing."""
        shared = distributed.share(self.ranks, None)
        if isinstance(shared, ConfigError):
            raise shared
        path, resumed = shared
        self.folder = RunFolder(Path(path))
        self.record, self.progress = RunRecord(), Progress()
        if resumed:
            self.progress, self.record = load_checkpoint(
                self.folder.checkpoint_path,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                device=self.device,
            )
        try:
            with self.stop.installed():
                status = self._train()
            distributed.params_agree(self.ranks, self.model)
            return status
        except RunDiverged:
            return RunStatus.DIVERGED

    def _train(self) -> RunStatus:
        cfg = self.cfg.trainer
        batch = int(cfg.batch_size)
        eval_every = cfg.eval_every_steps or self.steps_per_epoch
        train, train_targets = self.data.train, self.targets["train"]
        bar = tqdm(
            total=self.total_steps,
            initial=self.progress.step,
            disable=not cfg.progress or None,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        with bar:
            while self.progress.step < self.total_steps:
                p = self.progress
                order = batch_order(
                    train.x.shape[0], seed=int(cfg.seed), epoch=p.epoch, device=self.device
                )
                epoch_done = False
                while not epoch_done and p.step < self.total_steps:
                    idx = order[p.batch_in_epoch * batch : (p.batch_in_epoch + 1) * batch]
                    idx = idx[self.local_rows]  # this rank's rows of the global batch
                    x, target = train.x[idx], train_targets[idx]
                    start = time.perf_counter()
                    loss = self._step(x, target)
                    elapsed = time.perf_counter() - start
                    p.step += 1
                    p.batch_in_epoch += 1
                    p.wall_time_s += elapsed
                    row = {
                        "step": p.step,
                        "epoch": p.step / self.steps_per_epoch,
                        "batch_loss": loss,
                        "lr": float(self.optimizer.param_groups[0]["lr"]),
                        "step_time_s": elapsed,
                        "wall_time_s": p.wall_time_s,
                    }
                    if self.classifier:
                        row["batch_acc"] = batch_accuracy(self.likelihood, self.last_output, target)
                    self.record.steps.append(row)
                    if self.ranks.is_main and p.step % self._log_every == 0:  # rank 0 logs
                        self.logger.log(row, step=p.step)
                    bar.update(1)
                    bar.set_postfix(
                        epoch=f"{p.step / self.steps_per_epoch:.2f}", loss=f"{loss:.4g}"
                    )
                    epoch_done = p.batch_in_epoch == self.steps_per_epoch
                    if epoch_done:  # the next batch comes from the next epoch's order
                        p.epoch += 1
                        p.batch_in_epoch = 0
                        if self.scheduler is not None and not self.plateau:
                            self.scheduler.step()
                    if p.step % eval_every == 0 or p.step == self.total_steps:
                        self._evaluate()
                        self._write(RunStatus.RUNNING)
                    if epoch_done and self.plateau:  # the authors step on the test loss
                        watched = self._plateau_loss() if self.ranks.is_main else None
                        self.scheduler.step(distributed.share(self.ranks, watched))
                    if epoch_done and self._stops_early():
                        if not self.record.evals or int(self.record.evals[-1]["step"]) != p.step:
                            self._evaluate()
                        self.stopped_early_epoch = p.epoch
                        return RunStatus.COMPLETED
                    if self.stop.signal is not None:
                        return RunStatus.INTERRUPTED
                    if self._checkpoint_due():
                        self._checkpoint()
                        self._write(RunStatus.RUNNING)
        return RunStatus.COMPLETED


def _cast(data: DataBundle, dtype: torch.dtype) -> DataBundle:
    """Floating-point inputs (and Gaussian/Bernoulli float targets) in the run's dtype."""

    def cast(split: Split | None) -> Split | None:
        if split is None:
            return None
        y = split.y
        if y is not None and y.is_floating_point():
            y = y.to(dtype)
        return Split(split.x.to(dtype), y)

    data.train = cast(data.train)  # type: ignore[assignment]
    data.val = cast(data.val)  # type: ignore[assignment]
    data.test = cast(data.test)  # type: ignore[assignment]
    return data


@dataclass(frozen=True)
class RunOutcome:
    """How a job ended and where its run folder is."""

    status: RunStatus
    folder: Path


def run(cfg: DictConfig, ctx: RunContext) -> RunOutcome:
    """Run one job; the entry point that run.py (and tests, bench/) call."""
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        apply_optimizer_settings(cfg, ctx.overrides)
        trainer = Trainer(cfg, ctx)
        status = trainer.run()
        return RunOutcome(status=status, folder=trainer.folder.path)
    finally:
        distributed.stop()
