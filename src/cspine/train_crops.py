"""Stage `train-crops`: the crop track's models, one per fold, on every study's own C1..C7 labels.

    python -m cspine train-crops --config bench fold=0

Fold k's `cspine.models.CropNet` trains on the crops (`cspine.crop`) of every study outside fold k, each
of its seven vertebrae one example labelled by train.csv (so every study teaches, boxed or not), and then
scores fold k's studies: out of fold, for the level-2 blend and the report. The loss is the competition's
for a vertebra (binary cross-entropy, a fracture weighted 2, a healthy vertebra 1). Augmentation
(albumentations): mirror and a small affine, the same for every slice and channel of a crop. AMP (bf16 at
compute capability 8 and above, fp16 with a scaler below), channels_last and pinned memory on a GPU;
under torchrun, DistributedDataParallel with each rank drawing its own share of the vertebrae.

Writes ``<run>/crop/fold<k>/``: ``last.pt`` after every epoch (a killed stage resumes from it), then
``model.pt``, ``history.json``, ``oof.csv`` and ``record.json`` (last: the fold is done; settings or crops
changed since make it train again).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cspine import TARGETS, VERTEBRAE
from cspine.checkpoints import CropMeta, save_model
from cspine.config import Config, CropConfig
from cspine.crops import CropSpec, crop_channels, read_crop_store
from cspine.data import seed_worker
from cspine.inputs import combine
from cspine.metrics import NEGATIVE_WEIGHT, POSITIVE_WEIGHT, oof_table, weighted_log_loss
from cspine.models import CropNet, crop_probabilities
from cspine.progress import progress
from cspine.runs import Run, digest, read_json, write_csv, write_json
from cspine.runtime import (
    Runtime,
    autocast,
    init_distributed,
    seed_everything,
)
from cspine.training import distributed, mixed_precision, read_resume, restore, save_resume, update

log = logging.getLogger(__name__)
RUNTIME = ("workers", "loader_workers")  # crop settings that shape no model


class VertebraCrops(Dataset):
    """Every (study, vertebra) of ``uids`` as one example: its crop uint8 [slices, channels, size, size],
    the vertebra's index, and its label."""

    def __init__(self, run: Run, uids: list[str], labels: np.ndarray, augment: bool):
        self.run, self.uids, self.labels = run, uids, labels
        self.transform = (
            A.Compose(
                [
                    A.HorizontalFlip(p=0.5),
                    A.Affine(scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), rotate=(-10, 10), p=0.7),
                ]
            )
            if augment
            else None
        )

    def __len__(self) -> int:
        return len(self.uids) * len(VERTEBRAE)

    def __getitem__(self, i: int):
        study, vertebra = divmod(i, len(VERTEBRAE))
        crop = read_crop_store(self.run.crop_study(self.uids[study]), vertebra)
        if self.transform is not None:
            n, c, h, w = crop.shape
            image = np.ascontiguousarray(crop.reshape(n * c, h, w).transpose(1, 2, 0))
            crop = self.transform(image=image)["image"].transpose(2, 0, 1).reshape(n, c, h, w)
        return (
            torch.from_numpy(np.ascontiguousarray(crop)),
            vertebra,
            np.float32(self.labels[study, vertebra]),
        )


def crop_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The metric's loss on vertebrae: binary cross-entropy with the metric's weights (a fracture 2, a healthy
    vertebra 1)."""
    weight = NEGATIVE_WEIGHT["C1"] + (POSITIVE_WEIGHT["C1"] - NEGATIVE_WEIGHT["C1"]) * y
    return F.binary_cross_entropy_with_logits(logits.float(), y, weight=weight)


def _spec(run: Run) -> CropSpec:
    return CropSpec(**read_json(run.crop_record)["spec"])


def _record(run: Run, cfg: Config, fold: int) -> dict:
    """What fold ``fold``'s model was made from: the crops, the folds, the settings."""
    return {
        "crops": digest(run.crop_places),
        "folds": digest(run.folds),
        "fold": fold,
        # every crop setting but those of how fast it runs
        "crop": {k: v for k, v in dataclasses.asdict(cfg.crop).items() if k not in RUNTIME},
    }


