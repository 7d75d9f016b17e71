"""Stage 1: train the slice CNN for one fold (the paper's ResNet-50 on single slices).

    python -m cspine train-slices --config demo fold=0
    torchrun --nproc_per_node=4 -m cspine train-slices --config paper fold=0

Writes to ``<run>/slice/fold<k>/``: ``last.pt`` every epoch (a killed run resumes from it, exactly),
``best.pt`` (the model `extract` and `predict` use, with the studies it trained on and how it reads a
study), ``history.csv``, ``train.log``, the resolved ``config.yaml``, the validation report in Table 2's
form and the out-of-fold slice predictions. The shape follows timm's ``train.py``: `setup_fold` builds,
`train_one_epoch` trains, `validate` scores, `save_epoch` writes, and `train_fold` runs the loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader

from cspine.checkpoints import SliceMeta, save_model
from cspine.config import Config, SliceConfig, check_unchanged, config_dict, load_config, save_config
from cspine.data import (
    BalancedDistributedSampler,
    SliceDataset,
    build_transforms,
    height_matched_weights,
    seed_worker,
)
from cspine.inputs import FRACTURE, SLICE_OUTPUTS, SliceReading
from cspine.labels import UNKNOWN, vertebra_slice_labels
from cspine.metrics import cv_table, paper_reports, write_table
from cspine.models import SliceNet
from cspine.progress import progress
from cspine.runs import Run, write_csv, write_json, write_text
from cspine.runtime import (
    Runtime,
    autocast,
    init_distributed,
    seed_everything,
)
from cspine.training import distributed, mixed_precision, optimizer_step, read_resume, restore, save_resume

log = logging.getLogger(__name__)
PROGRESS_EVERY = 10  # steps between progress-bar loss updates (each one waits for the GPU)


def slice_pools(index: pd.DataFrame, folds: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training and validation slices of a fold: labelled slices of studies outside / inside the fold."""
    held_out = set(folds.loc[folds["fold"] == fold, "StudyInstanceUID"])
    labelled = index[index["label"] != UNKNOWN]
    in_fold = labelled["StudyInstanceUID"].isin(held_out)
    return labelled[~in_fold].reset_index(drop=True), labelled[in_fold].reset_index(drop=True)


