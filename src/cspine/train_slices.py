"""Stage 1: train the slice CNN for one fold (the paper's ResNet-50 on single slices).

    python -m cspine train-slices --config configs/demo.yaml fold=0
    torchrun --nproc_per_node=4 -m cspine train-slices --config configs/paper.yaml fold=0

Writes to ``<run>/slice/fold<k>/``: ``last.pt`` every epoch (a killed run resumes from it, exactly),
``best.pt`` (lowest validation loss; EMA weights when enabled), ``history.csv``, ``train.log``, the
resolved ``config.yaml``, the validation report in Table 2's form and the out-of-fold slice predictions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.scheduler import create_scheduler_v2
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cspine.config import Config, SliceConfig, config_dict, save_config
from cspine.data import (
    BalancedDistributedSampler,
    SliceDataset,
    build_transforms,
    height_matched_weights,
    seed_worker,
)
from cspine.metrics import cv_table, paper_reports, write_table
from cspine.models import SLICE_OUTPUTS, SliceNet
from cspine.prepare import UNKNOWN
from cspine.runtime import (
    Runtime,
    amp_dtype,
    autocast,
    init_distributed,
    rng_state,
    seed_everything,
    set_rng_state,
)

log = logging.getLogger(__name__)
PROGRESS_EVERY = 10  # steps between progress-bar loss updates (each one waits for the GPU)


def fold_dir(run_dir: str | os.PathLike, fold: int) -> Path:
    return Path(run_dir) / "slice" / f"fold{fold}"


def slice_pools(index: pd.DataFrame, folds: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training and validation slices of a fold: labelled slices of studies outside / inside the fold."""
    held_out = set(folds.loc[folds["fold"] == fold, "StudyInstanceUID"])
    labelled = index[index["label"] != UNKNOWN]
    in_fold = labelled["StudyInstanceUID"].isin(held_out)
    return labelled[~in_fold].reset_index(drop=True), labelled[in_fold].reset_index(drop=True)