def is_crop_trained(cfg: Config, run_dir: str | os.PathLike, fold: int) -> bool:
    """Whether fold ``fold``'s crop model and out-of-fold table exist, made from the current crops and settings."""
    run = Run(run_dir)
    record = run.crop_file(fold, "record.json")
    return (
        record.is_file()
        and run.crop_model(fold).is_file()
        and run.crop_places.is_file()
        and read_json(record) == _record(run, cfg, fold)
    )


def _studies(run: Run, fold: int) -> tuple[list[str], list[str]]:
    """(training, held-out) studies of fold ``fold`` that have crops."""
    folds = run.read_folds()
    have = {u for u in folds["StudyInstanceUID"] if run.crop_study(u).is_file()}
    train = [u for u in folds.loc[folds["fold"] != fold, "StudyInstanceUID"] if u in have]
    held = [u for u in folds.loc[folds["fold"] == fold, "StudyInstanceUID"] if u in have]
    return train, held


def _loader(data: Dataset, c: CropConfig, rt: Runtime, seed: int) -> DataLoader:
    sampler = (
        DistributedSampler(data, rt.world_size, rt.rank, shuffle=True, seed=seed) if rt.distributed else None
    )
    generator = torch.Generator().manual_seed(seed)
    workers = c.loader_workers
    return DataLoader(
        data,
        batch_size=c.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=workers,
        worker_init_fn=seed_worker if workers else None,
        pin_memory=rt.cuda,
        drop_last=len(data) > c.batch_size,
    )


@dataclass
class CropTraining:
    """One fold's crop model in training: built by `_setup`, advanced by `_train_epoch`."""

    model: CropNet
    net: torch.nn.Module  # the model, wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None
    channels_last: bool
    history: list[dict]
    start: int  # the next epoch to train


def _setup(c: CropConfig, spec: CropSpec, rt: Runtime, last: Path, record: dict, fold: int) -> CropTraining:
    """The model, optimizer, schedule and scaler of a fold, resumed from ``last`` when it was saved with this
    ``record`` (the same settings and crops)."""
    model = CropNet(c.backbone, crop_channels(spec), c.hidden, c.width, c.pretrained_file).to(rt.device)
    channels_last = rt.cuda and c.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=c.epochs, warmup_epochs=1, warmup_lr=c.lr / 10
    )
    dtype, scaler = mixed_precision(rt.device, c.amp)
    history, start = [], 0
    state = read_resume(last, "crop-resume")
    if state is not None and state["record"] == record:
        restore(state, model, optimizer, scaler)
        history, start = state["history"], state["epoch"] + 1
        log.info("train-crops fold %d: resumed after epoch %d", fold, start)  # 1-based
    return CropTraining(
        model, distributed(model, rt), optimizer, scheduler, scaler, dtype, channels_last, history, start
    )


def _train_epoch(
    t: CropTraining, loader: DataLoader, c: CropConfig, rt: Runtime, fold: int, epoch: int
) -> dict:
    """One epoch of updates; returns its history row."""
    t.scheduler.step(epoch)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    # each epoch's shuffling and augmentation from its own seed: a resumed fold draws what it had left
    loader.generator.manual_seed(c.seed * 100003 + fold * 1009 + epoch)
    loader.dataset.transform.set_random_seed(c.seed * 100003 + fold * 1009 + epoch)
    t.net.train()
    started, total, seen = time.perf_counter(), torch.zeros((), device=rt.device), 0
    steps = c.steps_per_epoch or len(loader)
    for x, vertebra, y in progress(
        islice(loader, steps),
        f"crops fold {fold} epoch {epoch + 1}",
        steps=True,
        enabled=rt.is_main,
        total=min(steps, len(loader)),
    ):
        x, vertebra, y = (v.to(rt.device, non_blocking=True) for v in (x, vertebra, y))
        with autocast(rt.device, t.dtype):
            loss = crop_loss(t.net(x, vertebra, t.channels_last), y)
        update(loss, t.optimizer, t.scaler)
        total, seen = total + loss.detach() * len(y), seen + len(y)  # read once an epoch: no sync a step
    return {
        "epoch": epoch + 1,
        "train_loss": total.item() / max(seen, 1),
        "vertebrae": seen,
        "lr": t.optimizer.param_groups[0]["lr"],
        "seconds": time.perf_counter() - started,
    }