def validation_subset(val: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    """At most ``cap`` validation slices, drawn per label in the fold's proportions (0 = all).

    Both labels stay present whenever the fold has both (at least one positive), so the learning curve's
    AUC is defined; drawing every positive first could leave no negative at all when positives exceed ``cap``.
    """
    if not cap or len(val) <= cap:
        return val
    positive = val["label"] == 1
    n_pos = min(int(positive.sum()), max(int(positive.any()), round(cap * positive.mean())))
    picks = [
        val[positive].sample(n=n_pos, random_state=seed),
        val[~positive].sample(n=min(cap - n_pos, int((~positive).sum())), random_state=seed),
    ]
    return pd.concat(picks).sort_index().reset_index(drop=True)


def box_loss(box_logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """BCE of the box map against the boxes pooled to its grid (a cell is positive if a box touches it).

    ``boxes`` float [B, H, W] is 1 inside boxes, 0 outside and −1 on slices whose boxes are unknown (skipped).
    """
    target = F.adaptive_max_pool2d(boxes[:, None].float(), box_logits.shape[-2:])
    known = (target >= 0).float()
    bce = F.binary_cross_entropy_with_logits(box_logits.float(), target.clamp(min=0), reduction="none")
    return (bce * known).sum() / known.sum().clamp(min=1.0)


def slice_loss(
    logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor, aux_weight: float
) -> torch.Tensor:
    """BCE over the known outputs: the slice-fracture head weighs 1, the per-vertebra heads ``aux_weight``."""
    weights = torch.full((logits.shape[1],), aux_weight, device=logits.device)
    weights[0] = 1.0
    w = known * weights
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    return (bce * w).sum() / w.sum().clamp(min=1.0)


@torch.inference_mode()
def predict_loader(
    model: torch.nn.Module,
    loader: DataLoader,
    rt: Runtime,
    dtype,
    channels_last: bool,
    desc: str = "validate",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities [N, 15], targets and known masks for every item of a loader, in order."""
    model.eval()
    probs, targets, knowns = [], [], []
    for images, target, known, *_ in progress(loader, desc, steps=True, enabled=rt.is_main, leave=False):
        images = images.to(rt.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(rt.device, dtype):
            logits = model(images)
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        targets.append(target.numpy())
        knowns.append(known.numpy())
    return np.concatenate(probs), np.concatenate(targets), np.concatenate(knowns)


def _loader(dataset, batch_size, workers, sampler=None, shuffle=False, seed=0, pin=False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=shuffle and sampler is None,
        num_workers=workers,
        worker_init_fn=seed_worker if workers else None,
        generator=generator,
        pin_memory=pin,
        persistent_workers=False,
        drop_last=False,
    )


def learning_rate_schedule(optimizer: torch.optim.Optimizer, slice_cfg: SliceConfig, updates_per_epoch: int):
    """timm's scheduler for ``slice_cfg.schedule``: the paper's StepLR, stepped per epoch, or cosine, per update.

    Call ``step(epoch)`` after each epoch and ``step_update(n)`` after each optimizer update: the rate is a
    function of those counts alone, so a resumed run picks it up exactly.
    """
    if slice_cfg.schedule not in ("step", "cosine"):
        raise ValueError(f"slice.schedule must be 'step' or 'cosine', not {slice_cfg.schedule!r}")
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=slice_cfg.schedule,
        num_epochs=slice_cfg.epochs,
        decay_epochs=slice_cfg.step_size,
        decay_rate=slice_cfg.gamma,
        min_lr=slice_cfg.min_lr,
        warmup_lr=slice_cfg.lr / 100,
        warmup_epochs=slice_cfg.warmup_epochs,
        step_on_epochs=slice_cfg.schedule == "step",
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.getLogger("cspine").addHandler(handler)
    return handler


@dataclass
class FoldTraining:
    """Everything one fold's training holds, built by `setup_fold`, advanced by `train_one_epoch`."""

    cfg: Config
    run: Run
    fold: int
    rt: Runtime
    train_df: pd.DataFrame
    val_df: pd.DataFrame
    train_set: SliceDataset
    sampler: BalancedDistributedSampler
    train_loader: DataLoader
    val_loader: DataLoader
    model: SliceNet
    net: torch.nn.Module  # the model, wrapped in DistributedDataParallel under torchrun
    ema: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None
    channels_last: bool
    updates_per_epoch: int
    epoch: int = 0  # the next epoch to train
    best_loss: float = math.inf
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)

    @property
    def with_boxes(self) -> bool:
        return self.cfg.slice.box_weight > 0

    @property
    def size(self) -> int:
        return self.cfg.slice.input_size or self.cfg.prepare.size

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights validation scores and best.pt keeps: the EMA's when enabled."""
        return self.ema.module if self.ema is not None else self.model


def checked_vertebrae(run: Run) -> pd.DataFrame:
    """The segment stage's per-slice vertebrae, less the studies whose vertebrae fail its check
    (``checks.csv``): their fractured slices stay unknown rather than labelled from a wrong vertebra."""
    vertebrae = pd.read_csv(run.seg_file("vertebrae.csv"), dtype={"StudyInstanceUID": str})
    checks = run.read_checks()
    rejected = set(checks.loc[~checks["passed"], "StudyInstanceUID"])
    return vertebrae[~vertebrae["StudyInstanceUID"].isin(rejected)]


def fold_slices(cfg: Config, run: Run, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The labelled slices fold ``fold`` trains on and validates on (`slice_pools`, `validation_subset`).

    Raises:
        RuntimeError: either set is empty.
    """
    slice_cfg = cfg.slice
    index = run.cache.read_index()
    if slice_cfg.labels == "vertebrae":
        index = vertebra_slice_labels(index, run.read_labels(), checked_vertebrae(run))
    train_df, val_df = slice_pools(index, run.read_folds(), fold)
    val_df = validation_subset(val_df, slice_cfg.val_max_slices, slice_cfg.seed)
    if train_df.empty or val_df.empty:
        raise RuntimeError(
            f"fold {fold}: {len(train_df)} training and {len(val_df)} validation slices with labels; "
            "more studies with boxes (or negatives) are needed"
        )
    return train_df, val_df


def _fold_model(
    slice_cfg: SliceConfig, rt: Runtime, with_boxes: bool
) -> tuple[SliceNet, torch.nn.Module | None]:
    """The fold's CNN on the device (channels_last as ``slice_cfg`` says: faster with AMP on a GPU, and on a
    CPU too with oneDNN, 1.25x the step at the demo's size), and its EMA (None without one), made before
    DDP wraps the model."""
    model = SliceNet(
        slice_cfg.backbone,
        slice_cfg.pretrained_file,
        slice_cfg.dropout,
        box_head=with_boxes,
        context=slice_cfg.context,
        width=slice_cfg.width,
    ).to(rt.device)
    if slice_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not slice_cfg.ema:
        return model, None
    from timm.utils import ModelEmaV3

    return model, ModelEmaV3(model, decay=slice_cfg.ema_decay)


def setup_fold(cfg: Config, run: Run, fold: int, rt: Runtime) -> FoldTraining:
    """Data, model, optimiser and schedule of one fold, in the order that fixes the RNG streams."""
    slice_cfg = cfg.slice
    if slice_cfg.select not in ("val_loss", "last"):
        raise ValueError(f"slice.select must be 'val_loss' or 'last', not {slice_cfg.select!r}")
    if slice_cfg.labels not in ("boxes", "vertebrae"):
        raise ValueError(f"slice.labels must be 'boxes' or 'vertebrae', not {slice_cfg.labels!r}")
    seed_everything(slice_cfg.seed + fold)
    train_df, val_df = fold_slices(cfg, run, fold)
    size, with_boxes = slice_cfg.input_size or cfg.prepare.size, slice_cfg.box_weight > 0
    train_set = SliceDataset(
        run.cache.root,
        train_df,
        build_transforms(slice_cfg, True, size, seed=slice_cfg.seed),
        with_boxes,
        context=slice_cfg.context,
    )
    val_set = SliceDataset(
        run.cache.root, val_df, build_transforms(slice_cfg, False, size), context=slice_cfg.context
    )
    labels = train_df["label"].to_numpy() if slice_cfg.balance else None
    total = (
        slice_cfg.steps_per_epoch * slice_cfg.batch_size * slice_cfg.accum_steps * rt.world_size
        if slice_cfg.steps_per_epoch
        else None
    )
    matched = height_matched_weights(train_df) if slice_cfg.balance and slice_cfg.height_matched > 0 else None
    sampler = BalancedDistributedSampler(
        train_set,
        labels,
        total,
        rt.world_size,
        rt.rank,
        seed=slice_cfg.seed + fold,
        positive_fraction=slice_cfg.positive_fraction,
        negative_weights=matched,
        matched_fraction=slice_cfg.height_matched,
    )
    train_loader = _loader(train_set, slice_cfg.batch_size, slice_cfg.workers, sampler=sampler, pin=rt.cuda)
    val_loader = _loader(val_set, slice_cfg.batch_size * 2, slice_cfg.workers, pin=rt.cuda)

    model, ema = _fold_model(slice_cfg, rt, with_boxes)
    channels_last = slice_cfg.channels_last
    optimizer = torch.optim.Adam(model.parameters(), lr=slice_cfg.lr, weight_decay=slice_cfg.weight_decay)
    updates_per_epoch = math.ceil(len(train_loader) / slice_cfg.accum_steps)
    dtype, scaler = mixed_precision(rt.device, slice_cfg.amp)
    return FoldTraining(
        cfg,
        run,
        fold,
        rt,
        train_df,
        val_df,
        train_set,
        sampler,
        train_loader,
        val_loader,
        model,
        distributed(model, rt),
        ema,
        optimizer,
        learning_rate_schedule(optimizer, slice_cfg, updates_per_epoch),
        scaler,
        dtype,
        channels_last,
        updates_per_epoch,
    )


def resume(t: FoldTraining) -> None:
    """Continues from ``last.pt`` if there is one: weights, optimiser, scaler, EMA, history and RNG states."""
    state = read_resume(t.run.slice_last(t.fold), "slice-resume")
    if state is None:
        return
    restore(
        state, t.model, t.optimizer, t.scaler, t.ema
    )  # the rate is a function of the step: `train_fold` sets it
    t.epoch, t.best_loss, t.bad_epochs = state["epoch"] + 1, state["best_loss"], state["bad_epochs"]
    t.history = state["history"]
    log.info(
        "fold %d: resumed after epoch %d (best validation loss %.4f)", t.fold, state["epoch"], t.best_loss
    )


def train_one_epoch(t: FoldTraining, epoch: int, max_steps: int | None) -> dict:
    """One epoch of updates; returns its mean training loss, images seen, seconds, last rate and updates."""
    slice_cfg, rt = t.cfg.slice, t.rt
    t.sampler.set_epoch(epoch)
    t.train_loader.generator.manual_seed(
        slice_cfg.seed * 100003 + t.fold * 1009 + epoch
    )  # worker augmentation seeds
    t.train_set.transform.set_random_seed(
        slice_cfg.seed * 100003 + t.fold * 1009 + epoch
    )  # in-process augmentation
    t.net.train()
    started, seen, updates, steps = time.perf_counter(), 0, epoch * t.updates_per_epoch, 0
    lr = t.optimizer.param_groups[0]["lr"]  # history's lr: the rate of the epoch's last update
    loss_sum = torch.zeros((), device=rt.device)  # summed on the device: no host sync per step
    bar = progress(
        t.train_loader,
        f"fold {t.fold} epoch {epoch + 1}/{slice_cfg.epochs}",
        steps=True,
        enabled=rt.is_main,
        leave=False,
    )
    t.optimizer.zero_grad(set_to_none=True)
    for step, (images, target, known, *boxes) in enumerate(bar):
        images = images.to(rt.device, non_blocking=True)
        target, known = target.to(rt.device, non_blocking=True), known.to(rt.device, non_blocking=True)
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        update = (step + 1) % slice_cfg.accum_steps == 0 or step + 1 == len(t.train_loader)
        with nullcontext() if update or not rt.distributed else t.net.no_sync():
            with autocast(rt.device, t.dtype):
                logits, box_logits = t.net(images, with_boxes=True) if t.with_boxes else (t.net(images), None)
            loss = slice_loss(logits, target, known, slice_cfg.aux_weight)
            if t.with_boxes:
                loss = loss + slice_cfg.box_weight * box_loss(
                    box_logits, boxes[0].to(rt.device, non_blocking=True)
                )
            t.scaler.scale(loss / slice_cfg.accum_steps).backward()
        if update:
            optimizer_step(t.optimizer, t.scaler, slice_cfg.clip_grad)
            if t.ema is not None:
                t.ema.update(t.model)
            steps, updates, lr = steps + 1, updates + 1, t.optimizer.param_groups[0]["lr"]
            t.scheduler.step_update(updates)
        loss_sum += loss.detach() * len(images)
        seen += len(images)
        if step % PROGRESS_EVERY == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}")
        if max_steps is not None and steps >= max_steps:
            break
    t.scheduler.step(epoch + 1)
    return {
        "train_loss": loss_sum.item() / max(seen, 1),
        "seen": seen,
        "seconds": time.perf_counter() - started,
        "lr": lr,
        "steps": steps,
    }


def validate(t: FoldTraining) -> tuple[np.ndarray, float, dict]:
    """The evaluation weights on the validation slices: probabilities [N, 15], loss and Table 2's report."""
    probs, targets, known = predict_loader(t.eval_model, t.val_loader, t.rt, t.dtype, t.channels_last)
    val_loss = float(
        slice_loss(
            torch.logit(torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6)),
            torch.from_numpy(targets),
            torch.from_numpy(known),
            t.cfg.slice.aux_weight,
        )
    )
    return probs, val_loss, paper_reports(targets[:, FRACTURE], probs[:, FRACTURE])


def save_best(t: FoldTraining, epoch: int, val_loss: float, probs: np.ndarray, report: dict) -> None:
    """best.pt, with what inference needs and the studies it trained on, and its validation outputs."""
    cfg = t.cfg
    reading = SliceReading(cfg.prepare.size, cfg.prepare.crop, cfg.prepare.margin, t.size, cfg.slice.context)
    meta = SliceMeta(
        reading,
        fold=t.fold,
        epoch=epoch + 1,
        val_loss=float(val_loss),
        trained_on=sorted(t.train_df["StudyInstanceUID"].unique()),
        config=config_dict(cfg),
    )
    save_model(t.eval_model, t.run.slice_best(t.fold), meta)
    _write_validation(t, probs, report)


def save_last(t: FoldTraining, epoch: int) -> None:
    """last.pt: everything `resume` needs to continue after ``epoch`` exactly, and the history so far."""
    write_csv(pd.DataFrame(t.history), t.run.slice_file(t.fold, "history.csv"))
    save_resume(
        t.run.slice_last(t.fold),
        "slice-resume",
        t.model,
        t.optimizer,
        t.scaler,
        epoch,
        t.history,
        t.ema,
        best_loss=t.best_loss,
        bad_epochs=t.bad_epochs,
    )


def end_of_epoch(t: FoldTraining, epoch: int, trained: dict) -> bool:
    """Validates, records and saves one finished epoch (rank 0); returns whether to stop early."""
    slice_cfg = t.cfg.slice
    early_stopping = slice_cfg.select == "val_loss"  # "last" trains every epoch: the final one is the model
    probs, val_loss, report = validate(t)
    row = {
        "epoch": epoch + 1,
        "train_loss": trained["train_loss"],
        "val_loss": val_loss,
        "val_auc": report["Imblcd."]["AUC"],
        "lr": trained["lr"],
        "images_per_s": trained["seen"] * t.rt.world_size / trained["seconds"],
    }
    t.history.append(row)
    improved = val_loss < t.best_loss
    t.best_loss, t.bad_epochs = (val_loss, 0) if improved else (t.best_loss, t.bad_epochs + 1)
    if improved or not early_stopping:
        save_best(t, epoch, val_loss, probs, report)
    log.info(
        "fold %d epoch %d: train loss %.4f, val loss %.4f, val AUC %.3f, %.1f img/s%s",
        t.fold,
        epoch + 1,
        row["train_loss"],
        val_loss,
        row["val_auc"],
        row["images_per_s"],
        " (best)" if improved else "",
    )
    save_last(t, epoch)
    stop = early_stopping and t.bad_epochs >= slice_cfg.patience
    if stop:
        log.info(
            "fold %d: early stopping after epoch %d (no improvement in %d epochs)",
            t.fold,
            epoch + 1,
            slice_cfg.patience,
        )
    return stop


def train_fold(
    cfg: Config,
    run_dir: str | os.PathLike,
    fold: int,
    rt: Runtime | None = None,
    max_epochs: int | None = None,
    max_steps: int | None = None,
) -> dict:
    """Trains (or resumes) the slice CNN of one fold.

    Args:
        cfg: the run's config (``slice`` section, ``prepare.size``).
        run_dir: holds ``cache/`` (from prepare) and ``folds.csv``.
        fold: the held-out fold.
        rt: the process's runtime (default: from the environment, joining torchrun's group if any).
        max_epochs: train at most this many epochs in this call (a time-boxed session); the next call
            resumes where this one stopped.
        max_steps: stop after this many optimizer steps in this call (smoke checks).

    Returns:
        A summary: epochs run, best validation loss, whether the fold finished, the fold directory.
    """
    rt = rt or init_distributed(cfg.device)
    run = Run(run_dir)
    handler = None
    if rt.is_main:
        _bind_fold_config(cfg, run, fold)
        handler = _log_to(run.slice_file(fold, "train.log"))
    try:
        t = setup_fold(cfg, run, fold, rt)
        resume(t)
        _log_start(t)
        return _loop(t, max_epochs, max_steps)
    finally:
        if handler is not None:
            logging.getLogger("cspine").removeHandler(handler)
            handler.close()


def _loop(t: FoldTraining, max_epochs: int | None, max_steps: int | None) -> dict:
    slice_cfg, rt = t.cfg.slice, t.rt
    start, steps = t.epoch, 0
    stopped = slice_cfg.select == "val_loss" and t.bad_epochs >= slice_cfg.patience
    t.scheduler.step(start)  # a per-epoch schedule moves here, a per-update one on the next line
    t.scheduler.step_update(start * t.updates_per_epoch)
    for epoch in range(start, slice_cfg.epochs):
        if stopped or (max_epochs is not None and epoch - start >= max_epochs):
            break
        trained = train_one_epoch(t, epoch, None if max_steps is None else max_steps - steps)
        steps += trained["steps"]
        stop = [end_of_epoch(t, epoch, trained) if rt.is_main else False]
        if rt.distributed:
            dist.broadcast_object_list(stop, src=0)
        stopped = stop[0]
        if max_steps is not None and steps >= max_steps:
            break
    finished = (
        stopped or len(t.history) >= slice_cfg.epochs
    )  # history holds every epoch trained, resumed ones too
    if finished and rt.is_main:
        write_json({"best_loss": t.best_loss, "epochs": len(t.history)}, t.run.slice_done(t.fold))
    return {
        "fold": t.fold,
        "dir": str(t.run.slice_dir(t.fold)),
        "epochs": len(t.history),
        "best_val_loss": t.best_loss,
        "finished": finished,
        "steps": steps,
    }


def _bind_fold_config(cfg: Config, run: Run, fold: int) -> None:
    """Records the fold's config when it starts; a resumed fold must continue with the settings it began with.

    Raises:
        ConfigError: naming each setting that would change the CNN of a fold already under way.
    """
    record = run.slice_file(fold, "config.yaml")
    if run.slice_last(fold).is_file() and record.is_file():
        check_unchanged(
            load_config(record),
            cfg,
            f"fold {fold} of {run.root}",
            lambda key: key.split(".")[0] in ("prepare", "slice", "folds"),
        )
        return
    save_config(cfg, record)


def _log_start(t: FoldTraining) -> None:
    if not t.rt.is_main:
        return
    slice_cfg = t.cfg.slice
    log.info(
        "fold %d: %d training slices (%d positive), %d validation slices; %s on %s, %d×%d, AMP %s",
        t.fold,
        len(t.train_df),
        int((t.train_df["label"] == 1).sum()),
        len(t.val_df),
        slice_cfg.backbone if slice_cfg.width == 1 else f"{slice_cfg.backbone} at width {slice_cfg.width:g}",
        t.rt.device,
        t.size,
        t.size,
        t.dtype or "off",
    )


def _write_validation(t: FoldTraining, probs: np.ndarray, report: dict) -> None:
    """Out-of-fold slice predictions and the image-level report (Table 2's form) of the epoch in best.pt."""
    oof = t.val_df[["StudyInstanceUID", "order", "slice_number", "label"]].copy()
    for i, name in enumerate(SLICE_OUTPUTS):
        oof[f"p_{name}"] = probs[:, i]
    write_csv(oof, t.run.slice_file(t.fold, "oof_slices.csv"))
    rows = [{"Data": data, **metrics} for data, metrics in report.items()]
    write_table(
        cv_table(rows, row_keys=("Data",)),
        t.run.slice_file(t.fold, "table2"),
        title=f"Image level, fold {t.fold} (validation)",
    )
    write_text(t.run.slice_file(t.fold, "report.json"), json.dumps(report, indent=2))


def is_trained(run_dir: str | os.PathLike, fold: int) -> bool:
    """Whether a fold finished training (early stop or last epoch) and has its best checkpoint."""
    run = Run(run_dir)
    return run.slice_done(fold).is_file() and run.slice_best(fold).is_file()