def validation_subset(val: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    """At most ``cap`` validation slices: every positive, negatives drawn at random (0 = all)."""
    if not cap or len(val) <= cap:
        return val
    pos = val[val["label"] == 1]
    neg = val[val["label"] != 1].sample(n=max(cap - len(pos), 0), random_state=seed)
    return pd.concat([pos, neg]).sort_index().reset_index(drop=True)


def box_loss(box_logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """BCE of the box map against the boxes pooled to its grid (a cell is positive if a box touches it).

    ``boxes`` float [B, H, W] is 1 inside boxes, 0 outside and −1 on slices whose boxes are unknown (skipped).
    """
    target = F.adaptive_max_pool2d(boxes[:, None].float(), box_logits.shape[-2:])
    known = (target >= 0).float()
    bce = F.binary_cross_entropy_with_logits(box_logits.float(), target.clamp(min=0), reduction="none")
    return (bce * known).sum() / known.sum().clamp(min=1.0)


def slice_loss(logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor, aux_weight: float) -> torch.Tensor:
    """BCE over the known outputs: the slice-fracture head weighs 1, the per-vertebra heads ``aux_weight``."""
    weights = torch.full((logits.shape[1],), aux_weight, device=logits.device)
    weights[0] = 1.0
    w = known * weights
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    return (bce * w).sum() / w.sum().clamp(min=1.0)


@torch.inference_mode()
def predict_loader(model: torch.nn.Module, loader: DataLoader, rt: Runtime, dtype, channels_last: bool,
                   desc: str = "validate") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities [N, 15], targets and known masks for every item of a loader, in order."""
    model.eval()
    probs, targets, knowns = [], [], []
    for images, target, known, *_ in tqdm(loader, desc=desc, leave=False, disable=not rt.is_main):
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
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle and sampler is None,
                      num_workers=workers, worker_init_fn=seed_worker if workers else None, generator=generator,
                      pin_memory=pin, persistent_workers=False, drop_last=False)


def learning_rate_schedule(optimizer: torch.optim.Optimizer, s: SliceConfig, updates_per_epoch: int):
    """timm's scheduler for ``s.schedule``: the paper's StepLR, stepped per epoch, or cosine, per update.

    Call ``step(epoch)`` after each epoch and ``step_update(n)`` after each optimizer update: the rate is a
    function of those counts alone, so a resumed run picks it up exactly.
    """
    if s.schedule not in ("step", "cosine"):
        raise ValueError(f"slice.schedule must be 'step' or 'cosine', not {s.schedule!r}")
    scheduler, _ = create_scheduler_v2(optimizer, sched=s.schedule, num_epochs=s.epochs,
                                       decay_epochs=s.step_size, decay_rate=s.gamma, min_lr=s.min_lr,
                                       warmup_lr=s.lr / 100, warmup_epochs=s.warmup_epochs,
                                       step_on_epochs=s.schedule == "step", updates_per_epoch=updates_per_epoch)
    return scheduler


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.getLogger("cspine").addHandler(handler)
    return handler


def load_slice_model(checkpoint: str | os.PathLike, device: torch.device | str = "cpu") -> SliceNet:
    """The SliceNet saved in a ``best.pt`` (its architecture is in the checkpoint; no weights file needed)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    arch = state["arch"]
    model = SliceNet(backbone=arch["backbone"], dropout=arch["dropout"], box_head=arch.get("box_head", False),
                     context=arch.get("context", 0), width=arch.get("width", 1.0))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def train_fold(cfg: Config, run_dir: str | os.PathLike, fold: int, rt: Runtime | None = None,
               max_epochs: int | None = None, max_steps: int | None = None) -> dict:
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
        A summary: epochs run, best epoch and validation loss, the fold directory.
    """
    rt = rt or init_distributed(cfg.device)
    run_dir = Path(run_dir)
    out = fold_dir(run_dir, fold)
    handler = None
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        handler = _log_to(out / "train.log")
    try:
        return _train(cfg, run_dir, out, fold, rt, max_epochs, max_steps)
    finally:
        if handler is not None:
            logging.getLogger("cspine").removeHandler(handler)
            handler.close()


def _train(cfg: Config, run_dir: Path, out: Path, fold: int, rt: Runtime, max_epochs, max_steps) -> dict:
    s = cfg.slice
    if s.select not in ("val_loss", "last"):
        raise ValueError(f"slice.select must be 'val_loss' or 'last', not {s.select!r}")
    early_stopping = s.select == "val_loss"  # "last" trains every epoch: the final one is the model
    seed_everything(s.seed + fold)
    index = pd.read_csv(run_dir / "cache" / "index.csv", dtype={"StudyInstanceUID": str})
    folds = pd.read_csv(run_dir / "folds.csv", dtype={"StudyInstanceUID": str})
    train_df, val_df = slice_pools(index, folds, fold)
    val_df = validation_subset(val_df, s.val_max_slices, s.seed)
    if train_df.empty or val_df.empty:
        raise RuntimeError(f"fold {fold}: {len(train_df)} training and {len(val_df)} validation slices with labels; "
                           "more studies with boxes (or negatives) are needed")
    size = s.input_size or cfg.prepare.size
    with_boxes = s.box_weight > 0
    train_set = SliceDataset(run_dir / "cache", train_df, build_transforms(s, True, size, seed=s.seed),
                             with_boxes, context=s.context)
    val_set = SliceDataset(run_dir / "cache", val_df, build_transforms(s, False, size), context=s.context)
    n_studies = train_df["StudyInstanceUID"].nunique()
    if with_boxes and len(train_set.boxes) < n_studies and rt.is_main:
        log.warning("fold %d: %d of %d training studies were cached without boxes (a cache from before cspine "
                    "cached them), so the box head learns nothing from them: delete %s and run prepare again",
                    fold, n_studies - len(train_set.boxes), n_studies, run_dir / "cache")
    labels = train_df["label"].to_numpy() if s.balance else None
    total = s.steps_per_epoch * s.batch_size * s.accum_steps * rt.world_size if s.steps_per_epoch else None
    matched = height_matched_weights(train_df) if s.balance and s.height_matched > 0 else None
    sampler = BalancedDistributedSampler(train_set, labels, total, rt.world_size, rt.rank, seed=s.seed + fold,
                                         positive_fraction=s.positive_fraction, negative_weights=matched,
                                         matched_fraction=s.height_matched)
    train_loader = _loader(train_set, s.batch_size, s.workers, sampler=sampler, pin=rt.cuda)
    val_loader = _loader(val_set, s.batch_size * 2, s.workers, pin=rt.cuda)

    model = SliceNet(s.backbone, s.pretrained_file, s.dropout, box_head=with_boxes, context=s.context,
                     width=s.width)
    model = model.to(rt.device)
    channels_last = s.channels_last and rt.cuda
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = None
    if s.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=s.ema_decay)  # before DDP wraps the model
    net = DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.cuda else None) if rt.distributed else model
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    updates_per_epoch = math.ceil(len(train_loader) / s.accum_steps)
    scheduler = learning_rate_schedule(optimizer, s, updates_per_epoch)
    dtype = amp_dtype(rt.device, s.amp)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=dtype == torch.float16)

    start_epoch, best_loss, bad_epochs, history = 0, math.inf, 0, []
    last_path, best_path = out / "last.pt", out / "best.pt"
    if last_path.is_file():
        state = torch.load(last_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])  # the rate is a function of the step: set below
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, best_loss, bad_epochs = state["epoch"] + 1, state["best_loss"], state["bad_epochs"]
        history = state["history"]
        set_rng_state(state["rng"])
        log.info("fold %d: resumed after epoch %d (best validation loss %.4f)", fold, state["epoch"], best_loss)
    if rt.is_main:
        log.info("fold %d: %d training slices (%d positive), %d validation slices; %s on %s, %d×%d, AMP %s",
                 fold, len(train_df), int((train_df["label"] == 1).sum()), len(val_df),
                 s.backbone if s.width == 1 else f"{s.backbone} at width {s.width:g}", rt.device, size, size,
                 dtype or "off")

    steps_done, stopped = 0, early_stopping and bad_epochs >= s.patience
    scheduler.step(start_epoch)  # a per-epoch schedule moves here, a per-update one on the next line
    scheduler.step_update(start_epoch * updates_per_epoch)
    for epoch in range(start_epoch, s.epochs):
        if stopped or (max_epochs is not None and epoch - start_epoch >= max_epochs):
            break
        sampler.set_epoch(epoch)
        train_loader.generator.manual_seed(s.seed * 100003 + fold * 1009 + epoch)  # worker augmentation seeds
        train_set.transform.set_random_seed(s.seed * 100003 + fold * 1009 + epoch)  # in-process augmentation
        net.train()
        started, seen, updates = time.perf_counter(), 0, epoch * updates_per_epoch
        lr = optimizer.param_groups[0]["lr"]  # history's lr: the rate of the epoch's last update
        loss_sum = torch.zeros((), device=rt.device)  # summed on the device: no host sync per step
        progress = tqdm(train_loader, desc=f"fold {fold} epoch {epoch + 1}/{s.epochs}", leave=False,
                        disable=not rt.is_main)
        optimizer.zero_grad(set_to_none=True)
        for step, (images, target, known, *boxes) in enumerate(progress):
            images = images.to(rt.device, non_blocking=True)
            target, known = target.to(rt.device, non_blocking=True), known.to(rt.device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            update = (step + 1) % s.accum_steps == 0 or step + 1 == len(train_loader)
            sync = nullcontext() if update or not rt.distributed else net.no_sync()
            with sync:
                with autocast(rt.device, dtype):
                    if with_boxes:
                        logits, box_logits = net(images, with_boxes=True)
                    else:
                        logits = net(images)
                loss = slice_loss(logits, target, known, s.aux_weight)
                if with_boxes:
                    loss = loss + s.box_weight * box_loss(box_logits, boxes[0].to(rt.device, non_blocking=True))
                scaler.scale(loss / s.accum_steps).backward()
            if update:
                if s.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
                steps_done, updates, lr = steps_done + 1, updates + 1, optimizer.param_groups[0]["lr"]
                scheduler.step_update(updates)
            loss_sum += loss.detach() * len(images)
            seen += len(images)
            if step % PROGRESS_EVERY == 0:
                progress.set_postfix(loss=f"{loss_sum.item() / seen:.4f}")
            if max_steps is not None and steps_done >= max_steps:
                break
        scheduler.step(epoch + 1)
        train_loss = loss_sum.item() / max(seen, 1)
        train_time = time.perf_counter() - started

        stop = [False]
        if rt.is_main:
            eval_model = ema.module if ema is not None else model
            probs, targets, known = predict_loader(eval_model, val_loader, rt, dtype, channels_last)
            val_loss = float(slice_loss(torch.logit(torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6)),
                                        torch.from_numpy(targets), torch.from_numpy(known), s.aux_weight))
            report = paper_reports(targets[:, 0], probs[:, 0])
            row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                   "val_auc": report["Imblcd."]["AUC"], "lr": lr,
                   "images_per_s": seen * rt.world_size / train_time}
            history.append(row)
            improved = val_loss < best_loss
            if improved:
                best_loss, bad_epochs = val_loss, 0
            else:
                bad_epochs += 1
            if improved or not early_stopping:
                arch = {"backbone": s.backbone, "dropout": s.dropout, "box_head": with_boxes,
                        "context": s.context, "width": s.width}
                _save_atomically({"model": (ema.module if ema is not None else model).state_dict(), "arch": arch,
                                  "epoch": epoch + 1, "val_loss": val_loss, "fold": fold,
                                  "config": config_dict(cfg)}, best_path)
                _write_validation(out, val_df, probs, report, fold)
            log.info("fold %d epoch %d: train loss %.4f, val loss %.4f, val AUC %.3f, %.1f img/s%s", fold,
                     epoch + 1, row["train_loss"], val_loss, row["val_auc"], row["images_per_s"],
                     " (best)" if improved else "")
            pd.DataFrame(history).to_csv(out / "history.csv", index=False)
            _save_atomically({"model": model.state_dict(),
                              "ema": ema.state_dict() if ema is not None else None,
                              "optimizer": optimizer.state_dict(),
                              "scaler": scaler.state_dict(), "epoch": epoch, "best_loss": best_loss,
                              "bad_epochs": bad_epochs, "history": history, "rng": rng_state()}, last_path)
            stop = [early_stopping and bad_epochs >= s.patience]
            if stop[0]:
                log.info("fold %d: early stopping after epoch %d (no improvement in %d epochs)", fold, epoch + 1,
                         s.patience)
        if rt.distributed:
            dist.broadcast_object_list(stop, src=0)
        stopped = stop[0]
        if max_steps is not None and steps_done >= max_steps:
            break
    finished = stopped or len(history) >= s.epochs  # history holds every epoch trained, resumed ones too
    if finished and rt.is_main:
        (out / "done").write_text(json.dumps({"best_loss": best_loss, "epochs": len(history)}))
    return {"fold": fold, "dir": str(out), "epochs": len(history), "best_val_loss": best_loss,
            "finished": finished, "steps": steps_done}


def _save_atomically(state: dict, path: Path) -> None:
    """torch.save through a temporary file, so a crash never leaves half a checkpoint at ``path``."""
    tmp = path.with_name(path.name + ".part")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _write_validation(out: Path, val_df: pd.DataFrame, probs: np.ndarray, report: dict, fold: int) -> None:
    """Out-of-fold slice predictions and the image-level report (Table 2's form) of the epoch in best.pt."""
    oof = val_df[["StudyInstanceUID", "order", "slice_number", "label"]].copy()
    for i, name in enumerate(SLICE_OUTPUTS):
        oof[f"p_{name}"] = probs[:, i]
    oof.to_csv(out / "oof_slices.csv", index=False)
    rows = [{"Data": data, **metrics} for data, metrics in report.items()]
    write_table(cv_table(rows, row_keys=("Data",)), out / "table2", title=f"Image level, fold {fold} (validation)")
    (out / "report.json").write_text(json.dumps(report, indent=2))


def is_trained(run_dir: str | os.PathLike, fold: int) -> bool:
    """Whether a fold finished training (early stop or last epoch) and has its best checkpoint."""
    out = fold_dir(run_dir, fold)
    return (out / "done").is_file() and (out / "best.pt").is_file()
