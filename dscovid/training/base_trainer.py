"""The base trainer: the loop, devices, mixed precision, checkpoints, logs, resume and validation hooks.

The hooks follow nnU-Net's (``on_train_start``, ``on_stage_start``, ``on_epoch_start``, ``train_step``,
``validation_step``, ``on_validation_epoch_end``, ``on_epoch_end``, ``on_train_end``), but the class only runs
them: the network and loss come from :mod:`dscovid.model`, the batches from a loader object, the stages and
learning rates from a schedule object. A variant changes a class attribute (``tasks``, ``overrides``) or one hook;
see :mod:`dscovid.training.trainers`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dscovid.errors import DscovidError
from dscovid.model import build_loss, build_network, random_inputs
from dscovid.model.network import MODULE_GROUPS
from dscovid.model.precision import autocast_dtype, compute_in_float32, dtype_name, kernel_faults
from dscovid.plans.configuration import Configuration, Plans, StageConfig
from dscovid.results.checkpoint import (
    BEST,
    FINAL,
    LATEST,
    load_checkpoint,
    save_checkpoint,
    stage_checkpoint,
    to_cpu,
)
from dscovid.training.augmentation import AugmentationSettings
from dscovid.training.data import CacheCase
from dscovid.training.distributed import DistributedContext, average_gradients, sum_over_ranks
from dscovid.training.lesion_context import GroundTruthContext, lesion_context_for
from dscovid.training.loader import build_loader, close_loader
from dscovid.training.progress import History, plot_progress
from dscovid.training.schedule import learning_rate, make_optimizer, stage_at, stages_with_overrides
from dscovid.training.schedule import total_epochs as count_epochs

log = logging.getLogger("dscovid.training")

@dataclass
class TrainingSetup:
    """Everything a trainer is handed (built by :func:`dscovid.training.run.run_training`)."""

    plans: Plans  # with the effective configuration in place of the planned one
    configuration_name: str
    configuration: Configuration  # effective: the plans configuration with the trainer's overrides applied
    train_cases: list[CacheCase]
    val_cases: list[CacheCase]
    output_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int | None = None  # None: the configuration's training.seed
    num_workers: int = 1
    epochs: int | None = None  # override of every stage's epochs (tests, demos)
    iterations_per_epoch: int | None = None
    val_iterations: int | None = None
    context: DistributedContext = field(default_factory=DistributedContext)

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = self.configuration.training.seed


class Trainer:
    """Trains one fold. Subclasses set ``tasks`` and ``overrides``, or replace a hook."""

    #: The network's ``tasks`` option this trainer trains ("joint", "segmentation" or "classification").
    tasks: ClassVar[str] = "joint"
    #: Dotted configuration keys a variant sets, e.g. ``{"network.cross_stitch": False}``.
    overrides: ClassVar[Mapping[str, object]] = {}
    grad_clip_norm: ClassVar[float] = 12.0
    ema_momentum: ClassVar[float] = 0.9
    #: Redraw progress.png at most this often (and after the last epoch): drawing costs about a second.
    plot_interval_s: ClassVar[float] = 60.0

    @classmethod
    def effective_configuration(cls, configuration: Configuration) -> Configuration:
        """The plans configuration with this trainer's task and overrides applied, validated again."""
        return configuration.with_overrides({"network.tasks": cls.tasks, **cls.overrides})

    def __init__(self, setup: TrainingSetup):
        self.setup = setup
        self.configuration = setup.configuration
        self.device = setup.device
        # float16 on CUDA needs the gradient scaler; bfloat16 (a CPU with native bfloat16) has float32's range.
        try:
            self.autocast_dtype = autocast_dtype(self.device)
        except ValueError as error:
            raise DscovidError(str(error)) from None
        self.float32_layers: list[str] = []  # layers taken out of bfloat16 (check_reduced_precision)
        self.context = setup.context
        self.output_dir = Path(setup.output_dir)
        training = self.configuration.training
        self.stages: list[StageConfig] = stages_with_overrides(training.stages, setup.epochs,
                                                               setup.iterations_per_epoch)
        self.total_epochs = count_epochs(self.stages)
        torch.manual_seed(setup.seed)  # identical initial weights on every rank and in every seeded run
        self.network = build_network(self.configuration).to(self.device)
        # What the classifier's Ŝ outside the patch is, and the hard negatives (dscovid.training.lesion_context).
        self.lesion_context, self._unused_notes = self.make_lesion_context()
        self.findings_lr_scale = training.findings_head_lr_scale
        self.loss = build_loss(self.configuration)
        self.use_amp = self.autocast_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.history = History()
        self.epoch = 0  # the next epoch to run (= epochs finished)
        self.ema: float | None = None
        self.best_ema: float | None = None
        self.stage_index: int | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.model: torch.nn.Module = self.network
        self.train_loader = self.val_loader = None
        self._file_handler: logging.Handler | None = None
        self._last_plot = -math.inf
        self.batch_size = max(1, training.batch_size // self.context.world_size)
        self.oversample = training.oversample_foreground
        self.lesion_sampling = training.lesion_sampling
        self.skipped_steps = 0  # steps of the current epoch skipped for a non-finite loss or gradient

    # ---- set-up -------------------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return type(self).__name__

    def make_lesion_context(self) -> tuple[GroundTruthContext, list[str]]:
        """The lesion-context component (a hook), and notes on the plans settings it leaves unused."""
        return lesion_context_for(self.configuration, self.output_dir)

    def resume(self, path: Path) -> None:
        """Restore weights, stage, optimiser, scaler, epoch and history from a checkpoint."""
        state = load_checkpoint(path, self.device)
        if state.get("trainer") != self.name or state.get("configuration_name") != self.setup.configuration_name:
            raise DscovidError(f"{path}: written by {state.get('trainer')}__{state.get('configuration_name')}, "
                               f"not {self.name}__{self.setup.configuration_name}")
        self.network.load_state_dict(state["network_weights"])
        self.epoch = int(state["epoch"])
        self.history = History.from_state(state.get("history", {}))
        self.ema, self.best_ema = state.get("ema"), state.get("best_ema")
        if self.epoch < self.total_epochs:
            self.on_stage_start(stage_at(self.stages, self.epoch)[0])
            if state.get("optimizer_state") is not None and state.get("stage") == self.stage_index:
                self.optimizer.load_state_dict(state["optimizer_state"])
        if state.get("grad_scaler_state"):
            self.scaler.load_state_dict(state["grad_scaler_state"])
        log.info("Resumed from %s at epoch %d of %d", path.name, self.epoch, self.total_epochs)

    def on_train_start(self) -> None:
        """Start the data loaders (seeded by the run seed, the rank and the first epoch)."""
        self.open_log()
        for note in self._unused_notes:
            log.info(note)
        self.check_reduced_precision()
        s = self.setup
        patch = self.configuration.segmentation.patch_size_zyx
        spacing = self.configuration.preprocessing.target_spacing_zyx_mm
        # A resumed run must not replay the batches of the first epochs: the stream depends on the start epoch.
        stream = int(np.random.SeedSequence([s.seed, self.context.rank, self.epoch]).generate_state(1)[0])
        # Stage 1 trains on the ground truth: no old maps. Nor when there is nothing left to train.
        fresh = (self.epoch >= self.total_epochs
                 or self.step_mode(self.stages[stage_at(self.stages, self.epoch)[0]]) == "separate")
        self.lesion_context.on_train_start(fresh, self.context)
        context = self.lesion_context
        self.train_loader = build_loader(s.train_cases, self.batch_size, patch, spacing, self.oversample,
                                         self.augmentation(), stream, s.num_workers, context.folder,
                                         context.hard_negative_folder, context.hard_negative_fraction,
                                         self.lesion_sampling)
        val_cases = s.val_cases or s.train_cases
        # Validation patches are always drawn by voxel: its pseudo-Dice (and the EMA that picks checkpoint_best)
        # then measures the network the same way whatever sampling trained it.
        self.val_loader = build_loader(val_cases, self.batch_size, patch, spacing, self.oversample,
                                       AugmentationSettings.none(), stream + 1, 1 if s.num_workers >= 2 else 0,
                                       context.folder)
        log.info("%s on %s (%s), fold folder %s: %d training / %d validation cases, batch %d x %d process(es), "
                 "%d epochs in %d stage(s)", self.name, self.device, dtype_name(self.autocast_dtype), self.output_dir,
                 len(s.train_cases), len(s.val_cases), self.batch_size, self.context.world_size, self.total_epochs,
                 len(self.stages))

    def check_reduced_precision(self) -> None:
        """Take out of bfloat16 the layers whose kernels this CPU computes wrong; float32 if that does not suffice.

        One batch of random inputs with the training shapes goes through the network, and each layer is replayed
        at the shapes it saw, in bfloat16 and in float32, forward and backward
        (``dscovid.model.precision.kernel_faults``). The faulty layers then compute in float32 inside the bfloat16
        network (``compute_in_float32``), and the check runs again; should a layer still be wrong, the whole run
        trains in float32. The network is in eval mode, so nothing it keeps (the findings head's statistics) moves.
        CUDA's float16 has the gradient scaler and is not probed.
        """
        if self.autocast_dtype != torch.bfloat16 or self.device.type != "cpu":
            return
        inputs = random_inputs(self.configuration, self.batch_size, torch.Generator().manual_seed(0))
        was_training = self.network.training
        self.network.eval()
        try:
            # The unwrapped network: no DDP hooks for a forward that trains nothing.
            faults = kernel_faults(self.network, lambda: self.network(**inputs), self.autocast_dtype, self.device)
            if not faults:
                return
            modules = dict(self.network.named_modules())
            for name, _, _ in faults:
                compute_in_float32(modules[name])
            remaining = kernel_faults(self.network, lambda: self.network(**inputs), self.autocast_dtype, self.device)
        finally:
            self.network.train(was_training)
        where, error = faults[0][1:]
        if not remaining:
            log.warning("bfloat16 computes wrong results on this CPU (%s: relative error %.3g against float32); "
                        "%d layer(s) compute in float32: %s", where, error, len(faults),
                        ", ".join(name for name, _, _ in faults))
            self.float32_layers = [name for name, _, _ in faults]
            return
        log.warning("bfloat16 computes wrong results on this CPU (%s: relative error %.3g against float32), still "
                    "with the faulty layers in float32 (%s); training in float32", where, error, remaining[0][1])
        self.autocast_dtype = None

    def augmentation(self) -> AugmentationSettings:
        """The training augmentation (a hook: a variant may return other settings)."""
        return AugmentationSettings()

    def trainable_parameters(self, stage: StageConfig) -> list[torch.nn.Parameter]:
        """Parameters of the modules a stage trains (``trainable``: ``all`` or module names / aliases)."""
        if "all" in stage.trainable:
            return list(self.network.parameters())
        for entry in stage.trainable:
            if entry not in MODULE_GROUPS:
                known = ", ".join(["all", *MODULE_GROUPS])
                raise DscovidError(f"training.stages ({stage.name}).trainable: unknown module {entry!r} "
                                   f"(known: {known})")
        return self.network.parameters_of(stage.trainable)

    def on_stage_start(self, index: int) -> None:
        """Freeze what the stage does not train, make its optimiser, and (re)wrap the network for DDP."""
        stage = self.stages[index]
        self.stage_index = index
        trainable = self.trainable_parameters(stage)
        chosen = {id(p) for p in trainable}
        for param in self.network.parameters():
            param.requires_grad_(id(param) in chosen)
        if not trainable:
            raise DscovidError(f"training stage {stage.name!r} trains no parameter of this network")
        self.optimizer = make_optimizer(stage, self._parameter_groups(trainable))
        if self.context.enabled:
            # Re-wrapped per stage: DDP records which parameters need gradients when it is built.
            self.model = DistributedDataParallel(self.network, find_unused_parameters=True)
        log.info("Stage %d/%d %r: %d epochs x %d iterations, %s lr %g (%s), loss %s, training %s",
                 index + 1, len(self.stages), stage.name, stage.epochs, stage.iterations_per_epoch,
                 stage.optimizer.name, stage.optimizer.lr, stage.schedule, self.step_mode(stage),
                 "all" if "all" in stage.trainable else ", ".join(stage.trainable))

    def _parameter_groups(self, trainable: list[torch.nn.Parameter]) -> list[dict]:
        """One optimiser group, or two when the findings head learns at ``training.findings_head_lr_scale`` x lr.

        The head is one linear layer over standardised findings; at the fine-tuning rate (1e-4) it barely follows
        the switch from the ground-truth lesion context of stage 1 to the network's own Ŝ of stage 2.
        """
        head = getattr(self.network, "findings_head", None)
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        rest = [p for p in trainable if id(p) not in head_ids]
        own = [p for p in trainable if id(p) in head_ids]
        if not own or self.findings_lr_scale == 1.0:
            return [{"params": trainable, "lr_scale": 1.0}]
        return [group for group in ({"params": rest, "lr_scale": 1.0},
                                    {"params": own, "lr_scale": self.findings_lr_scale}) if group["params"]]

    def step_mode(self, stage: StageConfig) -> str:
        """``separate`` (stage-1 pre-training of each part by its own loss) or ``total`` (the network's loss)."""
        return "separate" if stage.tasks == "separate" and self.network.config.tasks == "joint" else "total"

    # ---- one iteration ------------------------------------------------------------------------------------------

    def to_device(self, batch: dict) -> dict:
        """The network inputs and targets of a loader batch, as tensors on the training device."""
        device = self.device
        return {
            "seg_patch": torch.from_numpy(batch["data"]).to(device, non_blocking=True),
            "patch_box": torch.from_numpy(batch["patch_box"]),
            "volume_shape": torch.from_numpy(batch["volume_shape"]),
            "cls_image": torch.from_numpy(batch["cls_image"]).to(device, non_blocking=True),
            "lesion_context": torch.from_numpy(batch["cls_lesion"]).to(device, non_blocking=True),
            "lesion_target": torch.from_numpy(batch["seg"]).to(device, non_blocking=True),
            "class_index": torch.from_numpy(batch["class_index"]).to(device, non_blocking=True),
            "lesion_annotated": torch.from_numpy(batch["lesion_annotated"]).to(device, non_blocking=True),
        }

    def forward(self, inputs: dict):
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.model(seg_patch=inputs["seg_patch"], patch_box=inputs["patch_box"],
                              volume_shape=inputs["volume_shape"], cls_image=inputs["cls_image"],
                              lesion_context=inputs["lesion_context"])

    def compute_loss(self, outputs, inputs: dict):
        return self.loss(outputs, inputs["lesion_target"], inputs["class_index"], inputs["lesion_annotated"])

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimiser step; returns the loss terms."""
        self.network.train()
        inputs = self.to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.step_mode(self.stages[self.stage_index]) == "separate":
            terms = self._separate_backward(inputs)
        else:
            result = self.compute_loss(self.forward(inputs), inputs)
            terms = dict(result.terms)
            if math.isfinite(terms["total"]):
                self.scaler.scale(result.total).backward()
        if not math.isfinite(terms["total"]):
            log.warning("Non-finite loss at epoch %d (%s); step skipped", self.epoch, terms)
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return terms
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.network.parameters() if p.requires_grad],
                                              self.grad_clip_norm)
        if not self.use_amp and not torch.isfinite(norm):
            # Without the gradient scaler (which skips such steps itself), one step would make every weight NaN.
            log.warning("Non-finite gradient at epoch %d (loss %.4g); step skipped", self.epoch, terms["total"])
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return terms
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return terms

    def _separate_backward(self, inputs: dict) -> dict[str, float]:
        """Stage 1: the segmentation loss updates the segmentation part only, the classification loss the other.

        Both losses come from one forward; ``backward(inputs=...)`` routes each to its part. That bypasses DDP's
        reducer, so under DDP the step runs in ``no_sync`` and the gradients are averaged here.
        """
        from dscovid.model.losses import weighted_cross_entropy

        sync_off = self.model.no_sync() if self.context.enabled else contextlib.nullcontext()
        with sync_off:
            outputs = self.forward(inputs)
            c = self.loss.config
            seg, parts = self.loss.segmentation(outputs.lesion_logits, inputs["lesion_target"],
                                                inputs["lesion_annotated"])
            cls = weighted_cross_entropy(outputs.class_logits, inputs["class_index"], c.class_weights)
            seg_total, cls_total = c.lambda_seg * seg, c.lambda_cls * cls
            terms = {"seg": float(seg.detach()), "cls": float(cls.detach()), **parts}
            findings = self.loss.findings(outputs, inputs["class_index"])
            if findings is not None:
                terms["findings"] = float(findings.detach())
                cls_total = cls_total + c.lambda_findings * findings
            total = float(seg_total.detach() + cls_total.detach())
            terms["total"] = total
            if math.isfinite(total):
                seg_params, cls_params = self._parts()
                if seg_params:
                    self.scaler.scale(seg_total).backward(inputs=seg_params, retain_graph=bool(cls_params))
                if cls_params:
                    self.scaler.scale(cls_total).backward(inputs=cls_params)
        if math.isfinite(total):
            average_gradients(self.network.parameters(), self.context)
        return terms

    def _parts(self) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        parts: dict[str, list[torch.nn.Parameter]] = {"segmentation": [], "classification": []}
        for name, param in self.network.named_parameters():
            if param.requires_grad:
                parts[self.network.task_of(name)].append(param)
        return parts["segmentation"], parts["classification"]

    @torch.no_grad()
    def validation_step(self, batch: dict) -> dict[str, float]:
        """Counts for the pseudo-Dice (tp, fp, fn over annotated samples) and accuracy, plus the loss."""
        self.network.eval()
        inputs = self.to_device(batch)
        outputs = self.forward(inputs)
        result = self.compute_loss(outputs, inputs)
        counts = {"loss": result.terms["total"], "tp": 0.0, "fp": 0.0, "fn": 0.0, "correct": 0.0, "n": 0.0}
        if outputs.lesion_logits is not None:
            annotated = inputs["lesion_annotated"].view(-1, *[1] * (outputs.lesion_logits.ndim - 1))
            predicted = (outputs.lesion_logits > 0) & annotated
            target = (inputs["lesion_target"] > 0.5) & annotated
            counts["tp"] = float((predicted & target).sum())
            counts["fp"] = float((predicted & ~target).sum())
            counts["fn"] = float((~predicted & target).sum())
        if outputs.class_logits is not None:
            counts["correct"] = float((outputs.class_logits.argmax(1) == inputs["class_index"]).sum())
            counts["n"] = float(len(inputs["class_index"]))
        return counts

    def on_validation_epoch_end(self, outputs: list[dict[str, float]]) -> dict[str, float]:
        """Pseudo-Dice, accuracy and mean loss over the validation batches of all ranks."""
        keys = ("loss", "tp", "fp", "fn", "correct", "n")
        sums = sum_over_ranks([sum(o[k] for o in outputs) for k in keys] + [float(len(outputs))], self.context,
                              self.device)
        total = dict(zip(keys, sums[:-1]))
        denominator = 2 * total["tp"] + total["fp"] + total["fn"]
        has_seg = self.network.config.tasks != "classification"
        has_cls = self.network.config.tasks != "segmentation"
        return {
            "val_loss": total["loss"] / max(sums[-1], 1.0),
            "val_dice": (2 * total["tp"] / denominator if denominator > 0 else float("nan")) if has_seg else math.nan,
            "val_accuracy": total["correct"] / total["n"] if has_cls and total["n"] > 0 else float("nan"),
        }

    def validation_score(self, metrics: dict[str, float]) -> float:
        """What the best checkpoint is chosen by: the mean of the available pseudo-Dice and accuracy."""
        values = [v for v in (metrics["val_dice"], metrics["val_accuracy"]) if math.isfinite(v)]
        return float(np.mean(values)) if values else 0.0

    # ---- epochs -------------------------------------------------------------------------------------------------

    def on_epoch_start(self) -> float:
        index, in_stage = stage_at(self.stages, self.epoch)
        if index != self.stage_index:
            self.on_stage_start(index)
        lr = learning_rate(self.stages[index], in_stage)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.lesion_context.on_epoch_start(self.network, self.setup.train_cases, self.setup.val_cases, in_stage,
                                           self.step_mode(self.stages[index]) == "total", self.configuration,
                                           self.device, self.context)
        return lr

    def run_epoch(self) -> None:
        started = time.perf_counter()
        lr = self.on_epoch_start()
        stage = self.stages[self.stage_index]
        terms: list[dict[str, float]] = []
        waited = 0.0
        self.skipped_steps = 0
        for _ in range(stage.iterations_per_epoch):
            before = time.perf_counter()
            batch = next(self.train_loader)
            waited += time.perf_counter() - before
            terms.append(self.train_step(batch))
        if self.skipped_steps == stage.iterations_per_epoch:
            raise DscovidError(f"{self.output_dir}: training stopped at epoch {self.epoch + 1}: every step had a "
                               f"non-finite loss or gradient (DSCOVID_PRECISION=float32 rules out reduced precision)")
        val_iterations = self.setup.val_iterations or max(2, stage.iterations_per_epoch // 5)
        metrics = self.on_validation_epoch_end([self.validation_step(next(self.val_loader))
                                                for _ in range(val_iterations)])
        self.on_epoch_end(lr, terms, metrics, time.perf_counter() - started, waited)

    def on_epoch_end(self, lr: float, terms: list[dict[str, float]], metrics: dict[str, float], seconds: float,
                     waited_s: float) -> None:
        """Record the epoch, update the EMA score, write the latest (and maybe best) checkpoint and the plot."""
        mean = {key: float(np.mean([t[key] for t in terms if key in t])) for key in ("total", "seg", "cls", "findings", "ta")
                if any(key in t for t in terms)}
        score = self.validation_score(metrics)
        self.ema = score if self.ema is None else self.ema_momentum * self.ema + (1 - self.ema_momentum) * score
        self.history.append(epoch=self.epoch, stage=self.stage_index, lr=lr, train_loss=mean.get("total", math.nan),
                            train_seg=mean.get("seg", math.nan), train_cls=mean.get("cls", math.nan),
                            train_ta=mean.get("ta", math.nan), ema_score=self.ema, epoch_time_s=seconds, **metrics)
        log.info("epoch %d/%d (stage %s) lr %.2e | train loss %.4f (%s) | val loss %.4f, pseudo-Dice %.3f, "
                 "accuracy %.3f, EMA %.3f | %.1f s (%.1f s waiting for data)", self.epoch + 1, self.total_epochs,
                 self.stages[self.stage_index].name, lr, mean.get("total", math.nan),
                 ", ".join(f"{k} {v:.4f}" for k, v in mean.items() if k != "total"), metrics["val_loss"],
                 metrics["val_dice"], metrics["val_accuracy"], self.ema, seconds, waited_s)
        self.epoch += 1
        if self.context.is_main:
            improved = self.best_ema is None or self.ema > self.best_ema
            if improved:
                self.best_ema = self.ema
            save_checkpoint(self.checkpoint_state(), self.output_dir / LATEST)
            if self.epoch < self.total_epochs and stage_at(self.stages, self.epoch)[0] != self.stage_index:
                save_checkpoint(self.checkpoint_state(), self.output_dir / stage_checkpoint(self.stage_index + 1))
            if improved:
                save_checkpoint(self.checkpoint_state(), self.output_dir / BEST)
                log.info("New best EMA score %.4f: %s written", self.ema, BEST)
            if self.epoch == self.total_epochs or time.monotonic() - self._last_plot > self.plot_interval_s:
                plot_progress(self.history, self.output_dir / "progress.png",
                              f"{self.name}__{self.setup.configuration_name}")
                self._last_plot = time.monotonic()
        self.context.barrier()

    def checkpoint_state(self) -> dict:
        from dscovid import __version__

        return {
            "network_weights": to_cpu(self.network.state_dict()),
            "optimizer_state": to_cpu(self.optimizer.state_dict()) if self.optimizer is not None else None,
            "grad_scaler_state": self.scaler.state_dict() if self.use_amp else None,
            "epoch": self.epoch,
            "stage": self.stage_index,
            "trainer": self.name,
            "configuration_name": self.setup.configuration_name,
            "configuration": self.configuration.to_dict(),
            "plans": self.setup.plans.to_dict(),
            "history": self.history.to_state(),
            "ema": self.ema,
            "best_ema": self.best_ema,
            "precision": dtype_name(self.autocast_dtype),
            "float32_layers": self.float32_layers,
            "dscovid_version": __version__,
        }

    def weights_digest(self) -> str:
        """SHA-1 of the network's weights (bit-exact comparison of runs and of DDP replicas)."""
        digest = hashlib.sha1()
        for name, tensor in sorted(self.network.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def check_replicas(self) -> None:
        """Under DDP, confirm that every process ends with the same weights (they diverge only through a bug)."""
        if not self.context.enabled:
            return
        digests: list[str | None] = [None] * self.context.world_size
        dist.all_gather_object(digests, self.weights_digest())
        if len(set(digests)) != 1:
            raise DscovidError(f"the {self.context.world_size} DDP replicas ended with different weights: {digests}")
        log.info("Replica weights identical on %d processes (sha1 %s)", self.context.world_size, digests[0][:12])

    def on_train_end(self) -> None:
        """Check the replicas, write the final checkpoint, stop the loaders."""
        self.check_replicas()
        if self.context.is_main:
            save_checkpoint(self.checkpoint_state(), self.output_dir / FINAL)
            log.info("Training finished after %d epochs: %s written", self.epoch, FINAL)
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                close_loader(loader)
        self.train_loader = self.val_loader = None
        self.context.barrier()

    def open_log(self) -> None:
        """Append this run's messages to ``training_log.txt`` (main process; idempotent)."""
        if not self.context.is_main or self._file_handler is not None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._file_handler = logging.FileHandler(self.output_dir / "training_log.txt", encoding="utf-8")
        self._file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        package = logging.getLogger("dscovid")
        package.addHandler(self._file_handler)
        quiet = package.getEffectiveLevel()
        if quiet > logging.INFO:
            # The file always gets INFO; the console keeps the level the user asked for (-q).
            for handler in logging.getLogger().handlers:
                if handler.level == logging.NOTSET:
                    handler.setLevel(quiet)
            package.setLevel(logging.INFO)

    def close_log(self) -> None:
        if self._file_handler is not None:
            logging.getLogger("dscovid").removeHandler(self._file_handler)
            self._file_handler.close()
            self._file_handler = None

    def run(self) -> None:
        """Train from ``self.epoch`` (0, or where :meth:`resume` left it) to the end of the last stage."""
        self.on_train_start()
        try:
            while self.epoch < self.total_epochs:
                self.run_epoch()
            self.on_train_end()
        finally:
            for loader in (self.train_loader, self.val_loader):
                if loader is not None:
                    close_loader(loader)