def _score(run: Run, t: CropTraining, held: list[str], rt: Runtime) -> np.ndarray:
    """float [S, 8]: the fold's model on its held-out studies, 16 at a time (bounded memory); patient_overall
    as 1 − Π(1 − p_k)."""
    t.model.eval()
    p = np.concatenate(
        [
            crop_probabilities(
                t.model,
                np.stack([read_crop_store(run.crop_study(u)) for u in part]),
                rt.device,
                t.dtype,
                t.channels_last,
            )
            for part in (held[i : i + 16] for i in range(0, len(held), 16))
        ]
    )
    return combine(p)


def train_crop_fold(
    cfg: Config, run_dir: str | os.PathLike, fold: int, rt: Runtime | None = None
) -> pd.DataFrame | None:
    """Trains (or resumes) fold ``fold``'s crop model and scores its held-out studies; returns the
    out-of-fold table (TARGETS columns; patient_overall = 1 − Π(1 − p_k)) on rank 0, None on the others."""
    rt = rt or init_distributed(cfg.device)
    run, c = Run(run_dir), cfg.crop
    spec = _spec(run)
    train, held = _studies(run, fold)
    if not train or not held:
        raise RuntimeError(
            f"train-crops fold {fold}: {len(train)} training and {len(held)} held-out studies have "
            "crops; run the crop stage"
        )
    labels = run.read_labels()
    seed_everything(c.seed + fold)
    record = _record(run, cfg, fold)
    t = _setup(c, spec, rt, run.crop_last(fold), record, fold)
    data = VertebraCrops(run, train, labels.loc[train, list(VERTEBRAE)].to_numpy(np.float32), augment=True)
    loader = _loader(data, c, rt, c.seed + fold)
    for epoch in range(t.start, c.epochs):
        t.history.append(_train_epoch(t, loader, c, rt, fold, epoch))
        if rt.is_main:
            log.info(
                "train-crops fold %d epoch %d/%d: loss %.4f (%.0f s)",
                fold,
                epoch + 1,
                c.epochs,
                t.history[-1]["train_loss"],
                t.history[-1]["seconds"],
            )
            save_resume(
                run.crop_last(fold),
                "crop-resume",
                t.model,
                t.optimizer,
                t.scaler,
                epoch,
                t.history,
                record=record,
            )
    if rt.distributed:
        dist.barrier()
    if not rt.is_main:
        return None
    t.model.eval()
    save_model(t.model, run.crop_model(fold), CropMeta(spec, fold, list(train)))
    probs = _score(run, t, held, rt)
    oof = oof_table(held, fold, probs)
    write_csv(oof, run.crop_file(fold, "oof.csv"))
    write_json(t.history, run.crop_file(fold, "history.json"))
    write_json(record, run.crop_file(fold, "record.json"))  # last: the fold counts as trained
    run.crop_last(fold).unlink(missing_ok=True)
    log.info(
        "train-crops fold %d: %d studies scored out of fold, loss %.4f (patient_overall as 1 − Π(1 − p))",
        fold,
        len(held),
        weighted_log_loss(labels.loc[held, list(TARGETS)].to_numpy(), probs),
    )
    return oof
